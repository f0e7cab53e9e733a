"""A job's recovery hook: what an interrupted copy, move, backup, snapshot
or hibernation left behind on storage is removed at start-up (jobs are all
or nothing)."""

from __future__ import annotations

import logging
from typing import Any

from storage import qemuimg
from storage.domains.base import leaf_first
from storage.domains.imageops import ImageOps
from storage.errors import HostAgentError
from storage.locks import request
from storage.metadata import READY

log = logging.getLogger("storage.images")


class RecoveryIncomplete(Exception):
    """Part of a recovery failed (the rest was done): the job registry runs
    the hook again (agent.jobs)."""


async def recover_copy(ops: ImageOps, params: dict[str, Any]) -> None:
    """An interrupted copyImage/moveImage: targets still CREATING are removed
    by the domain's garbage collection; committed targets of a flow that did
    not end are removed too, unless the source is gone (a move that was
    removing its source: then the copy is complete and verified, and what
    is left of the source is removed)."""
    src_sd, dst_sd = params.get("sdUUID"), params.get("dstSdUUID")
    src_img, dst_img = params.get("imgUUID"), params.get("dstImgUUID", params.get("imgUUID"))
    targets: list[str] = list(params.get("targets", []))
    for sd in {src_sd, dst_sd} - {None}:
        await ops.registry.collect_garbage(str(sd))
    if not (src_sd and dst_sd and src_img and dst_img and targets) or \
            params.get("started") is None:
        return
    async with ops.locks.hold(request("image", f"{src_sd}/{src_img}"),
                              request("image", f"{dst_sd}/{dst_img}")):
        try:
            sdom = await ops.registry.domain(str(src_sd))
            ddom = await ops.registry.domain(str(dst_sd))
        except HostAgentError as e:
            log.warning("Cannot recover interrupted copy: %s", e.message)
            return
        sources = list(params.get("sources", []))
        try:
            have = {v.uuid for v in await sdom.image_volumes(str(src_img))
                    if v.state == READY}
        except HostAgentError:
            have = set()
        if params.get("move") and not set(sources) <= have:
            log.warning("Interrupted move of %s: the source was being removed; finishing",
                        src_img)
            if have:
                await sdom.delete_image(str(src_img))
            return
        try:
            vols = await ddom.image_volumes(str(dst_img))
        except HostAgentError:
            return
        # Only what this job made: a target older than the job is not its own.
        started = float(params["started"])
        stale = [v for v in vols if v.uuid in targets and v.ctime >= int(started) - 1]
        for v in leaf_first(stale):
            log.warning("Removing target %s/%s/%s of an interrupted copy", dst_sd, dst_img,
                        v.uuid)
            await ddom.discard_volume(v)



async def recover_backup(ops: ImageOps, params: dict[str, Any],
                         started: float | None) -> None:
    """An interrupted backupVolume: all or nothing, so its backup volumes are
    removed, and so are the snapshot layers it put on the disks (a child of
    the disk's top named after its backup, newer than the job): nothing
    writes such a layer unless a VM runs on the disk, so without one the
    disk is back as it was. A layer that holds data is left, and logged."""
    targets = list(params.get("targets", []))
    failed = []
    try:
        await recover_new_volumes(ops, targets, started)
    except RecoveryIncomplete as e:
        failed.append(str(e))
    if started is None:
        return
    for src, dst in zip(params.get("sources", []), targets, strict=False):
        sd, img = str(src["sdUUID"]), str(src["imgUUID"])
        if ops.prepared.is_prepared(sd, img, "vm"):
            log.warning("Interrupted backup of %s/%s: a VM uses the disk, its snapshot layer "
                        "stays", sd, img)
            continue
        try:
            domain = await ops.registry.domain(sd)
            async with ops.locks.hold(request("image", f"{sd}/{img}")):
                for v in await domain.image_volumes(img):
                    if (v.parent != src["volUUID"] or v.state != READY
                            or v.description != f"backup {dst['volUUID']}"
                            or v.ctime < int(started) - 1 or await domain.children(v)):
                        continue
                    async with ops.prepared.using(domain, await domain.chain(img, v.uuid)):
                        held = [e for e in await qemuimg.map_(
                            domain.volume_path(img, v.uuid), fmt="qcow2",
                            runner=ops.runner) if e["data"] and e["depth"] == 0]
                    if held:
                        log.error("Interrupted backup left snapshot layer %s/%s/%s with "
                                  "data: kept", sd, img, v.uuid)
                        continue
                    log.warning("Removing snapshot layer %s/%s/%s of an interrupted backup",
                                sd, img, v.uuid)
                    await domain.delete_volume(img, v.uuid)
        except HostAgentError as e:
            log.warning("Cannot recover the disk %s/%s of an interrupted backup: %s", sd, img,
                        e.message)
            failed.append(f"{sd}/{img}: {e.message}")
    if failed:
        raise RecoveryIncomplete("; ".join(failed))


async def recover_new_volumes(ops: ImageOps, vols: list[dict[str, Any]],
                              started: float | None) -> None:
    """An interrupted snapshotImages or createHibernationVolumes: all or
    nothing, so the volumes it made (newer than the job) are removed."""
    for sd in {str(v["sdUUID"]) for v in vols}:
        await ops.registry.collect_garbage(sd)
    if started is None:     # it never ran
        return
    failed = []
    for v in vols:
        sd, img, vol = str(v["sdUUID"]), str(v["imgUUID"]), str(v["volUUID"])
        try:
            domain = await ops.registry.domain(sd)
            md = await domain.volume(img, vol)
        except HostAgentError:
            continue
        if md.ctime < int(started) - 1:
            continue
        if ops.prepared.switching(sd, img, vol):
            log.warning("Volume %s/%s/%s of an interrupted job: a VM writes it or may "
                        "(a live snapshot), kept", sd, img, vol)
            continue
        log.warning("Removing volume %s/%s/%s of an interrupted job", sd, img, vol)
        try:
            async with ops.locks.hold(request("image", f"{sd}/{img}")):
                await domain.delete_volume(img, vol)
        except HostAgentError as e:
            log.warning("Cannot remove %s/%s/%s: %s", sd, img, vol, e.message)
            failed.append(f"{sd}/{img}/{vol}: {e.message}")
    if failed:
        raise RecoveryIncomplete("; ".join(failed))
