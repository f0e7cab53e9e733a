"""The local lease backend between two processes on real file systems (ext4
and xfs on loop devices, 512 and 4096 byte sectors): a holder process and
this test process contend for a file domain's host ids and leases."""

from __future__ import annotations

import asyncio
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from storage.errors import AcquireHostIdFailure, AcquireLockFailure
from storage.leases import (
    FileDomainLeases,
    Geometry,
    LeaseManager,
    LocalBackend,
    create_lease_file,
)
from storage.leases.layout import MiB
from tests.integration.storagefixtures import FsMount

pytestmark = pytest.mark.root

ROOT = Path(__file__).resolve().parents[2]
SD = "5d0c1b6e-2a8f-4e3b-9c7d-1e2f3a4b5c6d"
IMG = "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d"
VOL = "1b2c3d4e-5f6a-4b7c-8d9e-0f1a2b3c4d5e"

# The other process: joins with a host id, takes one lease, says HELD, and
# lets go when told (or is killed).
HOLDER = """
import asyncio, sys
from pathlib import Path
from storage.leases import FileDomainLeases, LeaseManager, LocalBackend

async def main(root, sd, host_id, which):
    areas = FileDomainLeases(sd, Path(root))
    m = LeaseManager({"local": LocalBackend()})
    await m.add_lockspace(areas.lockspace(), int(host_id), "local", io_timeout=5)
    res = areas.domain_resource() if which == "domain" else areas.volume_resource(*which.split("/"))
    async with m.acquire(res):
        print("HELD", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    await m.close()
    print("RELEASED", flush=True)

asyncio.run(main(*sys.argv[1:]))
"""


class Holder:
    def __init__(self, root: Path, host_id: int, which: str = "domain") -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(root), SD, str(host_id), which],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, cwd=ROOT)

    def expect(self, word: str, timeout: float = 30) -> None:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if line.strip() != word:
            self.proc.kill()
            _, err = self.proc.communicate()
            raise AssertionError(f"holder said {line!r}, wanted {word}; stderr:\n{err}")

    def release(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        self.expect("RELEASED")
        assert self.proc.wait(10) == 0

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture(params=[("ext4", 512), ("xfs", 4096)], ids=["ext4-512", "xfs-4096"])
def domain(request: pytest.FixtureRequest,
           make_fs_mount: Callable[..., FsMount]) -> FileDomainLeases:
    """A file domain's lease areas laid out as filedomain.py makes them."""
    fstype, sector = request.param
    fs = make_fs_mount(fstype, sector)
    root = fs.path / SD
    (root / "dom_md").mkdir(parents=True)
    (root / "images" / IMG).mkdir(parents=True)
    geometry = Geometry.for_sector(sector)
    for name in ("ids", "leases"):
        with open(root / "dom_md" / name, "wb") as f:
            f.truncate(MiB)
    create_lease_file(root / "images" / IMG / f"{VOL}.lease", geometry)
    return FileDomainLeases(SD, root, geometry)


@pytest.fixture
def holders() -> Iterator[list[Holder]]:
    made: list[Holder] = []
    try:
        yield made
    finally:
        for holder in made:
            holder.kill()


def manager() -> LeaseManager:
    return LeaseManager({"local": LocalBackend()}, retry_interval=0.1)


async def test_two_processes(domain: FileDomainLeases, holders: list[Holder]) -> None:
    holder = Holder(domain.root, 1)
    holders.append(holder)
    holder.expect("HELD")

    m = manager()
    # the holder's host id is taken
    with pytest.raises(AcquireHostIdFailure) as e:
        await m.add_lockspace(domain.lockspace(), 1, "local")
    assert e.value.code == 661
    await m.add_lockspace(domain.lockspace(), 2, "local")
    # its lease too: 651, also after retrying a while
    with pytest.raises(AcquireLockFailure) as e2:
        async with m.acquire(domain.domain_resource(), timeout=0.5):
            pass
    assert e2.value.code == 651
    # another lease of the domain is free
    async with m.acquire(domain.volume_resource(IMG, VOL)):
        pass

    holder.release()
    async with m.acquire(domain.domain_resource()):
        # now the other way round: a new holder cannot have it
        waiter = Holder(domain.root, 3)
        holders.append(waiter)
        await asyncio.sleep(0)
        assert waiter.proc.wait(30) != 0
        assert waiter.proc.stderr is not None
        # LeaseHeld: the AcquireLockFailure (651) of a lease another holder has
        assert "LeaseHeld" in waiter.proc.stderr.read()
    await m.close()


async def test_killed_holder_frees_its_leases(domain: FileDomainLeases,
                                              holders: list[Holder]) -> None:
    holder = Holder(domain.root, 1, f"{IMG}/{VOL}")
    holders.append(holder)
    holder.expect("HELD")
    m = manager()
    await m.add_lockspace(domain.lockspace(), 2, "local")
    res = domain.volume_resource(IMG, VOL)
    with pytest.raises(AcquireLockFailure):
        async with m.acquire(res):
            pass

    os.kill(holder.proc.pid, signal.SIGKILL)
    holder.proc.wait(10)
    start = time.monotonic()
    async with m.acquire(res, timeout=5):
        elapsed = time.monotonic() - start
    assert elapsed < 1.0        # freed by the kernel with the process, no expiry
    # and its host id
    await m.rem_lockspace(SD)
    await m.add_lockspace(domain.lockspace(), 1, "local")
    await m.close()
