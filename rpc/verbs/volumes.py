"""Image and volume verbs."""

from __future__ import annotations

from typing import Any

from agent.context import Agent
from agent.jobs import JobContext
from rpc.schema import UUID, Bool, Enum, Field, Int, InvalidParams, Object, Str
from rpc.table import TABLE
from rpc.verbs.common import IMG_UUID, JOB_RESULT, JOB_UUID, SD_UUID, VOL_UUID
from storage.domains import VolumeSpec

SIZE = Int(512, 1 << 50, multiple_of=512)
# VDSM's fence for verbs that change a volume (its SDM verbs' `generation`).
GENERATION = Field("generation", Int(0, (1 << 63) - 1), required=False,
                   description="The volume's generation as the caller last saw it "
                               "(getVolumeInfo): if the volume's is no longer that, the "
                               "call fails with 911 GenerationMismatch and changes nothing")
# QMP node names: qemu's id rules (a letter first, at most 31 characters)
WRITER = Object([
    Field("qmpSocket", Str(max_len=107, pattern=r"/[^\0]*",
                           pattern_doc="must be an absolute path (a Unix socket)"),
          description="The writer's QMP monitor (a Unix socket the agent alone uses: a "
                      "monitor serves one client at a time)"),
    Field("nodeName", Str(max_len=31, pattern=r"[A-Za-z][A-Za-z0-9_.-]*",
                          pattern_doc="must be a QMP node name"),
          description="The node that opens the volume's device or file (the protocol "
                      "node under the qcow2 node): its write offset is the allocation")])
VOLUME_INFO = {"type": "object", "required": [
    "uuid", "image", "domain", "parent", "format", "type", "voltype", "capacity",
    "apparentSize", "trueSize", "legality", "generation", "description", "diskType", "ctime"]}


def _check_create(values: dict[str, Any], path: str) -> None:
    if values["parentVolUUID"] == values["volUUID"]:
        raise InvalidParams("parentVolUUID", "a volume cannot be its own parent")
    if values["parentVolUUID"] and values["format"] != "cow":
        raise InvalidParams("format", "a snapshot layer (parentVolUUID) must be cow")
    if values["initialSize"] is not None and values["format"] != "cow":
        raise InvalidParams("initialSize", "only for cow volumes")


@TABLE.verb("createVolume", "Create a volume (a job): raw or cow, sparse or preallocated; "
            "with parentVolUUID a cow snapshot layer on that volume (same domain; a "
            "template's volume may be in another image). ILLEGAL until complete.",
            [JOB_UUID, SD_UUID, IMG_UUID, VOL_UUID,
             Field("size", SIZE, description="Virtual size in bytes, a multiple of 512"),
             Field("format", Enum(["raw", "cow"])),
             Field("preallocate", Enum(["sparse", "preallocated"])),
             Field("parentVolUUID", UUID(), required=False),
             Field("description", Str(min_len=0, max_len=1000), required=False, default=""),
             Field("diskType", Str(max_len=32, pattern=r"[A-Za-z0-9_]+"), required=False,
                   default="DATA"),
             Field("initialSize", SIZE, required=False,
                   description="cow on block domains: initial LV size")],
            check=_check_create, result=JOB_RESULT, job=True, tags=["volumes"])
async def create_volume(agent: Agent, jobUUID: str, sdUUID: str, imgUUID: str, volUUID: str,
                        size: int, format: str, preallocate: str, parentVolUUID: str | None,
                        description: str, diskType: str,
                        initialSize: int | None) -> dict[str, Any]:
    spec = VolumeSpec(img=imgUUID, vol=volUUID, size=size, format=format,
                      preallocate=preallocate, parent=parentVolUUID,
                      description=description, disk_type=diskType, initial_size=initialSize)

    async def work(ctx: JobContext) -> dict[str, Any]:
        return await agent.volumes.create_volume(sdUUID, spec, ctx.progress)

    job = await agent.jobs.submit_recorded(
        jobUUID, "createVolume", work,
        description=f"create volume {volUUID}",
        params={"sdUUID": sdUUID, "imgUUID": imgUUID, "volUUID": volUUID})
    return {"jobUUID": job.job_uuid}


@TABLE.verb("getVolumeInfo", "A volume's metadata and sizes.", [SD_UUID, IMG_UUID, VOL_UUID],
            result=VOLUME_INFO, tags=["volumes"])
async def get_volume_info(agent: Agent, sdUUID: str, imgUUID: str,
                          volUUID: str) -> dict[str, Any]:
    return await agent.volumes.volume_info(sdUUID, imgUUID, volUUID)


@TABLE.verb("getVolumesList", "Volumes of a domain, or of one image.",
            [SD_UUID, Field("imgUUID", UUID(), required=False)],
            result={"type": "array", "items": {"type": "string"}}, tags=["volumes"])
async def get_volumes_list(agent: Agent, sdUUID: str, imgUUID: str | None) -> list[str]:
    return await agent.volumes.volumes_list(sdUUID, imgUUID)


