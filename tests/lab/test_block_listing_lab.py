"""A block domain's listing across hosts (issue 21): host 2 lists the
volumes of a domain host 1 changes, with its slot cache warm in between
(tests/lab/multihost.py: two agents, each with its own sanlock daemon and
LVM run directories, one multipath LUN). Host 1's create, its delete, and a
create taking the freed slot are each seen by host 2's next getVolumesList
and getImagesList; getVolumeInfo on host 2 agrees.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from rpc.client import Client
from tests.lab import multihost as mh
from tests.lab.multihost import HostFactory
from tests.polling import until_async

MiB = 1 << 20


def new_id() -> str:
    return str(uuid.uuid4())


async def job(c: Client, verb: str, **params: Any) -> None:
    jid = new_id()
    await c.call(verb, jobUUID=jid, **params)
    info = await c.wait_job(jid, timeout=180)
    assert info["status"] == "done", info


async def listed(c: Client, sd: str) -> tuple[list[str], list[str]]:
    """(volumes, images) as host `c` lists them, each asked twice: the second
    answer (from its cache when nothing changed) must be the first."""
    out = []
    for _ in range(2):
        vols = sorted(await c.call("getVolumesList", sdUUID=sd))
        imgs = sorted(await c.call("getImagesList", sdUUID=sd))
        out.append((vols, imgs))
    assert out[0] == out[1], out
    return out[0]


async def joined(c: Client, sd: str) -> bool:
    info = await c.call("getStorageDomainInfo", sdUUID=sd)
    return bool(info["lockspace"]["state"] == "joined")


@pytest.mark.timeout(300)
async def test_host2_listing_sees_host1_create_and_delete(
        sim_hosts: HostFactory, shared_storage: mh.SharedStorage) -> None:
    a = sim_hosts("host1", 1)
    b = sim_hosts("host2", 2)
    sd = new_id()
    async with a.client() as ca, b.client() as cb:
        lun = await shared_storage.connect(ca)
        assert await shared_storage.connect(cb) == lun
        await ca.call("createStorageDomain", sdUUID=sd, name="listing", domClass="data",
                      ovfStore=False, domType="iscsi", devices=[lun])
        await cb.call("activateStorageDomain", sdUUID=sd)
        await until_async(lambda: joined(ca, sd), "host 1 joined the lockspace", timeout=60,
                          interval=0.5)
        assert await listed(cb, sd) == ([], [])

        vols = {name: (new_id(), new_id()) for name in ("v1", "v2", "v3")}

        async def create(name: str) -> None:
            img, vol = vols[name]
            await job(ca, "createVolume", sdUUID=sd, imgUUID=img, volUUID=vol, size=8 * MiB,
                      format="raw", preallocate="preallocated")

        def ids(*names: str) -> tuple[list[str], list[str]]:
            return sorted(vols[n][1] for n in names), sorted(vols[n][0] for n in names)

        await create("v1")
        await create("v2")
        assert await listed(cb, sd) == ids("v1", "v2")
        assert await listed(ca, sd) == ids("v1", "v2")

        img, vol = vols["v1"]
        await ca.call("deleteVolume", sdUUID=sd, imgUUID=img, volUUID=vol)
        assert await listed(cb, sd) == ids("v2")

        # v3 takes v1's freed slot: host 2 reads it again, not v1's
        await create("v3")
        assert await listed(cb, sd) == ids("v2", "v3")
        img, vol = vols["v3"]
        info = await cb.call("getVolumeInfo", sdUUID=sd, imgUUID=img, volUUID=vol)
        assert (info["uuid"], info["image"], info["legality"]) == (vol, img, "LEGAL"), info

        # a change of a volume's metadata alone (no LVM change): seen at once
        await ca.call("updateVolume", sdUUID=sd, imgUUID=img, volUUID=vol,
                      description="from host 1")
        info = await cb.call("getVolumeInfo", sdUUID=sd, imgUUID=img, volUUID=vol)
        assert info["description"] == "from host 1", info

        for name in ("v2", "v3"):
            img, _ = vols[name]
            await job(ca, "deleteImage", sdUUID=sd, imgUUID=img)
        assert await listed(cb, sd) == ([], [])
        await ca.call("deactivateStorageDomain", sdUUID=sd)
        await cb.call("deactivateStorageDomain", sdUUID=sd)
