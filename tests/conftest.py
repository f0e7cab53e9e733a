"""Shared pytest policy for every tier.

Tests marked `root` need root and real storage tools. Outside CI a missing
prerequisite skips them with the reason; under CI=true it is an error, and a
run that skipped anything fails: CI must prove every tier, not skip it.
"""

from __future__ import annotations

import os
import shutil

import pytest

pytest_plugins = ["tests.agentfixtures"]

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def missing(reason: str) -> None:
    """Skip the calling test, or fail it under CI."""
    if IN_CI:
        pytest.fail(f"prerequisite missing under CI: {reason}", pytrace=False)
    pytest.skip(reason)


def require_tools(*tools: str) -> None:
    for tool in tools:
        if shutil.which(tool) is None:
            missing(f"{tool} not found (make deps-test installs it)")


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("root") is not None and os.geteuid() != 0:
        missing("needs root")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not IN_CI:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = len(reporter.stats.get("skipped", [])) if reporter else 0
    if skipped and session.exitstatus == 0:
        session.exitstatus = 1
        if reporter:
            reporter.write_line(f"CI: {skipped} test(s) skipped; under CI=true that is a failure",
                                red=True)
