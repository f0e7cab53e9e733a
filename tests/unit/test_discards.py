"""A failed job's half-made volume whose removal failed (issue 22, 3): it is
no volume for the engine while its removal is retried, and its removal
needs no room on the domain."""

from __future__ import annotations

import errno
import uuid
from pathlib import Path

import pytest

from storage.domains.filedomain import FileDomain
from storage.errors import VolumeDoesNotExist
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
