"""Operations on a VM's disks across storage domains: copy, move, snapshot
all disks at once, hibernation volumes.

Every disk may live on its own domain; a flow that spans several disks is
all or nothing. The rules that keep storage safe:

- A copy target is made like any volume (CREATING + ILLEGAL, data written
  by qemu-img, then LEGAL in one metadata write). A chain copied layer by
  layer keeps every layer CREATING until all are written, then commits them
  base first: a crash leaves CREATING volumes (removed at start-up) or, in
  the last instant, a shorter valid chain that the job's recovery hook
  removes because the job did not end.
- A move removes its source only after every target volume is committed
  and `qemu-img compare` found each leaf equal to its source.
- Source volumes are locked shared, targets exclusive; the locks of every
  disk in a flow are taken together, in rank order.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from storage import commands, nbd, qemuimg
from storage.domains import merge
from storage.domains.base import (
    Domain,
    Progress,
    VolumeSpec,
    leaf_first,
    volume_info,
)
from storage.domains.prepared import PreparedVolumes
from storage.domains.registry import DomainRegistry
from storage.domains.writers import held_bitmaps
from storage.errors import (
    BackupDomainRestricted,
    CreateIllegalVolumeSnapshotError,
    HostAgentError,
    InvalidParameter,
    NoSpaceLeftOnDomain,
    PrepareIllegalVolumeError,
    VolumeAlreadyExists,
    VolumeCopyError,
    VolumeDoesNotExist,
    VolumeImageHasChildren,
    VolumeIsBusy,
    out_of_space,
)
from storage.locks import SHARED, LockManager, Request, request
from storage.metadata import LEGAL, READY, VolumeFormat, VolumeMetadata

if TYPE_CHECKING:
    from storage.domains.volumes import VolumeOps
    from storage.domains.writers import WriterWatch

log = logging.getLogger("storage.images")

MiB = 1 << 20
# The memory image of a hibernated VM: the dump and the VM's metadata.
HIBERNATION_META_SIZE = 10 * MiB


@dataclass(frozen=True)
class VolRef:
    sd: str
    img: str
    vol: str

    @classmethod
    def of(cls, d: dict[str, Any]) -> VolRef:
        return cls(d["sdUUID"], d["imgUUID"], d["volUUID"])

    def __str__(self) -> str:
        return f"{self.sd}/{self.img}/{self.vol}"


def qemu_format(md: VolumeMetadata) -> str:
    return VolumeFormat.of(md.format).qemu


def parents_first(vols: list[VolumeMetadata]) -> list[VolumeMetadata]:
    return list(reversed(leaf_first(vols)))


def _span(progress: Progress, start: float, end: float) -> Progress:
    """A progress callback mapping 0-100 onto start-end of the whole job."""
    return lambda p: progress(start + (end - start) * max(0.0, min(100.0, p)) / 100)


def _no_space(e: HostAgentError, sd: str) -> HostAgentError:
    if out_of_space(e):
        return NoSpaceLeftOnDomain(sdUUID=sd)
    return e


class ImageOps:
    def __init__(self, registry: DomainRegistry, prepared: PreparedVolumes,
                 locks: LockManager, volumes: VolumeOps,
                 runner: commands.Runner = commands.run) -> None:
        self.registry = registry
        self.prepared = prepared
        self.locks = locks
        # the writers of VMs' disks, switched onto new layers (live snapshot)
        self.volumes = volumes
        self.runner = runner

    # ---- helpers -----------------------------------------------------------------

    async def _writable(self, sd: str) -> Domain:
        entry = await self.registry.entry(sd)
        self.registry.check_writable(entry)
        return entry.domain

    async def _readable(self, sd: str) -> Domain:
        return await self.registry.active_domain(sd)

    @staticmethod
    def _legal(chain: list[VolumeMetadata]) -> None:
        for md in chain:
            if md.legality != LEGAL or md.state != READY:
                raise PrepareIllegalVolumeError(volUUID=md.uuid)

    async def _check_space(self, domain: Domain, need: int) -> None:
        free = (await domain.space())["free"]
        if need > free:
            raise NoSpaceLeftOnDomain(sdUUID=domain.uuid,
                                      reason=f"needs {need} bytes, {free} free")

    async def _convert(self, src: Domain, src_md: VolumeMetadata, dst: Domain,
                       dst_md: VolumeMetadata, progress: Progress, *,
                       backing: VolumeMetadata | None = None) -> None:
        """qemu-img convert into an existing target volume made for it: cache
        bypassed on both sides, zeros of a fresh target skipped, out-of-order
        writes where the target is raw. With `backing` the target is one
        layer of a chain: only what the source layer holds is written."""
        dst_fmt = qemu_format(dst_md)
        fresh_zero = dst.zeroed_when_made(dst_md)
        try:
            await qemuimg.convert(
                src.volume_path(src_md.image, src_md.uuid),
                dst.volume_path(dst_md.image, dst_md.uuid),
                src_cache=await src.cache_mode(), dst_cache=await dst.cache_mode(),
                src_fmt=qemu_format(src_md), dst_fmt=dst_fmt, create=False,
                target_is_zero=fresh_zero and backing is None,
                unordered=dst_fmt == "raw",
                backing=dst.volume_path(backing.image, backing.uuid) if backing else None,
                backing_fmt=qemu_format(backing) if backing else None,
                progress=progress, runner=self.runner)
        except qemuimg.QemuImgError as e:
            error = _no_space(e, dst.uuid)
            raise (VolumeCopyError(reason=e.message) if error is e else error) from None
        except HostAgentError as e:
            raise _no_space(e, dst.uuid) from None

    # ---- copyImage -------------------------------------------------------------------

    async def copy(self, src: VolRef, dst: VolRef, fmt: str | None, prealloc: str | None,
                   collapse: bool, progress: Progress) -> dict[str, Any]:
        if src.sd == dst.sd and src.vol == dst.vol:
            raise VolumeAlreadyExists(volUUID=dst.vol, reason="source and target are the same")
        reqs = [request("domain", src.sd, SHARED), request("image", f"{src.sd}/{src.img}",
                                                           SHARED),
                request("domain", dst.sd, SHARED), request("image", f"{dst.sd}/{dst.img}"),
                request("volume", f"{dst.sd}/{dst.vol}")]
        async with self.locks.hold(*reqs):
            sdom = await self._readable(src.sd)
            ddom = await self._writable(dst.sd)
            chain = await sdom.chain(src.img, src.vol)
            self._legal(chain)
            if collapse:
                md = await self._copy_collapsed(sdom, chain, ddom, dst, fmt, prealloc,
                                                progress)
            else:
                own = [m for m in chain if m.image == src.img]
                ids = {m.uuid: m.uuid for m in own}
                ids[src.vol] = dst.vol
                [md] = [m for m in await self._copy_volumes(sdom, own, ddom, dst.img, ids,
                                                            progress)
                        if m.uuid == dst.vol]
            apparent, true = await ddom.volume_sizes(md.image, md.uuid)
            return volume_info(md, apparent, true)

    async def _copy_collapsed(self, sdom: Domain, chain: list[VolumeMetadata], ddom: Domain,
                              dst: VolRef, fmt: str | None, prealloc: str | None,
                              progress: Progress) -> VolumeMetadata:
        top = chain[-1]
        fmt = fmt or top.format.lower()
        prealloc = prealloc or top.allocation.lower()
        async with self.prepared.using(sdom, chain):
            size = await qemuimg.measure(path=sdom.volume_path(top.image, top.uuid),
                                         src_fmt=qemu_format(top),
                                         dst_fmt=VolumeFormat.of(fmt).qemu,
                                         runner=self.runner)
            need = size["fully-allocated" if prealloc == "preallocated" else "required"]
            # Room for the data and qcow2's tables, rounded up (block: made that size).
            initial = ddom.initial_size(max(need, MiB) + MiB) if fmt == "cow" else None
            need = initial or ddom.space_for(fmt, top.capacity, need)
            await self._check_space(ddom, need)
            spec = VolumeSpec(img=dst.img, vol=dst.vol, size=top.capacity, format=fmt,
                              preallocate=prealloc, description=top.description,
                              disk_type=top.disk_type, initial_size=initial)

            async def fill(md: VolumeMetadata) -> None:
                async with self.prepared.using(ddom, [md]):
                    await self._convert(sdom, top, ddom, md, _span(progress, 5, 95))

            md = await ddom.create_volume(spec, progress, fill=fill)
        log.info("Copied %s/%s/%s (%d volumes, collapsed) to %s/%s/%s", sdom.uuid, top.image,
                 top.uuid, len(chain), ddom.uuid, dst.img, dst.vol)
        return md

    async def _copy_volumes(self, sdom: Domain, vols: list[VolumeMetadata], ddom: Domain,
                            dst_img: str, ids: dict[str, str],
                            progress: Progress) -> list[VolumeMetadata]:
        """Copy volumes of one image layer by layer, parents first, keeping
        the chain: `ids` maps source volume ids to target ids. A parent
        outside `vols` (a template) must be on the target domain already.
        All targets are committed at the end, or none is left."""
        order = parents_first(vols)
        mine = {m.uuid for m in order}
        templates: dict[str, VolumeMetadata] = {}
        for m in order:
            if m.has_parent and m.parent not in mine and m.parent not in templates:
                try:
                    t = await ddom.find_volume(m.parent)
                except VolumeDoesNotExist:
                    raise VolumeDoesNotExist(
                        volUUID=m.parent, reason=f"the template volume is not on the target "
                                                 f"domain {ddom.uuid}; copy it there first "
                                                 "or copy collapsed") from None
                self._legal([t])
                templates[m.parent] = t
        existing = await ddom.all_volume_ids()
        for m in order:
            if ids[m.uuid] in existing:
                raise VolumeAlreadyExists(volUUID=ids[m.uuid])
        sizes = {m.uuid: (await sdom.volume_sizes(m.image, m.uuid))[1] for m in order}
        need = sum(ddom.space_for(m.format, m.capacity, sizes[m.uuid]) for m in order)
        await self._check_space(ddom, need)
        total = max(1, sum(sizes.values()))
        done_bytes = 0
        made: list[tuple[VolumeMetadata, VolumeMetadata | None]] = []
        bases = await self._with_templates(ddom, list(templates.values()))
        # Source chain active for reading; the targets while they are written.
        async with self.prepared.using(sdom, await self._with_templates(sdom, order)):
            try:
                for m in order:
                    parent = None
                    if m.has_parent:
                        parent = templates.get(m.parent) or next(
                            t for t, _ in made if t.uuid == ids[m.parent])
                    initial = (ddom.initial_size(sizes[m.uuid] + MiB)
                               if m.format == VolumeFormat.COW else None)
                    spec = VolumeSpec(img=dst_img, vol=ids[m.uuid], size=m.capacity,
                                      format=m.format.lower(),
                                      preallocate=m.allocation.lower(),
                                      description=m.description, disk_type=m.disk_type,
                                      parent=parent.uuid if parent else None,
                                      initial_size=initial)
                    start = 100 * done_bytes / total
                    end = 100 * (done_bytes + sizes[m.uuid]) / total
                    step = _span(progress, start * 0.95, end * 0.95)

                    async def fill(md: VolumeMetadata, m: VolumeMetadata = m,
                                   parent: VolumeMetadata | None = parent,
                                   step: Progress = step) -> None:
                        # The target and what it is layered on, active while written.
                        need = [*bases, *(t for t, _ in made), md]
                        async with self.prepared.using(ddom, need):
                            await self._convert(sdom, m, ddom, md, step, backing=parent)

                    md = await ddom.create_volume(spec, fill=fill, parent=parent, commit=False)
                    made.append((md, parent))
                    done_bytes += sizes[m.uuid]
                # Base first: a crash in between leaves a valid shorter chain.
                committed = [await ddom.commit_volume(md, parent) for md, parent in made]
            except BaseException:
                for md, _ in reversed(made):
                    try:
                        await ddom.discard_volume(md)
                    except (HostAgentError, OSError) as e:
                        log.error("Cannot remove copy target %s: %s (removed when the domain "
                                  "answers again)", md.uuid, e)
                        ddom.pending_discards[md.uuid] = md
                raise
        progress(100)
        log.info("Copied %d volumes of image %s/%s to %s/%s", len(order), sdom.uuid,
                 order[0].image, ddom.uuid, dst_img)
        return committed

    async def _with_templates(self, domain: Domain,
                              vols: list[VolumeMetadata]) -> list[VolumeMetadata]:
        """The volumes and the chains of their parents outside them
        (templates), parents first."""
        out: list[VolumeMetadata] = []
        have = {m.uuid for m in vols}
        for m in vols:
            if m.has_parent and m.parent not in have:
                parent = await domain.find_volume(m.parent)
                for p in await domain.chain(parent.image, parent.uuid):
                    if p.uuid not in have:
                        out.append(p)
                        have.add(p.uuid)
        return out + list(vols)

    # ---- moveImage ---------------------------------------------------------------------

    async def move(self, sd: str, img: str, dst_sd: str, progress: Progress) -> None:
        if sd == dst_sd:
            raise InvalidParameter(field="dstSdUUID", reason="the image is already there")
        reqs = [request("domain", sd, SHARED), request("image", f"{sd}/{img}"),
                request("domain", dst_sd, SHARED), request("image", f"{dst_sd}/{img}")]
        async with self.locks.hold(*reqs):
            sdom = await self._writable(sd)
            ddom = await self._writable(dst_sd)
            if ddom.md.backup and self.prepared.is_prepared(sd, img, "vm"):
                raise BackupDomainRestricted(sdUUID=dst_sd,
                                             reason=f"image {img} is in use by a running VM")
            if self.prepared.is_prepared(sd, img):
                raise VolumeIsBusy(resource=f"image {img}", reason="volumes are prepared")
            await sdom.refuse_ovf_store(img)       # before the copy, not at the delete
            vols = await sdom.image_volumes(img)
            self._legal(vols)
            ids = {v.uuid for v in vols}
            outside = [v for v in await sdom.all_volumes() if v.image != img and v.parent in ids]
            if outside:
                raise VolumeImageHasChildren(resource=f"image {img}",
                                             reason=f"volume {outside[0].parent} is the "
                                                    "parent of "
                                           "volumes in other images (a template)")
            copies = await self._copy_volumes(sdom, vols, ddom, img, {i: i for i in ids},
                                              _span(progress, 0, 90))
            try:
                await self._verify(sdom, vols, ddom, copies)
            except BaseException:
                await _undo([(ddom, md) for md in reversed(leaf_first(copies))],
                            "unverified copy")
                raise
            await sdom.delete_image(img, _span(progress, 95, 100))
        log.info("Moved image %s from %s to %s", img, sd, dst_sd)

    async def _verify(self, sdom: Domain, vols: list[VolumeMetadata], ddom: Domain,
                      copies: list[VolumeMetadata]) -> None:
        parents = {v.parent for v in vols}
        leaves = [v for v in vols if v.uuid not in parents]
        # one -T for both images: O_DIRECT only if both domains have it
        modes = {await sdom.cache_mode(), await ddom.cache_mode()}
        cache = "none" if modes == {"none"} else "writeback"
        async with self.prepared.using(sdom, await self._with_templates(sdom, vols)), \
                self.prepared.using(ddom, await self._with_templates(ddom, copies)):
            for leaf in leaves:
                same = await qemuimg.compare(sdom.volume_path(leaf.image, leaf.uuid),
                                             ddom.volume_path(leaf.image, leaf.uuid),
                                             fmt_a=qemu_format(leaf), fmt_b=qemu_format(leaf),
                                             cache=cache, runner=self.runner)
                if not same:
                    raise VolumeCopyError(volUUID=leaf.uuid,
                                          reason="the copy differs from the source")

    # ---- snapshotImages ------------------------------------------------------------------

    async def snapshot(self, disks: list[dict[str, Any]], progress: Progress) -> list[
            dict[str, Any]]:
        reqs: list[Request] = []
        for d in disks:
            reqs += [request("domain", d["sdUUID"], SHARED),
                     request("image", f"{d['sdUUID']}/{d['imgUUID']}"),
                     request("volume", f"{d['sdUUID']}/{d['newVolUUID']}")]
        async with self.locks.hold(*reqs):
            plan: list[tuple[Domain, VolumeMetadata, VolumeSpec]] = []
            writers: list[WriterWatch | None] = []
            for i, d in enumerate(disks):
                domain = await self._writable(d["sdUUID"])
                try:
                    parent = await domain.volume(d["imgUUID"], d["volUUID"])
                except VolumeDoesNotExist as e:
                    raise VolumeDoesNotExist(volUUID=d["volUUID"],
                                             reason=f"disks[{i}]: {e.message}") from None
                if parent.legality != LEGAL or parent.state != READY:
                    raise CreateIllegalVolumeSnapshotError(volUUID=parent.uuid)
                writers.append(self.volumes.live_writer(f"disks[{i}]", d["sdUUID"],
                                                        d["imgUUID"], d["volUUID"],
                                                        d.get("switch")))
                if await domain.children(parent):
                    raise InvalidParameter(field=f"disks[{i}].volUUID",
                                           reason=f"volume {parent.uuid} is not the disk's "
                                                  "top volume")
                plan.append((domain, parent, VolumeSpec(
                    img=d["imgUUID"], vol=d["newVolUUID"], size=parent.capacity,
                    format="cow", preallocate="sparse", parent=parent.uuid,
                    description=d.get("description", ""), disk_type=parent.disk_type)))
            # A new layer takes an extent on a block domain, little on a file
            # domain: a full domain fails here, before anything is made.
            need: dict[str, int] = {}
            for domain, _, _ in plan:
                need[domain.uuid] = need.get(domain.uuid, 0) + domain.layer_space()
            for domain, _, _ in plan:
                await self._check_space(domain, need[domain.uuid])
            made: list[tuple[Domain, VolumeMetadata]] = []
            try:
                for i, (domain, _, spec) in enumerate(plan):
                    try:
                        md = await domain.create_volume(
                            spec, fill=merge.bitmaps_fill(self, domain))
                    except HostAgentError as e:
                        raise _no_space(e, domain.uuid) from None
                    made.append((domain, md))
                    progress(100 * (i + 1) / len(plan))
                # the VM's writers onto the new layers, all in one transaction
                await self.volumes.switch_writers([(f"disks[{i}]", dom, md, w) for i, ((dom, md), w)
                                              in enumerate(zip(made, writers, strict=True))
                                              if w is not None])
            except BaseException:
                # not a layer a VM may be on (a switch left unanswered)
                await _undo([(d, m) for d, m in made
                             if not self.prepared.switching(d.uuid, m.image, m.uuid)],
                            "snapshot layer")
                raise
            out = []
            for domain, md in made:
                apparent, true = await domain.volume_sizes(md.image, md.uuid)
                out.append(volume_info(md, apparent, true))
            log.info("Snapshot of %d disks: %s", len(made),
                     ", ".join(f"{d.uuid}/{m.image}/{m.uuid}" for d, m in made))
            return out

    # ---- createHibernationVolumes ---------------------------------------------------------

    async def hibernation(self, memory: dict[str, Any], disks: list[dict[str, Any]],
                          progress: Progress) -> dict[str, Any]:
        sd, img = memory["sdUUID"], memory["imgUUID"]
        reqs: list[Request] = [request("domain", sd, SHARED), request("image", f"{sd}/{img}"),
                               request("volume", f"{sd}/{memory['dumpVolUUID']}"),
                               request("volume", f"{sd}/{memory['metaVolUUID']}")]
        for d in disks:
            reqs += [request("domain", d["sdUUID"], SHARED),
                     request("image", f"{d['sdUUID']}/{d['imgUUID']}", SHARED)]
        async with self.locks.hold(*reqs):
            for i, d in enumerate(disks):
                await self._can_hibernate(d, f"disks[{i}]")
            domain = await self._writable(sd)
            if domain.md.backup:
                raise BackupDomainRestricted(sdUUID=sd, reason="memory: a backup domain "
                                                               "cannot hold a VM's memory")
            prealloc = domain.memory_allocation()
            dump = VolumeSpec(img=img, vol=memory["dumpVolUUID"], size=memory["size"],
                              format="raw", preallocate=prealloc,
                              description="memory dump", disk_type="MEMD")
            meta = VolumeSpec(img=img, vol=memory["metaVolUUID"], size=HIBERNATION_META_SIZE,
                              format="raw", preallocate=prealloc,
                              description="memory metadata", disk_type="MEMM")
            await self._check_space(domain, (memory["size"] + HIBERNATION_META_SIZE)
                                    if prealloc == "preallocated" else 0)
            # A memory image holds two standalone volumes, not a disk's
            # chain: a new image, checked once for both.
            await domain.check_image_chain(img, None)
            made = []
            try:
                for spec in (dump, meta):
                    made.append(await domain.create_volume(spec, chain=False))
                    progress(50 * len(made))
            except BaseException:
                await _undo([(domain, md) for md in made], "memory volume")
                raise
            out = {}
            for key, md in zip(("dump", "meta"), made, strict=True):
                apparent, true = await domain.volume_sizes(md.image, md.uuid)
                out[key] = volume_info(md, apparent, true)
            return out

    async def _can_hibernate(self, d: dict[str, Any], where: str) -> None:
        entry = await self.registry.entry(d["sdUUID"])
        try:
            self.registry.check_writable(entry)
        except HostAgentError as e:
            e.fields["disk"] = where
            raise
        if entry.domain.md.backup:
            raise BackupDomainRestricted(sdUUID=d["sdUUID"],
                                         reason=f"{where}: the disk is on a backup domain")
        try:
            md = await entry.domain.volume(d["imgUUID"], d["volUUID"])
        except VolumeDoesNotExist as e:
            raise VolumeDoesNotExist(volUUID=d["volUUID"],
                                     reason=f"{where}: {e.message}") from None
        if md.legality != LEGAL or md.state != READY:
            raise PrepareIllegalVolumeError(volUUID=md.uuid, reason=where)


    # ---- backupVolume -------------------------------------------------------------------

    async def backup(self, items: list[tuple[VolRef, VolRef, VolRef | None]], keep: bool,
                     progress: Progress) -> list[dict[str, Any]]:
        """Back up disks onto backup domains at one point in time, all or
        nothing: a snapshot layer on every disk (the disk goes on writing
        there), then each point in time copied (collapsed, or with
        `incremental` only what changed since that earlier backup, as a
        qcow2 layer over it), then the layers merged back unless `keep`.

        Changes are tracked by qcow2 persistent dirty bitmaps named after
        the backup volume: each backup adds one to the new layer, every
        layer carries its parent's bitmaps on, and a merge folds them back."""
        many = len(items) > 1
        reqs: list[Request] = []
        for src, dst, _ in items:
            reqs += [request("domain", src.sd, SHARED), request("image", f"{src.sd}/{src.img}"),
                     request("domain", dst.sd, SHARED), request("image", f"{dst.sd}/{dst.img}"),
                     request("volume", f"{dst.sd}/{dst.vol}")]
        async with self.locks.hold(*reqs):
            plan = [await self._backup_plan(i if many else None, *item)
                    for i, item in enumerate(items)]
            layers: list[tuple[Domain, VolumeMetadata, VolumeMetadata]] = []
            made: list[tuple[Domain, VolumeMetadata]] = []
            writers = [self.volumes.live_writer(f"src[{i}]" if many else "src", src.sd, src.img,
                                           src.vol) for i, (src, _, _) in enumerate(items)]
            switched = False
            try:
                for sdom, top, _, dst, _ in plan:
                    layers.append((sdom, top, await self._backup_layer(sdom, top, dst)))
                # a VM's writers onto the layers: what is copied is written no more
                await self.volumes.switch_writers([
                    (f"src[{i}]" if many else "src", sdom, layer, w)
                    for i, ((sdom, _, layer), w) in enumerate(zip(layers, writers, strict=True))
                    if w is not None])
                switched = True
                step = 90 / len(plan)
                for i, (sdom, top, ddom, dst, base) in enumerate(plan):
                    span = _span(progress, 5 + i * step, 5 + (i + 1) * step)
                    if base is None:
                        md = await self._copy_collapsed(sdom, await sdom.chain(top.image,
                                                                               top.uuid),
                                                        ddom, dst, "cow", "sparse", span)
                    else:
                        md = await self._copy_incremental(sdom, top, ddom, dst, base, span)
                    made.append((ddom, md))
            except BaseException:
                await _undo(made, "backup")
                # a layer only holds bitmaps so far (nothing writes it unless
                # a VM was switched onto it: then it stays)
                await _undo([(sdom, layer) for (sdom, _, layer), w
                             in zip(layers, writers, strict=False)
                             if not (switched and w is not None)
                             and not self.prepared.switching(sdom.uuid, layer.image,
                                                             layer.uuid)],
                            "snapshot layer")
                raise
            out: list[dict[str, Any]] = []
            for (sdom, top, ddom, _, base), (_, _, layer), (_, md) in zip(
                    plan, layers, made, strict=True):
                merged = False
                if not keep:
                    merged = await self._merge_back(sdom, top, layer)
                apparent, true = await ddom.volume_sizes(md.image, md.uuid)
                out.append({"backup": volume_info(md, apparent, true),
                            "incremental": base is not None,
                            "snapshotVolUUID": None if merged else layer.uuid,
                            "merged": merged})
            progress(100)
            log.info("Backed up %d disk(s): %s", len(out),
                     ", ".join(f"{md.domain}/{md.uuid}" for _, md in made))
            return out

    async def _backup_plan(self, i: int | None, src: VolRef, dst: VolRef,
                           inc: VolRef | None) -> tuple[Domain, VolumeMetadata, Domain, VolRef,
                                                        VolumeMetadata | None]:
        def name(field: str) -> str:
            return field if i is None else f"{field.split('.')[0]}[{i}]" + (
                f".{field.split('.', 1)[1]}" if "." in field else "")

        sdom = await self._writable(src.sd)
        ddom = await self._writable(dst.sd)
        if not ddom.md.backup:
            raise InvalidParameter(field=name("dst.sdUUID"),
                                   reason=f"domain {dst.sd} is not a backup domain")
        top = await sdom.volume(src.img, src.vol)
        self._legal([top])
        # the agent copies the layer below the new one: a VM must not write
        # it (its registered writer is switched onto the new layer: below)
        writer = self.volumes.live_writer(name("src"), src.sd, src.img, src.vol)
        if await sdom.children(top):
            raise InvalidParameter(field=name("src.volUUID"),
                                   reason=f"volume {top.uuid} is not the disk's top volume")
        if await ddom.has_volume(dst.vol):
            raise VolumeAlreadyExists(volUUID=dst.vol)
        base = None
        if inc is not None:
            if (inc.sd, inc.img) != (dst.sd, dst.img):
                raise InvalidParameter(field=name("incrementalFrom"),
                                       reason="an incremental backup is a layer over the "
                                              "earlier one: same domain and image as dst")
            base = await ddom.volume(inc.img, inc.vol)
            self._legal([base])
            if top.format != "COW" or not await self._tracks(sdom, top, bitmap_name(inc.vol),
                                                             writer, name("src")):
                raise InvalidParameter(
                    field=name("incrementalFrom"),
                    reason=f"the disk holds no record of its changes since backup {inc.vol} "
                           "(taken before a merge into a raw volume, or elsewhere): take a "
                           "full backup")
        return sdom, top, ddom, dst, base

    async def _bitmap_names(self, domain: Domain,
                            md: VolumeMetadata) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(usable, inconsistent) dirty bitmaps of a volume. An inconsistent
        one (a qemu-img writing the volume was killed) is never carried,
        merged or offered for an incremental backup: qemu refuses it."""
        if md.format != "COW":
            return (), ()
        async with self.prepared.using(domain, await domain.chain(md.image, md.uuid)):
            return await merge.bitmap_names(self, domain, md)

    async def _bitmaps(self, domain: Domain, md: VolumeMetadata) -> tuple[str, ...]:
        return (await self._bitmap_names(domain, md))[0]

    async def _tracks(self, domain: Domain, md: VolumeMetadata, bitmap: str,
                      writer: WriterWatch | None, disk: str) -> bool:
        """Whether a volume records its changes in `bitmap`: consistent on
        storage, or held by the VM that writes it (in-use on storage until
        the backup's switch makes the writer store it: _copy_incremental)."""
        if bitmap in await self._bitmaps(domain, md):
            return True
        return writer is not None and bitmap in await held_bitmaps(writer, disk)

    async def _backup_layer(self, sdom: Domain, top: VolumeMetadata,
                            dst: VolRef) -> VolumeMetadata:
        """The snapshot layer the disk goes on writing to, tracking changes
        since this backup and every earlier one the disk tracks."""
        spec = VolumeSpec(img=top.image, vol=str(uuid.uuid4()), size=top.capacity,
                          format="cow", preallocate="sparse", parent=top.uuid,
                          description=f"backup {dst.vol}", disk_type=top.disk_type)
        # One named after this backup is stale: left by an interrupted
        # attempt with the same target (which does not exist, see the plan).
        carried = [b for b in await self._bitmaps(sdom, top) if b != bitmap_name(dst.vol)]
        names = [*carried, bitmap_name(dst.vol)]

        async def fill(md: VolumeMetadata) -> None:
            path = sdom.volume_path(md.image, md.uuid)
            async with self.prepared.using(sdom, [*await sdom.chain(top.image, top.uuid), md]):
                for bm in names:
                    await qemuimg.bitmap(path, bm, action="add", runner=self.runner)
                for bm in carried:
                    await qemuimg.bitmap(path, bm, action="merge",
                                         source=sdom.volume_path(top.image, top.uuid),
                                         runner=self.runner)

        return await sdom.create_volume(spec, fill=fill)

    async def _copy_incremental(self, sdom: Domain, top: VolumeMetadata, ddom: Domain,
                                dst: VolRef, base: VolumeMetadata,
                                progress: Progress) -> VolumeMetadata:
        top_path = sdom.volume_path(top.image, top.uuid)
        if bitmap_name(base.uuid) not in await self._bitmaps(sdom, top):
            # a VM's writer stores it when switched off the layer; it did not
            raise VolumeIsBusy(resource=top.uuid,
                               reason=f"its dirty bitmap {bitmap_name(base.uuid)} is "
                                      "inconsistent on storage after the switch")
        async with self.prepared.using(sdom, await sdom.chain(top.image, top.uuid)):
            extents = nbd.coalesce(await nbd.dirty_extents(top_path, bitmap_name(base.uuid)),
                                   gap=MiB)
            changed = sum(length for _, length in extents)
            initial = ddom.initial_size(changed + changed // 8 + 2 * MiB)  # data, tables
            await self._check_space(ddom, initial or changed)
            spec = VolumeSpec(img=dst.img, vol=dst.vol, size=top.capacity, format="cow",
                              preallocate="sparse", parent=base.uuid,
                              description=f"incremental backup of {top.image}",
                              disk_type=top.disk_type, initial_size=initial)

            async def fill(md: VolumeMetadata) -> None:
                chain = await ddom.chain(base.image, base.uuid)
                async with self.prepared.using(ddom, [*chain, md]):
                    await qemuimg.copy_extents(
                        top_path, ddom.volume_path(md.image, md.uuid), extents,
                        src_fmt="qcow2", dst_fmt="qcow2", cache=await sdom.cache_mode(),
                        progress=_span(progress, 5, 95), runner=self.runner)

            md = await ddom.create_volume(spec, progress, fill=fill, parent=base)
        log.info("Incremental backup of %s/%s/%s: %d bytes in %d extents since %s",
                 sdom.uuid, top.image, top.uuid, changed, len(extents), base.uuid)
        return md

    async def _merge_back(self, sdom: Domain, top: VolumeMetadata,
                          layer: VolumeMetadata) -> bool:
        """Fold the backup's snapshot layer into the disk's volume below it
        (qemu-img commit, with its bitmaps), then drop the layer. Not while
        a VM writes the layer: that merge is the engine's (live merge)."""
        if self.prepared.is_prepared(sdom.uuid, top.image, "vm"):
            log.info("Disk %s/%s is in use by a VM: snapshot layer %s kept for a live merge",
                     sdom.uuid, top.image, layer.uuid)
            return False
        path = sdom.volume_path(layer.image, layer.uuid)
        async with sdom.leases.volume(top), sdom.leases.volume(layer):
            async with self.prepared.using(sdom, await sdom.chain(layer.image, layer.uuid)):
                if top.format == "COW":
                    have, broken = await self._bitmap_names(sdom, top)
                    top_path = sdom.volume_path(top.image, top.uuid)
                    for bm in await self._bitmaps(sdom, layer):
                        if bm in broken:
                            await qemuimg.bitmap(top_path, bm, action="remove",
                                                 runner=self.runner)
                        if bm not in have:
                            await qemuimg.bitmap(top_path, bm, action="add",
                                                 runner=self.runner)
                        await qemuimg.bitmap(top_path, bm, action="merge", source=path,
                                             runner=self.runner)
                await qemuimg.commit(path, fmt="qcow2", runner=self.runner)
            # What the layer held is in its parent now: remove it (a crash
            # before this leaves a consistent chain with one more layer).
            await sdom.delete_volume(layer.image, layer.uuid)
        return True


async def _undo(made: list[tuple[Domain, VolumeMetadata]], what: str) -> None:
    """Remove the volumes a failed flow made, the last made first; one that
    cannot be removed is logged (an engine sees it listed)."""
    for domain, md in reversed(made):
        try:
            await domain.delete_volume(md.image, md.uuid)
        except HostAgentError as e:
            log.error("Cannot remove %s %s: %s", what, md.uuid, e.message)


def bitmap_name(backup_vol: str) -> str:
    """The dirty bitmap that records a disk's changes since that backup."""
    return f"backup-{backup_vol}"
