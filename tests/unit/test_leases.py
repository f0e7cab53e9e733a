"""Leases: layout, the manager's semantics and the local backend (OFD locks on
files in tmp_path; no root needed: OFD locks conflict between two opens in
one process as between processes)."""

from __future__ import annotations

import asyncio
import fcntl
import os
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from storage.errors import (
    AcquireHostIdFailure,
    AcquireLockFailure,
    InvalidParameter,
    LeaseLost,
    ResourceInUse,
)
from storage.leases import (
    BlockDomainLeases,
    FileDomainLeases,
    Geometry,
    HostIdState,
    LeaseContext,
    LeaseManager,
    LocalBackend,
    Lockspace,
    Resource,
    create_lease_file,
    init_domain_areas,
    init_volume_lease,
    ofdlock,
)
from storage.leases import local as local_mod
from storage.leases.layout import MiB
from storage.leases.lockholder import LockHolder
from tests.polling import until
from tests.unit.fakerun import FakeRunner

SD = "0f6b3c0e-8f0a-4d8e-9d55-2f9e0c1b7a11"
IMG = "7d1c2d9e-1b1f-4e0b-a9a4-5c0f7b8c9d10"
VOL = "a3e4f5a6-b7c8-4d9e-8f0a-1b2c3d4e5f60"


# ---- layout ------------------------------------------------------------------------------

@pytest.mark.parametrize(("sector", "align", "hosts"), [
    (512, MiB, 2000), (4096, MiB, 250), (4096, 2 * MiB, 500), (4096, 4 * MiB, 1000),
    (4096, 8 * MiB, 2000)])
def test_geometry_max_hosts(sector: int, align: int, hosts: int) -> None:
    g = Geometry(sector, align)
    assert g.max_hosts == hosts
    assert g.lockspace_size == g.resource_size == align
    assert g.leases_area_size(10) == 10 * align


@pytest.mark.parametrize(("sector", "align"), [(512, 2 * MiB), (1024, MiB), (4096, 3 * MiB)])
def test_geometry_invalid(sector: int, align: int) -> None:
    with pytest.raises(InvalidParameter):
        Geometry(sector, align)


def test_geometry_for_sector() -> None:
    assert Geometry.for_sector(512) == Geometry(512, MiB)
    assert Geometry.for_sector(4096, 250) == Geometry(4096, MiB)
    assert Geometry.for_sector(4096, 251) == Geometry(4096, 2 * MiB)
    with pytest.raises(InvalidParameter):
        Geometry.for_sector(512, 2001)


def test_file_domain_layout(tmp_path: Path) -> None:
    areas = FileDomainLeases(SD, tmp_path / SD, Geometry(4096, MiB))
    ls = areas.lockspace()
    assert (ls.name, ls.path, ls.offset) == (SD, f"{tmp_path}/{SD}/dom_md/ids", 0)
    dom = areas.domain_resource()
    assert (dom.lockspace, dom.name, dom.path, dom.offset) == (
        SD, "SDM", f"{tmp_path}/{SD}/dom_md/leases", 0)
    vol = areas.volume_resource(IMG, VOL)
    assert (vol.name, vol.path, vol.offset) == (
        VOL, f"{tmp_path}/{SD}/images/{IMG}/{VOL}.lease", 0)


def test_block_domain_layout() -> None:
    areas = BlockDomainLeases(SD, Geometry(4096, 2 * MiB))
    assert areas.lockspace().path == f"/dev/{SD}/ids"
    assert areas.domain_resource().offset == 0
    vol = areas.volume_resource(VOL, 7)
    assert (vol.path, vol.offset) == (f"/dev/{SD}/leases", 14 * MiB)
    with pytest.raises(InvalidParameter):
        areas.volume_resource(VOL, 0)


@pytest.mark.parametrize("name", ["", "a:b", "x" * 49, "-x y", "a\nb"])
def test_bad_names_refused(name: str) -> None:
    with pytest.raises(InvalidParameter):
        Resource(SD, name, "/x", 0)


