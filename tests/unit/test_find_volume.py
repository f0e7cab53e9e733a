"""A volume found by id anywhere in a file domain (a clone's parent in its
template's image) in one look: the same answer as the image-by-image walk;
a stray file with an image's name is no image (getImagesList listed it, and
the walk failed on it)."""

from __future__ import annotations

import uuid

import pytest

from storage.domains.base import Domain
from storage.domains.filedomain import FileDomain
from storage.errors import VolumeDoesNotExist
from storage.metadata import BLANK_UUID, VolumeMetadata


def new_id() -> str:
    return str(uuid.uuid4())


async def test_a_volume_is_found_in_any_image(file_domain: FileDomain) -> None:
    domain = file_domain
    template, clone = new_id(), new_id()
    base, top = new_id(), new_id()
    for img, vol, parent in ((template, base, BLANK_UUID), (clone, top, base)):
        (domain.images / img).mkdir()
        await domain.write_volume_md(VolumeMetadata(
            domain=domain.uuid, image=img, uuid=vol, parent=parent, format="COW",
            allocation="SPARSE", voltype="LEAF", capacity=1 << 20, legality="LEGAL",
            generation=1))
        (domain.images / img / vol).write_bytes(b"")
    (domain.images / new_id()).write_bytes(b"a file with an image's name")
    empty = new_id()
    (domain.images / empty).mkdir()
    assert await domain.image_ids() == sorted([template, clone, empty])   # not the file

    for vol, holder in ((base, template), (top, clone), (new_id(), None)):
        assert await domain.image_of(vol) == holder
        assert await Domain.image_of(domain, vol) == holder    # the generic walk agrees
    assert [v.uuid for v in await domain.chain(clone, top)] == [base, top]
    assert (await domain.find_volume(base, prefer_image=clone)).image == template
    with pytest.raises(VolumeDoesNotExist):
        await domain.find_volume(new_id())


async def test_a_volume_id_is_the_domain_s_own(file_domain: FileDomain,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A new volume's id taken in another image is 212, for a base and for
    a snapshot layer, asked with a stat per image (has_volume), not a
    listing of each: the domain is never listed for it."""
    from storage.domains.common import VolumeSpec
    from storage.errors import VolumeAlreadyExists

    domain = file_domain
    img, vol = new_id(), new_id()
    await domain.create_volume(VolumeSpec(img=img, vol=vol, size=1 << 20, format="raw",
                                          preallocate="sparse"))
    other, top = new_id(), new_id()
    await domain.create_volume(VolumeSpec(img=other, vol=top, size=1 << 20, format="raw",
                                          preallocate="sparse"))

    async def no_listing(self: FileDomain) -> set[str]:
        raise AssertionError("the domain listed for a new volume's id")

    monkeypatch.setattr(FileDomain, "all_volume_ids", no_listing)
    assert await domain.has_volume(vol) and not await domain.has_volume(new_id())
    with pytest.raises(VolumeAlreadyExists):
        await domain.create_volume(VolumeSpec(img=new_id(), vol=vol, size=1 << 20,
                                              format="raw", preallocate="sparse"))
    with pytest.raises(VolumeAlreadyExists):
        await domain.create_volume(VolumeSpec(img=other, vol=vol, size=1 << 20, format="cow",
                                              preallocate="sparse", parent=top))
    snap = new_id()
    md = await domain.create_volume(VolumeSpec(img=other, vol=snap, size=1 << 20,
                                               format="cow", preallocate="sparse", parent=top))
    assert md.parent == top and await domain.has_volume(snap)
