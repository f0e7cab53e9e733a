"""Verbs on a VM's disks across domains: copy, move, snapshot all disks,
hibernation volumes. Each is a job."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from agent.context import Agent
from agent.jobs import JobContext
from rpc.schema import (
    UUID,
    Bool,
    Enum,
    Field,
    InvalidParams,
    List,
    Nullable,
    Object,
    OneOrMany,
    Str,
)
from rpc.table import TABLE
from rpc.verbs.common import IMG_UUID, JOB_RESULT, JOB_UUID, SD_UUID, VOL_UUID
from rpc.verbs.volumes import GENERATION, SIZE
from storage.domains import merge
from storage.domains.imageops import VolRef
from storage.errors import HostAgentError

VOLUME_REF = Object([SD_UUID, IMG_UUID, VOL_UUID])


def _check_copy(values: dict[str, Any], path: str) -> None:
    if not values["collapse"]:
        for name in ("format", "preallocate"):
            if values[name] is not None:
                raise InvalidParams(name, "a chain copied without collapse keeps each "
                                          "volume's format and allocation")
    if values["src"] == values["dst"]:
        raise InvalidParams("dst", "the same volume as src")


@TABLE.verb("copyImage", "Copy a volume to any domain (a job): its chain collapsed into one "
            "volume (default), converted to the format and allocation asked (default: the "
            "source's); with collapse=false the volumes of the chain in the source's image "
            "are copied layer by layer (a template parent must already be on the target "
            "domain). A failed or aborted copy leaves no target.",
            [JOB_UUID, Field("src", VOLUME_REF), Field("dst", VOLUME_REF),
             Field("format", Enum(["raw", "cow"]), required=False),
             Field("preallocate", Enum(["sparse", "preallocated"]), required=False),
             Field("collapse", Bool(), required=False, default=True)],
            check=_check_copy, result=JOB_RESULT, job=True, tags=["images"])
async def copy_image(agent: Agent, jobUUID: str, src: dict[str, str], dst: dict[str, str],
                     format: str | None, preallocate: str | None,
                     collapse: bool) -> dict[str, Any]:
    s, d = VolRef.of(src), VolRef.of(dst)

    async def work(ctx: JobContext) -> dict[str, Any]:
        return await agent.images.copy(s, d, format, preallocate, collapse,
                                               ctx.progress)

    job = await agent.jobs.submit_recorded(
        jobUUID, "copyImage", work,
        description=f"copy {s} to {d}",
        params={"sdUUID": s.sd, "imgUUID": s.img, "volUUID": s.vol,
                "dstSdUUID": d.sd, "dstImgUUID": d.img,
                "dstVolUUID": d.vol,
                "targets": [d.vol], "collapse": collapse})
    return {"jobUUID": job.job_uuid}


@TABLE.verb("moveImage", "Move a whole image, chain preserved, to another domain (a job); the "
            "source is removed only after the copy is complete and verified. Refused while "
            "the image is prepared, and onto a backup domain while a running VM uses it.",
            [JOB_UUID, SD_UUID, IMG_UUID, Field("dstSdUUID", UUID())],
            result=JOB_RESULT, job=True, tags=["images"])
async def move_image(agent: Agent, jobUUID: str, sdUUID: str, imgUUID: str,
                     dstSdUUID: str) -> dict[str, Any]:
    if sdUUID == dstSdUUID:
        raise InvalidParams("dstSdUUID", "the image is already on that domain")
    # The volumes the job may make on the target: the image's, same ids
    # (read now, for the recovery of an interrupted move; the move reads
    # them again under its locks).
    try:
        vols = await agent.volumes.volumes_list(sdUUID, imgUUID)
    except HostAgentError:   # the job reports the real error
        vols = []

    async def work(ctx: JobContext) -> None:
        await agent.images.move(sdUUID, imgUUID, dstSdUUID, ctx.progress)

    job = await agent.jobs.submit_recorded(
        jobUUID, "moveImage", work,
        description=f"move image {imgUUID} to {dstSdUUID}",
        params={"sdUUID": sdUUID, "imgUUID": imgUUID,
                "dstSdUUID": dstSdUUID, "move": True,
                "targets": vols, "sources": vols})
    return {"jobUUID": job.job_uuid}


SNAPSHOT_DISK = Object([SD_UUID, IMG_UUID, VOL_UUID, Field("newVolUUID", UUID()),
                        Field("description", Str(min_len=0, max_len=1000), required=False,
                              default=""),
                        Field("switch", Enum(["caller"]), required=False,
                              description="For a disk prepared for a VM: the caller "
                                          "switches its VM onto the new layer itself "
                                          "(without it, the agent switches a writer "
                                          "registered by prepareImage in one QMP "
                                          "transaction, and refuses a disk with none "
                                          "with 203)")])


def _check_snapshot(values: dict[str, Any], path: str) -> None:
    seen: dict[str, int] = {}
    for i, d in enumerate(values["disks"]):
        if d["newVolUUID"] == d["volUUID"]:
            raise InvalidParams(f"disks[{i}].newVolUUID", "the same as volUUID")
        for key in (f"{d['sdUUID']}/{d['imgUUID']}", f"{d['sdUUID']}/{d['newVolUUID']}"):
            if key in seen:
                raise InvalidParams(f"disks[{i}]", f"the same disk or new volume as "
                                                   f"disks[{seen[key]}]")
            seen[key] = i


@TABLE.verb("snapshotImages", "A new snapshot layer on each disk (a job), disks on any "
            "domains, all or nothing: if one fails, the layers already made are removed. "
            "The result lists the new volumes.",
            [JOB_UUID, Field("disks", List(SNAPSHOT_DISK, min_items=1, max_items=256))],
            check=_check_snapshot, result=JOB_RESULT, job=True, tags=["images"])
async def snapshot_images(agent: Agent, jobUUID: str,
                          disks: list[dict[str, Any]]) -> dict[str, Any]:
    async def work(ctx: JobContext) -> list[dict[str, Any]]:
        return await agent.images.snapshot(disks, ctx.progress)

    job = await agent.jobs.submit_recorded(
        jobUUID, "snapshotImages", work,
        description=f"snapshot {len(disks)} disks",
        params={"disks": disks})
    return {"jobUUID": job.job_uuid}


MEMORY = Object([SD_UUID, IMG_UUID, Field("dumpVolUUID", UUID()),
                 Field("metaVolUUID", UUID()),
                 Field("size", SIZE, description="Memory dump size in bytes")])


def _check_hibernation(values: dict[str, Any], path: str) -> None:
    m = values["memory"]
    if m["dumpVolUUID"] == m["metaVolUUID"]:
        raise InvalidParams("memory.metaVolUUID", "the same as dumpVolUUID")


@TABLE.verb("createHibernationVolumes", "Check every disk of a VM can be hibernated (domain "
            "active and not failing, not a backup domain, volume LEGAL), then create the "
            "memory dump and metadata volumes (a job); otherwise nothing is made and the error "
            "names the disk that cannot.",
            [JOB_UUID, Field("memory", MEMORY),
             Field("disks", List(VOLUME_REF, min_items=0, max_items=256))],
            check=_check_hibernation, result=JOB_RESULT, job=True, tags=["images"])
async def create_hibernation_volumes(agent: Agent, jobUUID: str, memory: dict[str, Any],
                                     disks: list[dict[str, Any]]) -> dict[str, Any]:
    async def work(ctx: JobContext) -> dict[str, Any]:
        return await agent.images.hibernation(memory, disks, ctx.progress)

    job = await agent.jobs.submit_recorded(
        jobUUID, "createHibernationVolumes", work,
        description="create hibernation volumes",
        params={"sdUUID": memory["sdUUID"], "imgUUID": memory["imgUUID"],
                "memory": memory, "disks": disks})
    return {"jobUUID": job.job_uuid}


def _pairs(values: dict[str, Any]) -> list[tuple[Any, Any, Any]]:
    src, dst, inc = values["src"], values["dst"], values["incrementalFrom"]
    if isinstance(src, dict):
        src, dst, inc = [src], [dst], [inc]
    return list(zip(src, dst, inc, strict=True))


def _check_backup(values: dict[str, Any], path: str) -> None:
    src, dst, inc = values["src"], values["dst"], values["incrementalFrom"]
    if isinstance(src, list) != isinstance(dst, list) or (
            isinstance(src, list) and len(src) != len(dst)):
        raise InvalidParams("dst", "must match src: one object, or a list as long as src's")
    if (inc is not None and isinstance(inc, list) != isinstance(src, list)) or (
            isinstance(inc, list) and len(inc) != len(src)):
        raise InvalidParams("incrementalFrom", "must match src: one object (or null), or a "
                                               "list as long as src's")
    if isinstance(src, list) and inc is None:
        values["incrementalFrom"] = [None] * len(src)
    seen: set[str] = set()
    for i, (s, d, _) in enumerate(_pairs(values)):
        where = "" if isinstance(values["src"], dict) else f"[{i}]"
        for key in (f"src {s['sdUUID']}/{s['imgUUID']}", f"dst {d['sdUUID']}/{d['volUUID']}"):
            if key in seen:
                raise InvalidParams(f"{key.split()[0]}{where}", "the same disk or target twice")
            seen.add(key)


@TABLE.verb("backupVolume", "Back up disks to a backup domain at one point in time (a job): "
            "a snapshot layer on each disk (the disk goes on writing there), the point in time "
            "copied collapsed onto the backup domain (qcow2), then the layer kept "
            "(keepSnapshot, default) or merged back. With incrementalFrom (an earlier backup "
            "of the same disk, in dst's image) only what changed since is copied, as a qcow2 "
            "layer over it (qcow2 dirty bitmaps). src/dst/incrementalFrom may be lists: "
            "several disks, all or nothing.",
            [JOB_UUID, Field("src", OneOrMany(VOLUME_REF)), Field("dst", OneOrMany(VOLUME_REF)),
             Field("keepSnapshot", Bool(), required=False, default=True),
             Field("incrementalFrom", Nullable(OneOrMany(Object(
                 [SD_UUID, IMG_UUID, VOL_UUID]))), required=False)],
            check=_check_backup, result=JOB_RESULT, job=True, tags=["images", "backup"])
async def backup_volume(agent: Agent, jobUUID: str, src: Any, dst: Any, keepSnapshot: bool,
                        incrementalFrom: Any) -> dict[str, Any]:
    items = [(VolRef.of(s), VolRef.of(d), VolRef.of(i) if i else None)
             for s, d, i in _pairs({"src": src, "dst": dst, "incrementalFrom": incrementalFrom})]

    async def work(ctx: JobContext) -> Any:
        out = await agent.images.backup(items, keepSnapshot, ctx.progress)
        return out if isinstance(src, list) else out[0]

    job = await agent.jobs.submit_recorded(
        jobUUID, "backupVolume", work,
        description=f"back up {len(items)} disk(s)",
        params={"targets": [{"sdUUID": d.sd, "imgUUID": d.img, "volUUID": d.vol}
                            for _, d, _ in items],
                "sources": [{"sdUUID": s.sd, "imgUUID": s.img, "volUUID": s.vol}
                            for s, _, _ in items]})
    return {"jobUUID": job.job_uuid}


@TABLE.verb("mergeSnapshots", "Delete the snapshot layer topVolUUID of a disk no VM writes (a "
            "job, cold merge as VDSM's): its data is committed into its parent baseVolUUID, "
            "its child (if any) layered on baseVolUUID, and topVolUUID removed; every "
            "remaining volume reads as before and dirty bitmaps are kept. Refused (203) "
            "while the image is prepared (for a VM: a live merge is the VM side's).",
            [JOB_UUID, SD_UUID, IMG_UUID,
             Field("baseVolUUID", UUID(), description="The parent of topVolUUID"),
             Field("topVolUUID", UUID(), description="The layer that goes"),
             replace(GENERATION, description="baseVolUUID's generation as the caller last "
                     "saw it: if it is no longer that, 911 and nothing changes")],
            result=JOB_RESULT, job=True, tags=["images"])
async def merge_snapshots(agent: Agent, jobUUID: str, sdUUID: str, imgUUID: str,
                          baseVolUUID: str, topVolUUID: str,
                          generation: int | None) -> dict[str, Any]:
    if baseVolUUID == topVolUUID:
        raise InvalidParams("topVolUUID", "the same volume as baseVolUUID")

    async def work(ctx: JobContext) -> dict[str, Any]:
        return await merge.merge_snapshots(agent.images, sdUUID, imgUUID, baseVolUUID,
                                           topVolUUID, ctx.progress, generation)

    job = await agent.jobs.submit_recorded(
        jobUUID, "mergeSnapshots", work, description=f"merge {topVolUUID} into {baseVolUUID}",
        params={"sdUUID": sdUUID, "imgUUID": imgUUID, "baseVolUUID": baseVolUUID,
                "topVolUUID": topVolUUID})
    return {"jobUUID": job.job_uuid}