@pytest.mark.parametrize("path", ["relative", "/a\\:b", "/a b", "/a\nb", "/" + "x" * 1024])
def test_bad_paths_refused(path: str) -> None:
    with pytest.raises(InvalidParameter):
        Lockspace(SD, path)


def test_nfs_mount_path_is_escaped_for_sanlock_cli() -> None:
    """An NFS mount point has a ':' (server:export): allowed, escaped on
    sanlock's command line (sanlock direct init takes "\\:")."""
    from storage.leases.sanlock import cli_path
    path = "/var/lib/hostagent/storage/10.0.0.1:_export/sd/dom_md/ids"
    assert Lockspace(SD, path).path == path
    assert cli_path(path) == "/var/lib/hostagent/storage/10.0.0.1\\:_export/sd/dom_md/ids"


def test_unaligned_offset_refused() -> None:
    with pytest.raises(InvalidParameter):
        Resource(SD, "r", "/x", 512)


def test_host_id_range() -> None:
    ls = Lockspace(SD, "/x", geometry=Geometry(4096, MiB))
    assert ls.check_host_id(250) == 250
    for bad in (0, 251):
        with pytest.raises(InvalidParameter):
            ls.check_host_id(bad)


def test_create_lease_file(tmp_path: Path) -> None:
    path = tmp_path / "v.lease"
    create_lease_file(path, Geometry(4096, 2 * MiB))
    assert path.stat().st_size == 2 * MiB
    with pytest.raises(FileExistsError):
        create_lease_file(path, Geometry())


async def test_init_areas_runs_sanlock_direct_init(tmp_path: Path) -> None:
    fake = FakeRunner()
    areas = FileDomainLeases(SD, tmp_path, Geometry(4096, 2 * MiB))
    await init_domain_areas(areas, "local", runner=fake)
    assert fake.calls == []
    await init_domain_areas(areas, "sanlock", 1, runner=fake)
    await init_volume_lease(areas.volume_resource(IMG, VOL), "sanlock", 1, runner=fake)
    assert [c.argv for c in fake.calls] == [
        ["sanlock", "direct", "init", "-s", f"{SD}:0:{tmp_path}/dom_md/ids:0",
         "-o", "1", "-Z", "4096", "-A", "2M"],
        ["sanlock", "direct", "init", "-r", f"{SD}:SDM:{tmp_path}/dom_md/leases:0",
         "-o", "1", "-Z", "4096", "-A", "2M"],
        ["sanlock", "direct", "init", "-r",
         f"{SD}:{VOL}:{tmp_path}/images/{IMG}/{VOL}.lease:0", "-o", "1", "-Z", "4096", "-A",
         "2M"],
    ]


# ---- the local backend through the manager ------------------------------------------------

@pytest.fixture
def domain(tmp_path: Path) -> FileDomainLeases:
    root = tmp_path / SD
    (root / "dom_md").mkdir(parents=True)
    (root / "images" / IMG).mkdir(parents=True)
    for name in ("ids", "leases"):
        (root / "dom_md" / name).write_bytes(b"\0" * MiB)
    create_lease_file(root / "images" / IMG / f"{VOL}.lease", Geometry())
    return FileDomainLeases(SD, root)


def manager(check_interval: float = 3600, fail_after: float | None = None,
            retry_interval: float = 0.5, in_process: bool = False) -> LeaseManager:
    """The local backend as the agent runs it: its locks in the lock holder
    process. `in_process`: in this process (ThreadLocker), for the tests that
    reach into a lock's fd or patch the lock primitives."""
    holder = None if in_process else LockHolder()
    m = LeaseManager({"local": LocalBackend(check_interval=check_interval,
                                            fail_after=fail_after, holder=holder)},
                     retry_interval=retry_interval)
    _made.append(m)
    return m


_made: list[LeaseManager] = []


