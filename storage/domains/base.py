"""What every storage domain offers, whatever holds it (a directory on a
mount, an LVM volume group), and the volume flows built on it.

The flows keep storage crash-safe: a volume is born ILLEGAL with state CREATING, its data
is made, then LEGAL + READY + a new generation are written in one metadata write. Removal
writes REMOVING first. Whatever a crash leaves CREATING or REMOVING is removed by
`collect_garbage` at start-up and on activate; a volume is never LEGAL unless complete.

Hosts sharing the domain meet in `self.leases` (leaseapi.py, leasing.py): a volume is
allocated under the domain lease and made, written or removed under its own lease; garbage
collection leaves alone what another host holds.
"""

from __future__ import annotations

import abc
import contextlib
import errno
import logging
from dataclasses import replace
from typing import Any, NoReturn

from storage import commands, qemuimg

# the shapes of volumes, here for the modules that import them from base
from storage.domains import garbage
from storage.domains.common import Fill as Fill
from storage.domains.common import Progress as Progress
from storage.domains.common import VmAccess as VmAccess
from storage.domains.common import VolumeSpec as VolumeSpec
from storage.domains.common import check_generation as check_generation
from storage.domains.common import leaf_first as leaf_first
from storage.domains.common import no_progress, visible
from storage.domains.common import os_error as os_error
from storage.domains.common import read_check as read_check
from storage.domains.common import volume_info as volume_info
from storage.domains.garbage import Census
from storage.domains.holding import VolumeHolding
from storage.domains.leaseapi import UNLEASED, Leases
from storage.errors import (
    AcquireLockFailure,
    CreateIllegalVolumeSnapshotError,
    HostAgentError,
    ImageDoesNotExistInSD,
    ImageIsNotLegalChain,
    InvalidParameter,
    LeaseHeld,
    LeaseLost,
    NoSpaceLeftOnDomain,
    ResourceInUse,
    VolumeAlreadyExists,
    VolumeCreationError,
    VolumeDoesNotExist,
    VolumeImageHasChildren,
    VolumeMetadataReadError,
    VolumeResizeValueError,
    out_of_space,
)
from storage.fileio import IOPool
from storage.leases import BlockDomainLeases, FileDomainLeases, Resource
from storage.metadata import (
    ALLOCATIONS,
    BLANK_UUID,
    CREATING,
    FORMATS,
    ILLEGAL,
    INTERNAL,
    LEAF,
    LEGAL,
    READY,
    REMOVING,
    SHARED,
    DomainMetadata,
    MetadataError,
    VolumeFormat,
    VolumeMetadata,
)
from storage.thin import ThinPolicy

log = logging.getLogger("storage.domains")

# The disk type the OVF store volume is made with (oVirt's OVF_STORE disks
# have it too). Only domains made before the store was recorded in the
# domain's metadata are looked up by it, once (Domain.ovf_store).
OVF_STORE_DISK_TYPE = "OVFS"
OVF_STORE_DESCRIPTION = "OVF_STORE"

