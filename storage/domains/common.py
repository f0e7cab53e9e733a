"""The plain shapes and helpers of volumes every domain module uses: what a
new volume is asked to be (VolumeSpec), the group prepared volumes are for
(VmAccess), a volume's wire form, the generation fence, chain order, and
what a file system error or a failed read means for a domain."""

from __future__ import annotations

import errno
from collections.abc import Awaitable, Callable, Container
from dataclasses import dataclass
from typing import Any

from storage import commands
from storage.errors import (
    FileStorageDomainStaleNFSHandle,
    GenerationMismatch,
    HostAgentError,
    NoSpaceLeftOnDomain,
    StorageDomainAccessError,
    VolumeDoesNotExist,
    out_of_space,
)
from storage.metadata import READY, REMOVING, VolumeMetadata

Progress = Callable[[float], None]
Fill = Callable[[VolumeMetadata], Awaitable[None]]


def no_progress(_: float) -> None:
    pass


@dataclass(frozen=True)
class VmAccess:
    """The group that opens prepared volumes besides root (qemu's), and the
    mode their files get."""

    gid: int
    file_mode: int = 0o660


@dataclass(frozen=True)
class VolumeSpec:
    img: str
    vol: str
    size: int
    format: str             # raw, cow
    preallocate: str        # sparse, preallocated
    parent: str | None = None
    description: str = ""
    disk_type: str = "DATA"
    initial_size: int | None = None


async def read_check(runner: commands.Runner, sd: str, path: str, timeout: float, *,
                     buffered_fallback: bool = False) -> None:
    """Read one block of `path` with O_DIRECT in a child process with a
    deadline: hung storage costs the deadline, never the agent. With
    `buffered_fallback`, a file system without O_DIRECT is read plainly."""
    argv = ["dd", f"if={path}", "of=/dev/null", "bs=4096", "count=1", "iflag=direct",
            "status=none"]
    try:
        r = await runner(argv, timeout=timeout, check=False)
        if buffered_fallback and r.rc != 0 and b"Invalid argument" in r.err:
            r = await runner([*argv[:-2], "status=none"], timeout=timeout, check=False)
    except commands.CommandTimeout:
        raise StorageDomainAccessError(sdUUID=sd,
                                   reason=f"metadata read took more than {timeout:g} s") \
            from None
    if r.rc != 0:
        raise StorageDomainAccessError(sdUUID=sd, reason=r.err_text.strip() or f"dd rc={r.rc}")


def os_error(e: OSError, sd: str) -> HostAgentError:
    """A storage error for what the file system answered."""
    if out_of_space(e):
        return NoSpaceLeftOnDomain(sdUUID=sd)
    if e.errno == errno.ESTALE:
        return FileStorageDomainStaleNFSHandle(path=e.filename or sd)
    return StorageDomainAccessError(sdUUID=sd, reason=f"{e.strerror or e}")


def leaf_first(vols: list[VolumeMetadata]) -> list[VolumeMetadata]:
    """The volumes of one image ordered children before parents."""
    ids = {v.uuid for v in vols}
    depth: dict[str, int] = {}
    by_id = {v.uuid: v for v in vols}

    def level(v: VolumeMetadata) -> int:
        if v.uuid not in depth:
            depth[v.uuid] = 0  # guards against loops
            depth[v.uuid] = 1 + level(by_id[v.parent]) if v.parent in ids else 0
        return depth[v.uuid]

    return sorted(vols, key=lambda v: (-level(v), v.uuid))


def check_generation(md: VolumeMetadata, generation: int | None) -> None:
    """VDSM's fence for verbs that change a volume: given the generation the
    caller last saw, the verb goes on only if it is still the volume's (a
    change made meanwhile, here or by another host, bumped it); else 911,
    before anything is changed."""
    if generation is not None and generation != md.generation:
        raise GenerationMismatch(volUUID=md.uuid, expected=generation, actual=md.generation)


def visible(md: VolumeMetadata, img: str, vol: str, discarding: Container[str]
            ) -> VolumeMetadata:
    """md, read for volume `vol` of image `img`, if callers may see it: not
    being removed, in that image, its discard not pending; else 201."""
    if md.state == REMOVING or md.image != img or vol in discarding:
        raise VolumeDoesNotExist(volUUID=vol)
    return md


def volume_info(md: VolumeMetadata, apparent: int, true: int) -> dict[str, Any]:
    return {
        "uuid": md.uuid, "image": md.image, "domain": md.domain,
        "parent": md.parent, "format": md.format.lower(),
        "type": md.allocation.lower(), "voltype": md.voltype,
        "capacity": md.capacity, "apparentSize": apparent, "trueSize": true,
        "legality": md.legality, "generation": md.generation,
        "description": md.description, "diskType": md.disk_type, "ctime": md.ctime,
        "status": "OK" if md.state == READY else md.state,
    }
