"""kill -9 the agent at random points of copyImage and moveImage: after a
restart the source is intact, a copy's target is absent or complete, a
moved image is in exactly one place and whole, and nothing half-made is
listed or left on storage."""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import subprocess
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.agentproc import AgentProcess
from tests.integration.storagefixtures import FsMount
from tests.integration.test_domains_crash import check_invariants, new_id

MiB = 1024**2
TRIALS = 20


def digest(path: Path) -> str:
    fmt = json.loads(subprocess.run(["qemu-img", "info", "--output", "json", "-U", str(path)],
                                    capture_output=True, text=True, check=True).stdout)["format"]
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        raw = Path(tmp) / "raw"
        subprocess.run(["qemu-img", "convert", "-U", "-f", fmt, "-O", "raw", str(path),
                        str(raw)], check=True, capture_output=True)
        return hashlib.sha256(raw.read_bytes()).hexdigest()


async def two_domains(agent: AgentProcess, base: Path, names: tuple[str, ...] = ("src", "dst")
                      ) -> tuple[list[dict[str, str]], list[str], list[Path]]:
    """localfs domains in directories `names` under base (two by default)."""
    conns, sds, roots = [], [], []
    async with agent.client() as c:
        for name in names:
            d = base / name
            d.mkdir()
            conn = {"id": new_id(), "connection": str(d)}
            await c.call("connectStorageServer", domType="localfs", connectionParams=[conn])
            sd = new_id()
            info = await c.call("createStorageDomain", sdUUID=sd, domType="localfs",
                                name=name, connectionId=conn["id"], ovfStore=False)
            conns.append(conn)
            sds.append(sd)
            roots.append(Path(info["path"]))
    return conns, sds, roots


async def make_chain(c: Any, sd: str, root: Path) -> tuple[str, str, str]:
    """An image: a 96 MiB raw base full of data and a qcow2 top with some."""
    img, base, top = new_id(), new_id(), new_id()
    for vol, fmt, parent in ((base, "raw", None), (top, "cow", base)):
        job = new_id()
        params: dict[str, Any] = dict(sdUUID=sd, imgUUID=img, volUUID=vol, size=96 * MiB,
                                      format=fmt, preallocate="sparse")
        if parent:
            params["parentVolUUID"] = parent
        await c.call("createVolume", jobUUID=job, **params)
        assert (await c.wait_job(job, timeout=60))["status"] == "done"
        path = root / "images" / img / vol
        pattern = "write -P 0x61 0 96M" if fmt == "raw" else "write -P 0x62 32M 16M"
        subprocess.run(["qemu-io", "-f", "raw" if fmt == "raw" else "qcow2", "-c", pattern,
                        str(path)], check=True, capture_output=True)
    return img, base, top


async def cleanup(agent: AgentProcess, conns: list[dict[str, str]], sds: list[str]) -> None:
    async with agent.client() as c:
        for sd, conn in zip(sds, conns, strict=True):
            await c.call("formatStorageDomain", sdUUID=sd)
            await c.call("disconnectStorageServer", domType="localfs",
                         connectionParams=[conn])


@pytest.mark.slow
@pytest.mark.parametrize("fs_mount", [("xfs", 4096)], indirect=True, ids=["xfs-4096"])
async def test_kill9_during_copy_image(fs_mount: FsMount,
                                       agent_factory: Callable[..., AgentProcess],
                                       tmp_path: Path) -> None:
    rng = random.Random(2024)
    state = tmp_path / "state"
    agent = agent_factory(state)
    conns, sds, roots = await two_domains(agent, fs_mount.path)
    async with agent.client() as c:
        img, _, top = await make_chain(c, sds[0], roots[0])
    src_path = roots[0] / "images" / img / top
    want = digest(src_path)
    outcomes = {"complete": 0, "absent": 0}
    for _ in range(TRIALS):
        dst = {"sdUUID": sds[1], "imgUUID": new_id(), "volUUID": new_id()}
        fmt = rng.choice(["raw", "cow"])
        async with agent.client() as c:
            await c.call("copyImage", jobUUID=new_id(), format=fmt,
                         src={"sdUUID": sds[0], "imgUUID": img, "volUUID": top}, dst=dst)
            await asyncio.sleep(rng.uniform(0, 0.5))
        agent.kill()
        agent = agent_factory(state, port=agent.port)
        async with agent.client() as c:
            await check_invariants(c, sds[0], roots[0])
            infos = await check_invariants(c, sds[1], roots[1])
            if dst["volUUID"] in infos:
                outcomes["complete"] += 1
                assert digest(roots[1] / "images" / dst["imgUUID"] / dst["volUUID"]) == want
                job = new_id()
                await c.call("deleteImage", jobUUID=job, sdUUID=sds[1],
                             imgUUID=dst["imgUUID"])
                await c.wait_job(job, timeout=60)
            else:
                outcomes["absent"] += 1
        assert digest(src_path) == want
    assert outcomes["complete"] and outcomes["absent"], outcomes
    await cleanup(agent, conns, sds)


