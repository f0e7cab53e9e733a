"""The storage domains this host sees: found on connected storage, created,
activated (monitored), deactivated, formatted; and the volume operations,
each under its resource locks.

Everything about a domain is read from the domain itself, so a second host
(or this one with a fresh state dir) that connects the storage finds every
domain and volume. The host's own state is small: which domains are active
here and which volumes are prepared (state_dir/domains.json, prepared.json).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from storage import commands, lvm, multipath, qemuimg
from storage.connections import ConnectionManager
from storage.connections.base import CONNECTED
from storage.domains.base import (
    OVF_STORE_DESCRIPTION,
    OVF_STORE_DISK_TYPE,
    Domain,
    Progress,
    VmAccess,
    VolumeSpec,
    check_generation,
    volume_info,
)
from storage.domains.blockdomain import INITIALIZING as VG_INITIALIZING
from storage.domains.blockdomain import VG_TAG, BlockDomain
from storage.domains.filedomain import FileDomain
from storage.domains.imageops import ImageOps
from storage.domains.leasing import DomainLeases
from storage.domains.writers import (
    Link,
    Switch,
    SwitchUncertain,
    WriterWatch,
    layer_nodes,
    switch_writers,
    switched,
)
from storage.errors import (
    BackupDomainRestricted,
    GenerationMismatch,
    HostAgentError,
    InaccessiblePhysDev,
    InvalidParameter,
    LeaseHeld,
    PrepareIllegalVolumeError,
    ResourceInUse,
    StorageDomainAccessError,
    StorageDomainAlreadyExists,
    StorageDomainDoesNotExist,
    StorageDomainNotActive,
    StorageServerConnectionError,
    VolumeDoesNotExist,
    VolumeIsBusy,
    VolumeNonWritable,
)
from storage.fileio import IOPool, atomic_write
from storage.leases import LeaseManager, init_domain_areas
from storage.locks import SHARED, LockManager, request
from storage.metadata import (
    CREATING,
    LEGAL,
    READY,
    REMOVING,
    DomainMetadata,
    MetadataError,
    VolumeMetadata,
)
from storage.thin import ThinPolicy

log = logging.getLogger("storage.domains")

FILE_TYPES = ("nfs", "posixfs", "localfs")
BLOCK_TYPES = ("iscsi", "fcp")
PURPOSES = ("vm", "read", "copy")


def _full(space: dict[str, int]) -> dict[str, bool]:
    """A domain without free space is full: still monitored as ok (its
    checks only read), refusing new data with 397 until space is freed."""
    return {"full": space["free"] == 0} if "free" in space else {}


@dataclass
class Monitor:
    state: str = "unknown"        # unknown, ok, failing
    last_check: float | None = None
    delay: float | None = None
    error: str = ""
    space: dict[str, int] = field(default_factory=dict)
    task: asyncio.Task[None] | None = field(default=None, repr=False)

    def info(self) -> dict[str, Any]:
        return {"state": self.state, "lastCheck": self.last_check, "delay": self.delay,
                "error": self.error}


@dataclass
class Entry:
    domain: Domain
    conn_id: str | None
    active: bool = False
    monitor: Monitor = field(default_factory=Monitor)


class DomainManager:
    def __init__(self, state_dir: Path, connections: ConnectionManager, locks: LockManager, *,
                 io_timeout: float = 30.0, monitor_interval: float = 10.0,
                 ovf_store_size: int = 0, block_extent_size: int = 128 << 20,
                 leases: LeaseManager | None = None, host_id: int = 1,
                 lock_policy: str = "local", lease_io_timeout: int = 10,
                 domain_lease_timeout: float = 60.0, vm_access: VmAccess | None = None,
                 thin: ThinPolicy | None = None,
                 runner: commands.Runner = commands.run) -> None:
        self.block_extent_size = block_extent_size
        self.thin = thin or ThinPolicy()
        # Told of every extension of a thin volume (extendVolume, the writers
        # the agent watches): (params, error); the agent sends them as
        # volume.extended / volume.extendFailed and counts them.
        self.on_extend: Callable[[dict[str, Any], HostAgentError | None], None] = (
            lambda params, error: None)
        # Size of the OVF store volume made with each new domain.
        self.ovf_store_size = ovf_store_size
        self.state_dir = state_dir
        self.connections = connections
        self.locks = locks
        self.io_timeout = io_timeout
        self.monitor_interval = monitor_interval
        self.runner = runner
        # Leases between hosts sharing storage (None: no leases, unit tests).
        self.leases = leases
        self.host_id = host_id
        # the lock policy recorded in domains this host creates
        self.lock_policy = lock_policy
        self.lease_io_timeout = lease_io_timeout
        self.domain_lease_timeout = domain_lease_timeout
        # the group (qemu's) a prepare gives the volumes to; None: root only
        self.vm_access = vm_access
        self.entries: dict[str, Entry] = {}
        self.pools: dict[str, IOPool] = {}
        self.active: set[str] = set()
        # "sd/img/vol" -> {purpose: count}
        self.prepared: dict[str, dict[str, int]] = {}
        # "sd/vol" -> how many users (prepared chains, running copies) need the
        # volume active: a template's LV stays active while any clone needs it.
        self.active_refs: dict[str, int] = {}
        self._activation: dict[str, asyncio.Lock] = {}
        # sd -> the task removing half-made volumes left while it failed
        self._discarding: dict[str, asyncio.Task[None]] = {}
        self._started = False
        connections.in_use = self.connection_in_use
        connections.release = self.release_connection
        self.images = ImageOps(self)
        # "sd/img/vol" -> the writer prepareImage named ({qmpSocket, nodeName})
        # and the watch extending the volume ahead of it
        self.writers: dict[str, dict[str, str]] = {}
        self._watches: dict[str, WriterWatch] = {}
        # a writer's monitor socket -> the one connection its disks' watches share
        self._links: dict[str, Link] = {}

    # ---- host state --------------------------------------------------------------

    def _load_state(self) -> None:
        try:
            self.active = set(json.loads((self.state_dir / "domains.json").read_text())
                              .get("active", []))
        except FileNotFoundError:
            self.active = set()
        try:
            self.prepared = json.loads((self.state_dir / "prepared.json").read_text())
        except FileNotFoundError:
            self.prepared = {}
        try:
            self.writers = json.loads((self.state_dir / "writers.json").read_text())
        except FileNotFoundError:
            self.writers = {}

    def _save(self, name: str, data: Any) -> None:
        atomic_write(self.state_dir / name, json.dumps(data, sort_keys=True).encode())

    def _save_active(self) -> None:
        self._save("domains.json", {"active": sorted(self.active)})

    def _save_prepared(self) -> None:
        self._save("prepared.json", self.prepared)
        self._save("writers.json", self.writers)

    # ---- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        self._load_state()
        await self.scan()
        for sd in sorted(self.active):
            entry = self.entries.get(sd)
            if entry is None:
                log.warning("Active domain %s not found on connected storage", sd)
                continue
            await self._activate(entry)
        await self._resolve_switches()
        await self._count_prepared()
        # VMs outlive the agent: their writers are watched again
        for key, writer in self.writers.items():
            if key in self.prepared:
                self._watch_writer(key, writer)
        self._started = True

    async def _count_prepared(self) -> None:
        """What prepared.json says is in use keeps its volumes active."""
        for key in list(self.prepared):
            sd, img, vol = key.split("/")
            entry = self.entries.get(sd)
            if entry is None:
                continue
            try:
                chain = await entry.domain.chain(img, vol)
            except HostAgentError as e:
                log.warning("Prepared volume %s: %s", key, e.message)
                continue
            for md in chain:
                ref = f"{sd}/{md.uuid}"
                self.active_refs[ref] = self.active_refs.get(ref, 0) + 1

    async def stop(self) -> None:
        for watch in self._watches.values():
            await watch.stop()
        self._watches.clear()
        self._links.clear()
        for entry in self.entries.values():
            # Block domains keep their metadata LV active: running VMs' LVs
            # outlive the agent too, and another agent on this host (tests)
            # may be using the same LVs.
            await self._stop_monitor(entry)
        for pool in self.pools.values():
            pool.close()

    def _attach(self, domain: Domain) -> Domain:
        """Give a domain found or made here this host's leases on it."""
        domain.thin = self.thin
        if self.leases is not None:
            domain.leases = DomainLeases(
                self.leases, domain, host_id=self.host_id, io_timeout=self.lease_io_timeout,
                domain_timeout=self.domain_lease_timeout,
                on_joined=lambda: self._collect(domain))
        return domain

    async def _collect(self, domain: Domain) -> None:
        """Once this host may write the domain (activated and joined)."""
        report = await domain.collect_garbage()
        if report["damaged"]:
            log.error("Domain %s has damaged volumes: %s", domain.uuid, report["damaged"])
        try:
            # a domain made before the OVF store was recorded gets it recorded
            await domain.ovf_store()
        except (HostAgentError, OSError, MetadataError) as e:
            log.warning("Domain %s: OVF store not recorded yet (tried again when used): %s",
                        domain.uuid, e)

    def _pool(self, conn_id: str) -> IOPool:
        pool = self.pools.get(conn_id)
        if pool is None:
            pool = self.pools[conn_id] = IOPool(conn_id[:8], timeout=self.io_timeout)
        return pool

    async def scan(self) -> None:
        """Find file domains on every connected file connection and block
        domains (tagged VGs) on the multipath devices of this host."""
        await self._scan_block()
        for conn in list(self.connections.conns.values()):
            if conn.type not in FILE_TYPES or conn.state != CONNECTED:
                continue
            mount = self.connections.local_path(conn.id)
            if mount is None:
                continue
            pool = self._pool(conn.id)
            try:
                roots = await pool.call(FileDomain.candidates, mount)
            except (HostAgentError, OSError) as e:
                log.warning("Cannot scan %s for domains: %s", mount, e)
                continue
            for root in roots:
                if root.name in self.entries:
                    continue
                try:
                    domain = await FileDomain.open(root, pool, self.runner)
                except (HostAgentError, OSError, MetadataError) as e:
                    log.warning("Ignoring domain at %s: %s", root, e)
                    continue
                domain.mountpoint = self.connections.mount_point(conn.id)
                entry = Entry(domain=self._attach(domain), conn_id=conn.id)
                self.entries[domain.uuid] = entry
                if self._started and domain.uuid in self.active:
                    # its storage was disconnected while active, and is back
                    await self._activate(entry)

    async def _mpath_devices(self) -> dict[str, str]:
        """wwid -> /dev/mapper/<map> of every multipath map on this host
        (nothing, without running multipathd: no dm devices, no LVM calls;
        467 if device-mapper still holds multipath maps then)."""
        if not os.path.exists("/dev/mapper/control") or not await multipath.is_running(  # noqa: ASYNC240
                timeout=self.io_timeout, runner=self.runner):
            await multipath.check_down("multipathd is not running")
            return {}
        return {m.wwid: f"/dev/mapper/{m.name}"
                for m in await multipath.maps(timeout=self.io_timeout, runner=self.runner)}

    async def _scan_block(self) -> None:
        try:
            devices = await self._mpath_devices()
        except HostAgentError as e:
            log.warning("Cannot list multipath devices: %s", e.message)
            return
        if not devices:
            return
        scanner = lvm.LVM(self.runner, devices=sorted(devices.values()))
        try:
            vgs = await scanner.vgs()
            pvs = await scanner.pvs()
        except HostAgentError as e:
            log.warning("Cannot scan LUNs for domains: %s", e.message)
            return
        for vg in vgs:
            if VG_TAG not in vg.tags or VG_INITIALIZING in vg.tags or vg.name in self.entries:
                continue
            paths = sorted(p.name for p in pvs if p.vg_name == vg.name)
            try:
                domain = await BlockDomain.open(vg.name, lvm.LVM(self.runner, devices=paths),
                                                IOPool(vg.name[:8], timeout=self.io_timeout),
                                                self.runner)
            except (HostAgentError, OSError, MetadataError) as e:
                log.warning("Ignoring VG %s: %s", vg.name, e)
                continue
            self.entries[domain.uuid] = Entry(domain=self._attach(domain), conn_id=None)

    async def entry(self, sd: str) -> Entry:
        if sd not in self.entries:
            await self.scan()
        try:
            return self.entries[sd]
        except KeyError:
            raise StorageDomainDoesNotExist(sdUUID=sd) from None

    async def domain(self, sd: str) -> Domain:
        domain = (await self.entry(sd)).domain
        domain.check_mounted()
        return domain

    async def active_domain(self, sd: str) -> Domain:
        entry = await self.entry(sd)
        if not entry.active:
            raise StorageDomainNotActive(sdUUID=sd)
        entry.domain.check_mounted()
        return entry.domain

    # ---- domain verbs -------------------------------------------------------------------

    async def create(self, sd: str, dom_type: str, name: str, dom_class: str, *,
                     connection_id: str | None, devices: list[str] | None,
                     version: int, ovf_store: bool = True) -> dict[str, Any]:
        info = await self._create(sd, dom_type, name, dom_class, connection_id=connection_id,
                                  devices=devices, version=version)
        if ovf_store:
            spec = VolumeSpec(img=str(uuid.uuid4()), vol=str(uuid.uuid4()),
                              size=self.ovf_store_size, format="raw", preallocate="sparse",
                              description=OVF_STORE_DESCRIPTION,
                              disk_type=OVF_STORE_DISK_TYPE)
            try:
                await self.create_volume(sd, spec, lambda _: None)
                # A crash before this leaves an unrecorded store: found by its
                # disk type on the next activation, like an older domain's.
                domain = await self.domain(sd)
                await domain.record_ovf_store(await domain.volume(spec.img, spec.vol))
            except BaseException:
                # All or nothing: a domain without its OVF store is removed.
                with contextlib.suppress(HostAgentError):
                    await self.format(sd)
                raise
        return info

    async def _create(self, sd: str, dom_type: str, name: str, dom_class: str, *,
                      connection_id: str | None, devices: list[str] | None,
                      version: int) -> dict[str, Any]:
        async with self.locks.hold(request("domain", sd)):
            if sd in self.entries:
                raise StorageDomainAlreadyExists(sdUUID=sd)
            md = DomainMetadata(uuid=sd, name=name, dom_type=dom_type, dom_class=dom_class,
                                version=version, backup=dom_class == "backup",
                                lock_policy=self.lock_policy)
            if dom_type in BLOCK_TYPES:
                entry = await self._create_block(md, devices)
                await self._init_leases(entry)
                self.entries[sd] = entry
                await self._activate(entry)
                log.info("Created %s domain %s (%s) on %s", dom_type, sd, name, devices)
                return await self.info(sd)
            if connection_id is None:
                raise InvalidParameter(field="connectionId",
                                       reason=f"a {dom_type} domain needs a connection")
            conn = self.connections.get(connection_id)
            if conn is None or conn.state != CONNECTED:
                raise StorageServerConnectionError(
                    reason=f"connection {connection_id} is not connected on this host")
            if conn.type != dom_type:
                raise InvalidParameter(field="connectionId",
                                       reason=f"connection {connection_id} is {conn.type}, "
                                              f"not {dom_type}")
            mount = self.connections.local_path(connection_id)
            assert mount is not None
            domain = await FileDomain.create(mount, md, self._pool(connection_id),
                                             self.runner)
            domain.mountpoint = self.connections.mount_point(connection_id)
            entry = Entry(domain=self._attach(domain), conn_id=connection_id)
            await self._init_leases(entry)
            self.entries[sd] = entry
            await self._activate(entry)
            log.info("Created %s domain %s (%s) on %s", dom_type, sd, name, mount)
            return await self.info(sd)

    async def _create_block(self, md: DomainMetadata, devices: list[str] | None) -> Entry:
        if not devices:
            raise InvalidParameter(field="devices",
                                   reason=f"a {md.dom_type} domain needs LUN devices")
        known = await self._mpath_devices()
        paths = []
        for guid in devices:
            if guid not in known:
                raise InaccessiblePhysDev(devices=guid)
            paths.append(known[guid])
        domain = await BlockDomain.create(paths, md, lvm.LVM(self.runner, devices=paths),
                                          IOPool(md.uuid[:8], timeout=self.io_timeout),
                                          self.runner, extent_size=self.block_extent_size)
        return Entry(domain=self._attach(domain), conn_id=None)

    async def _init_leases(self, entry: Entry) -> None:
        """Format a new domain's lockspace and domain lease for its policy;
        a domain that cannot have them is removed again."""
        try:
            await init_domain_areas(entry.domain.lease_areas(), entry.domain.md.lock_policy,
                                    self.lease_io_timeout, runner=self.runner)
        except BaseException:
            with contextlib.suppress(HostAgentError):
                await entry.domain.remove_all()
            raise

    async def info(self, sd: str) -> dict[str, Any]:
        entry = await self.entry(sd)
        md = entry.domain.md
        info = {"uuid": md.uuid, "name": md.name, "type": md.dom_type,
                "class": md.dom_class, "version": md.version, "backup": md.backup,
                "state": "active" if entry.active else "inactive",
                "blockSize": md.block_size, "alignment": md.alignment,
                "lockPolicy": md.lock_policy, "created": md.created,
                "connectionId": entry.conn_id, "monitoring": entry.monitor.info(),
                "lockspace": entry.domain.leases.status()}
        if isinstance(entry.domain, FileDomain):
            info["path"] = str(entry.domain.root)
        return info

    async def stats(self, sd: str) -> dict[str, Any]:
        entry = await self.entry(sd)
        entry.domain.check_mounted()   # else: the space of the bare mount point
        space = await entry.domain.space()
        vols = await entry.domain.all_volumes()
        return {**space, **_full(space), "volumes": len(vols),
                "images": len({v.image for v in vols}),
                "state": "active" if entry.active else "inactive",
                "monitoring": entry.monitor.info()}

    async def list_domains(self) -> list[str]:
        await self.scan()
        return sorted(self.entries)

    async def activate(self, sd: str) -> dict[str, Any]:
        async with self.locks.hold(request("domain", sd)):
            entry = await self.entry(sd)
            entry.domain.check_mounted()
            # Re-read: another host may have changed the domain while it was
            # inactive here.
            entry.domain.md = await entry.domain.read_domain_md()
            await self._activate(entry)
        return await self.info(sd)

    # how long activation waits for the host id before going on without it
    # (garbage collection runs once it is joined)
    JOIN_WAIT = 5.0

    async def _activate(self, entry: Entry) -> None:
        leases = entry.domain.leases
        if isinstance(leases, DomainLeases):
            # joining collects the garbage (under the domain lease)
            leases.start_join()
            await leases.wait_joined(self.JOIN_WAIT)
        else:
            await self._collect(entry.domain)
        entry.active = True
        self.active.add(entry.domain.uuid)
        self._save_active()
        if entry.monitor.task is None:
            entry.monitor.task = asyncio.create_task(self._monitor(entry),
                                                     name=f"monitor-{entry.domain.uuid}")

    async def deactivate(self, sd: str) -> dict[str, Any]:
        async with self.locks.hold(request("domain", sd)):
            entry = await self.entry(sd)
            if self._prepared_on(sd):
                raise ResourceInUse(resource=f"domain {sd}", reason="volumes are prepared")
            await entry.domain.leases.leave()
            entry.active = False
            self.active.discard(sd)
            self._save_active()
            await self._stop_monitor(entry)
        return await self.info(sd)

    async def _stop_monitor(self, entry: Entry) -> None:
        for task in (entry.monitor.task, self._discarding.pop(entry.domain.uuid, None)):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        entry.monitor.task = None
        entry.monitor.state = "unknown"

    async def _monitor(self, entry: Entry) -> None:
        """Check the domain every monitor_interval: a direct read of its
        metadata, then its space. A check that has not ended after io_timeout
        makes the domain failing at once; it is then waited for (its delay
        growing), and no new check starts while a command the runner gave up
        on still waits on this domain's storage: checks do not pile up on hung
        storage. The next check that ends well makes the domain ok again."""
        mon = entry.monitor
        sd = entry.domain.uuid

        async def check() -> dict[str, int]:
            await entry.domain.health_check(self.io_timeout)
            return await entry.domain.space()

        def failing(reason: str) -> None:
            if mon.state != "failing":
                log.error("Domain %s is failing: %s", sd, reason)
            mon.state, mon.error = "failing", reason

        start = time.monotonic()
        while True:
            if any(sd in arg for _, argv in commands.lingering() for arg in argv):
                # A killed check (or another command on this domain) still
                # waits on the storage: one more would only wait beside it.
                failing("a command killed on its deadline still waits on the storage")
                mon.last_check = time.time()
                mon.delay = time.monotonic() - start
                await asyncio.sleep(self.monitor_interval)
                continue
            start = time.monotonic()
            task = asyncio.create_task(check(), name=f"check-{sd}")
            try:
                await asyncio.wait({task}, timeout=self.io_timeout)
                if not task.done():
                    failing(f"no answer from storage in {self.io_timeout:g} s")
                    while not task.done():
                        mon.last_check = time.time()
                        mon.delay = time.monotonic() - start
                        await asyncio.wait({task}, timeout=self.monitor_interval)
            except asyncio.CancelledError:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
                raise
            mon.last_check = time.time()
            mon.delay = time.monotonic() - start
            error = task.exception()
            if error is None:
                mon.space = task.result()
                if mon.state == "failing":
                    log.info("Domain %s recovered", sd)
                mon.state, mon.error = "ok", ""
                leases = entry.domain.leases
                if isinstance(leases, DomainLeases) and not leases.joined():
                    # storage back, or the lock daemon: join again
                    leases.start_join()
                if entry.domain.pending_discards and entry.active and \
                        sd not in self._discarding:
                    # beside the checks: the storage may fail again meanwhile
                    self._discarding[sd] = asyncio.create_task(
                        self._finish_discards(entry), name=f"discard-{sd}")
            else:
                reason = error.message if isinstance(error, HostAgentError) else \
                    f"{type(error).__name__}: {error}"
                failing(reason)
            await asyncio.sleep(self.monitor_interval)

    async def _finish_discards(self, entry: Entry) -> None:
        """Remove the half-made volumes whose removal failed while the storage
        failed, now that it answers: under each one's locks, and only while
        it is still half-made (a job run again may have made it since).
        What is still left then is tried again after the next good check."""
        domain = entry.domain
        try:
            for vol, md in list(domain.pending_discards.items()):
                try:
                    async with self._volume_locks(domain.uuid, md.image, vol):
                        try:
                            now: VolumeMetadata | None = await domain.read_volume_md(
                                md.image, vol)
                        except (VolumeDoesNotExist, MetadataError):
                            # left without readable metadata (an LV still
                            # INITIALIZING), or gone already
                            now = md if vol in await domain.volume_ids(md.image) else None
                        if now is not None and now.state in (CREATING, REMOVING):
                            await domain.discard_volume(now)
                            log.info("Domain %s: removed half-made volume %s/%s",
                                     domain.uuid, md.image, vol)
                except LeaseHeld:
                    pass             # another host makes it now: its own
                except (HostAgentError, OSError) as e:
                    log.warning("Domain %s: half-made volume %s not removed yet: %s",
                                domain.uuid, vol, e)
                    return
                domain.pending_discards.pop(vol, None)
        finally:
            self._discarding.pop(domain.uuid, None)

    async def format(self, sd: str) -> None:
        async with self.locks.hold(request("domain", sd)):
            entry = await self.entry(sd)
            if self._prepared_on(sd):
                raise ResourceInUse(resource=f"domain {sd}", reason="volumes are prepared")
            await self._stop_monitor(entry)
            await entry.domain.leases.leave()
            await entry.domain.remove_all()
            del self.entries[sd]
            self.active.discard(sd)
            self._save_active()
            log.info("Formatted domain %s", sd)

    async def set_backup(self, sd: str, backup: bool) -> dict[str, Any]:
        async with self.locks.hold(request("domain", sd)):
            domain = await self.active_domain(sd)
            if backup and self._prepared_on(sd, purpose="vm"):
                raise ResourceInUse(resource=f"domain {sd}",
                                    reason="volumes are prepared for running VMs")
            async with domain.leases.metadata():
                md = replace(await domain.read_domain_md(), backup=backup,
                             dom_class="backup" if backup else "data")
                await domain.write_domain_md(md)
        return await self.info(sd)

    def summary(self) -> dict[str, Any]:
        """State and space of every known domain, as of its last check (no
        storage I/O here: getStats must answer while storage hangs)."""
        return {sd: {"state": "active" if e.active else "inactive",
                     "monitoring": e.monitor.info(), **e.monitor.space,
                     **_full(e.monitor.space)}
                for sd, e in self.entries.items()}

    # ---- volumes ---------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _volume_locks(self, sd: str, img: str, *vols: str,
                            parent: str | None = None) -> AsyncIterator[None]:
        reqs = [request("domain", sd, SHARED), request("image", f"{sd}/{img}")]
        reqs += [request("volume", f"{sd}/{v}") for v in vols]
        if parent:
            reqs.append(request("volume", f"{sd}/{parent}", SHARED))
        async with self.locks.hold(*reqs):
            yield

    async def create_volume(self, sd: str, spec: VolumeSpec,
                            progress: Progress) -> dict[str, Any]:
        async with self._volume_locks(sd, spec.img, spec.vol, parent=spec.parent):
            entry = await self.entry(sd)
            self.check_writable(entry)
            md = await entry.domain.create_volume(spec, progress)
            domain = entry.domain
            apparent, true = await domain.volume_sizes(md.image, md.uuid)
            return volume_info(md, apparent, true)

    async def volume_info(self, sd: str, img: str, vol: str) -> dict[str, Any]:
        domain = await self.domain(sd)
        return await domain.volume_info(img, vol)

    async def volumes_list(self, sd: str, img: str | None) -> list[str]:
        domain = await self.domain(sd)
        # what other hosts made or removed since this host cached it counts
        domain.forget_cache()
        if img is not None:
            return [v.uuid for v in await domain.image_volumes(img)]
        return [v.uuid for v in await domain.all_volumes()]

    async def images_list(self, sd: str) -> list[str]:
        domain = await self.domain(sd)
        domain.forget_cache()
        ids = await domain.image_ids()
        # an image that holds only half-made volumes whose removal is retried
        # is gone for the engine (its job failed and said so)
        gone = set()
        for img in {md.image for md in domain.pending_discards.values()} & set(ids):
            with contextlib.suppress(HostAgentError):
                if not await domain.image_volumes(img):
                    gone.add(img)
        return [img for img in ids if img not in gone]

    async def extend_volume(self, sd: str, img: str, vol: str, new_size: int,
                            generation: int | None = None) -> dict[str, Any]:
        async with self._volume_locks(sd, img, vol):
            domain = await self.active_domain(sd)
            md = await domain.extend_volume(img, vol, new_size, generation)
            apparent, true = await domain.volume_sizes(img, vol)
            return volume_info(md, apparent, true)

    async def update_volume(self, sd: str, img: str, vol: str, *, description: str | None,
                            legality: str | None,
                            generation: int | None = None) -> dict[str, Any]:
        async with self._volume_locks(sd, img, vol):
            domain = await self.active_domain(sd)
            md = await domain.update_volume(img, vol, description=description,
                                            legality=legality, generation=generation)
            apparent, true = await domain.volume_sizes(img, vol)
            return volume_info(md, apparent, true)

    async def measure_volume(self, sd: str, img: str, vol: str, fmt: str,
                             collapse: bool = True) -> dict[str, int]:
        """What converting the volume to `fmt` ("raw", "cow") needs (qemu-img
        measure): its chain collapsed, or with collapse=False its own layer
        only. Read-only: locks shared like a copy's source; the chain is
        used (LVs active) only while measured."""
        async with self.locks.hold(request("domain", sd, SHARED),
                                   request("image", f"{sd}/{img}", SHARED)):
            domain = await self.active_domain(sd)
            chain = await domain.chain(img, vol)
            for md in chain:
                if md.legality != LEGAL or md.state != READY:
                    raise PrepareIllegalVolumeError(volUUID=md.uuid)
            top = chain[-1]
            async with self.using(domain, chain if collapse else [top]):
                m = await qemuimg.measure(path=domain.volume_path(img, vol),
                                          src_fmt="qcow2" if top.format == "COW" else "raw",
                                          dst_fmt="qcow2" if fmt == "cow" else "raw",
                                          backing=collapse,
                                          block=isinstance(domain, BlockDomain),
                                          timeout=self.io_timeout, runner=self.runner)
        out = {"required": m["required"], "fullyAllocated": m["fully-allocated"]}
        if fmt == "cow":
            out["bitmaps"] = m["bitmaps"]
        return out

    async def extend_allocation(self, sd: str, img: str, vol: str, min_size: int,
                                generation: int | None = None) -> dict[str, Any]:
        """extendVolume. Only the domain (shared) is locked: a VM's extension
        never waits behind a long job on its image; LVM orders lvextends."""
        event: dict[str, Any] = {"sdUUID": sd, "imgUUID": img, "volUUID": vol}
        try:
            async with self.locks.hold(request("domain", sd, SHARED)):
                domain = await self.active_domain(sd)
                size, grew = await domain.extend_allocation(img, vol, min_size, generation)
        except HostAgentError as e:
            if not isinstance(e, VolumeDoesNotExist | GenerationMismatch | InvalidParameter):
                self.on_extend({**event, "size": min_size}, e)
            raise
        if grew:
            self.on_extend({**event, "size": size}, None)
        return {"size": size}

    async def reduce_volume(self, sd: str, img: str, vol: str,
                            generation: int | None = None) -> dict[str, Any]:
        """reduceVolume (a job): refused while a VM may write the volume on
        this host (prepared for vm); its chain active for qemu-img check."""
        async with self._volume_locks(sd, img, vol):
            domain = await self.active_domain(sd)
            if self.prepared.get(self._prepared_key(sd, img, vol), {}).get("vm"):
                raise VolumeIsBusy(resource=f"volume {vol}",
                                   reason="it is prepared for a VM, which may write it")
            md = await domain.volume(img, vol)
            check_generation(md, generation)
            chain = await domain.chain(img, vol)
            async with self.using(domain, chain):
                size = await domain.reduce_volume(md)
            return {"size": size}

    async def refresh_volume(self, sd: str, img: str, vol: str) -> dict[str, Any]:
        async with self.locks.hold(request("domain", sd, SHARED)):
            domain = await self.active_domain(sd)
            return {"size": await domain.refresh_volume(img, vol)}

    async def delete_volume(self, sd: str, img: str, vol: str,
                            generation: int | None = None) -> None:
        async with self._volume_locks(sd, img, vol):
            domain = await self.active_domain(sd)
            if self._prepared_key(sd, img, vol) in self.prepared:
                raise VolumeIsBusy(resource=f"volume {vol}", reason="it is prepared")
            await domain.delete_volume(img, vol, generation)

    async def delete_image(self, sd: str, img: str, progress: Progress) -> None:
        async with self._volume_locks(sd, img):
            domain = await self.active_domain(sd)
            if any(k.startswith(f"{sd}/{img}/") for k in self.prepared):
                raise VolumeIsBusy(resource=f"image {img}", reason="volumes are prepared")
            await domain.delete_image(img, progress)

    async def collect_garbage(self, sd: str) -> None:
        entry = self.entries.get(sd)
        if entry is not None:
            async with self.locks.hold(request("domain", sd)):
                await entry.domain.collect_garbage()

    # ---- prepare / teardown -----------------------------------------------------------------

    @staticmethod
    def _prepared_key(sd: str, img: str, vol: str) -> str:
        return f"{sd}/{img}/{vol}"

    def _prepared_on(self, sd: str, purpose: str | None = None) -> bool:
        return any(k.startswith(f"{sd}/") and (purpose is None or v.get(purpose))
                   for k, v in self.prepared.items())

    def connection_in_use(self, conn_id: str) -> bool:
        return any(e.conn_id == conn_id and self._prepared_on(sd)
                   for sd, e in self.entries.items())

    async def release_connection(self, conn_id: str) -> None:
        """The connection's storage is going: its file domains stop being
        monitored, leave their lockspaces (closing the files they hold open
        there) and are forgotten until the storage is found again."""
        for sd, entry in list(self.entries.items()):
            if entry.conn_id != conn_id:
                continue
            async with self.locks.hold(request("domain", sd)):
                await entry.domain.leases.leave()
                await self._stop_monitor(entry)
                # still active in domains.json: activated again when found
                del self.entries[sd]

    async def use_volumes(self, domain: Domain, chain: list[VolumeMetadata]) -> None:
        """Make volumes usable on this host (block: activate their LVs),
        counting users, so one user's release leaves them active for others."""
        async with self._activation.setdefault(domain.uuid, asyncio.Lock()):
            await domain.activate_volumes(chain)
            for md in chain:
                ref = f"{domain.uuid}/{md.uuid}"
                self.active_refs[ref] = self.active_refs.get(ref, 0) + 1

    async def release_volumes(self, domain: Domain, chain: list[VolumeMetadata]) -> None:
        """Undo one use_volumes; volumes nobody uses any more are deactivated."""
        async with self._activation.setdefault(domain.uuid, asyncio.Lock()):
            unused = []
            for md in chain:
                ref = f"{domain.uuid}/{md.uuid}"
                left = self.active_refs.get(ref, 0) - 1
                if left <= 0:
                    self.active_refs.pop(ref, None)
                    unused.append(md)
                else:
                    self.active_refs[ref] = left
            with contextlib.suppress(HostAgentError):
                await domain.deactivate_volumes(unused)

    @contextlib.asynccontextmanager
    async def using(self, domain: Domain, chain: list[VolumeMetadata]) -> AsyncIterator[None]:
        await self.use_volumes(domain, chain)
        try:
            yield
        finally:
            await self.release_volumes(domain, chain)

    def is_prepared(self, sd: str, img: str, purpose: str | None = None) -> bool:
        return any(k.startswith(f"{sd}/{img}/") and (purpose is None or v.get(purpose))
                   for k, v in self.prepared.items())

    def check_not_written(self, field: str, sd: str, img: str, vol: str,
                          switch: str | None = None) -> None:
        """A new layer on a disk a VM may write (prepared for vm on this
        host) is consistent only if the VM is switched onto it: by the
        agent (a registered QMP writer: live_writer) or by the caller
        ("switch": "caller"). Otherwise refused, rather than a layer the
        VM does not use or a copy of a layer it still writes."""
        if switch == "caller" or not self.is_prepared(sd, img, "vm"):
            return
        raise VolumeIsBusy(resource=f"{field} (volume {vol} of image {img} on {sd})",
                           reason="prepared for a VM with no writer registered; say "
                                  "\"switch\": \"caller\" if the VM manager switches the "
                                  "VM onto the new layer itself")

    def live_writer(self, field: str, sd: str, img: str, vol: str,
                    switch: str | None = None) -> WriterWatch | None:
        """The writer a new layer over this volume must be switched onto by
        the agent (its registered QMP writer), None if nothing or the caller
        switches; 203 for a VM disk with no writer (check_not_written)."""
        watch = self._watches.get(self._prepared_key(sd, img, vol))
        if switch == "caller" or watch is None:
            self.check_not_written(field, sd, img, vol, switch)
            return None
        return watch

    async def switch_writers(self, layers: list[tuple[str, Domain, VolumeMetadata,
                                                      WriterWatch]]) -> None:
        """Move VMs' writers onto the new layers (`field`, domain, the new
        layer, the old top's watch) in one transaction; the new top is then
        what is prepared for the VM and watched. On failure the writers stay
        on their old tops and the new layers are released (still there)."""
        if not layers:
            return
        chains = [(d, await d.chain(md.image, md.uuid)) for _, d, md, _ in layers]
        news = [self._prepared_key(d.uuid, md.image, md.uuid) for _, d, md, _ in layers]
        # Recorded first: a restart after a kill asks the writer which side
        # of the transaction it is on (resolve_switches), and an interrupted
        # job's recovery never removes a layer a VM may write.
        for (_, _, md, watch), new in zip(layers, news, strict=True):
            self.writers[new] = {**self.writers[watch.name],
                                 "nodeName": layer_nodes(md.uuid)[0], "switchedFrom": watch.name}
        self._save_prepared()
        used: list[tuple[Domain, list[VolumeMetadata]]] = []
        try:
            for domain, chain in chains:
                await self.use_volumes(domain, chain)
                used.append((domain, chain))
                if self.vm_access is not None:
                    await domain.grant_access(chain[-1:], self.vm_access)
            await switch_writers([Switch(watch, field, domain.volume_path(md.image, md.uuid),
                                         md.uuid) for field, domain, md, watch in layers])
        except SwitchUncertain:
            # kept in use and recorded as switching (see _resolve_switches)
            raise
        except BaseException:
            for domain, chain in used:
                await self.release_volumes(domain, chain)
            for new in news:
                self.writers.pop(new, None)
            self._save_prepared()
            raise
        for (_, domain, _, watch), new, (_, chain) in zip(layers, news, chains, strict=True):
            await self._switched(watch.name, new)
            with contextlib.suppress(HostAgentError):
                if watch.name not in self.prepared:
                    await self.release_volumes(domain, chain[:-1])
        self._save_prepared()

    async def _switched(self, old: str, new: str) -> None:
        """The VM writes `new` now, not `old`: prepared for vm and watched."""
        counts = self.prepared.get(old, {})
        self.prepared[new] = {"vm": counts.pop("vm", 1)}
        if not counts:
            self.prepared.pop(old, None)
        self.writers[new].pop("switchedFrom", None)
        # watched on the new node first: the writer's connection stays up
        self._watch_writer(new, self.writers[new])
        await self._unwatch_writer(old)

    async def _resolve_switches(self) -> None:
        """Live snapshots a kill cut: the writer says whether it holds the
        new layer. Unknown (the writer not running): both kept, the old one
        watched, the new layer kept by the job's recovery."""
        for new, writer in list(self.writers.items()):
            old = writer.get("switchedFrom")
            if old is None:
                continue
            on_new = await switched(writer["qmpSocket"], new.split("/")[2])
            log.warning("Live snapshot cut by a restart: the writer of %s %s", old,
                        {True: f"writes {new}", False: "was not switched",
                         None: "cannot be asked: both layers kept"}[on_new])
            if on_new:
                counts = self.prepared.get(old, {})
                self.prepared[new] = {"vm": counts.pop("vm", 1)}
                if not counts:
                    self.prepared.pop(old, None)
                writer.pop("switchedFrom")
                self.writers.pop(old, None)
            elif on_new is False:
                self.writers.pop(new)
        self._save_prepared()

    def switching(self, sd: str, img: str, vol: str) -> bool:
        """A layer a VM writes or may write (a live snapshot cut by a crash)."""
        key = self._prepared_key(sd, img, vol)
        return key in self.writers or bool(self.prepared.get(key, {}).get("vm"))

    def check_writable(self, entry: Entry) -> None:
        """A domain new data may be written to: active here, not failing."""
        sd = entry.domain.uuid
        if not entry.active:
            raise StorageDomainNotActive(sdUUID=sd)
        entry.domain.check_mounted()
        if entry.monitor.state == "failing":
            raise StorageDomainAccessError(sdUUID=sd, reason=entry.monitor.error)

    def _watch_writer(self, key: str, writer: dict[str, str]) -> None:
        sd, img, vol = key.split("/")

        async def current() -> int:
            return int((await self.extend_allocation(sd, img, vol, 1))["size"])

        async def extend(min_size: int) -> int:
            return int((await self.extend_allocation(sd, img, vol, min_size))["size"])

        path = writer["qmpSocket"]
        link = self._links.setdefault(path, Link(path))
        self._watches[key] = WriterWatch(key, path, writer["nodeName"], self.thin,
                                         current=current, extend=extend, link=link).start()

    async def _unwatch_writer(self, key: str) -> None:
        self.writers.pop(key, None)
        watch = self._watches.pop(key, None)
        if watch is not None:
            await watch.stop()
            if watch.link.idle:
                self._links.pop(watch.qmp_socket, None)

    async def prepare(self, sd: str, img: str, vol: str, purpose: str,
                      writer: dict[str, str] | None = None) -> dict[str, Any]:
        if writer is not None and purpose != "vm":
            raise InvalidParameter(field="writer", reason="only with purpose vm")
        async with self._volume_locks(sd, img):
            domain = await self.active_domain(sd)
            if purpose == "vm" and domain.md.backup:
                raise BackupDomainRestricted(sdUUID=sd, reason="its volumes cannot be "
                                                               "prepared for a running VM")
            chain = await domain.chain(img, vol)
            for md in chain:
                if md.legality != LEGAL or md.state != READY:
                    raise PrepareIllegalVolumeError(volUUID=md.uuid)
            if purpose == "vm":
                # a VM writing a parent corrupts every volume layered on it
                kids = await domain.children(chain[-1])
                if kids:
                    raise VolumeNonWritable(
                        volUUID=vol, reason=f"it is the parent of {len(kids)} volume(s) "
                                            f"({kids[0].image}/{kids[0].uuid}); only a leaf "
                                            "can be prepared for a VM (read and copy can)")
            key = self._prepared_key(sd, img, vol)
            if key in self.prepared:
                # Already counted; activating again is harmless (and needed
                # after a reboot deactivated everything).
                await domain.activate_volumes(chain)
            else:
                await self.use_volumes(domain, chain)
            if self.vm_access is not None:
                try:
                    await domain.grant_access(chain, self.vm_access)
                except BaseException:
                    if key not in self.prepared:
                        # not prepared: its LVs must not stay active, counted
                        await self.release_volumes(domain, chain)
                    raise
            counts = self.prepared.setdefault(key, {})
            counts[purpose] = counts.get(purpose, 0) + 1
            if writer is not None and self.writers.get(key) != writer:
                # a VM started again (or another one): the new writer
                await self._unwatch_writer(key)
                self.writers[key] = writer
                self._watch_writer(key, writer)
            self._save_prepared()
            return {"path": domain.volume_path(img, vol),
                    "chain": [{"volUUID": m.uuid, "imgUUID": m.image,
                               "path": domain.volume_path(m.image, m.uuid),
                               "format": m.format.lower()} for m in chain]}

    async def teardown(self, sd: str, img: str, vol: str | None) -> None:
        async with self._volume_locks(sd, img):
            # not self.domain(): a domain whose mount is gone (360) is torn down too
            domain = (await self.entry(sd)).domain
            keys = [k for k in self.prepared
                    if k.startswith(f"{sd}/{img}/") and (vol is None or k.endswith(f"/{vol}"))]
            for key in keys:
                counts = self.prepared[key]
                # one teardown undoes one prepare (the most privileged purpose first)
                for purpose in PURPOSES:
                    if counts.get(purpose):
                        counts[purpose] -= 1
                        if not counts[purpose]:
                            del counts[purpose]
                        break
                if not counts.get("vm"):
                    await self._unwatch_writer(key)
                if not counts:
                    del self.prepared[key]
                    _, _, v = key.split("/")
                    with contextlib.suppress(HostAgentError):
                        await self.release_volumes(domain, await domain.chain(img, v))
            self._save_prepared()
