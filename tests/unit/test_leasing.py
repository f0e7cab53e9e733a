"""DomainLeases: the per-domain lease rules on a real LeaseManager with the
local backend (file locks in a temporary directory)."""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path
from typing import Any

import pytest

from storage.domains.leasing import DomainLeases
from storage.errors import AcquireHostIdFailure, LeaseHeld
from storage.leases import (
    FileDomainLeases,
    LeaseManager,
    LocalBackend,
    Resource,
    create_lease_file,
)
from storage.leases.local import try_lock
from storage.leases.lockholder import LockHolder
from storage.metadata import BLANK_UUID, DomainMetadata, VolumeMetadata


class FakeDomain:
    def __init__(self, root: Path, policy: str = "local") -> None:
        self.md = DomainMetadata(uuid=str(uuid.uuid4()), name="d", dom_type="localfs",
                                 dom_class="data", version=5, lock_policy=policy)
        self.root = root
        self.forgotten = 0
        (root / "dom_md").mkdir(parents=True)
        for name in ("ids", "leases"):
            (root / "dom_md" / name).write_bytes(b"\0" * 4096)

    @property
    def uuid(self) -> str:
        return self.md.uuid

    def lease_areas(self) -> FileDomainLeases:
        return FileDomainLeases(self.uuid, self.root)

    def forget_cache(self) -> None:
        self.forgotten += 1

    async def volume_lease(self, img: str, vol: str) -> Resource:
        return self.lease_areas().volume_resource(img, vol)


def volume(dom: FakeDomain) -> VolumeMetadata:
    md = VolumeMetadata(domain=dom.uuid, image=str(uuid.uuid4()), uuid=str(uuid.uuid4()),
                        parent=BLANK_UUID, format="COW", allocation="SPARSE",
                        voltype="LEAF", capacity=1 << 30, legality="ILLEGAL")
    path = dom.lease_areas().volume_lease_path(md.image, md.uuid)
    path.parent.mkdir(parents=True)
    create_lease_file(path, dom.lease_areas().geometry)
    return md


@pytest.fixture
async def leases(tmp_path: Path) -> Any:
    manager = LeaseManager({"local": LocalBackend(holder=LockHolder())})
    dom = FakeDomain(tmp_path / "sd")
    dl = DomainLeases(manager, dom, host_id=1, io_timeout=1,  # type: ignore[arg-type]
                      domain_timeout=5.0)
    dl.start_join()
    assert await dl.wait_joined(5)
    yield dl
    await manager.close()


async def test_domain_lease_is_reentrant_and_queued(leases: DomainLeases) -> None:
    order = []

    async def change(name: str) -> None:
        async with leases.metadata():
            async with leases.metadata():      # the kind's code takes it again
                order.append(f"{name} in")
                await asyncio.sleep(0.05)
                order.append(f"{name} out")

    await asyncio.gather(change("a"), change("b"))
    assert order in (["a in", "a out", "b in", "b out"], ["b in", "b out", "a in", "a out"])
    assert leases.domain.forgotten == 2       # once per acquisition, not per nesting


async def test_volume_lease_held_by_another_task_or_holder(leases: DomainLeases) -> None:
    md = volume(leases.domain)  # type: ignore[arg-type]
    await leases.hold(md)
    assert await leases.busy(md)

    async def other_job() -> None:
        async with leases.volume(md):
            pass

    with pytest.raises(LeaseHeld):
        await asyncio.create_task(other_job())
    async with leases.volume(md):             # the holding task itself goes on
        pass
    await leases.drop(md)
    assert not await leases.busy(md)
    # another host (another open file) holds it: refused at once
    path = leases.domain.lease_areas().volume_lease_path(md.image, md.uuid)  # type: ignore
    fd = try_lock(str(path), 0)
    assert fd is not None
    try:
        assert await leases.busy(md)
        with pytest.raises(LeaseHeld):
            async with leases.volume(md):
                pass
    finally:
        os.close(fd)


async def test_writes_refused_without_the_policy_backend(tmp_path: Path) -> None:
    manager = LeaseManager({"local": LocalBackend(holder=LockHolder())})
    dom = FakeDomain(tmp_path / "sd", policy="sanlock")
    dl = DomainLeases(manager, dom, host_id=1, io_timeout=1,  # type: ignore[arg-type]
                      domain_timeout=5.0)
    dl.start_join()
    assert not await dl.wait_joined(5)
    with pytest.raises(AcquireHostIdFailure, match="sanlock"):
        async with dl.metadata():
            pass
    status = dl.status()
    assert status["state"] == "free" and "not configured" in status["reason"]
    await manager.close()
