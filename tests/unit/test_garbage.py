"""A file domain's garbage collection reads the domain in one pass (its
census) and lists each image once for its debris (temp files, orphaned
lease files): what it removes, reports and leaves is what the
volume-by-volume walk found, and a stray file among the image directories
does not stop it."""

from __future__ import annotations

import uuid
from dataclasses import replace

from storage.domains.base import Domain
from storage.domains.filedomain import FileDomain
from storage.metadata import BLANK_UUID, VolumeMetadata


def new_id() -> str:
    return str(uuid.uuid4())


async def test_collect_garbage_of_a_file_domain(file_domain: FileDomain) -> None:
    domain = file_domain

    async def volume(img: str, **kw: str) -> VolumeMetadata:
        md = VolumeMetadata(domain=domain.uuid, image=img, uuid=new_id(), parent=BLANK_UUID,
                            format="RAW", allocation="SPARSE", voltype="LEAF",
                            capacity=1 << 20, legality="LEGAL", generation=1)
        md = replace(md, **kw)  # type: ignore[arg-type]
        (domain.images / img).mkdir(exist_ok=True)
        await domain.write_volume_md(md)
        (domain.images / img / md.uuid).write_bytes(b"x")
        return md

    half_made, kept, damaged_img, empty = new_id(), new_id(), new_id(), new_id()
    half = await volume(half_made, state="CREATING", legality="ILLEGAL")
    good = await volume(kept)
    halved = await volume(kept, state="REMOVING", legality="ILLEGAL")
    bad = await volume(damaged_img)
    meta = domain.images / damaged_img / f"{bad.uuid}.meta"
    meta.write_bytes(meta.read_bytes().replace(b"LEGALITY=LEGAL", b"LEGALITY=LEGAX"))
    (domain.images / empty).mkdir()
    stray = domain.images / new_id()          # a file with an image's name
    stray.write_bytes(b"not an image")
    orphan = domain.images / kept / f"{new_id()}.lease"    # a removal cut after the metadata
    orphan.write_bytes(bytes(4096))
    torn = domain.images / kept / f".{good.uuid}.meta.tmp"  # an atomic write cut short
    torn.write_bytes(b"half")

    census = await domain.census()
    assert sorted(census.images) == sorted([half_made, kept, damaged_img, empty])
    assert sorted(v.uuid for v in census.volumes) == sorted([half.uuid, good.uuid, halved.uuid])
    assert [d.split(":")[0] for d in census.damaged] == [f"{damaged_img}/{bad.uuid}"]
    walked = await Domain.census(domain)        # the generic, volume-by-volume walk
    assert (sorted(walked.images), sorted(v.uuid for v in walked.volumes), walked.damaged) == (
        sorted(census.images), sorted(v.uuid for v in census.volumes), census.damaged)

    report = await domain.collect_garbage()
    assert sorted(report["removed"]) == sorted([f"{half_made}/{half.uuid}",
                                                f"{kept}/{halved.uuid}", torn.name,
                                                f"{kept}/{orphan.name}"])
    assert not orphan.exists() and not torn.exists()
    assert report["damaged"] == census.damaged
    assert sorted(p.name for p in domain.images.iterdir()) == sorted(
        [kept, damaged_img, stray.name])
    assert [v.uuid for v in await domain.image_volumes(kept)] == [good.uuid]
    assert meta.exists()
    assert stray.read_bytes() == b"not an image"
