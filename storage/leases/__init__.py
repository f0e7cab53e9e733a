"""Leases on shared storage: host ids per domain, a domain lease, volume leases.

    manager = LeaseManager({"local": LocalBackend(), "sanlock": SanlockBackend()})
    await manager.add_lockspace(areas.lockspace(), host_id, md.lock_policy, io_timeout)
    async with manager.acquire(areas.domain_resource()) as lease:
        ...   # change domain / VG metadata; cancelled with LeaseLost if lost
    await manager.rem_lockspace(sd_uuid)

`areas` is a FileDomainLeases or BlockDomainLeases (layout.py); the areas
are formatted once, at domain creation, with `init_domain_areas` and, per
volume, `init_volume_lease`.
"""

from __future__ import annotations

import os

from storage import commands
from storage.leases.base import (
    Backend,
    HostIdState,
    Lease,
    LeaseBusy,
    LeaseContext,
    LeaseManager,
)
from storage.leases.layout import (
    DOMAIN_LEASE,
    BlockDomainLeases,
    FileDomainLeases,
    Geometry,
    Lockspace,
    Resource,
)
from storage.leases.local import LocalBackend
from storage.leases.sanlock import SanlockBackend, init_lockspace, init_resource

POLICIES = ("local", "sanlock")

__all__ = [
    "DOMAIN_LEASE", "POLICIES", "Backend", "BlockDomainLeases", "FileDomainLeases",
    "Geometry", "HostIdState", "Lease", "LeaseBusy", "LeaseContext", "LeaseManager",
    "LocalBackend", "Lockspace", "Resource", "SanlockBackend", "create_lease_file",
    "init_domain_areas", "init_lockspace", "init_resource", "init_volume_lease",
]


def create_lease_file(path: os.PathLike[str] | str, geometry: Geometry) -> None:
    """A volume's lease file on a file domain: resource_size zero bytes,
    fsync'd (blocking: run it in the domain's IOPool)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o660)
    try:
        os.ftruncate(fd, geometry.resource_size)
        os.fsync(fd)
    finally:
        os.close(fd)


async def init_domain_areas(areas: FileDomainLeases | BlockDomainLeases, policy: str,
                            io_timeout: int = 10, *,
                            runner: commands.Runner = commands.run) -> None:
    """Format a new domain's ids area and its domain lease for `policy`
    (the local policy needs no format: the areas only have to exist)."""
    if policy == "sanlock":
        await init_lockspace(areas.lockspace(), io_timeout, runner=runner)
        await init_resource(areas.domain_resource(), io_timeout, runner=runner)


async def init_volume_lease(resource: Resource, policy: str, io_timeout: int = 10, *,
                            runner: commands.Runner = commands.run) -> None:
    """Format a new volume's lease area for `policy` (no-op for local)."""
    if policy == "sanlock":
        await init_resource(resource, io_timeout, runner=runner)