@pytest.mark.slow
@pytest.mark.parametrize("fs_mount", [("ext4", 512)], indirect=True, ids=["ext4-512"])
async def test_kill9_during_move_image(fs_mount: FsMount,
                                       agent_factory: Callable[..., AgentProcess],
                                       tmp_path: Path) -> None:
    rng = random.Random(2025)
    state = tmp_path / "state"
    agent = agent_factory(state)
    conns, sds, roots = await two_domains(agent, fs_mount.path)
    async with agent.client() as c:
        img, base, top = await make_chain(c, sds[0], roots[0])
    want = digest(roots[0] / "images" / img / top)
    where = 0
    outcomes = {"moved": 0, "stayed": 0}
    for _ in range(TRIALS):
        async with agent.client() as c:
            await c.call("moveImage", jobUUID=new_id(), sdUUID=sds[where], imgUUID=img,
                         dstSdUUID=sds[1 - where])
            await asyncio.sleep(rng.uniform(0, 0.6))
        agent.kill()
        agent = agent_factory(state, port=agent.port)
        async with agent.client() as c:
            found = []
            for i in (0, 1):
                infos = await check_invariants(c, sds[i], roots[i])
                vols = {v for v, info in infos.items() if info["image"] == img}
                if vols:
                    # whole: both volumes, the chain kept, the data equal
                    assert vols == {base, top}, (i, vols)
                    assert infos[top]["parent"] == base
                    assert digest(roots[i] / "images" / img / top) == want
                    found.append(i)
            assert len(found) == 1, found
            outcomes["moved" if found[0] != where else "stayed"] += 1
            where = found[0]
    assert outcomes["moved"] and outcomes["stayed"], outcomes
    await cleanup(agent, conns, sds)


@pytest.mark.slow
@pytest.mark.parametrize("fs_mount", [("xfs", 512)], indirect=True, ids=["xfs-512"])
async def test_kill9_during_snapshot_images(fs_mount: FsMount,
                                            agent_factory: Callable[..., AgentProcess],
                                            tmp_path: Path) -> None:
    """A snapshot of three disks on three domains is all or nothing, also
    when the agent is killed: after the restart every disk has the new
    layer, or none has."""
    rng = random.Random(2026)
    state = tmp_path / "state"
    agent = agent_factory(state)
    conns, sds, roots = await two_domains(agent, fs_mount.path, ("a", "b", "c"))
    disks = []
    async with agent.client() as c:
        for sd, root in zip(sds, roots, strict=True):
            img, _, top = await make_chain(c, sd, root)
            disks.append({"sdUUID": sd, "imgUUID": img, "volUUID": top})
    outcomes = {"all": 0, "none": 0}
    for _ in range(TRIALS):
        new = [str(uuid.uuid4()) for _ in disks]
        async with agent.client() as c:
            await c.call("snapshotImages", jobUUID=new_id(), disks=[
                {**d, "newVolUUID": n} for d, n in zip(disks, new, strict=True)])
            await asyncio.sleep(rng.uniform(0, 0.4))
        agent.kill()
        agent = agent_factory(state, port=agent.port)
        async with agent.client() as c:
            have = []
            for d, n, root in zip(disks, new, roots, strict=True):
                infos = await check_invariants(c, d["sdUUID"], root)
                have.append(n in infos)
                if n in infos:
                    assert infos[n]["parent"] == d["volUUID"]
                    assert infos[d["volUUID"]]["voltype"] == "INTERNAL"
                else:
                    assert infos[d["volUUID"]]["voltype"] == "LEAF"
            assert all(have) or not any(have), have
            if all(have):
                outcomes["all"] += 1
                disks = [{**d, "volUUID": n} for d, n in zip(disks, new, strict=True)]
            else:
                outcomes["none"] += 1
    assert outcomes["all"] and outcomes["none"], outcomes
    async with agent.client() as c:
        for sd, conn in zip(sds, conns, strict=True):
            await c.call("formatStorageDomain", sdUUID=sd)
            await c.call("disconnectStorageServer", domType="localfs", connectionParams=[conn])
