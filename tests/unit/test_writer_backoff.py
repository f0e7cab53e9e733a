"""The watch's retries of a failing extension (a full VG): a delay that
doubles up to a cap, only the first failure of a run told (notification,
metric), and space freed on this host waking the retry at once, also when
it was freed while the failing lvextend ran."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import pytest

from storage.domains.writers import Backoff, WriterWatch
from storage.errors import NoSpaceLeftOnDomain
from storage.thin import ThinPolicy

MiB = 1 << 20


def test_backoff_doubles_up_to_its_cap() -> None:
    b = Backoff(first=1.0, cap=8.0)
    assert [b.delay(n) for n in range(1, 7)] == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    # no overflow after days of a full VG
    assert b.delay(10**6) == 8.0


class FullVG:
    """extend() failing `failures` times (the VG full), then growing; what
    each call was asked and whether it would tell its failure."""

    def __init__(self, failures: int, on_fail: Callable[[], None] | None = None) -> None:
        self.failures = failures
        self.reports: list[bool] = []
        self.on_fail = on_fail

    async def extend(self, min_size: int, *, report: bool = True) -> int:
        self.reports.append(report)
        if len(self.reports) <= self.failures:
            if self.on_fail is not None:
                self.on_fail()
            raise NoSpaceLeftOnDomain(sdUUID="sd", volUUID="vol", needed=min_size)
        return min_size


def watch(vg: FullVG, backoff: Backoff) -> WriterWatch:
    async def current() -> int:
        return 64 * MiB
    return WriterWatch("sd/img/vol", "/nonexistent/qmp.sock", "file0", ThinPolicy(),
                       current=current, extend=vg.extend, backoff=backoff)


async def test_only_the_first_failure_is_told(caplog: pytest.LogCaptureFixture) -> None:
    vg = FullVG(failures=4)
    w = watch(vg, Backoff(first=0.001, cap=0.004))
    with caplog.at_level(logging.INFO, logger="storage.writers"):
        await asyncio.wait_for(w._extend_retrying(128 * MiB), 10)
    assert w.size == 128 * MiB
    assert vg.reports == [True, False, False, False, False]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings
    assert "extending to 134217728 failed" in warnings[0]
    assert "extended to 134217728 after 4 failures" in warnings[1]


async def test_space_freed_wakes_the_retry_at_once() -> None:
    """A delay of an hour: only the wake can end each wait within the
    test's deadline."""
    failed = asyncio.Queue[None]()
    vg = FullVG(failures=2, on_fail=lambda: failed.put_nowait(None))
    w = watch(vg, Backoff(first=3600, cap=3600))
    task = asyncio.create_task(w._extend_retrying(128 * MiB))
    for _ in range(2):
        await asyncio.wait_for(failed.get(), 5)
        assert not task.done()
        w.wake()
    await asyncio.wait_for(task, 5)
    assert vg.reports == [True, False, False] and w.size == 128 * MiB


async def test_space_freed_during_the_failing_attempt_is_not_lost() -> None:
    """Space freed while the lvextend that fails runs (it saw the VG full):
    the retry comes at once, not after the backoff."""
    w: WriterWatch
    vg = FullVG(failures=1, on_fail=lambda: w.wake())
    w = watch(vg, Backoff(first=3600, cap=3600))
    await asyncio.wait_for(w._extend_retrying(128 * MiB), 5)
    assert vg.reports == [True, False] and w.size == 128 * MiB
