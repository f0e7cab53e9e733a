"""The hostagent process: configuration, lifecycle, jobs, events, metrics."""

__version__ = "0.1.0"