@TABLE.verb("getImagesList", "Images of a domain.", [SD_UUID],
            result={"type": "array", "items": {"type": "string"}}, tags=["volumes"])
async def get_images_list(agent: Agent, sdUUID: str) -> list[str]:
    return await agent.volumes.images_list(sdUUID)


@TABLE.verb("extendVolumeSize", "Grow a volume's virtual size.",
            [SD_UUID, IMG_UUID, VOL_UUID, Field("newSize", SIZE), GENERATION],
            result=VOLUME_INFO, tags=["volumes"])
async def extend_volume_size(agent: Agent, sdUUID: str, imgUUID: str, volUUID: str,
                             newSize: int, generation: int | None) -> dict[str, Any]:
    return await agent.volumes.extend_volume(sdUUID, imgUUID, volUUID, newSize, generation)


# VDSM's limit (storage/constants.py DESCRIPTION_SIZE): the description must
# fit, UTF-8 encoded, in a block volume's 512-byte metadata slot beside the
# other keys. VDSM truncates longer ones; a new verb refuses them instead.
DESCRIPTION_BYTES = 210


def _check_update(values: dict[str, Any], path: str) -> None:
    if values["description"] is None and values["legality"] is None:
        raise InvalidParams("description", "give description or legality (or both)")
    if values["description"] is not None and \
            len(values["description"].encode()) > DESCRIPTION_BYTES:
        raise InvalidParams("description", f"must be at most {DESCRIPTION_BYTES} bytes "
                                           "in UTF-8")


@TABLE.verb("updateVolume", "Change a volume's description and/or legality (LEGAL, "
            "ILLEGAL): one atomic metadata write under the volume's lease, with a new "
            "generation (none when the values are already the volume's). Not for the "
            "domain's OVF store volume.",
            [SD_UUID, IMG_UUID, VOL_UUID,
             Field("description", Str(min_len=0, max_len=DESCRIPTION_BYTES), required=False,
                   description=f"At most {DESCRIPTION_BYTES} bytes in UTF-8 (VDSM's limit)"),
             Field("legality", Enum(["LEGAL", "ILLEGAL"]), required=False),
             GENERATION],
            check=_check_update, result=VOLUME_INFO, tags=["volumes"])
async def update_volume(agent: Agent, sdUUID: str, imgUUID: str, volUUID: str,
                        description: str | None, legality: str | None,
                        generation: int | None) -> dict[str, Any]:
    return await agent.volumes.update_volume(sdUUID, imgUUID, volUUID, description=description,
                                             legality=legality, generation=generation)


@TABLE.verb("measureVolume", "What converting a volume to `format` needs, as qemu-img "
            "measure says: `required` (bytes a sparse target takes) and `fullyAllocated` "
            "(a preallocated one), for cow also `bitmaps` (room for its persistent bitmaps, "
            "in neither figure). The volume's chain collapsed, or with collapse=false its "
            "own layer only. Read-only; ILLEGAL volumes are refused (227).",
            [SD_UUID, IMG_UUID, VOL_UUID, Field("format", Enum(["raw", "cow"])),
             Field("collapse", Bool(), required=False, default=True,
                   description="false: the top layer alone, without its parents' data")],
            result={"type": "object", "required": ["required", "fullyAllocated"],
                    "properties": {"required": {"type": "integer"},
                                   "fullyAllocated": {"type": "integer"},
                                   "bitmaps": {"type": "integer"}}},
            tags=["volumes"])
async def measure_volume(agent: Agent, sdUUID: str, imgUUID: str, volUUID: str, format: str,
                         collapse: bool) -> dict[str, Any]:
    return dict(await agent.volumes.measure_volume(sdUUID, imgUUID, volUUID, format,
                                                   collapse))


@TABLE.verb("extendVolume", "Grow the space a thin (cow) volume on a block domain may use "
            "(its LV, not the virtual size) to at least minSize bytes, in whole extents, "
            "never past what its full capacity needs; idempotent; one lvextend under the "
            "domain lease, none when the LV is large enough. A raw volume or a file domain's "
            "volume grows by itself: a no-op returning its size. Sends volume.extended (or "
            "volume.extendFailed, e.g. 397 when the domain is full) on the WebSocket.",
            [SD_UUID, IMG_UUID, VOL_UUID,
             Field("minSize", Int(1, 1 << 50), description="Bytes the volume must be able to "
                                                           "hold (a writer's next offset)"),
             GENERATION],
            result={"type": "object", "required": ["size"],
                    "properties": {"size": {"type": "integer",
                                            "description": "The LV's size now"}}},
            tags=["volumes"])
async def extend_volume(agent: Agent, sdUUID: str, imgUUID: str, volUUID: str, minSize: int,
                        generation: int | None) -> dict[str, Any]:
    return await agent.volumes.extend_allocation(sdUUID, imgUUID, volUUID, minSize,
                                                 generation)


