"""Cold merge (mergeSnapshots): delete the snapshot layer `top` of a disk no
VM writes by committing it into its parent `base`, as VDSM's SDM merge does;
and the dirty bitmaps a new layer carries from its parent.

The steps, each leaving a chain that `qemu-img check` and the metadata agree
on and that reads as before:

1. `qemu-img commit -d` of top into base: top still covers base, so the
   chain reads the same during and after it (a commit again is a no-op).
2. top's consistent dirty bitmaps merged into base's (a commit carries none).
3. top marked ILLEGAL: the point of no return, recorded on storage. An
   interrupted job's recovery (`recover_merge`) finishes from here on, and
   gives up before it (the chain is whole; the engine may merge again).
4. top's child, if any, rebased (`qemu-img rebase -u`: base holds top's data
   now) onto base, then its metadata's parent.
5. top removed (REMOVING first: garbage collection finishes a cut removal and
   makes base a LEAF again when top was the leaf).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

from storage import commands, qcow2, qemuimg
from storage.domains.base import Domain, Fill, Progress, check_generation, volume_info
from storage.domains.prepared import PreparedVolumes
from storage.domains.registry import DomainRegistry
from storage.errors import (
    HostAgentError,
    InvalidParameter,
    NoSpaceLeftOnDomain,
    PrepareIllegalVolumeError,
    VolumeDoesNotExist,
    VolumeIsBusy,
)
from storage.fileio import read_direct
from storage.locks import SHARED, LockManager, request
from storage.metadata import ILLEGAL, LEGAL, READY, VolumeMetadata
from storage.metadata import SHARED as SHARED_VOL

log = logging.getLogger("storage.merge")

COW = "COW"


class Pieces(Protocol):
    """What merging and carrying bitmaps need: the domain registry, the
    prepared-volume tracking, the locks and the runner (VolumeOps and
    ImageOps both have them)."""

    @property
    def registry(self) -> DomainRegistry: ...

    @property
    def prepared(self) -> PreparedVolumes: ...

    @property
    def runner(self) -> commands.Runner: ...

    @property
    def locks(self) -> LockManager: ...


def _fmt(md: VolumeMetadata) -> str:
    return "qcow2" if md.format == COW else "raw"


def _span(progress: Progress, start: float, end: float) -> Progress:
    return lambda p: progress(start + (end - start) * max(0.0, min(100.0, p)) / 100)


async def bitmap_names(dm: Pieces, domain: Domain,
                       md: VolumeMetadata) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(consistent, inconsistent) dirty bitmaps of an active volume. An
    inconsistent one (a qemu-img that had the volume open for writing was
    killed) no longer knows what changed: never carried nor merged."""
    if md.format != COW:
        return (), ()
    path = domain.volume_path(md.image, md.uuid)
    # Most volumes have none: its header says so in one read, where a
    # qemu-img info (which opens the backing chain too) was most of a
    # snapshot layer's create on NFS in the lab guest (208 of 700 ms).
    head = await domain.io.call(read_direct, Path(path), qcow2.HEAD_READ)
    if qcow2.has_bitmaps(head) is False:
        return (), ()
    [info] = await qemuimg.info(path, fmt="qcow2", runner=dm.runner)
    broken = info.inconsistent_bitmaps
    return tuple(b for b in info.bitmaps if b not in broken), broken


async def carry_bitmaps(dm: Pieces, domain: Domain, parent: VolumeMetadata,
                        md: VolumeMetadata) -> None:
    """A new layer `md` over `parent` goes on tracking what the parent's
    consistent bitmaps track (VDSM's addBitmaps): each added to the layer
    and, unless a VM writes the parent now (a snapshot the VM's manager
    switches itself: qemu holds the parent's write lock), filled from the
    parent's so that the layer's bitmap alone covers the whole disk (what an
    incremental backup reads)."""
    if parent.format != COW or md.format != COW:
        return
    # most parents have none: asked with the parent alone active (block: one
    # LV, not the chain the bitmaps' qemu-img runs open)
    async with dm.prepared.using(domain, [parent]):
        have, _ = await bitmap_names(dm, domain, parent)
    if not have:
        return
    live = dm.prepared.is_prepared(domain.uuid, parent.image, "vm")
    async with dm.prepared.using(domain, [*await domain.chain(parent.image, parent.uuid), md]):
        path = domain.volume_path(md.image, md.uuid)
        for bm in have:
            await qemuimg.bitmap(path, bm, action="add", runner=dm.runner)
            if not live:
                await qemuimg.bitmap(path, bm, action="merge",
                                     source=domain.volume_path(parent.image, parent.uuid),
                                     runner=dm.runner)


def bitmaps_fill(dm: Pieces, domain: Domain) -> Fill:
    """A `fill` for Domain.create_volume of a new layer (createVolume with a
    parent, snapshotImages): it carries its parent's bitmaps."""
    async def fill(md: VolumeMetadata) -> None:
        if md.has_parent:
            parent = await domain.find_volume(md.parent, prefer_image=md.image)
            await carry_bitmaps(dm, domain, parent, md)
    return fill


