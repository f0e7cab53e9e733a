"""kill -9 the agent at random points of createVolume and deleteImage: after
a restart no volume is LEGAL unless complete, nothing half-made is listed,
and nothing half-made is left on storage."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.integration.storagefixtures import FsMount

MiB = 1024**2
TRIALS = 20


def new_id() -> str:
    return str(uuid.uuid4())


def storage_files(root: Path) -> set[str]:
    return {str(p.relative_to(root / "images")) for p in (root / "images").rglob("*")}


async def check_invariants(c: Any, sd: str, root: Path) -> dict[str, dict[str, Any]]:
    """Every listed volume is LEGAL, complete (qemu-img reads it with the
    recorded size) and its chain is whole; storage holds exactly the files
    of the listed volumes."""
    infos = {}
    expected = set()
    for img in await c.call("getImagesList", sdUUID=sd):
        expected.add(img)
        for vol in await c.call("getVolumesList", sdUUID=sd, imgUUID=img):
            info = await c.call("getVolumeInfo", sdUUID=sd, imgUUID=img, volUUID=vol)
            assert info["legality"] == "LEGAL", info
            path = root / "images" / img / vol
            q = json.loads(subprocess.run(
                ["qemu-img", "info", "--output", "json", "-U", "--backing-chain", str(path)],
                capture_output=True, text=True, check=True).stdout)
            assert q[0]["virtual-size"] == info["capacity"]
            infos[vol] = info
            expected |= {f"{img}/{vol}", f"{img}/{vol}.meta"}
    assert storage_files(root) == expected
    return infos


async def localfs_domain(agent: Any, data: Path) -> tuple[str, str, Path]:
    """Connect `data` as localfs and make a domain there (no OVF store)."""
    cid, sd = new_id(), new_id()
    async with agent.client() as c:
        await c.call("connectStorageServer", domType="localfs",
                     connectionParams=[{"id": cid, "connection": str(data)}])
        info = await c.call("createStorageDomain", sdUUID=sd, domType="localfs", name="crash",
                            connectionId=cid, ovfStore=False)
    return cid, sd, Path(info["path"])


@pytest.mark.slow
@pytest.mark.parametrize("fs_mount", [("xfs", 4096)], indirect=True, ids=["xfs-4096"])
async def test_kill9_during_create_volume(fs_mount: FsMount, agent_factory, tmp_path):
    rng = random.Random(1234)
    state = tmp_path / "state"
    data = fs_mount.path / "dom"
    data.mkdir()
    agent = agent_factory(state)
    cid, sd, root = await localfs_domain(agent, data)
    outcomes = {"complete": 0, "absent": 0}
    base = None
    for _trial in range(TRIALS):
        img, vol = (base[0] if base else new_id()), new_id()
        kind = rng.choice([("raw", "preallocated"), ("cow", "preallocated"),
                           ("cow", "sparse"), ("raw", "sparse")])
        parent = base[1] if base and kind[0] == "cow" and rng.random() < 0.5 else None
        params = dict(sdUUID=sd, imgUUID=img if parent else new_id(), volUUID=vol,
                      size=rng.choice([64, 256, 1024]) * MiB, format=kind[0],
                      preallocate=kind[1])
        if parent:
            params["parentVolUUID"] = parent
            params["size"] = max(params["size"], base[2])
        async with agent.client() as c:
            await c.call("createVolume", jobUUID=new_id(), **params)
            await asyncio.sleep(rng.uniform(0, 0.06))
        agent.kill()
        agent = agent_factory(state, port=agent.port)
        async with agent.client() as c:
            infos = await check_invariants(c, sd, root)
            if vol in infos:
                outcomes["complete"] += 1
                if infos[vol]["voltype"] == "LEAF" and infos[vol]["format"] == "cow":
                    base = (infos[vol]["image"], vol, infos[vol]["capacity"])
            else:
                outcomes["absent"] += 1
    # both outcomes must have happened for the trials to mean anything
    assert outcomes["complete"] and outcomes["absent"], outcomes
    async with agent.client() as c:
        for img in await c.call("getImagesList", sdUUID=sd):
            await c.call("deleteImage", jobUUID=new_id(), sdUUID=sd, imgUUID=img)
        await asyncio.sleep(0.5)
        await c.call("formatStorageDomain", sdUUID=sd)
        await c.call("disconnectStorageServer", domType="localfs",
                     connectionParams=[{"id": cid, "connection": str(data)}])


@pytest.mark.slow
@pytest.mark.parametrize("fs_mount", [("ext4", 512)], indirect=True, ids=["ext4-512"])
async def test_kill9_during_delete_image(fs_mount: FsMount, agent_factory, tmp_path):
    rng = random.Random(4321)
    state = tmp_path / "state"
    data = fs_mount.path / "dom"
    data.mkdir()
    agent = agent_factory(state)
    cid, sd, root = await localfs_domain(agent, data)
    outcomes = {"kept": 0, "gone": 0}
    for _trial in range(TRIALS):
        img = new_id()
        async with agent.client() as c:
            parent = None
            for _ in range(3):   # a chain of three, preallocated base
                vol = new_id()
                params = dict(sdUUID=sd, imgUUID=img, volUUID=vol, size=256 * MiB,
                              format="cow" if parent else "raw",
                              preallocate="sparse" if parent else "preallocated")
                if parent:
                    params["parentVolUUID"] = parent
                job = new_id()
                await c.call("createVolume", jobUUID=job, **params)
                assert (await c.wait_job(job, timeout=60))["status"] == "done"
                parent = vol
            await c.call("deleteImage", jobUUID=new_id(), sdUUID=sd, imgUUID=img)
            # half the kills right away (before or inside the job), half later
            await asyncio.sleep(rng.choice([0.0, rng.uniform(0, 0.03)]))
        agent.kill()
        agent = agent_factory(state, port=agent.port)
        async with agent.client() as c:
            await check_invariants(c, sd, root)
            images = await c.call("getImagesList", sdUUID=sd)
            if img in images:
                assert len(await c.call("getVolumesList", sdUUID=sd, imgUUID=img)) == 3
                outcomes["kept"] += 1
                job = new_id()
                await c.call("deleteImage", jobUUID=job, sdUUID=sd, imgUUID=img)
                assert (await c.wait_job(job, timeout=60))["status"] == "done"
            else:
                outcomes["gone"] += 1
    # A kept image was fully intact, a gone one fully removed: never between.
    # How many of each depends on timing; at least some deletions must land.
    assert outcomes["gone"], outcomes
    async with agent.client() as c:
        await c.call("formatStorageDomain", sdUUID=sd)
        await c.call("disconnectStorageServer", domType="localfs",
                     connectionParams=[{"id": cid, "connection": str(data)}])
