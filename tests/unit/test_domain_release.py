"""A domain leaving its lockspace (its connection disconnected, the domain
deactivated) stops its monitor first: a check in flight that ends after the
leave would otherwise join the lockspace again, opening files on storage
about to be unmounted (a CI run's disconnect left its mount busy)."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import pytest

from agent.locks import LockManager
from storage.connections import ConnectionManager
from storage.domains import registry as registry_module
from storage.domains.blockdomain import VG_TAG
from storage.domains.leasing import DomainLeases
from storage.domains.monitor import DomainMonitor, Entry
from storage.domains.prepared import PreparedVolumes
from storage.domains.registry import DomainRegistry
from storage.errors import ResourceInUse
from storage.leases.base import HostIdState
from tests.polling import until


class Manager:
    """The host's lease manager as the domain's leases see it: the calls made."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.state = HostIdState.JOINED
        self.refuse_leave = False
        self.during_leave: Any = lambda: None

    def host_id_status(self, sd: str) -> dict[str, Any]:
        return {"state": self.state}

    async def add_lockspace(self, *args: Any) -> None:
        self.calls.append("join")
        self.state = HostIdState.JOINED

    async def rem_lockspace(self, sd: str) -> None:
        if self.refuse_leave:
            raise ResourceInUse(resource=f"domain {sd}", reason="a lease is held")
        self.state = HostIdState.LEAVING
        # a monitor check in flight answers while the leave is under way
        self.during_leave()
        for _ in range(20):
            await asyncio.sleep(0)
        self.calls.append("leave")
        self.state = HostIdState.FREE


class Domain:
    """A domain whose health check waits until the test lets it end."""

    def __init__(self) -> None:
        self.uuid = str(uuid.uuid4())
        self.checking = asyncio.Event()
        self.answer = asyncio.Event()
        self.md = type("Md", (), {"lock_policy": "local"})()

    async def health_check(self, timeout: float) -> None:
        self.checking.set()
        await self.answer.wait()

    async def space(self) -> dict[str, int]:
        return {"total": 1, "free": 1}

    pending_discards: dict[str, Any] = {}

    def lease_areas(self) -> Any:
        return type("Areas", (), {"lockspace": lambda _: "ids"})()


def new_registry(tmp_path: Path) -> DomainRegistry:
    """A domain registry on a state dir under tmp_path, monitoring every 10 ms."""
    state = tmp_path / "state"
    state.mkdir()
    locks = LockManager()
    return DomainRegistry(state, ConnectionManager(state, tmp_path / "root", locks,
                                                   io_timeout=10),
                          locks, PreparedVolumes(state),
                          DomainMonitor(locks, io_timeout=10, interval=0.01))


def attach(domain: Domain, manager: Manager) -> Domain:
    domain.leases = DomainLeases(manager, domain, host_id=1, io_timeout=1,  # type: ignore
                                 domain_timeout=1)
    return domain


@pytest.fixture
def setup(tmp_path: Path) -> tuple[DomainRegistry, Entry, Manager, Domain]:
    registry = new_registry(tmp_path)
    manager = Manager()
    domain = attach(Domain(), manager)
    entry = Entry(domain, "conn", active=True)  # type: ignore[arg-type]
    registry.entries[domain.uuid] = entry
    registry.active.add(domain.uuid)
    return registry, entry, manager, domain


async def test_release_with_a_check_in_flight_does_not_join_again(
        setup: tuple[DomainRegistry, Entry, Manager, Domain]) -> None:
    registry, entry, manager, domain = setup
    registry.monitor.start(entry)
    await domain.checking.wait()
    manager.during_leave = domain.answer.set
    await registry.release_connection("conn")
    for _ in range(20):          # what the monitor would do next, if still running
        await asyncio.sleep(0)
    assert manager.calls == ["leave"]
    assert entry.monitor.task is None
    assert domain.uuid not in registry.entries


async def test_a_refused_leave_keeps_the_domain_monitored(
        setup: tuple[DomainRegistry, Entry, Manager, Domain]) -> None:
    registry, entry, manager, domain = setup
    registry.monitor.start(entry)
    await domain.checking.wait()
    manager.refuse_leave = True
    with pytest.raises(ResourceInUse):
        await registry.release_connection("conn")
    assert entry.monitor.task is not None and not entry.monitor.task.done()
    assert registry.entries[domain.uuid] is entry
    await registry.monitor.stop(entry)


class SlowJoins(Manager):
    """Joins that end only when the test says so."""

    def __init__(self, expected: int) -> None:
        super().__init__()
        self.state = HostIdState.FREE
        self.joining = 0
        self.expected = expected
        self.all_joining = asyncio.Event()
        self.go = asyncio.Event()

    async def add_lockspace(self, *args: Any) -> None:
        self.joining += 1
        if self.joining == self.expected:
            self.all_joining.set()
        await self.go.wait()
        await super().add_lockspace(*args)