async def merge_snapshots(dm: Pieces, sd: str, img: str, base_id: str, top_id: str,
                          progress: Progress, generation: int | None = None
                          ) -> dict[str, Any]:
    """mergeSnapshots: `top` (the child of `base`) goes, its child (if any)
    is layered on `base`, every remaining volume reads as before; the info
    of `base` afterwards."""
    async with dm.locks.hold(request("domain", sd, SHARED), request("image", f"{sd}/{img}")):
        entry = await dm.registry.entry(sd)
        dm.registry.check_writable(entry)
        domain = entry.domain
        await domain.refuse_ovf_store(img)
        base, top, child = await _plan(dm, domain, img, base_id, top_id)
        check_generation(base, generation)
        progress(5)
        base = await _merge(dm, domain, base, top, child, progress)
        apparent, true = await domain.volume_sizes(img, base.uuid)
        progress(100)
        return volume_info(base, apparent, true)


async def _plan(dm: Pieces, domain: Domain, img: str, base_id: str,
                top_id: str) -> tuple[VolumeMetadata, VolumeMetadata, VolumeMetadata | None]:
    if dm.prepared.is_prepared(domain.uuid, img, "vm"):
        raise VolumeIsBusy(resource=f"image {img}",
                           reason="prepared for a VM: merging a disk a VM writes is the VM "
                                  "side's live merge")
    if dm.prepared.is_prepared(domain.uuid, img):
        # a reader's chain would lose a volume under it (as deleteImage)
        raise VolumeIsBusy(resource=f"image {img}", reason="volumes are prepared")
    top = await domain.volume(img, top_id)
    try:
        base = await domain.volume(img, base_id)
    except VolumeDoesNotExist:
        try:
            other = await domain.find_volume(base_id)
        except VolumeDoesNotExist:
            raise VolumeDoesNotExist(volUUID=base_id) from None
        raise InvalidParameter(field="baseVolUUID",
                               reason=f"volume {base_id} is in image {other.image} (a "
                                      "template's volume is shared: never merged into)"
                               ) from None
    if top.parent != base.uuid:
        raise InvalidParameter(field="topVolUUID",
                               reason=f"volume {top_id} is not a child of {base_id} (its "
                                      f"parent is {top.parent})")
    if base.voltype == SHARED_VOL:
        raise InvalidParameter(field="baseVolUUID",
                               reason=f"volume {base_id} is shared by other images")
    kids = await domain.children(top)
    if len(kids) > 1 or any(k.image != img for k in kids):
        raise InvalidParameter(field="topVolUUID",
                               reason=f"volume {top_id} is the parent of volumes in other "
                                      "images (a template)")
    child = kids[0] if kids else None
    for md in (base, top, *kids):
        if md.legality != LEGAL or md.state != READY:
            raise PrepareIllegalVolumeError(volUUID=md.uuid, reason="not a complete, LEGAL "
                                                                    "volume")
    return base, top, child


async def _merge(dm: Pieces, domain: Domain, base: VolumeMetadata,
                 top: VolumeMetadata, child: VolumeMetadata | None,
                 progress: Progress) -> VolumeMetadata:
    img = base.image
    chain = await domain.chain(img, (child or top).uuid)
    top_path = domain.volume_path(img, top.uuid)
    base_path = domain.volume_path(img, base.uuid)
    async with domain.leases.volume(base), domain.leases.volume(top):
        async with dm.prepared.using(domain, chain):
            if top.capacity > base.capacity:
                # qemu-img commit would grow base's image, but not its
                # metadata nor a raw LV: both first (a larger base under top
                # reads the same through top)
                await domain.extend_volume_data(base, top.capacity)
                base = replace(base, capacity=top.capacity, generation=base.generation + 1)
                await domain.write_volume_md(base)
            await _make_room(dm, domain, base, top)
            if base.format == COW:
                # bitmaps a killed qemu-img left in-use cannot be merged into
                _, broken = await bitmap_names(dm, domain, base)
                for bm in broken:
                    await qemuimg.bitmap(base_path, bm, action="remove", runner=dm.runner)
            progress(10)
            try:
                await qemuimg.commit(top_path, fmt="qcow2", drop=True,
                                     progress=_span(progress, 10, 85), runner=dm.runner)
            except qemuimg.QemuImgError as e:
                if "No space left" in e.message:
                    raise NoSpaceLeftOnDomain(sdUUID=domain.uuid) from None
                raise
            await _merge_bitmaps(dm, domain, base, top)
            progress(90)
            # 3: the point of no return (recover_merge goes on from here)
            top = replace(top, legality=ILLEGAL, generation=top.generation + 1)
            await domain.write_volume_md(top)
            if child is not None:
                async with domain.leases.volume(child):
                    await _rebase(dm, domain, child, base)
    # 5: top goes (under its lease again); a leaf top leaves base the leaf
    await domain.delete_volume(img, top.uuid)
    progress(95)
    base = await domain.volume(img, base.uuid)
    try:
        async with dm.prepared.using(domain, await domain.chain(img, base.uuid)):
            await domain.reduce_volume(base)
    except HostAgentError as e:
        # base holds all it must; only room is not given back
        log.warning("Merged base %s/%s/%s not reduced: %s", domain.uuid, img, base.uuid,
                    e.message)
    log.info("Merged volume %s/%s/%s into %s%s", domain.uuid, img, top.uuid, base.uuid,
             f" (child {child.uuid} rebased)" if child else "")
    return base


