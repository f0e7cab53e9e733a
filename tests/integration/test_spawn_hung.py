"""Long-running children start off the event loop: a file of this process open on
FUSE storage that hangs makes every fork wait (the child closes it before exec, and
that close does not return), so a child started from the loop stops the whole agent.
The lock holder is started through commands.start, like every command."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from storage.leases.lockholder import LockHolder
from tests.integration.hangfs import HangFs, build

pytestmark = [pytest.mark.root, pytest.mark.timeout(60)]

# The loop must answer within this while the start waits on the hung storage
# (a loaded 2-CPU host: generous). The storage is let go after FAILSAFE
# seconds whatever happens, by another process: a start from the loop froze
# this whole process (no thread, not even pytest-timeout's alarm ran until
# the storage answered), so the test fails instead of hanging.
LOOP_BOUND = 3.0
FAILSAFE = 10.0


@pytest.fixture
def hangfs(tmp_path: Path) -> Iterator[HangFs]:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fs = HangFs(tmp_path, build(bindir))
    try:
        yield fs.start()
    finally:
        fs.stop()


async def test_lock_holder_starts_off_the_loop(hangfs: HangFs, tmp_path: Path) -> None:
    target = tmp_path / "ids"
    target.write_bytes(b"\0" * 512)
    # a file of the agent open on the storage, as a domain's ids file would be
    fd = os.open(hangfs.mountpoint / "open-file", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC)
    assert hangfs.proc is not None
    holder = LockHolder()
    failsafe: subprocess.Popen[bytes] | None = None
    try:
        # started before the hang: once it hangs, no fork of this process returns
        failsafe = subprocess.Popen(["sh", "-c", f'sleep {FAILSAFE}; kill -USR2 "$0"',
                                     str(hangfs.proc.pid)])
        hangfs.hang()
        began = time.monotonic()
        call = asyncio.create_task(holder.call("visible", FAILSAFE * 2, path=str(target),
                                               offset=0))
        done, _ = await asyncio.wait({call}, timeout=0.5)
        waited = time.monotonic() - began
        # the start is stuck in its spawner thread; the loop is not
        assert not done, "the helper started although the storage hangs"
        assert waited < LOOP_BOUND, f"the event loop was blocked {waited:.1f} s"
        hangfs.release()
        assert (await call) == {"id": 1, "visible": False}
    finally:
        if failsafe is not None:
            failsafe.kill()
            failsafe.wait()
        hangfs.release()
        os.close(fd)
        await holder.close()
