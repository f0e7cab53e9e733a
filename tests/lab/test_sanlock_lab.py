"""The sanlock lease backend against the real sanlock daemon, in the lab guest.

Two hosts on one guest: daemon A (the session's `sanlock_daemon`, /run/sanlock)
and daemon B (started here with SANLOCK_RUN_DIR=/run/sanlock-b), each with
its own host id in the same lockspaces; sanlock's disk paxos between them is
the same as between two machines. Areas: a file domain on NFSv4.2 (512-byte
sectors) and a block domain's ids/leases LVs on a loop-backed VG with
4096-byte sectors. Every lockspace uses io_timeout 1 (joining takes ~3 s).
python3-sanlock (not used by the agent) reads the owners on disk as an
independent check.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import ModuleType

import pytest

from storage.errors import AcquireHostIdFailure, AcquireLockFailure, LeaseLost
from storage.leases import (
    BlockDomainLeases,
    FileDomainLeases,
    Geometry,
    LeaseManager,
    Resource,
    SanlockBackend,
    create_lease_file,
    init_domain_areas,
    init_volume_lease,
)
from storage.leases.layout import MiB
from tests.conftest import require_tools
from tests.lab import guestlib as g

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
IO_TIMEOUT = 1
# sanlock 3.8: a host whose delta lease stops is dead 8 io_timeouts + 60 s
# (the watchdog's fire timeout) after its last renewal
HOST_DEAD = 8 * IO_TIMEOUT + 60
B_RUN_DIR = Path("/run/sanlock-b")
IMG = "0c9a8b7d-6e5f-4a3b-9c2d-1e0f2a3b4c5d"
VOL = "5e6f7a8b-9c0d-4e1f-8a2b-3c4d5e6f7a8b"


class SecondSanlock:
    """Daemon B: a second sanlock daemon (another "host") with its own run dir."""

    def __init__(self) -> None:
        self.log_path = g.LOG_DIR / "sanlock-b.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.env = {**os.environ, "SANLOCK_RUN_DIR": str(B_RUN_DIR)}

    @property
    def socket(self) -> str:
        return str(B_RUN_DIR / "sanlock.sock")

    def start(self) -> SecondSanlock:
        B_RUN_DIR.mkdir(parents=True, exist_ok=True)
        g.LOG_DIR.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                ["sanlock", "daemon", "-D", "-w", "0", "-U", "root", "-G", "root"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, env=self.env)
        g.wait_until(lambda: self.alive() and self.status() is not None, "sanlock daemon B", 15)
        return self

    def alive(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError(f"sanlock daemon B exited; log:\n{self.log_path.read_text()}")
        return True

    def status(self) -> str | None:
        proc = subprocess.run(["sanlock", "client", "status"], capture_output=True,
                              text=True, env=self.env, timeout=30)
        return proc.stdout if proc.returncode == 0 else None

    def kill(self) -> None:
        """The host dies: no clean release, its delta lease just stops."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        subprocess.run(["sanlock", "client", "shutdown", "-f", "1"], env=self.env,
                       capture_output=True, timeout=30)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def daemon_b(sanlock_daemon: g.SanlockDaemon) -> Iterator[SecondSanlock]:
    daemon = SecondSanlock().start()
    try:
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture
async def hosts(daemon_b: SecondSanlock, tmp_path: Path
                ) -> AsyncIterator[tuple[LeaseManager, LeaseManager]]:
    """Lease managers of host A (daemon A, host id 1) and host B (daemon B, 2)."""
    a = LeaseManager({"sanlock": SanlockBackend(run_dir=str(tmp_path / "run-a"))},
                     retry_interval=0.5)
    b = LeaseManager({"sanlock": SanlockBackend(socket_path=daemon_b.socket,
                                                run_dir=str(tmp_path / "run-b"))},
                     retry_interval=0.5)
    try:
        yield a, b
    finally:
        try:
            async with asyncio.timeout(60):
                await asyncio.gather(a.close(), b.close())
        except TimeoutError:
            for task in asyncio.all_tasks():
                task.print_stack(file=sys.stdout)
            raise


def owners(sanlock_py: ModuleType, res: Resource) -> list[int]:
    """Host ids owning res on disk, read by python3-sanlock through daemon A."""
    found = sanlock_py.read_resource_owners(
        res.lockspace.encode(), res.name.encode(), [(res.path, res.offset)],
        align=res.geometry.alignment, sector=res.geometry.sector_size)
    return sorted(int(h["host_id"]) for h in found)


async def join_both(a: LeaseManager, b: LeaseManager,
                    areas: FileDomainLeases | BlockDomainLeases) -> None:
    await asyncio.gather(a.add_lockspace(areas.lockspace(), 1, "sanlock", IO_TIMEOUT),
                         b.add_lockspace(areas.lockspace(), 2, "sanlock", IO_TIMEOUT))


# ---- a file domain on NFS ----------------------------------------------------------------

