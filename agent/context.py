"""The running agent's services, built once in main() and passed down."""

from __future__ import annotations

import grp
import logging
import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent import transferjobs
from agent.config import Config
from agent.events import EventBus
from agent.host import Host
from agent.jobs import JobRegistry
from agent.metrics import Metrics
from ovfstore.service import OvfService
from ovfstore.store import volume_size
from storage import commands, lvmshell
from storage.connections import ConnectionManager
from storage.domains import DomainRegistry, VmAccess, merge, recovery
from storage.domains.imageops import ImageOps
from storage.domains.monitor import DomainMonitor
from storage.domains.prepared import PreparedVolumes
from storage.domains.volumes import VolumeOps
from storage.errors import HostAgentError
from storage.leases import Backend, LeaseManager, LocalBackend, SanlockBackend
from storage.leases.lockholder import LockHolder
from storage.locks import LockManager
from storage.thin import ThinPolicy
from storage.transfers import TicketLimits, TransferService

log = logging.getLogger("agent.context")


@dataclass
class Domains:
    """The pieces of the storage domains: which domains this host sees
    (registry), which volumes are prepared here, the volume verbs and the
    operations on a VM's disks across domains."""
    registry: DomainRegistry
    prepared: PreparedVolumes
    volumes: VolumeOps
    images: ImageOps

    @classmethod
    def create(cls, config: Config, connections: ConnectionManager, locks: LockManager,
               leases: LeaseManager) -> Domains:
        storage, le = config.storage, config.leases
        thin = ThinPolicy(config.thin.chunk_size, config.thin.watermark_percent)
        prepared = PreparedVolumes(config.state_dir)
        monitor = DomainMonitor(locks, io_timeout=storage.io_timeout,
                                interval=storage.monitor_interval)
        registry = DomainRegistry(config.state_dir, connections, locks, prepared, monitor,
                                  io_timeout=storage.io_timeout,
                                  ovf_store_size=volume_size(config.ovf.max_tar_size),
                                  block_extent_size=storage.block_extent_size,
                                  leases=None if config.debug.no_leases else leases,
                                  host_id=le.host_id, lock_policy=le.policy,
                                  lease_io_timeout=le.io_timeout,
                                  domain_lease_timeout=le.domain_lease_timeout, thin=thin)
        volumes = VolumeOps(registry, prepared, locks, io_timeout=storage.io_timeout,
                            vm_access=vm_access(storage.vm_group, storage.vm_file_mode,
                                                Path(storage.storage_root)),
                            thin=thin)
        return cls(registry=registry, prepared=prepared, volumes=volumes,
                   images=ImageOps(registry, prepared, locks, volumes))

    async def start(self) -> None:
        self.prepared.load()
        await self.registry.start()
        await self.volumes.resolve_switches()
        await self.prepared.count(self.registry.lookup)
        await self.volumes.start()

    async def stop(self) -> None:
        await self.volumes.stop()
        await self.registry.stop()

    def register_recoveries(self, jobs: JobRegistry) -> None:
        """What an interrupted job left on storage is removed at start-up."""
        registry, images = self.registry, self.images
        # What an interrupted createVolume or deleteImage left is CREATING or
        # REMOVING on storage: the domain's garbage collection removes it.
        for job_type in ("createVolume", "deleteImage"):
            jobs.register_recovery(job_type, lambda job: registry.collect_garbage(
                str(job.params.get("sdUUID", ""))))
        # A copy or move that did not end leaves no target; a snapshot of
        # several disks or the hibernation volumes, nothing at all.
        for job_type in ("copyImage", "moveImage"):
            jobs.register_recovery(job_type, lambda job: recovery.recover_copy(
                images, {**job.params, "started": job.started}))
        jobs.register_recovery("snapshotImages", lambda job: recovery.recover_new_volumes(
            images, [{**d, "volUUID": d["newVolUUID"]} for d in job.params.get("disks", [])],
            job.started))
        # An interrupted backup leaves no backup volume, and no snapshot layer
        # unless a VM runs on the disk.
        jobs.register_recovery("backupVolume", lambda job: recovery.recover_backup(
            images, job.params, job.started))
        # An interrupted merge past its point of no return is finished.
        jobs.register_recovery("mergeSnapshots", lambda job: merge.recover_merge(
            images, job.params, job.started), live=True)
        # a domain reachable again: the live recoveries waiting for it run
        registry.activated = lambda sd: jobs.storage_back()
        jobs.register_recovery("createHibernationVolumes",
                               lambda job: recovery.recover_new_volumes(
                                   images, [{**job.params["memory"], "volUUID": v}
                                            for v in (job.params["memory"]["dumpVolUUID"],
                                                      job.params["memory"]["metaVolUUID"])],
                                   job.started))