class Domain(VolumeHolding, abc.ABC):
    """A storage domain as this host sees it."""

    def __init__(self, md: DomainMetadata, io: IOPool) -> None:
        self.md = md
        self.io = io
        # set by the DomainRegistry to this host's leases on the domain
        self.leases: Leases = UNLEASED
        # Half-made volumes this host failed to remove (the storage failed):
        # the DomainMonitor removes them once the domain answers again.
        self.pending_discards: dict[str, VolumeMetadata] = {}
        # The domain metadata (self.md as read then) in which the OVF store
        # record was looked for, and an older domain's store recorded: no
        # record in it means no store.
        self._ovf_checked: DomainMetadata | None = None
        # set by the DomainRegistry: how thin cow volumes are grown
        self.thin = ThinPolicy()

    @property
    def uuid(self) -> str:
        return self.md.uuid

    # ---- primitives each kind implements ------------------------------------

    @abc.abstractmethod
    async def write_domain_md(self, md: DomainMetadata) -> None: ...

    @abc.abstractmethod
    async def read_domain_md(self) -> DomainMetadata: ...

    @abc.abstractmethod
    async def image_ids(self) -> list[str]: ...

    @abc.abstractmethod
    async def volume_ids(self, img: str) -> list[str]:
        """Volumes of an image, including CREATING/REMOVING ones."""

    @abc.abstractmethod
    async def read_volume_md(self, img: str, vol: str) -> VolumeMetadata:
        """Raises VolumeDoesNotExist, or MetadataError if it is damaged."""

    @abc.abstractmethod
    async def write_volume_md(self, md: VolumeMetadata,
                              initial_size: int | None = None) -> None:
        """One atomic write of the volume's metadata; for a new volume
        `initial_size` is createVolume's (block: the size of its LV)."""

    @abc.abstractmethod
    async def create_volume_data(self, md: VolumeMetadata, parent: VolumeMetadata | None,
                                 initial_size: int | None) -> None:
        """Make the data of a volume whose metadata (CREATING) exists."""

    @abc.abstractmethod
    async def remove_volume_data(self, img: str, vol: str) -> None:
        """Remove data and metadata of a volume; missing parts are fine."""

    @abc.abstractmethod
    async def extend_volume_data(self, md: VolumeMetadata, new_size: int) -> None: ...

    async def open_volume_file(self, md: VolumeMetadata, size: int) -> int:
        """Let a volume's file be written as it is (a qcow2 upload) up to
        `size` bytes; the size it can take. Block: its LV as it is (the
        engine sizes it, VDSM's initialSize)."""
        return (await self.volume_sizes(md.image, md.uuid))[0]

    async def close_volume_file(self, md: VolumeMetadata, end: int) -> None:
        """After open_volume_file: the file ends at `end` (its image's end)."""
        return None

    @abc.abstractmethod
    def volume_path(self, img: str, vol: str) -> str:
        """Where the volume's data is when prepared."""

    @abc.abstractmethod
    async def volume_sizes(self, img: str, vol: str) -> tuple[int, int]:
        """(apparent size, allocated size) in bytes."""

    @abc.abstractmethod
    async def activate_volumes(self, vols: list[VolumeMetadata], *,
                               refresh: bool = False) -> None: ...

    async def grant_access(self, vols: list[VolumeMetadata], access: VmAccess) -> None:
        """Let access.gid open the (active) volumes' data read-write: what a
        prepare does so that an unprivileged qemu can open the chain."""
        return None

    @abc.abstractmethod
    async def deactivate_volumes(self, vols: list[VolumeMetadata]) -> None: ...

    @abc.abstractmethod
    async def space(self) -> dict[str, int]:
        """{capacity, free, used} in bytes."""

    @abc.abstractmethod
    async def remove_image_dir(self, img: str) -> None:
        """Drop what is left of an image once its volumes are gone."""

    @abc.abstractmethod
    async def remove_all(self) -> None:
        """Remove the whole domain from storage (format)."""

    def check_mounted(self) -> None:
        """Raise StorageDomainFSNotMounted if the file system the domain
        lives on is no longer mounted (file domains on a mount)."""
        return None

    @abc.abstractmethod
    async def health_check(self, timeout: float) -> None:
        """Read the domain metadata from storage bypassing caches; raises if
        storage does not answer in time."""

    @abc.abstractmethod
    def lease_areas(self) -> FileDomainLeases | BlockDomainLeases:
        """Where the domain's lockspace and leases live."""

    @abc.abstractmethod
    async def volume_lease(self, img: str, vol: str) -> Resource:
        """The lease of a volume that exists (its metadata at least)."""

    @abc.abstractmethod
    async def make_volume_lease(self, md: VolumeMetadata) -> None:
        """Make (or re-make) the lease area of a new volume for the domain's
        lock policy. Only while nobody can hold that lease: at creation,
        under the domain lease, or when taking it failed for want of one."""

    async def remove_volume_lease(self, img: str, vol: str) -> None:
        """Drop a removed volume's own lease area, once its lease is released
        (file domains: its .lease file; unlinking it while open would leave
        a silly-renamed file on NFS)."""
        return None

    async def purge_removed_image(self, img: str, progress: Progress) -> None:
        """What remove_image_volumes left to free once the leases are released."""
        return None

    def forget_cache(self) -> None:
        """Drop what is cached of shared metadata (taking the domain lease:
        another host may have changed it)."""
        return None

    # ---- the OVF store ---------------------------------------------------------

    async def ovf_store(self) -> tuple[str, str] | None:
        """(image, volume) of the domain's OVF store, as the domain's metadata
        records it; None: the domain has none. A domain made before the
        record existed had its store found by disk type: that volume is
        recorded here, once (on activation), under the domain lease."""
        if self.md.ovf_volume:
            return self.md.ovf_image, self.md.ovf_volume
        if self._ovf_checked is not self.md:
            async with self.leases.metadata():
                md = await self.read_domain_md()      # another host may have recorded it
                if not md.ovf_volume:
                    found = await self._unrecorded_ovf_store()
                    if found is not None:
                        md = replace(md, ovf_image=found.image, ovf_volume=found.uuid)
                        await self.write_domain_md(md)
                        log.info("Domain %s: OVF store %s/%s recorded in its metadata",
                                 self.uuid, found.image, found.uuid)
                self.md = md
                self._ovf_checked = md
        if self.md.ovf_volume:
            return self.md.ovf_image, self.md.ovf_volume
        return None

    async def _unrecorded_ovf_store(self) -> VolumeMetadata | None:
        """The store of a domain made before the record: its OVFS volume (the
        one made with the domain, "OVF_STORE", the oldest, if others claim
        that type too)."""
        found = [v for v in await self.all_volumes()
                 if v.disk_type == OVF_STORE_DISK_TYPE and v.legality == LEGAL
                 and v.state == READY]
        if len(found) > 1:
            log.warning("Domain %s: %d volumes have disk type %s; the OVF store is the "
                        "oldest", self.uuid, len(found), OVF_STORE_DISK_TYPE)
        found.sort(key=lambda v: (v.description != OVF_STORE_DESCRIPTION, v.ctime, v.uuid))
        return found[0] if found else None

    async def record_ovf_store(self, md: VolumeMetadata) -> None:
        """Name a new domain's OVF store in its metadata."""
        async with self.leases.metadata():
            dmd = await self.read_domain_md()
            await self.write_domain_md(replace(dmd, ovf_image=md.image, ovf_volume=md.uuid))

    async def refuse_ovf_store(self, img: str, vol: str | None = None) -> None:
        """Volume verbs do not touch the OVF store: it changes through
        uploadOvfTar only (a volume made in its image, or it deleted, extended
        or replaced, would lose or corrupt every VM's OVF)."""
        store = await self.ovf_store()
        if store is not None and (img == store[0] or vol == store[1]):
            raise ResourceInUse(resource=f"image {store[0]}",
                                reason=f"it holds the OVF store of domain {self.uuid}; "
                                       "change it with uploadOvfTar")

    # ---- queries ---------------------------------------------------------------

    async def volume(self, img: str, vol: str) -> VolumeMetadata:
        try:
            md = await self.read_volume_md(img, vol)
        except MetadataError as e:
            raise VolumeMetadataReadError(volUUID=vol, reason=str(e)) from None
        return visible(md, img, vol, self.pending_discards)

    async def scan(self, img: str | None = None, *, cached: bool = False) -> list[VolumeMetadata]:
        """Metadata of every volume (of one image, or of the domain) whose metadata
        reads; kinds override this with one batched read (cached: for a listing)."""
        out = []
        for image in [img] if img else await self.image_ids():
            for vol in await self.volume_ids(image):
                try:
                    out.append(await self.read_volume_md(image, vol))
                except (VolumeDoesNotExist, MetadataError):
                    continue
        return out

    async def image_volumes(self, img: str, *, cached: bool = False) -> list[VolumeMetadata]:
        """READY and CREATING volumes of an image (CREATING ones are ILLEGAL)."""
        vols = [v for v in await self.scan(img, cached=cached) if self._listed(v)]
        if not vols and img not in await self.image_ids():
            raise ImageDoesNotExistInSD(imgUUID=img, sdUUID=self.uuid)
        return vols

    async def all_volumes(self, *, cached: bool = False) -> list[VolumeMetadata]:
        return [v for v in await self.scan(cached=cached) if self._listed(v)]

    def _listed(self, md: VolumeMetadata) -> bool:
        """Whether a volume counts as one: not being removed, and not a
        failed job's half-made volume whose removal is retried (the job
        reported it gone; it is, once the domain lets it go)."""
        return md.state != REMOVING and md.uuid not in self.pending_discards

    async def volume_info(self, img: str, vol: str) -> dict[str, Any]:
        md = await self.volume(img, vol)
        apparent, true = await self.volume_sizes(img, vol)
        return volume_info(md, apparent, true)

    async def chain(self, img: str, vol: str) -> list[VolumeMetadata]:
        """The volume and its parents, base first (parents may be in other
        images of this domain: templates)."""
        chain = []
        md = await self.volume(img, vol)
        seen = set()
        while True:
            chain.append(md)
            seen.add(md.uuid)
            if not md.has_parent:
                break
            if md.parent in seen:
                raise VolumeDoesNotExist(volUUID=md.parent, reason="parent loop")
            md = await self.find_volume(md.parent, prefer_image=md.image)
        return list(reversed(chain))

    async def find_volume(self, vol: str, prefer_image: str | None = None) -> VolumeMetadata:
        """A volume by id anywhere in the domain."""
        if prefer_image is not None:
            try:
                return await self.volume(prefer_image, vol)
            except VolumeDoesNotExist:
                pass
        img = await self.image_of(vol)
        if img is None:
            raise VolumeDoesNotExist(volUUID=vol)
        return await self.volume(img, vol)

    async def image_of(self, vol: str) -> str | None:
        """The image holding volume `vol` (the first, by id), or None; kinds
        override this with one look (a clone's prepare looks up its parent)."""
        for img in await self.image_ids():
            if vol in await self.volume_ids(img):
                return img
        return None

    async def children(self, md: VolumeMetadata) -> list[VolumeMetadata]:
        return [v for v in await self.all_volumes() if v.parent == md.uuid]

    # ---- volume flows ------------------------------------------------------------

    async def create_volume(self, spec: VolumeSpec, progress: Progress = no_progress, *,
                            fill: Fill | None = None, parent: VolumeMetadata | None = None,
                            commit: bool = True, chain: bool = True) -> VolumeMetadata:
        """Create a volume: metadata CREATING + ILLEGAL, its data, then (with
        `commit`) LEGAL + READY in one metadata write.

        `fill(md)` writes the volume's data (a copy) once it exists, before
        it is committed; the caller makes it reachable (block: activates it).
        `parent` skips the parent lookup and its checks: the caller (a copy
        of a chain) passes a parent it is making itself. Without `commit`
        the volume stays CREATING and the caller commits it with
        `commit_volume` or removes it with `discard_volume`. Without `chain`
        the volume is not part of the image's chain (a hibernated VM's memory
        image holds two standalone volumes); the caller checked the image.
        """
        await self.refuse_ovf_store(spec.img, spec.vol)
        if parent is None and spec.parent and spec.parent != BLANK_UUID:
            # A retried create of a volume that exists is 212 whatever its
            # parent now looks like (it has a child: the volume itself).
            if await self.has_volume(spec.vol):
                raise await self._exists_error(spec.vol, spec.img)
            parent = await self._parent_for(spec)
        if parent is not None and spec.size < parent.capacity:
            raise InvalidParameter(field="size", reason=f"smaller than the parent's capacity "
                                                        f"{parent.capacity}")
        if spec.format == "raw" and parent is not None:
            raise InvalidParameter(field="format", reason="a snapshot layer must be cow")
        md = VolumeMetadata(domain=self.uuid, image=spec.img, uuid=spec.vol,
                            parent=parent.uuid if parent else BLANK_UUID,
                            format=FORMATS[spec.format],
                            allocation=ALLOCATIONS[spec.preallocate], voltype=LEAF,
                            capacity=spec.size, legality=ILLEGAL, generation=0,
                            description=spec.description, disk_type=spec.disk_type,
                            state=CREATING)
        await self._allocate_volume(md, spec, parent, chain)
        progress(2 if fill else 10)
        try:
            await self.create_volume_data(md, parent, spec.initial_size)
            if fill is not None:
                progress(5)
                await fill(md)
            progress(95 if fill else 90)
            if commit:
                md = await self.commit_volume(md, parent)
        except BaseException as e:
            await self._creation_failed(md, e)
        if commit:
            log.info("Created volume %s/%s/%s (%s, %s, %d bytes)", self.uuid, spec.img,
                     spec.vol, spec.format, spec.preallocate, spec.size)
        return md

    async def _allocate_volume(self, md: VolumeMetadata, spec: VolumeSpec,
                               parent: VolumeMetadata | None, chain: bool) -> None:
        """The new volume's metadata (CREATING) and its lease, held, under the
        domain lease; nothing of it is left if this fails."""
        async with self.leases.metadata():
            if await self.has_volume(spec.vol):
                raise await self._exists_error(spec.vol, spec.img)
            if chain:
                # under the domain lease: another host adding to the image waits
                await self.check_image_chain(spec.img, parent)
            try:
                await self.write_volume_md(md, spec.initial_size)
            except OSError as e:
                raise os_error(e, self.uuid) from None
            try:
                # the new volume's lease, taken before another host may see it
                try:
                    await self.make_volume_lease(md)
                except commands.CommandError as e:
                    if out_of_space(e):
                        raise NoSpaceLeftOnDomain(sdUUID=self.uuid) from None
                    raise VolumeCreationError(volUUID=spec.vol,
                                              reason=f"its lease: {e.message}") from None
                except OSError as e:
                    raise os_error(e, self.uuid) from None
                await self.leases.hold(md)
            except BaseException:
                try:
                    await self.discard_volume(md)
                except AcquireLockFailure:
                    # held elsewhere (another host or job makes it: not ours),
                    # or no lease area yet: garbage collection makes one first
                    pass
                except (HostAgentError, OSError) as de:
                    log.warning("Volume %s left for removal when %s answers again: %s",
                                spec.vol, self.uuid, de)
                    self.pending_discards[md.uuid] = md
                raise

    async def _creation_failed(self, md: VolumeMetadata, e: BaseException) -> NoReturn:
        """A volume whose data could not be made (error or cancellation `e`):
        its lease ended, the half-made volume removed (or left for removal),
        and the error to report raised."""
        # End the volume's lease first: LeaseLost if it was lost under the
        # work (then `e` is the cancellation that stopped it).
        lost = e if isinstance(e, LeaseLost) else None
        try:
            await self.leases.drop(md)
        except LeaseLost as ll:
            lost = ll
        log.warning("Creating volume %s failed (%s); removing it", md.uuid,
                    type(lost or e).__name__)
        # Also on cancellation (an aborted job): the half-made volume goes,
        # under its lease again. If this is cut short too, or the lease
        # cannot be had, garbage collection removes it once it can.
        if lost is not None or isinstance(e, LeaseHeld):
            try:
                await self.discard_volume(md)
            except HostAgentError as de:
                log.warning("Volume %s left for garbage collection: %s", md.uuid, de.message)
            if lost is not None:
                raise lost from (None if lost is e else e)
            raise e
        try:
            await self.discard_volume(md)
        except (HostAgentError, OSError) as de:
            # Often the storage failing made the volume fail too: report
            # the volume's own error, remove it once the domain answers.
            log.warning("Volume %s left for removal when %s answers again: %s", md.uuid,
                        self.uuid, de)
            self.pending_discards[md.uuid] = md
        if isinstance(e, qemuimg.QemuImgError):
            # what qemu-img refused (a size the file system cannot hold, ...)
            if out_of_space(e):
                raise NoSpaceLeftOnDomain(sdUUID=self.uuid) from None
            raise VolumeCreationError(volUUID=md.uuid, reason=e.message) from None
        if isinstance(e, HostAgentError) or not isinstance(e, Exception):
            raise e
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise os_error(e, self.uuid) from None
        raise VolumeCreationError(volUUID=md.uuid, reason=str(e)) from e

    async def commit_volume(self, md: VolumeMetadata,
                            parent: VolumeMetadata | None) -> VolumeMetadata:
        """The one metadata write that makes a complete volume LEGAL, then
        its parent's type (internal, or shared by images: a template).
        Only while the volume's lease is still held; it is released after."""
        done = replace(md, legality=LEGAL, state=READY, generation=md.generation + 1)
        self.leases.check(md)
        await self.write_volume_md(done)
        await self.leases.drop(md)
        if parent is not None:
            parent = await self.read_volume_md(parent.image, parent.uuid)
            if parent.voltype == LEAF:
                await self.write_volume_md(replace(parent, voltype=INTERNAL))
            elif parent.image != md.image and parent.voltype != SHARED:
                await self.write_volume_md(replace(parent, voltype=SHARED))
        return done

    async def _parent_for(self, spec: VolumeSpec) -> VolumeMetadata:
        try:
            parent = await self.find_volume(spec.parent or "", prefer_image=spec.img)
        except VolumeDoesNotExist:
            raise VolumeDoesNotExist(volUUID=spec.parent,
                                     reason=f"parent not in domain {self.uuid}") from None
        if parent.legality != LEGAL or parent.state != READY:
            raise CreateIllegalVolumeSnapshotError(volUUID=parent.uuid)
        if parent.image != spec.img and parent.voltype not in (SHARED, INTERNAL, LEAF):
            raise InvalidParameter(field="parentVolUUID", reason="parent cannot be shared")
        return parent

    async def check_image_chain(self, img: str, parent: VolumeMetadata | None) -> None:
        """The one check that keeps an image one chain, for every flow that
        adds a volume to an image: the new volume goes on the image's top
        volume (`parent` in the image, without a child there yet), or it is
        the image's base (no parent, or a template's volume in another
        image) and the image holds no volume yet. Half-made (CREATING)
        volumes count: another job is making them."""
        try:
            vols = await self.image_volumes(img)
        except ImageDoesNotExistInSD:
            vols = []
        if parent is None or parent.image != img:
            if vols:
                raise ImageIsNotLegalChain(
                    imgUUID=img, sdUUID=self.uuid,
                    reason=f"the image already holds volume(s) "
                           f"{', '.join(sorted(v.uuid for v in vols))}: a volume without "
                           "a parent in the image would be a second base (give the "
                           "image's top volume as parent)")
            return
        kids = [v.uuid for v in vols if v.parent == parent.uuid]
        if kids:
            raise ImageIsNotLegalChain(
                imgUUID=img, sdUUID=self.uuid,
                reason=f"volume {parent.uuid} is not the image's top volume (volume "
                       f"{kids[0]} is layered on it)")

    async def _exists_error(self, vol: str, img: str) -> HostAgentError:
        """212, or 651 when the volume is being made (its lease held) elsewhere."""
        try:
            existing = await self.find_volume(vol, prefer_image=img)
        except VolumeDoesNotExist:
            return VolumeAlreadyExists(volUUID=vol)
        if existing.state == CREATING and await self.leases.busy(existing):
            return LeaseHeld(resource=f"{self.uuid}:{vol}",
                             reason="the volume is being made by another host or job")
        return VolumeAlreadyExists(volUUID=vol)

    async def all_volume_ids(self) -> set[str]:
        ids: set[str] = set()
        for img in await self.image_ids():
            ids.update(await self.volume_ids(img))
        return ids

    async def has_volume(self, vol: str) -> bool:
        """Whether any image of the domain holds volume `vol` (a new
        volume's id is the domain's own); kinds look more cheaply."""
        return vol in await self.all_volume_ids()

    async def discard_volume(self, md: VolumeMetadata) -> None:
        """Remove a volume being made (marked REMOVING first), under its lease.
        The mark is only a courtesy: a volume still CREATING is garbage
        just the same. It needs room (a new metadata file) and the removal
        does not: on a full domain (often full because of this very volume)
        a failed mark must not keep the space taken (issue 22, 3)."""
        try:
            async with self.leases.volume(md):
                try:
                    await self.write_volume_md(replace(md, state=REMOVING, legality=ILLEGAL))
                except (HostAgentError, OSError) as e:
                    log.info("Volume %s/%s not marked REMOVING (%s); removing it anyway",
                             self.uuid, md.uuid, e)
                await self.remove_volume_data(md.image, md.uuid)
        finally:
            with contextlib.suppress(LeaseLost):
                await self.leases.drop(md)
        await self.remove_volume_lease(md.image, md.uuid)
        if not await self.volume_ids(md.image):
            await self.remove_image_dir(md.image)

    async def delete_volume(self, img: str, vol: str, generation: int | None = None, *,
                            wipe: bool = False) -> None:
        await self.refuse_ovf_store(img, vol)
        md = await self.volume(img, vol)
        check_generation(md, generation)
        kids = await self.children(md)
        if kids:
            raise VolumeImageHasChildren(resource=f"volume {vol}",
                                         reason=f"it has {len(kids)} child volume(s)")
        async with self.leases.volume(md):
            if wipe:
                await self.mark_wipe([md])
            await self.write_volume_md(replace(md, state=REMOVING, legality=ILLEGAL))
            await self.remove_volume_data(img, vol)
        await self.remove_volume_lease(img, vol)
        if md.has_parent:
            parent = await self.find_volume(md.parent, prefer_image=img)
            if parent.voltype == INTERNAL and not await self.children(parent):
                await self.write_volume_md(replace(parent, voltype=LEAF))
        if not await self.volume_ids(img):
            await self.remove_image_dir(img)
        log.info("Deleted volume %s/%s/%s", self.uuid, img, vol)

    async def delete_image(self, img: str, progress: Progress = no_progress, *,
                           wipe: bool = False) -> None:
        await self.refuse_ovf_store(img)
        vols = await self.image_volumes(img)
        ids = {v.uuid for v in vols}
        outside = [v for v in await self.all_volumes()
                   if v.image != img and v.parent in ids]
        if outside:
            raise VolumeImageHasChildren(resource=f"image {img}",
                                         reason=f"volume {outside[0].parent} is the parent of "
                                                "volumes in other images")
        async with contextlib.AsyncExitStack() as held:
            for v in vols:
                await held.enter_async_context(self.leases.volume(v))
            if wipe:
                await self.mark_wipe(vols)
            await self.remove_image_volumes(img, vols, progress)
        await self.purge_removed_image(img, progress)
        # A template parent in another image may now be a leaf again.
        for v in vols:
            if v.has_parent and v.parent not in ids:
                try:
                    parent = await self.find_volume(v.parent)
                except (VolumeDoesNotExist, VolumeMetadataReadError):
                    continue
                if parent.voltype == INTERNAL and not await self.children(parent):
                    await self.write_volume_md(replace(parent, voltype=LEAF))
        log.info("Deleted image %s/%s (%d volumes)", self.uuid, img, len(vols))

    async def remove_image_volumes(self, img: str, vols: list[VolumeMetadata],
                                   progress: Progress) -> None:
        """Remove every volume of an image so that a crash at any point
        leaves a valid (shorter) chain or nothing: mark leaf first, then
        remove leaf first. File domains do better: one atomic rename."""
        ordered = leaf_first(vols)
        for v in ordered:
            await self.write_volume_md(replace(v, state=REMOVING, legality=ILLEGAL))
        for i, v in enumerate(ordered):
            await self.remove_volume_data(img, v.uuid)
            progress(100 * (i + 1) / max(1, len(ordered)))
        await self.remove_image_dir(img)

    async def extend_volume(self, img: str, vol: str, new_size: int,
                            generation: int | None = None) -> VolumeMetadata:
        # the store's layout does not follow its capacity (ovfstore.store),
        # but it is the store's own business how large it is
        await self.refuse_ovf_store(img, vol)
        md = await self.volume(img, vol)
        check_generation(md, generation)
        if md.legality != LEGAL:
            raise InvalidParameter(field="volUUID", reason="volume is not LEGAL")
        if new_size < md.capacity:
            raise VolumeResizeValueError(volUUID=vol, reason=f"newSize {new_size} is smaller "
                                                             f"than the capacity {md.capacity}")
        if new_size == md.capacity:
            return md
        async with self.leases.volume(md):
            try:
                await self.extend_volume_data(md, new_size)
            except qemuimg.QemuImgError as e:
                if out_of_space(e):
                    raise NoSpaceLeftOnDomain(sdUUID=self.uuid) from None
                if "too large" in e.message.lower():
                    raise InvalidParameter(field="newSize", reason=e.message) from None
                raise
            done = replace(md, capacity=new_size, generation=md.generation + 1)
            await self.write_volume_md(done)
        return done

    async def update_volume(self, img: str, vol: str, *, description: str | None = None,
                            legality: str | None = None,
                            generation: int | None = None) -> VolumeMetadata:
        """Change a volume's description and/or legality (updateVolume): one
        atomic metadata write with a new generation, under the volume lease;
        no change at all when the values are already the volume's."""
        await self.refuse_ovf_store(img, vol)
        md = await self.volume(img, vol)
        check_generation(md, generation)
        async with self.leases.volume(md):
            # read again under the lease: another host may have changed it
            md = await self.volume(img, vol)
            check_generation(md, generation)
            if md.state != READY:
                # a CREATING volume is LEGAL only once complete (commit_volume)
                raise InvalidParameter(field="volUUID",
                                       reason=f"volume is {md.state}, not complete")
            done = replace(md, description=md.description if description is None
                           else description, legality=legality or md.legality)
            if done == md:
                return md
            done = replace(done, generation=md.generation + 1)
            await self.write_volume_md(done)
        log.info("Updated volume %s/%s/%s: legality %s, generation %d", self.uuid, img, vol,
                 done.legality, done.generation)
        return done

    # ---- thin volumes (extendVolume, refreshVolume): file domains grow by themselves

    async def extend_allocation(self, img: str, vol: str, min_size: int,
                                generation: int | None = None) -> tuple[int, bool]:
        """Let the volume use at least `min_size` bytes of storage: (its size
        afterwards, whether it grew). A file grows as it is written:
        nothing to do."""
        md = await self.volume(img, vol)
        check_generation(md, generation)
        return (await self.volume_sizes(img, vol))[0], False

    async def reduce_volume(self, md: VolumeMetadata) -> int:
        """Shrink what the volume may use to what it holds plus the thin
        margin; its size afterwards. A file holds only what was written:
        nothing to do."""
        return (await self.volume_sizes(md.image, md.uuid))[0]

    async def refresh_volume(self, img: str, vol: str) -> int:
        """See the size another host gave the volume; its size."""
        await self.volume(img, vol)
        return (await self.volume_sizes(img, vol))[0]

    async def collect_garbage(self) -> dict[str, list[str]]:
        """Remove what a crash left half-made or half-removed; report volumes
        whose metadata cannot be read (they are left alone). Under the
        domain lease (storage.domains.garbage)."""
        async with self.leases.metadata():
            return await self._collect_garbage()

    async def census(self) -> Census:
        """Every volume's metadata read afresh; kinds read it in one batch."""
        return await garbage.census(self)

    async def _collect_garbage(self) -> dict[str, list[str]]:
        """The collection; kinds remove their own debris first."""
        return await garbage.collect(self)

    async def verify_image_file(self, md: VolumeMetadata) -> qemuimg.ImageInfo:
        [info] = await qemuimg.info(self.volume_path(md.image, md.uuid),
                                    fmt=VolumeFormat.of(md.format).qemu)
        return info