async def _make_room(dm: Pieces, domain: Domain, base: VolumeMetadata,
                     top: VolumeMetadata) -> None:
    """Let base hold what top holds besides its own (block cow: its LV grown
    to its size plus top's measured data and bitmaps; a file grows as it is
    written: a no-op there)."""
    if base.format != COW:
        return
    top_path = domain.volume_path(top.image, top.uuid)
    measured = await qemuimg.measure(path=top_path, src_fmt="qcow2", dst_fmt="qcow2",
                                     backing=False, block=top_path.startswith("/dev/"),
                                     runner=dm.runner)
    have = (await domain.volume_sizes(base.image, base.uuid))[0]
    need = have + measured["required"] + measured.get("bitmaps", 0)
    await domain.extend_allocation(base.image, base.uuid, need)


async def _merge_bitmaps(dm: Pieces, domain: Domain, base: VolumeMetadata,
                         top: VolumeMetadata) -> None:
    """Fold top's consistent bitmaps into base's (`qemu-img commit` carries
    none): what they tracked while top was written is base's now. A raw
    base holds no bitmaps: they end with top."""
    if base.format != COW:
        return
    base_path = domain.volume_path(base.image, base.uuid)
    top_path = domain.volume_path(top.image, top.uuid)
    have, broken = await bitmap_names(dm, domain, base)
    for bm in (await bitmap_names(dm, domain, top))[0]:
        if bm in broken:
            await qemuimg.bitmap(base_path, bm, action="remove", runner=dm.runner)
        if bm not in have:
            await qemuimg.bitmap(base_path, bm, action="add", runner=dm.runner)
        await qemuimg.bitmap(base_path, bm, action="merge", source=top_path,
                             runner=dm.runner)


async def _rebase(dm: Pieces, domain: Domain, child: VolumeMetadata,
                  base: VolumeMetadata) -> None:
    """Layer child on base: its qcow2 header (unsafe: base reads as top
    did), then its metadata. Both again are no-ops."""
    await qemuimg.rebase(domain.volume_path(child.image, child.uuid), base.uuid,
                         backing_fmt=_fmt(base), runner=dm.runner)
    md = await domain.read_volume_md(child.image, child.uuid)
    if md.parent != base.uuid:
        await domain.write_volume_md(replace(md, parent=base.uuid,
                                             generation=md.generation + 1))


async def recover_merge(dm: Pieces, params: dict[str, Any],
                        started: float | None) -> None:
    """An interrupted mergeSnapshots. Before top was marked ILLEGAL the chain
    is whole and reads as before (top over base, base maybe holding some of
    top's data already): left as it is, the engine may merge again. From the
    mark on, the merge is finished: the child rebased onto base (again), top
    removed. Until then the chain cannot be prepared nor merged (top is
    ILLEGAL), so this may run while the agent serves: if the domain cannot
    be reached (its storage down at the start), this fails and runs again
    when storage comes back (a live recovery, agent.jobs)."""
    sd, img = str(params.get("sdUUID", "")), str(params.get("imgUUID", ""))
    base_id, top_id = str(params.get("baseVolUUID", "")), str(params.get("topVolUUID", ""))
    try:
        await dm.registry.collect_garbage(sd)
    except HostAgentError as e:
        log.warning("Interrupted merge in %s: garbage collection failed: %s", sd, e.message)
    if started is None:
        return
    try:
        async with dm.locks.hold(request("domain", sd, SHARED),
                                 request("image", f"{sd}/{img}")):
            domain = await dm.registry.domain(sd)
            try:
                await _finish(dm, domain, sd, img, base_id, top_id)
            finally:
                # The killed job's volumes were active (block: LVs): those no
                # prepared chain uses are deactivated (taken and released).
                async with dm.prepared.using(domain, await domain.image_volumes(img)):
                    pass
    except HostAgentError as e:
        log.error("Cannot finish the interrupted merge of %s/%s/%s yet: %s", sd, img, top_id,
                  e.message)
        raise


async def _finish(dm: Pieces, domain: Domain, sd: str, img: str, base_id: str,
                  top_id: str) -> None:
    try:
        top = await domain.read_volume_md(img, top_id)
        base = await domain.volume(img, base_id)
    except VolumeDoesNotExist:
        return          # top gone: the merge was over (or never here)
    if top.state != READY or top.parent != base_id or top.legality == LEGAL:
        log.warning("Interrupted merge of %s/%s/%s: the chain is as it was; merge again",
                    sd, img, top_id)
        return
    log.warning("Interrupted merge of %s/%s/%s into %s: finishing", sd, img, top_id, base_id)
    kids = [v for v in await domain.image_volumes(img) if v.parent == top_id]
    for child in kids:
        async with dm.prepared.using(domain, await domain.chain(img, child.uuid)):
            await _rebase(dm, domain, child, base)
    await domain.delete_volume(img, top_id)