@pytest.fixture(autouse=True)
async def _close_managers() -> AsyncIterator[None]:
    """Every manager a test made is closed (its lock holder process ends),
    also those a test leaves open."""
    yield
    while _made:
        await _made.pop().close()


async def test_host_id_join_leave(domain: FileDomainLeases) -> None:
    m = manager()
    assert m.host_id_status(SD)["state"] == "free"
    await m.add_lockspace(domain.lockspace(), 3, "local", io_timeout=1)
    await m.add_lockspace(domain.lockspace(), 3, "local", io_timeout=1)   # idempotent
    status = m.host_id_status(SD)
    assert (status["hostId"], status["state"], status["backend"]) == (3, "joined", "local")
    with pytest.raises(AcquireHostIdFailure) as e:
        await m.add_lockspace(domain.lockspace(), 4, "local")
    assert e.value.code == 661
    await m.rem_lockspace(SD)
    assert m.host_id_status(SD)["state"] == "free"
    await m.close()


async def test_same_host_id_twice_refused_661(domain: FileDomainLeases) -> None:
    a, b = manager(), manager()
    await a.add_lockspace(domain.lockspace(), 1, "local")
    with pytest.raises(AcquireHostIdFailure) as e:
        await b.add_lockspace(domain.lockspace(), 1, "local")
    assert e.value.code == 661 and "held by another agent" in e.value.message
    assert b.host_id_status(SD)["state"] == "free"
    await b.add_lockspace(domain.lockspace(), 2, "local")    # another id is fine
    await a.rem_lockspace(SD)
    await b.rem_lockspace(SD)
    await b.add_lockspace(domain.lockspace(), 1, "local")    # free again
    await a.close()
    await b.close()


async def test_unknown_policy_661(domain: FileDomainLeases) -> None:
    with pytest.raises(AcquireHostIdFailure):
        await manager().add_lockspace(domain.lockspace(), 1, "sanlock")


async def test_missing_ids_file_661(tmp_path: Path) -> None:
    with pytest.raises(AcquireHostIdFailure) as e:
        await manager().add_lockspace(Lockspace(SD, f"{tmp_path}/nope"), 1, "local")
    assert "No such file" in e.value.message


async def test_lease_conflict_651_then_free(domain: FileDomainLeases) -> None:
    a, b = manager(), manager()
    await a.add_lockspace(domain.lockspace(), 1, "local")
    await b.add_lockspace(domain.lockspace(), 2, "local")
    res = domain.domain_resource()
    async with a.acquire(res) as lease:
        assert [h["resource"] for h in a.held()] == ["SDM"]
        assert lease.lost_reason is None
        with pytest.raises(AcquireLockFailure) as e:
            async with b.acquire(res):
                pass
        assert e.value.code == 651
        assert b.held() == []
        # a second acquire in the same agent is refused too
        with pytest.raises(AcquireLockFailure):
            async with a.acquire(res):
                pass
        # another resource is independent
        async with b.acquire(domain.volume_resource(IMG, VOL)):
            pass
    assert a.held() == []
    async with b.acquire(res):
        pass
    await a.close()
    await b.close()


async def test_acquire_retries_until_timeout(domain: FileDomainLeases) -> None:
    a, b = manager(), manager(retry_interval=0.05)
    await a.add_lockspace(domain.lockspace(), 1, "local")
    await b.add_lockspace(domain.lockspace(), 2, "local")
    res = domain.domain_resource()
    ctx = a.acquire(res)
    await ctx.__aenter__()
    loop = asyncio.get_running_loop()
    loop.call_later(0.3, lambda: asyncio.ensure_future(ctx.__aexit__(None, None, None)))
    start = loop.time()
    with pytest.raises(AcquireLockFailure):
        async with b.acquire(res, timeout=0.1):
            pass
    async with b.acquire(res, timeout=5):
        assert loop.time() - start >= 0.25
    await a.close()
    await b.close()


