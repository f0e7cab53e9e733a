"""The storage domains this host sees: found on connected storage, created,
activated (monitored), deactivated, formatted.

Everything about a domain is read from the domain itself, so a second host
(or this one with a fresh state dir) that connects the storage finds every
domain and volume. The host's own state here is which domains are active
(state_dir/domains.json); which volumes are prepared is prepared.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from storage import commands, lvm, multipath
from storage.connections import ConnectionManager
from storage.connections.base import CONNECTED
from storage.domains.base import (
    OVF_STORE_DESCRIPTION,
    OVF_STORE_DISK_TYPE,
    Domain,
    VolumeSpec,
)
from storage.domains.blockdomain import INITIALIZING as VG_INITIALIZING
from storage.domains.blockdomain import VG_TAG, BlockDomain
from storage.domains.filedomain import FileDomain
from storage.domains.leasing import DomainLeases
from storage.domains.monitor import DomainMonitor, Entry, full
from storage.domains.prepared import PreparedVolumes
from storage.errors import (
    HostAgentError,
    HostStateError,
    InaccessiblePhysDev,
    InvalidParameter,
    ResourceInUse,
    StorageDomainAccessError,
    StorageDomainAlreadyExists,
    StorageDomainDoesNotExist,
    StorageDomainNotActive,
    StorageServerConnectionError,
)
from storage.fileio import IOPool, read_state, record_state, str_map
from storage.leases import LeaseManager, init_domain_areas
from storage.locks import LockManager, request
from storage.metadata import DomainMetadata, MetadataError
from storage.thin import ThinPolicy

log = logging.getLogger("storage.domains")

FILE_TYPES = ("nfs", "posixfs", "localfs")
BLOCK_TYPES = ("iscsi", "fcp")


class DomainRegistry:
    def __init__(self, state_dir: Path, connections: ConnectionManager, locks: LockManager,
                 prepared: PreparedVolumes, monitor: DomainMonitor, *,
                 io_timeout: float = 30.0, ovf_store_size: int = 0,
                 block_extent_size: int = 128 << 20,
                 leases: LeaseManager | None = None, host_id: int = 1,
                 lock_policy: str = "local", lease_io_timeout: int = 10,
                 domain_lease_timeout: float = 60.0, thin: ThinPolicy | None = None,
                 runner: commands.Runner = commands.run) -> None:
        self.block_extent_size = block_extent_size
        self.thin = thin or ThinPolicy()
        # Size of the OVF store volume made with each new domain.
        self.ovf_store_size = ovf_store_size
        self.state_dir = state_dir
        self.connections = connections
        self.locks = locks
        self.prepared = prepared
        self.monitor = monitor
        self.io_timeout = io_timeout
        self.runner = runner
        # Leases between hosts sharing storage (None: no leases, unit tests).
        self.leases = leases
        self.host_id = host_id
        # the lock policy recorded in domains this host creates
        self.lock_policy = lock_policy
        self.lease_io_timeout = lease_io_timeout
        self.domain_lease_timeout = domain_lease_timeout
        self.entries: dict[str, Entry] = {}
        self.pools: dict[str, IOPool] = {}
        self.active: set[str] = set()
        # set once start() has activated the active domains found then
        self._started = asyncio.Event()
        # the scans after connections came up, one at a time (_connection_up)
        self._scan_lock = asyncio.Lock()
        self._scans_begun = self._scans_done = 0
        # called with a domain's id once it is activated
        self.activated: Callable[[str], None] = lambda sd: None
        connections.in_use = self.connection_in_use
        connections.release = self.release_connection
        connections.came_up = self._connection_up

    # ---- host state --------------------------------------------------------------

    def _load_active(self) -> None:
        """StateDamaged if domains.json is not what _set_active writes."""
        def shape(r: object) -> bool:
            return str_map(r, lambda v: isinstance(v, list)
                           and all(isinstance(sd, str) for sd in v))
        self.active = set(read_state(self.state_dir / "domains.json", "the active domains",
                                     shape, {}).get("active", []))

    def _set_active(self, sd: str, active: bool) -> None:
        """Record the domain (in)active on this host, before the change is
        made: if the record cannot be written (HostStateError: the state
        directory's file system full), nothing has changed."""
        new = self.active | {sd} if active else self.active - {sd}
        if new != self.active:
            record_state(self.state_dir / "domains.json",
                         json.dumps({"active": sorted(new)}, sort_keys=True).encode(),
                         "the active domains")
            self.active = new

    # ---- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        self._load_active()
        await self.scan()
        found = []
        for sd in sorted(self.active):
            entry = self.entries.get(sd)
            if entry is None:
                log.warning("Active domain %s not found on connected storage", sd)
                continue
            found.append(entry)
        # All at once: each waits up to JOIN_WAIT for its lockspace join
        # (sanlock's take 20 s and more); one after the other, a host with
        # 20 active domains would answer after 100 s, past systemd's start
        # timeout, and be restarted for ever.
        await asyncio.gather(*(self._activate(entry) for entry in found))
        self._started.set()

    async def _connection_up(self, conn_id: str) -> None:
        """A connection came up after the start: its active domains are
        activated as the scan finds them (once start() has ended: its own
        pass over the active domains has run by then). What it needs is a
        scan begun after it came up: connections coming up together (the
        engine connects a host's storage at once) share one, not one each
        (each lists every multipath device and VG, and every file domain)."""
        await self._started.wait()
        want = self._scans_begun + 1
        async with self._scan_lock:
            if self._scans_done >= want:
                return
            self._scans_begun += 1
            try:
                await self.scan()
            finally:
                self._scans_done = self._scans_begun

    def lookup(self, sd: str) -> Domain | None:
        """The domain of that id known here (no scan), or None."""
        entry = self.entries.get(sd)
        return None if entry is None else entry.domain

    async def stop(self) -> None:
        for entry in self.entries.values():
            # Block domains keep their metadata LV active: running VMs' LVs
            # outlive the agent too, and another agent on this host (tests)
            # may be using the same LVs.
            await self.monitor.stop(entry)
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
        await domain.collect_garbage()      # it logs what it removed and what is damaged
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
                await self._found(domain, conn.id)

    async def _found(self, domain: Domain, conn_id: str | None) -> None:
        """A scan found `domain` (on connection `conn_id`; None: a block
        domain's VG). An active one found after the start had its storage
        missing then (a server or portal down, a disconnect): activated."""
        if domain.uuid in self.entries:
            return            # found meanwhile by a scan beside this one
        entry = Entry(domain=self._attach(domain), conn_id=conn_id)
        self.entries[domain.uuid] = entry
        if not self._started.is_set():
            return
        # the volumes VMs still use since before the agent's start (the
        # start counted those of the domains found then; each domain once)
        await self.prepared.count(self.lookup)
        if domain.uuid in self.active:
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
                                                self.runner, scanned=vg)
            except (HostAgentError, OSError, MetadataError) as e:
                log.warning("Ignoring VG %s: %s", vg.name, e)
                continue
            await self._found(domain, None)

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
                await self._create_volume(sd, spec)
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

    async def _lun_paths(self, guids: list[str]) -> list[str]:
        """The multipath devices of LUN guids; 606 for one this host lacks."""
        known = await self._mpath_devices()
        missing = [guid for guid in guids if guid not in known]
        if missing:
            raise InaccessiblePhysDev(devices=", ".join(missing))
        return [known[guid] for guid in guids]

    async def _create_block(self, md: DomainMetadata, devices: list[str] | None) -> Entry:
        if not devices:
            raise InvalidParameter(field="devices",
                                   reason=f"a {md.dom_type} domain needs LUN devices")
        paths = await self._lun_paths(devices)
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
        return {**info, **entry.domain.location()}

    async def stats(self, sd: str) -> dict[str, Any]:
        entry = await self.entry(sd)
        entry.domain.check_mounted()   # else: the space of the bare mount point
        space = await entry.domain.space()
        vols = await entry.domain.all_volumes()
        return {**space, **full(space), "volumes": len(vols),
                "images": len({v.image for v in vols}),
                "state": "active" if entry.active else "inactive",
                "monitoring": entry.monitor.info()}

    async def extend_domain(self, sd: str, guids: list[str]) -> dict[str, Any]:
        """extendStorageDomain: add LUNs to an active block domain, under
        the domain's lock (and, in the domain, its lease)."""
        async with self.locks.hold(request("domain", sd)):
            domain = await self.active_domain(sd)
            await domain.add_devices(guids, self._lun_paths, timeout=self.io_timeout)
        return await self.stats(sd)

    async def resize_pv(self, sd: str, guid: str) -> dict[str, Any]:
        """resizePV: rescan the LUN's paths, resize its multipath map, then
        pvresize; the domain's space after."""
        async with self.locks.hold(request("domain", sd)):
            domain = await self.active_domain(sd)
            size = await domain.resize_device(guid, self._lun_paths, timeout=self.io_timeout)
        return {**await self.stats(sd), "size": size}

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

    @contextlib.asynccontextmanager
    async def _recorded(self, sd: str, active: bool) -> AsyncIterator[None]:
        """The domain recorded (in)active before the change is made (if that
        cannot be, nothing changes), and as it was if the change fails."""
        was = sd in self.active
        self._set_active(sd, active)
        try:
            yield
        except BaseException:
            with contextlib.suppress(HostStateError):
                self._set_active(sd, was)
            raise

    async def _activate(self, entry: Entry) -> None:
        async with self._recorded(entry.domain.uuid, True):
            leases = entry.domain.leases
            if isinstance(leases, DomainLeases):
                # joining collects the garbage (under the domain lease)
                leases.start_join()
                await leases.wait_joined(self.JOIN_WAIT)
            else:
                await self._collect(entry.domain)
        entry.active = True
        self.monitor.start(entry)
        self.activated(entry.domain.uuid)

    async def deactivate(self, sd: str) -> dict[str, Any]:
        async with self.locks.hold(request("domain", sd)):
            entry = await self.entry(sd)
            if self.prepared.on(sd):
                raise ResourceInUse(resource=f"domain {sd}", reason="volumes are prepared")
            await self._deactivate(entry)
        return await self.info(sd)

    async def _deactivate(self, entry: Entry) -> None:
        async with self._recorded(entry.domain.uuid, False):
            await self._leave(entry)
        entry.active = False

    async def _leave(self, entry: Entry) -> None:
        """Leave the domain's lockspace, its monitor stopped first (a check
        in flight ending after the leave would join again, opening files on
        storage about to be unmounted); if the leave is refused, the domain
        stays monitored."""
        monitored = entry.monitor.task is not None
        await self.monitor.stop(entry)
        try:
            await entry.domain.leases.leave()
        except BaseException:
            if monitored:
                self.monitor.start(entry)
            raise

    async def format(self, sd: str) -> None:
        async with self.locks.hold(request("domain", sd)):
            entry = await self.entry(sd)
            if self.prepared.on(sd):
                raise ResourceInUse(resource=f"domain {sd}", reason="volumes are prepared")
            await self._deactivate(entry)
            await entry.domain.remove_all()
            del self.entries[sd]
            log.info("Formatted domain %s", sd)

    async def set_backup(self, sd: str, backup: bool) -> dict[str, Any]:
        async with self.locks.hold(request("domain", sd)):
            domain = await self.active_domain(sd)
            if backup and self.prepared.on(sd, purpose="vm"):
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
                     **full(e.monitor.space)}
                for sd, e in self.entries.items()}

    async def _create_volume(self, sd: str, spec: VolumeSpec) -> None:
        async with self.locks.volumes(sd, spec.img, spec.vol, parent=spec.parent):
            entry = await self.entry(sd)
            self.check_writable(entry)
            await entry.domain.create_volume(spec, lambda _: None)

    def check_writable(self, entry: Entry) -> None:
        """A domain new data may be written to: active here, not failing."""
        sd = entry.domain.uuid
        if not entry.active:
            raise StorageDomainNotActive(sdUUID=sd)
        entry.domain.check_mounted()
        if entry.monitor.state == "failing":
            raise StorageDomainAccessError(sdUUID=sd, reason=entry.monitor.error)

    async def collect_garbage(self, sd: str) -> None:
        entry = self.entries.get(sd)
        if entry is not None:
            async with self.locks.hold(request("domain", sd)):
                await entry.domain.collect_garbage()

    # ---- connections -----------------------------------------------------------------

    def connection_in_use(self, conn_id: str) -> bool:
        return any(e.conn_id == conn_id and self.prepared.on(sd)
                   for sd, e in self.entries.items())

    async def release_connection(self, conn_id: str) -> None:
        """The connection's storage is going: its file domains stop being
        monitored, leave their lockspaces (closing the files they hold open
        there) and are forgotten until the storage is found again."""
        for sd, entry in list(self.entries.items()):
            if entry.conn_id != conn_id:
                continue
            async with self.locks.hold(request("domain", sd)):
                await self._leave(entry)
                # still active in domains.json: activated again when found
                del self.entries[sd]
