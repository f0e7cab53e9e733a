"""A domain's garbage collection: what a crash left half-made or
half-removed is removed, volume types a crash left wrong are repaired,
volumes whose metadata cannot be read are reported and left alone.

It runs under the domain lease at the agent's start and at every
activation (storage.domains.registry), and after an interrupted job's
recovery. A volume whose own lease another host or job holds is being made
or removed there, not left behind, and stays. The kinds read the domain in
one pass (`Domain.census`) and remove their own debris before the rest
(a file domain's temp files and orphaned lease files, a block domain's LVs
left INITIALIZING).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Protocol

from storage.domains.leaseapi import Leases
from storage.errors import AcquireLockFailure, LeaseHeld, VolumeDoesNotExist
from storage.metadata import (
    CREATING,
    INTERNAL,
    LEAF,
    READY,
    REMOVING,
    MetadataError,
    VolumeMetadata,
)

log = logging.getLogger("storage.domains")


class Collected(Protocol):
    """What the collection needs of its domain (not the Domain class:
    base.py runs the collection, so importing it here would make a cycle)."""

    @property
    def uuid(self) -> str: ...

    @property
    def leases(self) -> Leases: ...

    async def image_ids(self) -> list[str]: ...

    async def volume_ids(self, img: str) -> list[str]: ...

    async def read_volume_md(self, img: str, vol: str) -> VolumeMetadata: ...

    async def write_volume_md(self, md: VolumeMetadata,
                              initial_size: int | None = None) -> None: ...

    async def census(self) -> Census: ...

    async def remove_volume_data(self, img: str, vol: str) -> None: ...

    async def make_volume_lease(self, md: VolumeMetadata) -> None: ...

    async def remove_volume_lease(self, img: str, vol: str) -> None: ...

    async def remove_image_dir(self, img: str) -> None: ...


@dataclass
class Census:
    """A domain read afresh in one pass, for its garbage collection: every
    volume whose metadata reads, those whose metadata does not ("img/vol:
    why"), and every image (an image may have no volume left)."""

    images: list[str]
    volumes: list[VolumeMetadata] = field(default_factory=list)
    damaged: list[str] = field(default_factory=list)


def voltype_repairs(vols: list[VolumeMetadata]) -> list[VolumeMetadata]:
    """The READY volumes of `vols` whose type is wrong, with the right one.
    A volume's type follows from its children, written after them: a crash
    in between leaves a LEAF parent of a child (creation) or an INTERNAL
    volume with none (removal of a chain's top)."""
    ready = [v for v in vols if v.state == READY]
    parents = {v.parent for v in ready if v.has_parent}
    fixed = []
    for v in ready:
        if v.voltype == LEAF and v.uuid in parents:
            fixed.append(replace(v, voltype=INTERNAL))
        elif v.voltype == INTERNAL and v.uuid not in parents:
            fixed.append(replace(v, voltype=LEAF))
    return fixed


async def census(domain: Collected) -> Census:
    """The generic census: image by image, volume by volume."""
    found = Census(await domain.image_ids())
    for img in found.images:
        for vol in await domain.volume_ids(img):
            try:
                found.volumes.append(await domain.read_volume_md(img, vol))
            except VolumeDoesNotExist:
                continue
            except MetadataError as e:
                found.damaged.append(f"{img}/{vol}: {e}")
    return found


async def collect(domain: Collected) -> dict[str, list[str]]:
    """Collect `domain`'s garbage (the caller holds the domain lease):
    {"removed": ["img/vol", ...], "damaged": ["img/vol: why", ...]}."""
    found = await domain.census()
    removed: list[str] = []
    kept: set[str] = set()           # images with a volume left
    for md in found.volumes:
        if md.state in (CREATING, REMOVING) and await _remove_leftover(domain, md):
            removed.append(f"{md.image}/{md.uuid}")
        else:
            kept.add(md.image)
    for img in found.images:
        # listed again: a damaged volume, or one made meanwhile, keeps it
        if img not in kept and not await domain.volume_ids(img):
            await domain.remove_image_dir(img)
    repaired = voltype_repairs(found.volumes)
    for fixed in repaired:
        await domain.write_volume_md(fixed)
    if repaired:
        log.warning("Domain %s: volume types repaired after an interruption: %s", domain.uuid,
                    ", ".join(f"{v.image}/{v.uuid} -> {v.voltype}" for v in repaired))
    if removed:
        log.warning("Domain %s: removed half-made or half-removed volumes: %s", domain.uuid,
                    ", ".join(removed))
    if found.damaged:
        log.error("Domain %s: volumes with unreadable metadata: %s", domain.uuid,
                  ", ".join(found.damaged))
    return {"removed": removed, "damaged": found.damaged}


async def _remove_leftover(domain: Collected, md: VolumeMetadata) -> bool:
    """Remove a volume left CREATING or REMOVING, under its lease; False if
    another host or job holds it (it is being made or removed there)."""
    for attempt in (1, 2):
        try:
            async with domain.leases.volume(md):
                await domain.remove_volume_data(md.image, md.uuid)
            await domain.remove_volume_lease(md.image, md.uuid)
            return True
        except LeaseHeld:
            return False
        except AcquireLockFailure as e:
            if attempt == 2:
                log.warning("Domain %s: leaving %s/%s: %s", domain.uuid, md.image,
                            md.uuid, e.message)
                return False
            # no usable lease area: a crash came before it was made
            await domain.make_volume_lease(md)
    return False
