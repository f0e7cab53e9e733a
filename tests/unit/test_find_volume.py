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
