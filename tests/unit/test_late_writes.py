"""A volume's metadata write that hung past its deadline may still land
(storage answering at last). Until it returned, no newer write of that
metadata is made: one reported done would be undone by it. File domains
here; block domains' slots in test_blockdomain.py."""

from __future__ import annotations

import threading
import uuid

import pytest

from storage.domains import filedomain
from storage.domains.common import VolumeSpec
from storage.domains.filedomain import FileDomain
from storage.errors import ResourceTimeout


async def test_no_metadata_write_lands_before_a_late_one(
        file_domain: FileDomain, monkeypatch: pytest.MonkeyPatch) -> None:
    domain = file_domain
    img, vol = str(uuid.uuid4()), str(uuid.uuid4())
    await domain.create_volume(VolumeSpec(img=img, vol=vol, size=1 << 20, format="raw",
                                          preallocate="sparse"))
    hang = threading.Event()
    real_write = filedomain.atomic_write
    hung_once: list[bool] = []

    def late_write(path, data, mode=0o644):      # type: ignore[no-untyped-def]
        if not hung_once:
            hung_once.append(True)
            hang.wait()                          # storage answers at last: it lands
        real_write(path, data, mode)

    monkeypatch.setattr(filedomain, "atomic_write", late_write)
    domain.io.timeout = 0.3
    try:
        with pytest.raises(ResourceTimeout, match="did not finish"):
            await domain.update_volume(img, vol, description="first")
        # reported failed, still running: a newer write would land first
        with pytest.raises(ResourceTimeout, match="has not returned"):
            await domain.update_volume(img, vol, description="second")
        # another volume's metadata is written meanwhile
        other = str(uuid.uuid4())
        await domain.create_volume(VolumeSpec(img=str(uuid.uuid4()), vol=other, size=1 << 20,
                                              format="raw", preallocate="sparse"))
    finally:
        hang.set()
    await domain.io.settled(str(domain._meta(img, vol)))
    assert (await domain.volume(img, vol)).description == "first"     # it landed
    done = await domain.update_volume(img, vol, description="second")
    assert done.description == "second"
    assert (await domain.volume(img, vol)).description == "second"