async def test_acquire_needs_joined_lockspace(domain: FileDomainLeases) -> None:
    with pytest.raises(AcquireLockFailure) as e:
        async with manager().acquire(domain.domain_resource()):
            pass
    assert "host id on domain is free" in e.value.message


async def test_rem_lockspace_refused_while_held(domain: FileDomainLeases) -> None:
    m = manager()
    await m.add_lockspace(domain.lockspace(), 1, "local")
    async with m.acquire(domain.domain_resource()):
        with pytest.raises(ResourceInUse):
            await m.rem_lockspace(SD)
    await m.rem_lockspace(SD)


async def test_release_on_error_in_block(domain: FileDomainLeases) -> None:
    a, b = manager(), manager()
    await a.add_lockspace(domain.lockspace(), 1, "local")
    await b.add_lockspace(domain.lockspace(), 2, "local")
    with pytest.raises(ZeroDivisionError):
        async with a.acquire(domain.domain_resource()):
            1 / 0  # noqa: B018
    async with b.acquire(domain.domain_resource()):
        pass
    await a.close()
    await b.close()


def _backend(m: LeaseManager) -> LocalBackend:
    backend = m.backends["local"]
    assert isinstance(backend, LocalBackend)
    return backend


def _drop_lock_behind_its_back(backend: LocalBackend, name: str) -> None:
    """What an expired NFSv4 lease does: the lock is gone, the fd stays."""
    for space in backend._spaces.values():
        for lease in space.leases:
            if lease.lock.what.endswith(name) and lease.lock.fd is not None:
                fcntl.fcntl(lease.lock.fd, fcntl.F_OFD_SETLK,
                            ofdlock._flock(fcntl.F_UNLCK, lease.lock.offset))
                return
    raise AssertionError(f"no lease {name}")


async def test_lost_lease_cancels_holder_with_lease_lost(domain: FileDomainLeases) -> None:
    m = manager(in_process=True)
    await m.add_lockspace(domain.lockspace(), 1, "local")
    steps: list[str] = []

    async def job() -> None:
        async with m.acquire(domain.domain_resource()):
            steps.append("working")
            await asyncio.sleep(30)
            steps.append("finished")       # never: the lease was lost

    task = asyncio.create_task(job())
    await until(lambda: steps, "the holder works")
    _drop_lock_behind_its_back(_backend(m), f"{SD}:SDM")
    await _backend(m).check_all()
    done, _ = await asyncio.wait([task], timeout=2)    # stopped at once, not by a timeout
    assert done, "the holder was not cancelled"
    with pytest.raises(LeaseLost) as e:
        await task
    assert e.value.code == 2112 and "is gone" in e.value.message
    assert steps == ["working"]
    assert m.held() == []
    # the host id itself is fine: the next acquire works
    async with m.acquire(domain.domain_resource()):
        pass
    await m.close()


