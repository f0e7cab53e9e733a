"""extendVolume and refreshVolume on a file domain: a file grows as it is
written, so both answer the volume's current size and change nothing (no
volume.extended notification, no extension counted)."""

from __future__ import annotations

import os
from typing import Any

import pytest

from rpc.client import RpcError
from tests.integration.test_domains_file import Storage, create_volume, new_id, run_job
from tests.integration.test_domains_file import backing as backing
from tests.integration.test_domains_file import storage as file_storage

MiB = 1 << 20


@pytest.fixture
def dom_type() -> str:
    return "localfs"


storage = file_storage    # the fixture, under its name here


def extends_counted(metrics: bytes) -> dict[str, float]:
    out = {}
    for line in metrics.decode().splitlines():
        if line.startswith("hostagent_volume_extends_total{"):
            name, value = line.rsplit(" ", 1)
            out[name.split('"')[1]] = float(value)
    return out


async def test_extend_and_refresh_on_file_domain_change_nothing(storage: Storage) -> None:
    c = storage.c
    await storage.create_domain()
    img, vol = new_id(), new_id()
    await create_volume(c, storage.sd, img, vol, size=64 * MiB)
    p = await c.call("prepareImage", sdUUID=storage.sd, imgUUID=img, volUUID=vol,
                     purpose="vm")
    before: dict[str, Any] = dict(await c.call("getVolumeInfo", sdUUID=storage.sd,
                                               imgUUID=img, volUUID=vol))
    size = os.stat(p["path"]).st_size
    assert before["apparentSize"] == size
    ref = {"sdUUID": storage.sd, "imgUUID": img, "volUUID": vol}
    assert await c.call("extendVolume", **ref, minSize=512 * MiB) == {"size": size}
    assert await c.call("extendVolume", **ref, minSize=512 * MiB,
                        generation=before["generation"]) == {"size": size}
    assert await c.call("refreshVolume", **ref) == {"size": size}
    with pytest.raises(RpcError) as e:
        await c.call("extendVolume", **ref, minSize=MiB, generation=before["generation"] + 1)
    assert e.value.code == 911, e.value
    after = await c.call("getVolumeInfo", **ref)
    assert after == before
    assert os.stat(p["path"]).st_size == size
    status, body = await c.get("/metrics")
    assert status == 200
    assert extends_counted(body).get("ok", 0) == 0, body
    assert extends_counted(body).get("failed", 0) == 0, body
    await c.call("teardownImage", **ref)


async def test_new_layer_on_a_disk_a_vm_writes(storage: Storage) -> None:
    """snapshotImages on a disk prepared for a VM with no writer: 203 naming
    the disk, nothing made, unless the caller switches the VM itself;
    backupVolume of it: 203."""
    c = storage.c
    await storage.create_domain()
    img, vol, new = new_id(), new_id(), new_id()
    await create_volume(c, storage.sd, img, vol, size=64 * MiB)
    ref = {"sdUUID": storage.sd, "imgUUID": img, "volUUID": vol}
    await c.call("prepareImage", **ref, purpose="vm")
    disk = {**ref, "newVolUUID": new}
    info = await run_job(c, "snapshotImages", disks=[disk])
    assert info["status"] == "failed" and info["error"]["code"] == 203, info
    assert "disks[0]" in info["error"]["message"] and vol in info["error"]["message"], info
    assert await c.call("getVolumesList", sdUUID=storage.sd, imgUUID=img) == [vol]
    # a backup would copy the layer the VM writes: refused as well
    backup = new_id()
    await c.call("createStorageDomain", sdUUID=backup, domType=storage.dom_type,
                 name="backup", domClass="backup", connectionId=storage.conn_id,
                 ovfStore=False)
    info = await run_job(c, "backupVolume", src=ref,
                         dst={"sdUUID": backup, "imgUUID": new_id(), "volUUID": new_id()})
    assert info["status"] == "failed" and info["error"]["code"] == 203, info
    assert await c.call("getVolumesList", sdUUID=storage.sd, imgUUID=img) == [vol]
    assert await c.call("getImagesList", sdUUID=backup) == []
    info = await run_job(c, "snapshotImages", disks=[{**disk, "switch": "caller"}])
    assert info["status"] == "done", info
    assert sorted(await c.call("getVolumesList", sdUUID=storage.sd, imgUUID=img)) == \
        sorted([vol, new])
    await c.call("teardownImage", **ref)
    # not prepared for a VM: no switch needed
    info = await run_job(c, "snapshotImages", disks=[{**ref, "volUUID": new,
                                                      "newVolUUID": new_id()}])
    assert info["status"] == "done", info
