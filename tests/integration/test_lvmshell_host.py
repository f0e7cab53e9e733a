"""The running `lvm` shell (storage.lvmshell) with real LVM on a loop
device, host tier (metadata only): an urgent lvextend runs in the shell (a
create in another, of the agent's own priority) and does what a spawned one
does, a failure is the same typed error, a second
urgent command while the shell is busy is spawned, and the shell is started
again after it was killed."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable

import pytest

from storage import lvmshell
from storage.lvm import LVMNotFound
from tests.integration.test_lvm_host import host_lvm, lvm_device, make_vg, name

pytestmark = pytest.mark.root
__all__ = ["lvm_device"]

MiB = 1 << 20


@pytest.fixture
async def shell_on() -> AsyncIterator[None]:
    if not lvmshell.Shell().usable:
        pytest.fail(f"no {lvmshell.PROFILE_DIR}/{lvmshell.PROFILE}.profile (package lvm2)")
    lvmshell.set_enabled(True)
    try:
        yield
    finally:
        await lvmshell.close()
        lvmshell.set_enabled(False)


def in_shell(caplog: pytest.LogCaptureFixture, op: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if f"lvm {op} " in r.getMessage() and "in the lvm shell" in r.getMessage()]


async def test_urgent_lvextend_runs_in_the_shell(
        shell_on: None, lvm_device: Callable[..., str],
        caplog: pytest.LogCaptureFixture) -> None:
    device = lvm_device(sector_size=4096)
    mgr = host_lvm(device)
    vg = name("vg")
    await make_vg(mgr, device, vg)
    with caplog.at_level(logging.DEBUG, logger="storage.commands"):
        # a create runs in the other shell (of the agent's own priority)
        await mgr.lvcreate(vg, "lv1", 8 * MiB, activate=False)
        assert len(in_shell(caplog, "lvcreate")) == 1
        assert not lvmshell._SHELLS[False].urgent
        await mgr.lvextend(vg, "lv1", 16 * MiB)
        assert True in lvmshell._SHELLS
        pid = lvmshell._SHELLS[True].pid
        await mgr.lvextend(vg, "lv1", 24 * MiB)
        # asking the size it has is no error, as with a spawned lvextend
        await mgr.lvextend(vg, "lv1", 24 * MiB)
        assert len(in_shell(caplog, "lvextend")) == 3
        assert lvmshell._SHELLS[True].pid == pid
    mgr.invalidate(vg)
    assert {lv.name: lv.size for lv in await mgr.lvs(vg)}["lv1"] == 24 * MiB

    # a failure: the same typed error, with LVM's message
    with pytest.raises(LVMNotFound) as e:
        await mgr.lvextend(vg, "nosuch", 24 * MiB)
    assert "nosuch" in str(e.value)
    with pytest.raises(Exception, match=r"not larger|smaller|reduce|Use lvreduce"):
        await mgr.lvextend(vg, "lv1", 8 * MiB)

    # busy: another VG's urgent command is spawned (one VG's changes run one
    # after the other anyway), both do their work
    device2 = lvm_device(sector_size=512)
    mgr2 = host_lvm(device2)
    vg2 = name("vg")
    await make_vg(mgr2, device2, vg2)
    await mgr2.lvcreate(vg2, "lv2", 8 * MiB, activate=False)
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="storage.commands"):
        await asyncio.gather(mgr.lvextend(vg, "lv1", 32 * MiB),
                             mgr2.lvextend(vg2, "lv2", 32 * MiB))
    assert len(in_shell(caplog, "lvextend")) == 1
    assert any("lvm lvextend" in r.getMessage() and ": started, pid" in r.getMessage()
               for r in caplog.records)
    mgr.invalidate(vg)
    mgr2.invalidate(vg2)
    assert {lv.name: lv.size for lv in await mgr.lvs(vg)}["lv1"] == 32 * MiB
    assert {lv.name: lv.size for lv in await mgr2.lvs(vg2)}["lv2"] == 32 * MiB

    # killed between commands: the next command starts another shell
    assert lvmshell._SHELLS[True].pid is not None
    pid = lvmshell._SHELLS[True].pid
    os.kill(pid, signal.SIGKILL)
    child = lvmshell._SHELLS[True]._child
    assert child is not None
    await child.wait()
    await mgr.lvextend(vg, "lv1", 40 * MiB)
    assert lvmshell._SHELLS[True].pid not in (None, pid)
    mgr.invalidate(vg)
    assert {lv.name: lv.size for lv in await mgr.lvs(vg)}["lv1"] == 40 * MiB