async def test_start_activates_the_active_domains_at_once(tmp_path: Path) -> None:
    """At start-up every active domain starts its lockspace join and waits
    for it (JOIN_WAIT) at the same time, not one after the other: with
    sanlock's joins of 20 s and more, 5 s each for 20 domains held the
    agent's READY past systemd's start timeout."""
    registry = new_registry(tmp_path)
    registry.JOIN_WAIT = 3600.0
    domains = [Domain() for _ in range(4)]
    manager = SlowJoins(len(domains))
    for domain in domains:
        attach(domain, manager)
        registry.entries[domain.uuid] = Entry(domain, "conn")  # type: ignore[arg-type]
        registry._set_active(domain.uuid, True)

    async def scan() -> None:
        return None
    registry.scan = scan  # type: ignore[method-assign]
    start = asyncio.create_task(registry.start())
    # one after the other, only the first join starts before its hour's wait
    await asyncio.wait_for(manager.all_joining.wait(), 5)
    assert not start.done()
    manager.go.set()
    await asyncio.wait_for(start, 5)
    assert all(e.active for e in registry.entries.values())
    for entry in registry.entries.values():
        await registry.monitor.stop(entry)


async def test_an_active_block_domain_found_after_the_start_is_activated(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An active block domain whose LUNs were missing at the start (an
    iSCSI portal down) is activated and monitored when a later scan finds
    its VG (the connection came up), as an active file domain is."""
    registry = new_registry(tmp_path)
    domain, manager = Domain(), Manager()
    registry._set_active(domain.uuid, True)
    found: list[str] = []

    async def devices() -> dict[str, str]:
        return {"wwid": "/dev/mapper/wwid"} if found else {}

    class Lvm:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            pass

        async def vgs(self) -> list[Any]:
            return [type("Vg", (), {"name": domain.uuid, "tags": [VG_TAG]})()]

        async def pvs(self) -> list[Any]:
            return [type("Pv", (), {"name": "/dev/mapper/wwid", "vg_name": domain.uuid})()]

    async def open_vg(*args: Any, **kwargs: Any) -> Domain:
        return domain

    monkeypatch.setattr(registry, "_mpath_devices", devices)
    monkeypatch.setattr(registry, "_attach", lambda d: attach(d, manager))
    monkeypatch.setattr(registry_module.lvm, "LVM", Lvm)
    monkeypatch.setattr(registry_module.BlockDomain, "open", open_vg)
    await registry.start()                 # no LUN yet: "not found on connected storage"
    assert domain.uuid not in registry.entries
    found.append("wwid")
    await registry.scan()                  # the iSCSI connection came up
    entry = registry.entries[domain.uuid]
    assert entry.active and entry.monitor.task is not None
    await domain.checking.wait()           # monitored
    await registry.monitor.stop(entry)


class _CountingLock(asyncio.Lock):
    def __init__(self) -> None:
        super().__init__()
        self.asked = 0

    async def acquire(self) -> bool:
        self.asked += 1
        return await super().acquire()


async def test_connections_up_together_share_a_scan(tmp_path: Path) -> None:
    """Connections coming up while a scan runs (the engine connects a host's
    storage at once) share the next scan, one begun after they came up,
    not one scan each."""
    registry = new_registry(tmp_path)
    registry._started.set()
    lock = registry._scan_lock = _CountingLock()
    scans = 0
    go, began = asyncio.Event(), asyncio.Event()

    async def scan() -> None:
        nonlocal scans
        scans += 1
        began.set()
        await go.wait()
    registry.scan = scan  # type: ignore[method-assign]
    first = asyncio.create_task(registry._connection_up("a"))
    await began.wait()
    later = [asyncio.create_task(registry._connection_up(c)) for c in "bcd"]
    await until(lambda: lock.asked == 4, "the three wait for the scan under way")
    go.set()
    await asyncio.wait_for(asyncio.gather(first, *later), 5)
    assert scans == 2


class _ChainDomain(Domain):
    """A domain whose every volume sits on one template volume."""

    async def chain(self, img: str, vol: str) -> list[Any]:
        return [type("Md", (), {"uuid": "template"})(), type("Md", (), {"uuid": vol})()]


async def test_a_domain_found_after_the_start_has_its_prepared_volumes_counted(
        tmp_path: Path) -> None:
    """VMs ran on two clones of a template while the agent restarted, their
    domain's storage late: found after the start, the volumes they use are
    counted, so that one VM's teardown does not deactivate the template the
    other still reads; and counted once, whichever of the start and the
    late scan comes first."""
    registry = new_registry(tmp_path)
    domain = _ChainDomain()
    prepared = registry.prepared
    prepared.counts = {f"{domain.uuid}/img1/a": {"vm": 1}, f"{domain.uuid}/img2/b": {"vm": 1}}
    await prepared.count(registry.lookup)        # the start's: the domain not found yet
    assert prepared.active_refs == {}
    registry._started.set()
    await registry._found(domain, "conn")  # type: ignore[arg-type]
    refs = {r.split("/")[1]: n for r, n in prepared.active_refs.items()}
    assert refs == {"template": 2, "a": 1, "b": 1}, refs
    await prepared.count(registry.lookup)        # again: nothing counted twice
    assert {r.split("/")[1]: n for r, n in prepared.active_refs.items()} == refs