@pytest.fixture
def nfs_domain(nfs_mounts: g.NfsMounts) -> Iterator[FileDomainLeases]:
    sd = str(uuid.uuid4())
    root = nfs_mounts.v42 / sd
    (root / "dom_md").mkdir(parents=True)
    (root / "images" / IMG).mkdir(parents=True)
    for name in ("ids", "leases"):
        with open(root / "dom_md" / name, "wb") as f:
            f.truncate(MiB)
    areas = FileDomainLeases(sd, root, Geometry(512, MiB))
    create_lease_file(areas.volume_lease_path(IMG, VOL), areas.geometry)
    try:
        yield areas
    finally:
        subprocess.run(["rm", "-rf", str(root)], check=False)


async def test_file_domain_on_nfs(hosts: tuple[LeaseManager, LeaseManager],
                                  nfs_domain: FileDomainLeases,
                                  sanlock_py: ModuleType) -> None:
    a, b = hosts
    await init_domain_areas(nfs_domain, "sanlock", IO_TIMEOUT)
    vol = nfs_domain.volume_resource(IMG, VOL)
    await init_volume_lease(vol, "sanlock", IO_TIMEOUT)

    start = time.monotonic()
    await join_both(a, b, nfs_domain)
    join_s = time.monotonic() - start
    assert a.host_id_status(nfs_domain.sd_uuid)["state"] == "joined"
    assert sanlock_py.inq_lockspace(nfs_domain.sd_uuid.encode(), 1,
                                    str(nfs_domain.ids_path), 0) is True
    # host id 1 is A's: a third agent on daemon B cannot have it
    c = LeaseManager({"sanlock": b.backends["sanlock"]})
    with pytest.raises(AcquireHostIdFailure):
        await c.add_lockspace(nfs_domain.lockspace(), 1, "sanlock", IO_TIMEOUT)

    dom = nfs_domain.domain_resource()
    async with a.acquire(dom):
        assert owners(sanlock_py, dom) == [1]
        with pytest.raises(AcquireLockFailure) as e:
            async with b.acquire(dom):
                pass
        assert e.value.code == 651
        # a volume lease is independent of the domain lease
        async with b.acquire(vol):
            assert owners(sanlock_py, vol) == [2]
            assert [h["resource"] for h in b.held()] == [VOL]
    async with b.acquire(dom):
        assert owners(sanlock_py, dom) == [2]
    print(f"\njoin of two hosts in parallel: {join_s:.1f} s")

    await asyncio.gather(a.rem_lockspace(nfs_domain.sd_uuid),
                         b.rem_lockspace(nfs_domain.sd_uuid))
    assert sanlock_py.inq_lockspace(nfs_domain.sd_uuid.encode(), 1,
                                    str(nfs_domain.ids_path), 0) is False


# ---- a block domain's LVs ------------------------------------------------------------------

class LoopVg:
    """A VG named like a block domain on a loop device, with ids and leases LVs."""

    def __init__(self, workdir: Path, sector: int) -> None:
        self.name = str(uuid.uuid4())
        self.image = workdir / f"{self.name}.img"
        self.sector = sector
        self.device = ""

    def create(self) -> LoopVg:
        g.modprobe("loop", "dm-mod")
        self.image.parent.mkdir(parents=True, exist_ok=True)
        with open(self.image, "wb") as f:
            f.truncate(64 * MiB)
        self.device = g.run("losetup", "--find", "--show", "--sector-size", str(self.sector),
                            self.image).strip()
        g.lvm("pvcreate", "-q", self.device)
        g.lvm("vgcreate", "-q", self.name, self.device)
        g.lvm("lvcreate", "-q", "-y", "-L", "4m", "-n", "ids", self.name)
        g.lvm("lvcreate", "-q", "-y", "-L", "8m", "-n", "leases", self.name)
        return self

    def dm_name(self, lv: str) -> str:
        return f"{self.name.replace('-', '--')}-{lv}"

    def destroy(self) -> None:
        steps = g.Cleanup()
        steps.push("remove image", lambda: self.image.unlink(missing_ok=True))
        if self.device:
            steps.push("detach loop", lambda: g.run("losetup", "-d", self.device))
            steps.push("wipe", lambda: g.lvm_wipe(self.device))
        steps.run()


@pytest.fixture
def loop_vg(request: pytest.FixtureRequest) -> Iterator[LoopVg]:
    require_tools("lvm", "losetup", "dmsetup")
    sector = getattr(request, "param", 4096)
    vg = LoopVg(Path("/tmp/lab/leases"), sector).create()
    try:
        yield vg
    finally:
        # sanlock holds the ids LV open while it has the lockspace
        for line in g.run("sanlock", "client", "gets").splitlines():
            if line.startswith("s ") and f"/dev/{vg.name}/" in line:
                g.run_ok("sanlock", "client", "rem_lockspace", "-s", line.split()[1])
        vg.destroy()