@TABLE.verb("refreshVolume", "A host that has the volume prepared (its LV active) sees the "
            "size another host gave it (lvchange --refresh); elsewhere nothing to do.",
            [SD_UUID, IMG_UUID, VOL_UUID],
            result={"type": "object", "required": ["size"]}, tags=["volumes"])
async def refresh_volume(agent: Agent, sdUUID: str, imgUUID: str,
                         volUUID: str) -> dict[str, Any]:
    return await agent.volumes.refresh_volume(sdUUID, imgUUID, volUUID)


@TABLE.verb("reduceVolume", "Shrink a sparse cow volume's LV on a block domain to what it "
            "holds (qemu-img check's image end) plus the thin margin (a job; its result is "
            "{size}). Refused (203) while the volume is prepared for a VM on this host; "
            "other volumes and file domains: nothing to do.",
            [JOB_UUID, SD_UUID, IMG_UUID, VOL_UUID, GENERATION], result=JOB_RESULT, job=True,
            tags=["volumes"])
async def reduce_volume(agent: Agent, jobUUID: str, sdUUID: str, imgUUID: str, volUUID: str,
                        generation: int | None) -> dict[str, Any]:
    async def work(ctx: JobContext) -> dict[str, Any]:
        return await agent.volumes.reduce_volume(sdUUID, imgUUID, volUUID, generation)

    job = await agent.jobs.submit_recorded(
        jobUUID, "reduceVolume", work, description=f"reduce volume {volUUID}",
        params={"sdUUID": sdUUID, "imgUUID": imgUUID, "volUUID": volUUID})
    return {"jobUUID": job.job_uuid}


WIPE = Field("wipe", Bool(), required=False, default=False,
             description="Block domains: zero the volumes' extents before their LVs go "
                         "(and discard them where the LUN takes discards); crash-safe: a "
                         "volume tagged for wiping is zeroed by whoever removes it, also the "
                         "garbage collection after a crash. File domains: ignored, as VDSM "
                         "does (a file's blocks go back to the file system).")


@TABLE.verb("deleteVolume", "Delete a volume that has no children and is not prepared.",
            [SD_UUID, IMG_UUID, VOL_UUID, GENERATION, WIPE], result={"type": "object"},
            tags=["volumes"])
async def delete_volume(agent: Agent, sdUUID: str, imgUUID: str, volUUID: str,
                        generation: int | None, wipe: bool) -> dict[str, Any]:
    await agent.volumes.delete_volume(sdUUID, imgUUID, volUUID, generation, wipe=wipe)
    return {}


@TABLE.verb("deleteImage", "Delete an image and all its volumes (a job).",
            [JOB_UUID, SD_UUID, IMG_UUID, WIPE], result=JOB_RESULT, job=True,
            tags=["volumes"])
async def delete_image(agent: Agent, jobUUID: str, sdUUID: str, imgUUID: str,
                       wipe: bool) -> dict[str, Any]:
    async def work(ctx: JobContext) -> None:
        await agent.volumes.delete_image(sdUUID, imgUUID, ctx.progress, wipe=wipe)

    job = await agent.jobs.submit_recorded(
        jobUUID, "deleteImage", work,
        description=f"delete image {imgUUID}" + (" (wipe)" if wipe else ""),
        params={"sdUUID": sdUUID, "imgUUID": imgUUID, "wipe": wipe})
    return {"jobUUID": job.job_uuid}


@TABLE.verb("prepareImage", "Make a volume and its chain usable on this host; returns the "
            "path and the chain (base first). ILLEGAL volumes cannot be prepared; a backup "
            "domain's volume cannot be prepared for a VM, nor a volume with children "
            "(213 VolumeNonWritable: a VM writing it would corrupt them).",
            [SD_UUID, IMG_UUID, VOL_UUID, Field("purpose", Enum(["vm", "read", "copy"])),
             Field("writer", WRITER, required=False,
                   description="purpose vm: the qemu (or qemu-storage-daemon) writing the "
                               "volume. The agent connects to qmpSocket when it appears (and "
                               "again after the writer restarts) until teardownImage, arms "
                               "block-set-write-threshold on nodeName, extends the volume on "
                               "BLOCK_WRITE_THRESHOLD (volume.extended), re-arms, and resumes "
                               "(cont) a VM paused on ENOSPC.")],
            result={"type": "object", "required": ["path", "chain"]}, tags=["volumes"])
async def prepare_image(agent: Agent, sdUUID: str, imgUUID: str, volUUID: str,
                        purpose: str, writer: dict[str, str] | None) -> dict[str, Any]:
    return await agent.volumes.prepare(sdUUID, imgUUID, volUUID, purpose, writer)


@TABLE.verb("teardownImage", "Undo one prepareImage of a volume (or of every prepared volume "
            "of the image).", [SD_UUID, IMG_UUID, Field("volUUID", UUID(), required=False)],
            result={"type": "object"}, tags=["volumes"])
async def teardown_image(agent: Agent, sdUUID: str, imgUUID: str,
                         volUUID: str | None) -> dict[str, Any]:
    await agent.volumes.teardown(sdUUID, imgUUID, volUUID)
    return {}
