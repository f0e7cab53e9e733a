"""A file domain's scan (getVolumesList, issue 21): a metadata file whose
bytes did not change since the last full scan is not parsed again, and
what another host wrote since counts at once."""

from __future__ import annotations

import uuid
from dataclasses import replace
from pathlib import Path

import pytest

from storage.domains.filedomain import FileDomain
from storage.fileio import IOPool
from storage.metadata import BLANK_UUID, DomainMetadata, VolumeMetadata


def new_id() -> str:
    return str(uuid.uuid4())


async def make_domain(tmp_path: Path, io: IOPool, count: int) -> tuple[FileDomain,
                                                                          list[VolumeMetadata]]:
    md = DomainMetadata(uuid=new_id(), name="t", dom_type="localfs", dom_class="data",
                        version=5, backup=False)
    domain = await FileDomain.create(tmp_path, md, io)
    vols = []
    for _ in range(count):
        v = VolumeMetadata(domain=md.uuid, image=new_id(), uuid=new_id(), parent=BLANK_UUID,
                           format="RAW", allocation="SPARSE", voltype="LEAF",
                           capacity=1 << 20, legality="LEGAL", generation=0)
        await domain.write_volume_md(v)
        vols.append(v)
    return domain, vols


async def test_a_rescan_parses_only_changed_files(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    io = IOPool("test", timeout=10)
    try:
        domain, vols = await make_domain(tmp_path, io, 3)
        assert {v.uuid for v in await domain.all_volumes()} == {v.uuid for v in vols}

        decoded = []
        real = VolumeMetadata.decode.__func__   # type: ignore[attr-defined]

        def counting(cls: type[VolumeMetadata], data: bytes) -> VolumeMetadata:
            decoded.append(data)
            return real(cls, data)  # type: ignore[no-any-return]
        monkeypatch.setattr(VolumeMetadata, "decode", classmethod(counting))

        changed = replace(vols[1], generation=1)
        await domain.write_volume_md(changed)
        after = {v.uuid: v for v in await domain.all_volumes()}
        assert len(decoded) == 1
        assert after == {v.uuid: v for v in (vols[0], changed, vols[2])}
    finally:
        io.close()


async def test_a_rescan_sees_what_another_host_wrote(tmp_path: Path) -> None:
    io = IOPool("test", timeout=10)
    try:
        domain, vols = await make_domain(tmp_path, io, 3)
        await domain.all_volumes()
        # another host marks one REMOVING, and one file rots in place (same size)
        other = FileDomain(domain.md, domain.root, io)
        await other.write_volume_md(replace(vols[0], state="REMOVING"))
        meta = domain.images / vols[1].image / f"{vols[1].uuid}.meta"
        data = bytearray(meta.read_bytes())
        data[data.index(b"CAP=") + 4] ^= 1
        meta.write_bytes(bytes(data))
        assert [v.uuid for v in await domain.all_volumes()] == [vols[2].uuid]
        assert await domain.image_volumes(vols[0].image) == []
    finally:
        io.close()
