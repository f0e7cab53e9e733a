"""Benchmarks (`make bench`): each compares the agent with the direct tool or
the physical limit measured in the same run, medians of several runs."""
