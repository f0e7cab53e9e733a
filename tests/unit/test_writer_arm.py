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