@dataclass
class Agent:
    config: Config
    events: EventBus
    metrics: Metrics
    jobs: JobRegistry
    host: Host
    locks: LockManager
    connections: ConnectionManager
    storage: Domains
    leases: LeaseManager
    ovf: OvfService
    transfers: TransferService
    started: float = field(default_factory=time.time)

    # the pieces the verbs call
    @property
    def domains(self) -> DomainRegistry:
        return self.storage.registry

    @property
    def volumes(self) -> VolumeOps:
        return self.storage.volumes

    @property
    def images(self) -> ImageOps:
        return self.storage.images

    @classmethod
    def create(cls, config: Config) -> Agent:
        events = EventBus(config.server.ws_queue_size)
        metrics = Metrics()
        jobs = JobRegistry(config.jobs, config.state_dir, events, metrics)
        host = Host(config.state_dir)
        locks = LockManager()
        storage = config.storage
        commands.set_urgent_nice(config.thin.urgent_nice)
        lvmshell.set_enabled(config.thin.lvm_shell)
        connections = ConnectionManager(config.state_dir, Path(storage.storage_root), locks,
                                        mount_timeout=storage.mount_timeout,
                                        io_timeout=storage.io_timeout,
                                        start_wait=storage.connect_wait)
        le = config.leases
        # the local backend's locks live in a helper process (lockholder.py)
        backends: dict[str, Backend] = {"local": LocalBackend(
            holder=LockHolder(), check_interval=le.check_interval)}
        if "sanlock" in le.backends:
            backends["sanlock"] = SanlockBackend(socket_path=le.sanlock_socket,
                                                 run_dir=le.run_dir)
        leases = LeaseManager(backends, default_io_timeout=le.io_timeout)
        domains = Domains.create(config, connections, locks, leases)
        ovf = OvfService(domains.registry, locks, slot_size=config.ovf.max_tar_size,
                         member_limit=config.ovf.max_member_size,
                         ticket_ttl=config.ovf.ticket_ttl)

        def extended(params: dict[str, Any], error: HostAgentError | None) -> None:
            if error is None:
                metrics.volume_extends.labels(outcome="ok").inc()
                events.publish("volume.extended", params)
            else:
                metrics.volume_extends.labels(outcome="failed").inc()
                events.publish("volume.extendFailed", {
                    **params, "error": {"code": error.code, "message": error.message}})
        domains.volumes.on_extend = extended
        domains.register_recoveries(jobs)
        transfers = TransferService(
            domains.volumes, publish=events.publish, limits=TicketLimits(
                ticket_lifetime=config.transfers.ticket_lifetime,
                inactivity_timeout=config.transfers.inactivity_timeout,
                max_inactivity_timeout=config.transfers.max_inactivity_timeout),
            count_bytes=lambda d, n: metrics.transfer_bytes.labels(d).inc(n))
        transferjobs.attach(jobs, transfers)
        return cls(config=config, events=events, metrics=metrics, jobs=jobs, host=host,
                   locks=locks, connections=connections, storage=domains, leases=leases,
                   ovf=ovf, transfers=transfers)

    async def start(self) -> None:
        self.config.state_dir.mkdir(parents=True, exist_ok=True)
        self.host.load()
        # Storage first: the recovery hooks of interrupted jobs use it.
        await self.connections.start()
        await self.storage.start()
        await self.jobs.start()

    async def stop(self) -> None:
        await self.transfers.stop()
        await self.jobs.shutdown()
        await self.connections.stop()
        await self.storage.stop()
        await self.leases.close()
        await lvmshell.close()


def vm_access(group: str, file_mode: int, storage_root: Path) -> VmAccess | None:
    """storage.vm_group as a VmAccess (None: root only). A group this host
    lacks, or a directory above the storage root it cannot pass, is logged:
    the agent works, but a qemu in that group cannot open prepared volumes."""
    if not group:
        return None
    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        log.warning("storage.vm_group: no group %r on this host: prepared volumes are "
                    "for root only", group)
        return None
    for d in (storage_root, *storage_root.parents):
        try:
            st = os.stat(d)
        except OSError:
            continue
        if not (st.st_mode & stat.S_IXOTH or (st.st_gid == gid and st.st_mode & stat.S_IXGRP)):
            log.warning("%s (mode %o, group %d) does not let group %s pass: a VM cannot "
                        "open prepared volumes below it", d, stat.S_IMODE(st.st_mode),
                        st.st_gid, group)
    return VmAccess(gid, file_mode)
