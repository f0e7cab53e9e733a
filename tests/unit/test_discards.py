"""A failed job's half-made volume whose removal failed (issue 22, 3): it is
no volume for the engine while its removal is retried, and its removal
needs no room on the domain."""

from __future__ import annotations

import errno
import uuid
from dataclasses import replace
from pathlib import Path

import pytest

from storage.domains.common import volume_info
from storage.domains.filedomain import FileDomain
from storage.errors import VolumeDoesNotExist, VolumeMetadataReadError
from storage.fileio import IOPool, atomic_write
from storage.metadata import BLANK_UUID, DomainMetadata, VolumeMetadata


def new_id() -> str:
    return str(uuid.uuid4())


class FullDomain(FileDomain):
    """A file domain whose metadata writes find the file system full."""

    full = False

    async def write_volume_md(self, md: VolumeMetadata) -> None:
        if self.full:
            raise OSError(errno.ENOSPC, "No space left on device")
        await super().write_volume_md(md)


async def test_a_pending_discard_is_no_volume_and_goes_without_room(tmp_path: Path) -> None:
    io = IOPool("test", timeout=10)
    try:
        md = DomainMetadata(uuid=new_id(), name="t", dom_type="localfs", dom_class="data",
                            version=5, backup=False)
        domain = await FullDomain.create(tmp_path, md, io)
        img, vol = new_id(), new_id()
        half = VolumeMetadata(domain=md.uuid, image=img, uuid=vol, parent=BLANK_UUID,
                              format="RAW", allocation="SPARSE", voltype="LEAF",
                              capacity=1 << 20, legality="ILLEGAL", generation=0,
                              state="CREATING")
        await domain.write_volume_md(half)
        (domain.images / img / vol).write_bytes(b"x" * 4096)
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
    finally:
        io.close()


def test_a_failed_atomic_write_leaves_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "md"
    with pytest.raises(TypeError):
        atomic_write(target, "not bytes")  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


async def test_volume_info_sees_what_volume_sees(tmp_path: Path) -> None:
    """FileDomain.volume_info reads metadata and sizes in one trip: the same
    answer as the two reads, and the same refusals (another image's volume,
    a volume being removed, damaged metadata)."""
    io = IOPool("test", timeout=10)
    try:
        md = DomainMetadata(uuid=new_id(), name="t", dom_type="localfs", dom_class="data",
                            version=5, backup=False)
        domain = await FileDomain.create(tmp_path, md, io)
        img, vol = new_id(), new_id()
        vmd = VolumeMetadata(domain=md.uuid, image=img, uuid=vol, parent=BLANK_UUID,
                             format="RAW", allocation="SPARSE", voltype="LEAF",
                             capacity=1 << 20, legality="LEGAL", generation=3,
                             state="READY")
        await domain.write_volume_md(vmd)
        (domain.images / img / vol).write_bytes(b"x" * 8192)
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
    finally:
        io.close()