HOLDER = """
import asyncio, sys
from storage.leases import BlockDomainLeases, Geometry, LeaseManager, SanlockBackend

async def main(vg, sector, run_dir):
    areas = BlockDomainLeases(vg, Geometry(int(sector), 1 << 20))
    m = LeaseManager({"sanlock": SanlockBackend(run_dir=run_dir)})
    await m.add_lockspace(areas.lockspace(), 1, "sanlock", 1)   # joined already: EEXIST
    async with m.acquire(areas.domain_resource()):
        print("HELD", flush=True)
        await asyncio.sleep(3600)

asyncio.run(main(*sys.argv[1:]))
"""


@pytest.mark.timeout(300)    # waits out a dead host's lease: 70-80 s of it
async def test_block_domain_holders_die(hosts: tuple[LeaseManager, LeaseManager],
                                        loop_vg: LoopVg, daemon_b: SecondSanlock,
                                        sanlock_py: ModuleType, tmp_path: Path) -> None:
    a, b = hosts
    areas = BlockDomainLeases(loop_vg.name, Geometry(loop_vg.sector, MiB))
    await init_domain_areas(areas, "sanlock", IO_TIMEOUT)
    vol = areas.volume_resource(VOL, 3)
    await init_volume_lease(vol, "sanlock", IO_TIMEOUT)
    await join_both(a, b, areas)
    dom = areas.domain_resource()

    # 1. the agent process holding a lease dies: its daemon frees the lease at once
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, loop_vg.name,
                               str(loop_vg.sector), str(tmp_path / "run-holder")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=ROOT)
    try:
        assert holder.stdout is not None
        line = await asyncio.to_thread(holder.stdout.readline)
        assert line.strip() == "HELD", holder.stderr.read() if holder.stderr else ""
        assert owners(sanlock_py, dom) == [1]
        with pytest.raises(AcquireLockFailure):
            async with a.acquire(dom):       # same host, other process
                pass
        with pytest.raises(AcquireLockFailure):
            async with b.acquire(dom):       # other host
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
        for stream in (holder.stdout, holder.stderr):
            if stream is not None:
                stream.close()
    start = time.monotonic()
    async with a.acquire(dom, timeout=10):
        freed_s = time.monotonic() - start
    assert freed_s < 5

    # 2. a host dies holding a lease: the other gets it only when its host id expired
    with pytest.raises(LeaseLost):
        async with b.acquire(vol, cancel_on_lost=False) as lease:
            assert owners(sanlock_py, vol) == [2]
            daemon_b.kill()
            died = time.monotonic()
            await asyncio.wait_for(lease.lost.wait(), 10)   # B's agent sees it too
    refusals = 0
    while True:
        try:
            async with a.acquire(vol, timeout=0):
                taken_s = time.monotonic() - died
            break
        except AcquireLockFailure as e:
            assert e.code == 651
            refusals += 1
            assert time.monotonic() - died < HOST_DEAD + 40, "never expired"
            await asyncio.sleep(2)
    print(f"\nkilled holder's lease free after {freed_s:.2f} s; dead host's lease taken "
          f"after {taken_s:.0f} s ({refusals} refusals)")
    assert refusals > 0
    assert taken_s >= HOST_DEAD - 10


@pytest.mark.parametrize("loop_vg", [512], indirect=True)
async def test_block_domain_storage_fails(hosts: tuple[LeaseManager, LeaseManager],
                                          loop_vg: LoopVg) -> None:
    """The ids LV starts failing I/O: sanlock gives up the lockspace after 8
    io_timeouts and runs our killpath; the work holding the lease is cancelled
    with LeaseLost, the agent lives on and lets go of the lease."""
    a, _ = hosts
    areas = BlockDomainLeases(loop_vg.name, Geometry(512, MiB))
    await init_domain_areas(areas, "sanlock", IO_TIMEOUT)
    await a.add_lockspace(areas.lockspace(), 1, "sanlock", IO_TIMEOUT)
    entered = asyncio.Event()

    async def job() -> None:
        async with a.acquire(areas.domain_resource()):
            entered.set()
            await asyncio.sleep(120)

    task = asyncio.create_task(job())
    await entered.wait()
    ids = loop_vg.dm_name("ids")
    sectors = g.run("blockdev", "--getsz", f"/dev/mapper/{ids}").strip()
    start = time.monotonic()
    g.run("dmsetup", "suspend", ids)
    g.run("dmsetup", "load", ids, "--table", f"0 {sectors} error")
    g.run("dmsetup", "resume", ids)
    with pytest.raises(LeaseLost) as e:
        await asyncio.wait_for(task, 60)
    lost_s = time.monotonic() - start
    assert "revoked" in e.value.message or "host id lost" in e.value.message
    assert a.held() == []
    assert a.host_id_status(areas.sd_uuid)["state"] == "failed"
    # sanlock no longer lists a lease of ours
    assert not [ln for ln in g.run("sanlock", "client", "status").splitlines()
                if ln.startswith("r ") and f"p {os.getpid()}" in ln]
    print(f"\nlease lost {lost_s:.1f} s after the ids LV failed")
    assert 5 < lost_s < 40
