"""A failed job's half-made volume whose removal failed (issue 22, 3): it is
no volume for the engine while its removal is retried, and its removal
needs no room on the domain."""

from __future__ import annotations

import errno
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from storage.domains.common import volume_info
from storage.domains.filedomain import FileDomain
from storage.domains.leaseapi import Unleased
from storage.errors import VolumeDoesNotExist, VolumeMetadataReadError
from storage.fileio import IOPool, atomic_write
from storage.metadata import BLANK_UUID, DomainMetadata, VolumeMetadata


def new_id() -> str:
    return str(uuid.uuid4())


class FullDomain(FileDomain):
    """A file domain whose metadata writes find the file system full."""

    full = False

    async def write_volume_md(self, md: VolumeMetadata,
                              initial_size: int | None = None) -> None:
        if self.full:
            raise OSError(errno.ENOSPC, "No space left on device")
        await super().write_volume_md(md, initial_size)




async def domain_with_volume(cls: type[FileDomain], root: Path, io: IOPool, size: int,
                             **md: Any) -> tuple[FileDomain, VolumeMetadata]:
    """A new file domain of class `cls` holding one volume of `size` bytes."""
    dmd = DomainMetadata(uuid=new_id(), name="t", dom_type="localfs", dom_class="data",
                         version=5, backup=False)
    domain = await cls.create(root, dmd, io)
    vmd = VolumeMetadata(**{"domain": dmd.uuid, "image": new_id(), "uuid": new_id(),
                            "parent": BLANK_UUID, "format": "RAW", "allocation": "SPARSE",
                            "voltype": "LEAF", "capacity": 1 << 20, **md})
    await domain.write_volume_md(vmd)
    (domain.images / vmd.image / vmd.uuid).write_bytes(b"x" * size)
    return domain, vmd


async def test_a_pending_discard_is_no_volume_and_goes_without_room(tmp_path: Path,
                                                                    io: IOPool) -> None:
    domain, half = await domain_with_volume(FullDomain, tmp_path, io, 4096,
                                            legality="ILLEGAL", generation=0,
                                            state="CREATING")
    assert isinstance(domain, FullDomain)
    img, vol = half.image, half.uuid
    assert [v.uuid for v in await domain.image_volumes(img)] == [vol]

    domain.pending_discards[vol] = half
    assert await domain.image_volumes(img) == []
    assert await domain.all_volumes() == []
    with pytest.raises(VolumeDoesNotExist):
        await domain.volume(img, vol)
    with pytest.raises(VolumeDoesNotExist):    # its own path on a file domain
        await domain.volume_info(img, vol)

    domain.full = True
    await domain.discard_volume(half)
    assert not (domain.images / img).exists()


def test_a_failed_atomic_write_leaves_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "md"
    with pytest.raises(TypeError):
        atomic_write(target, "not bytes")  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


async def test_volume_info_sees_what_volume_sees(tmp_path: Path, io: IOPool) -> None:
    """FileDomain.volume_info reads metadata and sizes in one trip: the same
    answer as the two reads, and the same refusals (another image's volume,
    a volume being removed, damaged metadata)."""
    domain, vmd = await domain_with_volume(FileDomain, tmp_path, io, 8192,
                                           legality="LEGAL", generation=3, state="READY")
    img, vol = vmd.image, vmd.uuid
    info = await domain.volume_info(img, vol)
    assert info == volume_info(await domain.volume(img, vol),
                               *await domain.volume_sizes(img, vol))
    assert (info["apparentSize"], info["generation"], info["status"]) == (8192, 3, "OK")

    with pytest.raises(VolumeDoesNotExist):
        await domain.volume_info(new_id(), vol)
    await domain.write_volume_md(replace(vmd, state="REMOVING"))
    with pytest.raises(VolumeDoesNotExist):
        await domain.volume_info(img, vol)
    meta = domain.images / img / f"{vol}.meta"
    meta.write_bytes(meta.read_bytes().replace(b"LEGALITY=LEGAL", b"LEGALITY=LEGAX"))
    with pytest.raises(VolumeMetadataReadError):
        await domain.volume_info(img, vol)


async def test_a_lease_left_by_a_removal_cut_short_is_collected(tmp_path: Path,
                                                                io: IOPool) -> None:
    """A removal writes REMOVING, removes the data and metadata, then the
    lease file: a kill between the last two left the lease file with no
    volume beside it, which garbage collection (finding volumes by their
    metadata) never looked at again (seen in a kill -9 merge trial)."""
    domain, vmd = await domain_with_volume(FileDomain, tmp_path, io, 4096,
                                           legality="LEGAL", generation=0, state="READY")
    img, vol = vmd.image, vmd.uuid
    await domain.make_volume_lease(vmd)
    lease = domain.images / img / f"{vol}.lease"
    assert lease.exists()
    other = replace(vmd, uuid=new_id())            # a volume that stays, in the same image
    await domain.write_volume_md(other)
    (domain.images / img / other.uuid).write_bytes(b"")
    await domain.make_volume_lease(other)

    await domain.write_volume_md(replace(vmd, state="REMOVING", legality="ILLEGAL"))
    await domain.remove_volume_data(img, vol)      # the kill comes here
    await domain.collect_garbage()
    assert sorted(p.name for p in (domain.images / img).iterdir()) == sorted(
        [other.uuid, f"{other.uuid}.meta", f"{other.uuid}.lease"])


class HeldLeases(Unleased):
    """Leases of which those of the volumes in `held` are taken elsewhere."""

    def __init__(self, held: set[str]) -> None:
        self.held = held

    async def busy(self, md: VolumeMetadata) -> bool:
        return md.uuid in self.held


async def test_an_image_emptied_keeps_a_lease_file_still_held(tmp_path: Path,
                                                              io: IOPool) -> None:
    """remove_image_dir (an image left with no volume) removes a lease file
    without its volume, as the collection does, and asks the same question
    first: one still held is a removal under way (another host's or job's),
    not a leftover. It stays, and with it the directory, until it is free."""
    domain, vmd = await domain_with_volume(FileDomain, tmp_path, io, 4096,
                                           legality="LEGAL", generation=0, state="READY")
    img, vol = vmd.image, vmd.uuid
    await domain.make_volume_lease(vmd)
    await domain.write_volume_md(replace(vmd, state="REMOVING", legality="ILLEGAL"))
    await domain.remove_volume_data(img, vol)      # another holder is here
    domain.leases = HeldLeases({vol})
    await domain.remove_image_dir(img)
    assert sorted(p.name for p in (domain.images / img).iterdir()) == [f"{vol}.lease"]
    domain.leases = HeldLeases(set())              # released (and the holder died)
    await domain.remove_image_dir(img)
    assert not (domain.images / img).exists()
