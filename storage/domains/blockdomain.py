"""Block domains: an LVM volume group on LUNs, self-contained on storage.

    VG <sdUUID>, tagged HOSTAGENT_SD
      LV metadata   slot 0: domain metadata; slot n: metadata of the volume
                    whose LV has the tag MD_<n>
      LV ids, leases  lease areas (hosts sharing the domain, sanlock later)
      LV <volUUID>  volume data (raw or qcow2), tags IU_<img>, PU_<parent>, MD_<slot>

A slot holds two copies of the same metadata, A then B, each written with
O_DIRECT and fsync'd before the next: a crash tears at most one copy, and a
reader takes A when its checksum is good, else B; so it sees the old
metadata or the new, never a mix. A volume's slot is written first, then its
LV created with its final tags: a slot no LV names is free. (Agents before
issue 21 created the LV tagged INITIALIZING, then wrote the slot and dropped
the tag; an LV still INITIALIZING is a crash leftover that
`collect_garbage` removes.)

Deleting with wipe tags the volume's LV WIPE before its metadata says
REMOVING; whoever removes an LV tagged WIPE (the delete, or `collect_garbage`
after a crash) zeroes it first, so its data never stays on the LUN.

LUNs are added to the VG (`add_devices`) and grown PVs resized
(`resize_device`) under the domain lease; the domain metadata lists the VG's
PVs by LUN WWID (PVS), so another host finds them (`follow_pvs`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
from collections.abc import Callable
from typing import TypeVar

from storage import commands, lvm, lvmlabel, qemuimg
from storage.domains.base import (
    Domain,
    VmAccess,
    check_generation,
    os_error,
    read_check,
)
from storage.domains.firstextent import Placement as Placement
from storage.domains.firstextent import UnknownPV, first_bytes, locate, write_first
from storage.domains.garbage import Census
from storage.domains.holding import LVHolding
from storage.domains.lvtags import IDS_LV as IDS_LV
from storage.domains.lvtags import IMAGE_PREFIX as IMAGE_PREFIX
from storage.domains.lvtags import INITIALIZING as INITIALIZING
from storage.domains.lvtags import LEASES_LV as LEASES_LV
from storage.domains.lvtags import METADATA_LV as METADATA_LV
from storage.domains.lvtags import PARENT_PREFIX as PARENT_PREFIX
from storage.domains.lvtags import SLOT_PREFIX as SLOT_PREFIX
from storage.domains.lvtags import SPECIAL_LVS as SPECIAL_LVS
from storage.domains.lvtags import VG_TAG as VG_TAG
from storage.domains.lvtags import VolumeLV as VolumeLV
from storage.domains.lvtags import free_slot as free_slot
from storage.domains.lvtags import parse_tags as parse_tags
from storage.domains.lvtags import round_up as round_up
from storage.domains.lvtags import slot_of as slot_of
from storage.domains.lvtags import volume_tags as volume_tags
from storage.domains.slots import COPY_SIZE as COPY_SIZE
from storage.domains.slots import DOMAIN_SLOT as DOMAIN_SLOT
from storage.domains.slots import SLOT_SIZE as SLOT_SIZE
from storage.domains.slots import ZERO_CHUNK, SlotCache, read_slots, write_slot, zero
from storage.domains.slots import decode_slot as decode_slot
from storage.domains.slots import encode_copy as encode_copy
from storage.domains.vgdevices import (
    DEFAULT_MDA_SIZE,
    LUNs,
    pv_list_of,
    remove_vg,
    sector_size,
)
from storage.domains.vgdevices import WIPE as WIPE
from storage.errors import (
    DeviceBlockSizeError,
    HostAgentError,
    InvalidParameter,
    LVMCommandError,
    NoSpaceLeftOnDomain,
    StorageDomainAlreadyExists,
    StorageDomainDoesNotExist,
    VolumeDoesNotExist,
    VolumeGroupBlockSizeError,
)
from storage.fileio import IOPool
from storage.leases import BlockDomainLeases, Geometry, Resource, init_volume_lease
from storage.metadata import DomainMetadata, MetadataError, VolumeFormat, VolumeMetadata

log = logging.getLogger("storage.domains")

MiB = 1 << 20
GiB = 1 << 30


DEFAULT_EXTENT_SIZE = 128 * MiB
DEFAULT_METADATA_SIZE = 128 * MiB
# Leases the leases LV grows by at once (64 MiB at 1 MiB alignment; one
# default extent holds 128)
LEASES_GROWTH = 64

R = TypeVar("R")


# ---- the domain -----------------------------------------------------------------------

class BlockDomain(LUNs, LVHolding, Domain):
    sysfs = "/sys"      # (tests point it elsewhere)

    def __init__(self, md: DomainMetadata, lvm_: lvm.LVM, io: IOPool,
                 runner: commands.Runner = commands.run, *, extent_size: int,
                 slots: int) -> None:
        super().__init__(md, io)
        self.lvm = lvm_
        self.runner = runner
        self.extent_size = extent_size
        self.slots = slots
        # Slot allocation (lvs, lvcreate with MD_<n>) and slot clearing after
        # lvremove run one at a time, so a freed slot is never zeroed after
        # someone took it.
        self._slot_lock = asyncio.Lock()
        # LVs this object created (inactive, at this size) whose data
        # create_volume_data has not made yet: it needs no lvs to know their
        # size, nor an activation when their first extent's place on its PV
        # is known. Every LVM command costs a process and a VG metadata
        # read (most of a second in the lab guest).
        self._new_lvs: dict[str, tuple[int, Placement | None]] = {}
        # Slots of volumes this object made (a volume's slot never changes)
        # and the leases LV's size: a new volume's lease needs no lvs.
        self._slots: dict[str, int] = {}
        # The LV _create_lv just made, for the next metadata write of its
        # volume (the commit, or the mark of a failed one): made under the
        # domain lease and the volume's lease held since, it needs no lvs
        # (issue 21: one LVM command of every create). Dropped by the first
        # use and whenever the domain lease is taken again.
        self._made: dict[str, VolumeLV] = {}
        self._leases_size: int | None = None
        # capacity -> qemu-img measure's fully-allocated qcow2 size (the most
        # a cow LV of that capacity ever needs)
        self._full_sizes: dict[int, int] = {}
        # the VG's PVs (the agent never removes one): the first with a
        # metadata area tells whether the VG changed since the cached lvs
        # report (the domain lease's forget_cache keeps it then)
        self._pvs: list[lvm.PV] | None = None
        lvm_.watch_metadata(self.vg, self._metadata_stamp)
        # the volume slots as last read or written here (issue 21: listings)
        self._slot_cache = SlotCache(VolumeMetadata.decode, lvm_.cache_ttl)
        self._parsed_lvs: dict[int, tuple[lvm.LV, VolumeLV | None]] = {}

    @property
    def vg(self) -> str:
        return self.md.uuid

    @property
    def md_path(self) -> str:
        return f"/dev/{self.vg}/{METADATA_LV}"

    # ---- creation, discovery ---------------------------------------------------

    @classmethod
    async def create(cls, devices: list[str], md: DomainMetadata, lvm_: lvm.LVM, io: IOPool,
                     runner: commands.Runner = commands.run, *,
                     extent_size: int = DEFAULT_EXTENT_SIZE,
                     metadata_size: int = DEFAULT_METADATA_SIZE,
                     mda_size: int = DEFAULT_MDA_SIZE,
                     lease_size: int | None = None, force: bool = False) -> BlockDomain:
        """A new domain on `devices` (blank LUNs; force: over other signatures).
        The VG is tagged INITIALIZING until the domain metadata is written, so
        a creation cut short is recognised and redone by the next create."""
        vg = lvm.check_name(md.uuid, "sdUUID")
        if not devices:
            raise InvalidParameter(field="devices", reason="must not be empty")
        for found in await lvm_.vgs():
            if found.name != vg:
                continue
            if INITIALIZING not in found.tags:
                raise StorageDomainAlreadyExists(sdUUID=vg)
            log.warning("Removing domain %s left half-made by an earlier create", vg)
            await remove_vg(lvm_, vg)
        sizes = {d: await sector_size(d, runner) for d in devices}
        if len(set(sizes.values())) > 1:
            raise VolumeGroupBlockSizeError(reason=", ".join(
                f"{d}: {s}" for d, s in sizes.items()))
        block_size = sizes[devices[0]]
        if block_size not in (512, 4096) or COPY_SIZE % block_size:
            raise DeviceBlockSizeError(reason=f"{devices[0]}: sector size {block_size} "
                                              "(512 or 4096 only)")
        md.block_size = block_size
        await lvm_.pvcreate(devices, metadata_size=mda_size, force=force)
        await lvm_.vgcreate(vg, devices, extent_size=extent_size,
                            tags=[VG_TAG, INITIALIZING])
        md.pvs = await pv_list_of(await lvm_.pvs(vg))
        lease_size = lease_size or extent_size
        await lvm_.lvcreate(vg, METADATA_LV, metadata_size)
        await lvm_.lvcreate(vg, IDS_LV, lease_size)
        await lvm_.lvcreate(vg, LEASES_LV, lease_size)
        await lvm_.activate(vg, [METADATA_LV, IDS_LV, LEASES_LV])
        md_lv = await lvm_.lv(vg, METADATA_LV)
        domain = cls(md, lvm_, io, runner, extent_size=extent_size,
                     slots=md_lv.size // SLOT_SIZE)
        # Stale slots of an earlier domain on these LUNs must not read as valid.
        for offset in range(0, md_lv.size, ZERO_CHUNK):
            await io.call(zero, domain.md_path, offset, min(ZERO_CHUNK, md_lv.size - offset))
        await domain.write_domain_md(md)
        await lvm_.vgchange_tags(vg, remove=[INITIALIZING])
        log.info("Created block domain %s on %s", vg, ", ".join(devices))
        return domain

    @classmethod
    async def open(cls, vg_name: str, lvm_: lvm.LVM, io: IOPool,
                   runner: commands.Runner = commands.run, *,
                   scanned: lvm.VG | None = None) -> BlockDomain:
        """The domain of VG `vg_name`, from storage alone; leaves its metadata
        LV active (see `close`). `scanned`: the VG as a scan just reported
        it (one vgs less per domain at each start)."""
        try:
            vg = scanned if scanned is not None else await lvm_.vg(vg_name)
        except lvm.LVMNotFound:
            raise StorageDomainDoesNotExist(sdUUID=vg_name) from None
        if VG_TAG not in vg.tags:
            raise MetadataError(f"VG {vg_name} is not a storage domain (no {VG_TAG} tag)")
        if INITIALIZING in vg.tags:
            raise MetadataError(f"creation of domain {vg_name} did not finish")
        # the lease areas too: every host sharing the domain uses them
        await lvm_.activate(vg_name, [METADATA_LV, IDS_LV, LEASES_LV])
        md_lv = await lvm_.lv(vg_name, METADATA_LV)
        path = f"/dev/{vg_name}/{METADATA_LV}"
        data = (await io.call(read_slots, path, [DOMAIN_SLOT]))[DOMAIN_SLOT]
        md = decode_slot(data, DomainMetadata.decode)
        if md.uuid != vg_name:
            raise MetadataError(f"metadata of {md.uuid} found in VG {vg_name}")
        return cls(md, lvm_, io, runner, extent_size=vg.extent_size,
                   slots=md_lv.size // SLOT_SIZE)

    async def close(self) -> None:
        """Deactivate the metadata LV (volumes are the callers' to tear down)."""
        await self.lvm.deactivate(self.vg, [METADATA_LV])

    # ---- metadata slots ---------------------------------------------------------

    async def _io(self, fn: Callable[..., R], *args: object,
                  timeout: float | None = None, key: str | None = None) -> R:
        """I/O on the domain's LVs (`key`: the slot it writes, IOPool.call's):
        an error of the LUN (EIO; ENODATA, a SCSI medium error; every path
        gone) is the domain failing (379)."""
        try:
            return await self.io.call(fn, *args, timeout=timeout, key=key)
        except OSError as e:
            raise os_error(e, self.uuid) from None

    async def _read_slot(self, slot: int) -> bytes:
        return (await self._io(read_slots, self.md_path, [slot]))[slot]

    async def _write_slot(self, slot: int, data: bytes) -> None:
        copy = encode_copy(data)
        await self._slot_write(slot, copy + copy, write_slot, self.md_path, slot, copy)

    async def _clear_slot(self, slot: int) -> None:
        await self._slot_write(slot, bytes(SLOT_SIZE), zero, self.md_path,
                               slot * SLOT_SIZE, SLOT_SIZE)

    async def _slot_write(self, slot: int, content: bytes, fn: Callable[..., None],
                          *args: object) -> None:
        """Write a slot, and tell the slot cache (a listing that read it
        meanwhile does not keep what it read)."""
        self._slot_cache.wrote(slot, None, None)
        await self._io(fn, *args, key=f"slot {slot} of {self.md_path}")
        self._slot_cache.wrote(slot, content, self.lvm.report_stamp(self.vg))

    async def write_domain_md(self, md: DomainMetadata) -> None:
        await self._write_slot(DOMAIN_SLOT, md.encode())
        self.md = md

    async def read_domain_md(self) -> DomainMetadata:
        return decode_slot(await self._read_slot(DOMAIN_SLOT), DomainMetadata.decode)

    # ---- images and volumes -------------------------------------------------------

    async def _volume_lvs(self) -> list[VolumeLV]:
        # Each LV of the (cached) report is parsed once, not at each of the
        # five or six looks a create takes: parsing its tags cost about
        # 18 us a volume a look in the lab guest, 0.1 s of every create at
        # 1,000 volumes (issue 21). Keyed by the report's own LV objects
        # (kept, so an id is never reused while its entry is here).
        lvs = await self.lvm.lvs(self.vg)
        memo = self._parsed_lvs
        if len(memo) > 2 * len(lvs) + 64:     # reports since replaced
            memo.clear()
        out = []
        for lv in lvs:
            hit = memo.get(id(lv))
            if hit is None or hit[0] is not lv:
                hit = memo[id(lv)] = (lv, VolumeLV.from_lv(lv))
            if hit[1] is not None:
                out.append(hit[1])
        return out

    async def _volume_lv(self, vol: str, ask_again: bool = True) -> VolumeLV | None:
        found = next((v for v in await self._volume_lvs() if v.name == vol), None)
        if found is None and ask_again:
            # Not in the cached lvs: another host may have made it since (the
            # cache is only dropped under the domain lease). Ask LVM again.
            self.lvm.invalidate(self.vg)
            found = next((v for v in await self._volume_lvs() if v.name == vol), None)
        return found

    async def image_ids(self) -> list[str]:
        return sorted({v.image for v in await self._volume_lvs()})

    async def volume_ids(self, img: str) -> list[str]:
        return sorted(v.name for v in await self._volume_lvs() if v.image == img)

    async def image_of(self, vol: str) -> str | None:
        v = await self._volume_lv(vol)
        return None if v is None else v.image

    async def all_volume_ids(self) -> set[str]:
        # One pass over the VG's LVs. The generic one (volume_ids of every
        # image) walked them once per image: each create (it asks this
        # twice) cost O(volumes²) tag parsing, 1 s at 400 volumes in the
        # lab guest, 5 s at 1,000 (issue 21, session 9's DEBUG timeline).
        return {v.name for v in await self._volume_lvs()}

    def _check_volume(self, v: VolumeLV, md: VolumeMetadata) -> VolumeMetadata:
        # A slot reused after a crash may still hold its previous volume.
        if md.uuid != v.name or md.domain != self.uuid:
            raise MetadataError(f"slot {v.slot} holds metadata of {md.domain}/{md.uuid}")
        return md

    async def read_volume_md(self, img: str, vol: str) -> VolumeMetadata:
        v = await self._volume_lv(vol)
        if v is None or v.image != img or v.initializing:
            raise VolumeDoesNotExist(volUUID=vol)
        if v.slot is None:
            raise MetadataError(f"LV {vol} has no {SLOT_PREFIX} tag")
        return self._check_volume(v, decode_slot(await self._read_slot(v.slot),
                                                 VolumeMetadata.decode))

    async def scan(self, img: str | None = None, *,
                   cached: bool = False) -> list[VolumeMetadata]:
        """One lvs (or the cached report, checked against the VG's metadata
        stamp) and one executor call reading the slots; a slot whose bytes
        did not change is not parsed again. cached (the listing verbs,
        after forget_cache): only the slots not read under the VG's current
        stamp within the cache's TTL are read (SlotCache), and those of LVs
        tagged WIPE (being removed: the REMOVING mark follows the tag)."""
        return [md for _, md in await self._read_volumes(img, cached)
                if isinstance(md, VolumeMetadata)]

    async def census(self) -> Census:
        """As scan, every slot read (the generic one walked the VG's LVs once
        per image and per volume: O(volumes²))."""
        census = Census(await self.image_ids())
        for v, md in await self._read_volumes(None, cached=False):
            if isinstance(md, VolumeMetadata):
                census.volumes.append(md)
            else:
                census.damaged.append(f"{v.image}/{v.name}: {md}")
        return census

    async def _read_volumes(self, img: str | None, cached: bool
                            ) -> list[tuple[VolumeLV, VolumeMetadata | MetadataError]]:
        vols = sorted((v for v in await self._volume_lvs()
                       if not v.initializing and (img is None or v.image == img)),
                      key=lambda v: (v.image, v.name))
        stamp = self.lvm.report_stamp(self.vg)
        cache = self._slot_cache
        want = cache.to_read([v.slot for v in vols if v.slot is not None],
                             stamp if cached else None,
                             always=[v.slot for v in vols if v.wipe and v.slot is not None])
        generation = cache.generation
        data = await self._io(read_slots, self.md_path, want,
                              timeout=max(self.io.timeout, 120)) if want else {}
        cache.store(data, stamp, generation)
        out: list[tuple[VolumeLV, VolumeMetadata | MetadataError]] = []
        for v in vols:
            try:
                if v.slot is None:
                    raise MetadataError(f"LV {v.name} has no {SLOT_PREFIX} tag")
                out.append((v, self._check_volume(v, cache.decode(v.slot, data.get(v.slot)))))
            except MetadataError as e:
                out.append((v, e))
        return out

    async def full_size(self, capacity: int) -> int:
        """What a qcow2 volume of `capacity` holds when every cluster is
        written (qemu-img measure), in whole extents."""
        full = self._full_sizes.get(capacity)
        if full is None:
            measured = await qemuimg.measure(size=capacity, runner=self.runner)
            full = self._full_sizes[capacity] = round_up(measured["fully-allocated"],
                                                         self.extent_size)
        return full

    async def lv_start_size(self, md: VolumeMetadata, initial_size: int | None) -> int:
        """The LV of a new volume: raw holds its whole capacity; preallocated
        cow what its full capacity needs; sparse cow `initial_size` or one
        chunk of the thin policy, at most what the full capacity needs."""
        if md.format == "RAW":
            return round_up(md.capacity, self.extent_size)
        if md.allocation == "PREALLOCATED":
            return await self.full_size(md.capacity)
        want = initial_size or self.thin.chunk_size
        # qcow2 never needs less than its capacity: no measure below it
        full = await self.full_size(md.capacity) if want > md.capacity else want
        return self.thin.start_size(initial_size, full, self.extent_size)

    async def write_volume_md(self, md: VolumeMetadata,
                              initial_size: int | None = None) -> None:
        data = md.encode()
        encode_copy(data)   # refuse metadata too large before making anything
        v = self._made.pop(md.uuid, None) or await self._volume_lv(md.uuid, ask_again=False)
        if v is None:
            # Not in the cached report: _create_lv looks under the domain
            # lease, where the report is fresh (issue 21: asking LVM again
            # here was one command of every create). False: it exists.
            if await self._create_lv(md, data, initial_size):
                return
            v = await self._volume_lv(md.uuid)
            if v is None:
                raise VolumeDoesNotExist(volUUID=md.uuid, reason="its LV is gone")
        if v is not None:
            if v.image != md.image or v.slot is None:
                raise InvalidParameter(field="volUUID",
                                       reason=f"LV {md.uuid} belongs to image {v.image}")
            await self._write_slot(v.slot, data)
            if v.parent != md.parent:
                async with self.leases.metadata():
                    await self.lvm.lvchange_tags(self.vg, md.uuid,
                                                 add=[f"{PARENT_PREFIX}{md.parent}"],
                                                 remove=[f"{PARENT_PREFIX}{v.parent}"])
            return

    async def _create_lv(self, md: VolumeMetadata, data: bytes,
                         initial_size: int | None) -> bool:
        """Make the volume's LV and slot; False if an LV of that name exists."""
        lvm.check_name(md.uuid, "volUUID")
        # Made at its final size: no lvextend in create_volume_data.
        size = await self.lv_start_size(md, initial_size)
        slot: int | None = None
        try:
            async with self.leases.metadata(), self._slot_lock:
                # (fresh: taking the domain lease dropped the cached reports,
                # and every change since went through this object, under it)
                lvs = await self.lvm.lvs(self.vg)
                stamp = self.lvm.report_stamp(self.vg)
                if any(lv.name == md.uuid for lv in lvs):
                    return False
                slot = free_slot((lv.tags for lv in lvs), self.slots)
                if slot is None:
                    raise NoSpaceLeftOnDomain(sdUUID=self.uuid)
                # The slot first, then the LV that names it, with its final
                # tags: one LVM command (issue 21; it was lvcreate tagged
                # INITIALIZING and an lvchange dropping the tag after the
                # slot write). A crash in between leaves a slot that no LV's
                # MD_ tag names, which is free: the next volume taking it
                # overwrites it.
                await self._write_slot(slot, data)
                # Inactive, not zeroed: create_volume_data writes its first
                # bytes onto its PV (firstextent.py), found in the metadata
                # this lvcreate committed, under the lease (issue 21).
                # sole_writer: the cached report then stays, with this LV,
                # for the next create (issue 21)
                await self.lvm.lvcreate(self.vg, md.uuid, size,
                                        tags=volume_tags(md, slot), sole_writer=True)
                self._advance_stamp(stamp)
                self._new_lvs[md.uuid] = (size, await self._locate(md.uuid))
                self._slots[md.uuid] = slot
                self._made[md.uuid] = VolumeLV(name=md.uuid, image=md.image, parent=md.parent,
                                               slot=slot, initializing=False, size=size,
                                               active=False)
                self._leases_size = next((lv.size for lv in lvs if lv.name == LEASES_LV),
                                         self._leases_size)
        except BaseException:
            if slot is not None:
                await self._undo_lvcreate(md.uuid, slot)
            raise
        return True

    def _advance_stamp(self, before: bytes | None) -> None:
        """After this host's change of the VG under the domain lease: the
        slots read under the stamp `before` still hold (no other host
        changed the VG in between), so a listing need not read them again."""
        after = self.lvm.report_stamp(self.vg)
        if before is not None and after is not None:
            self._slot_cache.advance(before, after)

    async def _undo_lvcreate(self, vol: str, slot: int) -> None:
        """After a failed or cut off lvcreate: an LV that LVM made anyway
        goes, with its slot. Only one that names this slot: it was free,
        so no other LV can (an LV of that name made by another job stays)."""
        try:
            self.lvm.invalidate(self.vg)
            v = next((v for v in await self._volume_lvs() if v.name == vol), None)
            if v is not None and v.slot == slot:
                await self._remove_lv(vol, slot)
        except HostAgentError as e:
            # collect_garbage removes a CREATING volume later
            log.warning("Cannot remove LV %s/%s: %s", self.vg, vol, e)

    async def _remove_lv(self, vol: str, slot: int | None) -> None:
        self._new_lvs.pop(vol, None)
        self._slots.pop(vol, None)
        self._made.pop(vol, None)
        async with self.leases.metadata(), self._slot_lock:
            try:
                # --force also deactivates the LV if it is active and not
                # open (a crash left it so): no separate lvchange -an.
                await self.lvm.lvremove(self.vg, [vol])
            except lvm.LVMNotFound:
                return
            if slot is not None:
                await self._clear_slot(slot)

    def volume_path(self, img: str, vol: str) -> str:
        return f"/dev/{self.vg}/{vol}"

    async def grant_access(self, vols: list[VolumeMetadata], access: VmAccess) -> None:
        """Give the (active) LVs' device nodes to access.gid with
        access.file_mode: what udev/60-hostagent-lvm.rules does on every
        event, for hosts without it. Not undone at teardown: the last user's
        teardown deactivates the LV, which removes its node (the next
        activation makes a new one, root:disk or the rule's); while it stays
        active, another prepared chain sharing it (a template's volume)
        still needs its qemu to be able to reopen it."""
        paths = [self.volume_path(m.image, m.uuid) for m in vols]

        def grant() -> None:
            for path in paths:
                st = os.stat(path)      # the dm node: /dev/<vg>/<lv> is udev's link
                if st.st_gid != access.gid:
                    os.chown(path, -1, access.gid)
                if stat.S_IMODE(st.st_mode) != access.file_mode:
                    os.chmod(path, access.file_mode)
        try:
            await self.io.call(grant)
        except OSError as e:
            raise os_error(e, self.uuid) from e

    async def create_volume_data(self, md: VolumeMetadata, parent: VolumeMetadata | None,
                                 initial_size: int | None) -> None:
        made, place = self._new_lvs.pop(md.uuid, (None, None))
        # relative, so the chain resolves in /dev/<sdUUID>/ wherever the
        # volumes live; the parent need not be active
        backing = (parent.uuid, VolumeFormat.of(parent.format).qemu) if parent else (None, None)
        if place is not None:
            if first_bytes(md.format, md.capacity, *backing) <= place.length:
                await self._io(write_first, place.device, place.offset, md.format,
                               md.capacity, *backing)
                return
            log.debug("LV %s/%s: first segment too short; activating it", self.vg, md.uuid)
        want = 0
        if made is None:
            # Not made by _create_lv of this object: find its size.
            v = await self._volume_lv(md.uuid)
            if v is None:
                raise VolumeDoesNotExist(volUUID=md.uuid, reason="its LV is gone")
            made = v.size
            if md.format == "COW":
                want = await self.lv_start_size(md, initial_size)
        await self.lvm.activate(self.vg, [md.uuid])
        try:
            if md.format == "COW" and want > made:
                async with self.leases.metadata():
                    await self.lvm.lvextend(self.vg, md.uuid, want)
            await self._io(write_first, self.volume_path(md.image, md.uuid), 0, md.format,
                           md.capacity, *backing)
        finally:
            await self.lvm.deactivate(self.vg, [md.uuid], udev_sync=False)

    async def remove_volume_data(self, img: str, vol: str) -> None:
        v = await self._volume_lv(vol)
        if v is None or v.image != img:
            return
        if v.wipe:
            await self.wipe_lv(v.image, v.name, v.size)
        await self._remove_lv(vol, v.slot)

    async def extend_volume_data(self, md: VolumeMetadata, new_size: int) -> None:
        if md.format == "RAW":
            # The virtual size of a raw volume is its LV's size.
            v = await self._volume_lv(md.uuid)
            size = round_up(new_size, self.extent_size)
            if v is None or size > v.size:
                async with self.leases.metadata():
                    await self.lvm.lvextend(self.vg, md.uuid, size)
            return
        # qemu-img resize opens the backing chain: activate all of it.
        chain = await self.chain(md.image, md.uuid)
        by_name = {v.name: v for v in await self._volume_lvs()}
        inactive = [c for c in chain if by_name[c.uuid].active is not True]
        if inactive:
            await self.activate_volumes(inactive)
        try:
            await qemuimg.resize(self.volume_path(md.image, md.uuid), new_size, fmt="qcow2",
                                 runner=self.runner)
        finally:
            if inactive:
                await self.deactivate_volumes(inactive)

    async def extend_allocation(self, img: str, vol: str, min_size: int,
                                generation: int | None = None) -> tuple[int, bool]:
        """Grow a cow volume's LV to at least `min_size` (whole extents, never
        past what its full capacity needs) with one lvextend under the domain
        lease; when the LV is large enough already, no LVM command at all
        (the cached report; a stale one is smaller, never larger). The LV's
        size is not in the volume's metadata: a crash leaves the LV at its
        old size or the new one, both usable. A raw volume's LV is its
        capacity: nothing to do."""
        md = await self.volume(img, vol)
        check_generation(md, generation)
        v = await self._volume_lv(vol)
        if v is None or v.image != img:
            raise VolumeDoesNotExist(volUUID=vol)
        if md.format != "COW":
            return v.size, False
        want = self.thin.extend_size(min_size, await self.full_size(md.capacity),
                                     self.extent_size)
        if v.size >= want:
            return v.size, False
        async with self.leases.metadata():
            try:
                await self.lvm.lvextend(self.vg, vol, want, sole_writer=True)
            except LVMCommandError as e:
                reason = str(e)
                if "Insufficient free space" in reason:
                    raise NoSpaceLeftOnDomain(sdUUID=self.uuid, volUUID=vol,
                                              needed=want - v.size) from None
                if "not larger than existing" not in reason:
                    raise
                # another host (or call) grew it further meanwhile
                now = await self._volume_lv(vol)
                return (now.size if now is not None else want), False
        log.info("Extended LV %s/%s to %d bytes", self.vg, vol, want)
        return want, True

    async def reduce_volume(self, md: VolumeMetadata) -> int:
        """Shrink a sparse cow volume's LV (its chain active, no writer) to
        qemu-img check's image-end-offset plus the thin margin, in whole
        extents. Under the volume's lease, the lvreduce under the domain
        lease. Crash-safe without a metadata step: everything qcow2 holds
        lies below image-end-offset, the LV's size is no metadata, and
        lvreduce is one LVM metadata commit (the old size or the new one)."""
        v = await self._volume_lv(md.uuid)
        if v is None or v.image != md.image:
            raise VolumeDoesNotExist(volUUID=md.uuid)
        if md.format != "COW" or md.allocation != "SPARSE":
            return v.size
        async with self.leases.volume(md):
            checked = await qemuimg.check(self.volume_path(md.image, md.uuid),
                                          runner=self.runner)
            end = int(checked.get("image-end-offset", 0))
            if not end:
                raise InvalidParameter(field="volUUID",
                                       reason=f"qemu-img check gave no image end: {checked}")
            want = self.thin.reduced_size(end, await self.full_size(md.capacity),
                                          self.extent_size)
            if want >= v.size:
                return v.size
            async with self.leases.metadata():
                await self.lvm.lvreduce(self.vg, md.uuid, want)
        log.info("Reduced LV %s/%s from %d to %d bytes (image end %d)", self.vg, md.uuid,
                 v.size, want, end)
        return want

    async def refresh_volume(self, img: str, vol: str) -> int:
        """lvchange --refresh: an LV active here takes the size another
        host's lvextend recorded. Not asked of lv_attr first: while the
        mapping here differs from the metadata (just what a refresh is
        for), lvs reports the LV's state unknown ("X"), not active; and a
        refresh of an inactive LV does nothing (measured in the lab guest,
        LVM 2.03.16)."""
        self.lvm.invalidate(self.vg)
        v = await self._volume_lv(vol)
        if v is None or v.image != img or v.initializing:
            raise VolumeDoesNotExist(volUUID=vol)
        await self.lvm.refresh(self.vg, [vol])
        return v.size

    async def volume_sizes(self, img: str, vol: str) -> tuple[int, int]:
        v = await self._volume_lv(vol)
        if v is None or v.image != img:
            return 0, 0
        return v.size, v.size

    async def activate_volumes(self, vols: list[VolumeMetadata], *,
                               refresh: bool = False) -> None:
        """`refresh` (a prepare, as VDSM's): an LV active here already is
        reloaded too (lvchange --activate leaves an active LV's mapping as
        it is, with the size it had when activated: another host may have
        extended it since)."""
        if not vols:
            return
        names = [v.uuid for v in vols]
        active = []
        if refresh:
            lvs = {v.name: v for v in await self._volume_lvs()}
            # None: LVM cannot tell (the mapping differs from the metadata)
            active = [n for n in names if n in lvs and lvs[n].active is not False]
        await self.lvm.activate(self.vg, names)
        if active:
            await self.lvm.refresh(self.vg, active)

    async def deactivate_volumes(self, vols: list[VolumeMetadata]) -> None:
        existing = {v.name for v in await self._volume_lvs()}
        names = [v.uuid for v in vols if v.uuid in existing]
        if names:
            await self.lvm.deactivate(self.vg, names)

    async def space(self) -> dict[str, int]:
        vg = await self.lvm.vg(self.vg)
        if vg.pv_count > len(self.lvm.devices or ()) and await self.follow_pvs():
            vg = await self.lvm.vg(self.vg)
        return {"capacity": vg.size, "free": vg.free, "used": vg.size - vg.free}

    async def remove_image_dir(self, img: str) -> None:
        return None   # an image is only the IU_ tags of its volumes

    async def _collect_garbage(self) -> dict[str, list[str]]:
        """Also remove LVs left INITIALIZING (a crash between lvcreate and the
        slot write): their metadata was never complete. (Under the domain
        lease: another host makes its new LVs under it too.)"""
        self.lvm.invalidate(self.vg)
        leftovers = [v for v in await self._volume_lvs() if v.initializing]
        for v in leftovers:
            await self._remove_lv(v.name, v.slot)
        report = await super()._collect_garbage()
        report["removed"] += [f"{v.image}/{v.name}" for v in leftovers]
        if leftovers:
            log.warning("Domain %s: removed LVs left INITIALIZING: %s", self.uuid,
                        ", ".join(v.name for v in leftovers))
        return report

    async def remove_all(self) -> None:
        await remove_vg(self.lvm, self.vg)

    async def health_check(self, timeout: float) -> None:
        await read_check(self.runner, self.uuid, str(self.md_path), timeout)

    # ---- leases --------------------------------------------------------------------------

    def lease_areas(self) -> BlockDomainLeases:
        return BlockDomainLeases(self.uuid, Geometry(self.md.block_size, self.md.alignment))

    def forget_cache(self) -> None:
        # what this host cached may be stale: LVM's reports are checked
        # against the VG's metadata stamp before their next use
        self.lvm.suspect(self.vg)
        self._made.clear()

    async def _domain_pvs(self, again: bool = False) -> list[lvm.PV]:
        if self._pvs is None or again:
            self._pvs = await self.lvm.pvs(self.vg)
        return self._pvs

    async def _metadata_stamp(self) -> bytes | None:
        """The VG's metadata stamp (lvmlabel) from its first PV with a
        metadata area."""
        pv = next((pv for pv in await self._domain_pvs() if pv.mda_count), None)
        return await self._io(lvmlabel.metadata_stamp, pv.name) if pv is not None else None

    async def _locate(self, vol: str) -> Placement | None:
        """Where the new LV `vol` starts on its PV (firstextent.py); under
        the domain lease, after its lvcreate. A PV another host added
        since this host's list: the list is asked again, once."""
        for again in (False, True):
            try:
                return await self._io(locate, self.vg, vol, await self._domain_pvs(again))
            except UnknownPV as e:
                log.debug("LV %s/%s on PV %s, not in %s's PV list", self.vg, vol, e, self.vg)
        return None

    async def volume_lease(self, img: str, vol: str) -> Resource:
        slot = self._slots.get(vol)
        if slot is None:
            v = await self._volume_lv(vol)
            if v is None or v.slot is None:
                raise VolumeDoesNotExist(volUUID=vol, reason="no LV with a metadata slot")
            slot = v.slot
        return self.lease_areas().volume_resource(vol, slot)

    async def make_volume_lease(self, md: VolumeMetadata) -> None:
        """The leases LV holds one lease per metadata slot: grow it when a
        slot past its end is used, by LEASES_GROWTH leases at least (with
        small extents, one extent at a time cost every 8th create an lvs
        and an lvextend: issue 21)."""
        res = await self.volume_lease(md.image, md.uuid)
        need = res.offset + res.geometry.resource_size
        if self._leases_size is None or self._leases_size < need:
            async with self.leases.metadata():
                size = (await self.lvm.lv(self.vg, LEASES_LV)).size
                if size < need:
                    size = round_up(need + (LEASES_GROWTH - 1) * res.geometry.resource_size,
                                    self.extent_size)
                    await self.lvm.lvextend(self.vg, LEASES_LV, size)
                self._leases_size = size
        await init_volume_lease(res, self.md.lock_policy, self.leases.io_timeout,
                                runner=self.runner)