async def test_swallowed_cancellation_is_repeated(domain: FileDomainLeases,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Work that swallows one cancellation (3.11's wait_for can) is cancelled
    again until it leaves the block."""
    monkeypatch.setattr(LeaseContext, "RECANCEL_INTERVAL", 0.05)
    m = manager(in_process=True)
    await m.add_lockspace(domain.lockspace(), 1, "local")
    steps: list[str] = []

    async def job() -> None:
        async with m.acquire(domain.domain_resource()):
            steps.append("working")
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                steps.append("swallowed")
            await asyncio.sleep(30)
            steps.append("finished")

    task = asyncio.create_task(job())
    await until(lambda: steps, "the holder works")
    _drop_lock_behind_its_back(_backend(m), f"{SD}:SDM")
    await _backend(m).check_all()
    done, _ = await asyncio.wait([task], timeout=2)
    assert done, "the holder was not cancelled again"
    with pytest.raises(LeaseLost):
        await task
    assert steps == ["working", "swallowed"]
    assert task.cancelling() == 0
    await m.close()


async def test_lost_and_cancelled_from_outside(domain: FileDomainLeases) -> None:
    """A job aborted while its lease is lost ends cancelled (abort wins)."""
    m = manager(in_process=True)
    await m.add_lockspace(domain.lockspace(), 1, "local")
    entered = asyncio.Event()

    async def job() -> None:
        async with m.acquire(domain.domain_resource()):
            entered.set()
            await asyncio.sleep(30)

    task = asyncio.create_task(job())
    await entered.wait()
    _drop_lock_behind_its_back(_backend(m), f"{SD}:SDM")
    await _backend(m).check_all()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await m.close()


async def test_lost_without_cancel_sets_event(domain: FileDomainLeases) -> None:
    m = manager(in_process=True)
    await m.add_lockspace(domain.lockspace(), 1, "local")
    with pytest.raises(LeaseLost):
        async with m.acquire(domain.domain_resource(), cancel_on_lost=False) as lease:
            _drop_lock_behind_its_back(_backend(m), f"{SD}:SDM")
            await _backend(m).check_all()
            await asyncio.wait_for(lease.lost.wait(), 1)
            with pytest.raises(LeaseLost):
                lease.check()
    await m.close()


async def test_outside_cancel_is_not_lease_lost(domain: FileDomainLeases) -> None:
    m = manager()
    await m.add_lockspace(domain.lockspace(), 1, "local")
    entered = asyncio.Event()

    async def job() -> None:
        async with m.acquire(domain.domain_resource()):
            entered.set()
            await asyncio.sleep(30)

    task = asyncio.create_task(job())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert m.held() == []
    await m.close()


async def test_storage_gone_loses_host_id_and_leases(domain: FileDomainLeases) -> None:
    m = manager(fail_after=0)
    await m.add_lockspace(domain.lockspace(), 1, "local")
    with pytest.raises(LeaseLost):
        async with m.acquire(domain.domain_resource(), cancel_on_lost=False) as lease:
            # the checks open the files again: make them fail like dead storage
            os.rename(domain.root, domain.root.with_name("gone"))
            await _backend(m).check_all()
            assert lease.lost.is_set()
            assert m.host_id_status(SD)["state"] == HostIdState.FAILED
            with pytest.raises(AcquireLockFailure):
                async with m.acquire(domain.volume_resource(IMG, VOL)):
                    pass
            os.rename(domain.root.with_name("gone"), domain.root)
    assert m.held() == []
    # joining again (the storage is back) gives the host id back
    await m.add_lockspace(domain.lockspace(), 1, "local")
    assert m.host_id_status(SD)["state"] == "joined"
    async with m.acquire(domain.domain_resource()):
        pass
    await m.close()


async def test_monitor_runs_by_itself(domain: FileDomainLeases) -> None:
    m = manager(check_interval=0.05, in_process=True)
    await m.add_lockspace(domain.lockspace(), 1, "local")
    with pytest.raises(LeaseLost) as e:
        async with m.acquire(domain.domain_resource(), cancel_on_lost=False) as lease:
            _drop_lock_behind_its_back(_backend(m), f"{SD}:SDM")
            await asyncio.wait_for(lease.lost.wait(), 5)
    assert "is gone" in e.value.message
    await m.close()


async def test_blocked_storage_times_out(domain: FileDomainLeases,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A check that hangs (dead NFS server) counts as a failure after the
    lockspace's io_timeout and loses the lease after fail_after."""
    m = manager(fail_after=0, in_process=True)
    await m.add_lockspace(domain.lockspace(), 1, "local", io_timeout=1)
    gate = threading.Event()

    def hang(path: str, offset: int) -> bool:
        gate.wait(5)
        return True

    try:
        with pytest.raises(LeaseLost) as e:
            async with m.acquire(domain.domain_resource(), cancel_on_lost=False) as lease:
                monkeypatch.setattr(local_mod, "lock_visible", hang)
                await _backend(m).check_all()
                assert lease.lost.is_set()
        assert "did not finish" in e.value.message
    finally:
        gate.set()
    await m.close()
