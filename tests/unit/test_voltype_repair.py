"""After an interrupted flow, a volume's type (LEAF/INTERNAL) is made to
agree with its children again by the domain's garbage collection."""

from __future__ import annotations

import uuid
from pathlib import Path

from storage.domains.filedomain import FileDomain
from storage.fileio import IOPool
from storage.metadata import BLANK_UUID, DomainMetadata, VolumeMetadata


def new_id() -> str:
    return str(uuid.uuid4())


async def test_collect_garbage_repairs_volume_types(tmp_path: Path) -> None:
    io = IOPool("test", timeout=10)
    try:
        md = DomainMetadata(uuid=new_id(), name="t", dom_type="localfs", dom_class="data",
                            version=5, backup=False)
        domain = await FileDomain.create(tmp_path, md, io)
        img = new_id()
        base, top, lone = new_id(), new_id(), new_id()

        def vol(u: str, parent: str, voltype: str) -> VolumeMetadata:
            return VolumeMetadata(domain=md.uuid, image=img, uuid=u, parent=parent,
                                  format="COW", allocation="SPARSE", voltype=voltype,
                                  capacity=1 << 20, legality="LEGAL", generation=1)

        (domain.images / img).mkdir()
        # a child was committed, the crash came before its parent became INTERNAL
        await domain.write_volume_md(vol(base, BLANK_UUID, "LEAF"))
        await domain.write_volume_md(vol(top, base, "LEAF"))
        # the top of a chain was removed, its parent was left INTERNAL
        await domain.write_volume_md(vol(lone, BLANK_UUID, "INTERNAL"))
        for v in (base, top, lone):
            (domain.images / img / v).write_bytes(b"")
        await domain.collect_garbage()
        types = {v.uuid: v.voltype for v in await domain.image_volumes(img)}
        assert types == {base: "INTERNAL", top: "LEAF", lone: "LEAF"}
        # nothing to repair: nothing written
        before = {v: (domain.images / img / f"{v}.meta").stat().st_mtime_ns
                  for v in (base, top, lone)}
        await domain.collect_garbage()
        assert before == {v: (domain.images / img / f"{v}.meta").stat().st_mtime_ns
                          for v in (base, top, lone)}
    finally:
        io.close()
