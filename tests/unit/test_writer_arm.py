"""The next write threshold is armed while the LV grows (issue 15: a QMP
round trip off each extension's latency): sent before the extension ends,
armed again only when LVM gave another size than asked, and a failed arm
never cuts the extension short."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from storage.domains.writers import WriterWatch
from storage.qmp import QMPError
from storage.thin import ThinPolicy

MiB = 1 << 20
POLICY = ThinPolicy(chunk_size=512 * MiB, watermark_percent=50)


class FakeQMP:
    """Records the thresholds armed, and what the extension had done then."""

    def __init__(self, log: list[str], fail: bool = False) -> None:
        self.log = log
        self.fail = fail

    async def execute(self, command: str, args: dict[str, Any] | None = None) -> Any:
        if command == "block-set-write-threshold":
            assert args is not None
            self.log.append(f"arm {args['write-threshold'] // MiB}")
            if self.fail:
                raise QMPError("GenericError", "the writer went away")
            return {}
        if command == "query-status":
            return {"status": "running", "running": True}
        raise AssertionError(command)


class SlowLVM:
    """An extension that ends only when told to, giving `gives` bytes."""

    def __init__(self, log: list[str], gives: int | None = None) -> None:
        self.log = log
        self.gives = gives
        self.release = asyncio.Event()

    async def extend(self, min_size: int, *, report: bool = True) -> int:
        self.log.append(f"extend {min_size // MiB}")
        await self.release.wait()
        self.log.append("extended")
        return self.gives if self.gives is not None else min_size


async def logged(log: list[str], entry: str) -> None:
    while entry not in log:
        await asyncio.sleep(0)      # (the loop's turn: no time passes)


def watch(lvm: SlowLVM) -> WriterWatch:
    async def current() -> int:
        return 512 * MiB
    w = WriterWatch("sd/img/vol", "/nonexistent/qmp.sock", "fmt0", POLICY,
                    current=current, extend=lvm.extend)
    w.size = 512 * MiB
    return w


async def test_the_next_threshold_is_armed_before_the_extension_ends() -> None:
    log: list[str] = []
    lvm = SlowLVM(log)
    grow = asyncio.create_task(watch(lvm)._grow(FakeQMP(log), 300 * MiB))  # type: ignore[arg-type]
    await asyncio.wait_for(logged(log, "arm 768"), 5)
    assert "extended" not in log
    lvm.release.set()
    await asyncio.wait_for(grow, 5)
    # one arm: at the new size less the margin (1024 - 256 MiB)
    assert log == ["extend 1024", "arm 768", "extended"]


async def test_armed_again_when_lvm_gave_another_size() -> None:
    log: list[str] = []
    lvm = SlowLVM(log, gives=1152 * MiB)     # another host grew it further
    lvm.release.set()
    w = watch(lvm)
    await asyncio.wait_for(w._grow(FakeQMP(log), 300 * MiB), 5)  # type: ignore[arg-type]
    assert w.size == 1152 * MiB
    assert log[-1] == "arm 896" and log.count("arm 768") == 1


async def test_a_failed_arm_is_raised_after_the_extension() -> None:
    log: list[str] = []
    lvm = SlowLVM(log)
    w = watch(lvm)
    grow = asyncio.create_task(w._grow(FakeQMP(log, fail=True), 300 * MiB))  # type: ignore[arg-type]
    await asyncio.wait_for(logged(log, "arm 768"), 5)
    await asyncio.sleep(0)
    assert not grow.done()          # the extension still runs
    lvm.release.set()
    with pytest.raises(QMPError):
        await asyncio.wait_for(grow, 5)
    assert log[-1] == "extended" and w.size == 1024 * MiB


class StatsQMP(FakeQMP):
    """A writer that wrote `highest` bytes: in its stats, and in a threshold
    event for the threshold armed on connecting."""

    def __init__(self, log: list[str], node: str, highest: int) -> None:
        super().__init__(log)
        self.node = node
        self.highest = highest

    async def execute(self, command: str, args: dict[str, Any] | None = None) -> Any:
        if command == "query-blockstats":
            return [{"node-name": self.node, "stats": {"wr_highest_offset": self.highest}}]
        return await super().execute(command, args)


async def test_an_event_already_answered_grows_nothing() -> None:
    """The writer writes past the threshold as the watch connects: the watch
    sees it in the stats and grows, and the threshold event of the same
    writes comes after: the volume grows once, not a chunk more (a CI run
    asked 80 MiB after 64 in tests/integration/test_writer_watch_host.py)."""
    log: list[str] = []
    lvm = SlowLVM(log)
    lvm.release.set()
    w = watch(lvm)
    qmp = StatsQMP(log, w.node, 300 * MiB)
    w.events.put_nowait({"event": "BLOCK_WRITE_THRESHOLD", "data": {
        "node-name": w.node, "write-threshold": 256 * MiB, "amount-exceeded": 44 * MiB}})
    watching = asyncio.create_task(w._watch(qmp))  # type: ignore[arg-type]
    await asyncio.wait_for(logged(log, "extended"), 5)
    # an event of no interest after it: once taken, the watch is done with the first
    w.events.put_nowait({"event": "RESUME", "data": {}})
    await asyncio.wait_for(until_empty(w.events), 5)
    watching.cancel()
    await asyncio.wait([watching])
    assert [e for e in log if e.startswith("extend ")] == ["extend 1024"], log


async def until_empty(q: asyncio.Queue[Any]) -> None:
    while not q.empty():
        await asyncio.sleep(0)      # (the loop's turn: no time passes)
