"""kill -9 the agent at random points of copyImage, moveImage and
snapshotImages: after a restart the source is intact, a copy's target is
absent or complete, a moved image is in exactly one place and whole, a
snapshot of several disks is on all or none, and nothing half-made is
listed or left on storage; and right after a copy is seen done: it stays
done (tests/integration/crashharness)."""

from __future__ import annotations

import random
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from rpc.client import Client
from tests.agentproc import AgentProcess
from tests.integration.crashharness import (
    CrashTrials,
    Job,
    Kill,
    MiB,
    check_invariants,
    digest,
    done,
    kill_after_done,
    localfs_domains,
    new_id,
)
from tests.integration.storagefixtures import FsMount


async def make_chain(c: Client, sd: str, root: Path) -> tuple[str, str, str]:
    """An image: a 96 MiB raw base full of data and a qcow2 top with some."""
    img, base, top = new_id(), new_id(), new_id()
    for vol, fmt, parent in ((base, "raw", None), (top, "cow", base)):
        params: dict[str, Any] = dict(sdUUID=sd, imgUUID=img, volUUID=vol, size=96 * MiB,
                                      format=fmt, preallocate="sparse")
        if parent:
            params["parentVolUUID"] = parent
        await done(c, "createVolume", **params)
        path = root / "images" / img / vol
        pattern = "write -P 0x61 0 96M" if fmt == "raw" else "write -P 0x62 32M 16M"
        subprocess.run(["qemu-io", "-f", "raw" if fmt == "raw" else "qcow2", "-c", pattern,
                        str(path)], check=True, capture_output=True)
    return img, base, top


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("fs_mount", [("xfs", 4096)], indirect=True, ids=["xfs-4096"])
async def test_kill9_during_copy_image(fs_mount: FsMount,
                                       agent_factory: Callable[..., AgentProcess],
                                       tmp_path: Path) -> None:
    rng = random.Random(2024)
    agent = agent_factory(tmp_path / "state")
    async with agent.client() as c:
        doms = await localfs_domains(c, fs_mount.path, ["src", "dst"])
        img, _, top = await make_chain(c, doms.sds[0], doms.roots[0])
    src_path = doms.roots[0] / "images" / img / top
    want = digest(src_path)

    async def start(c: Client) -> Job:
        dst = {"sdUUID": doms.sds[1], "imgUUID": new_id(), "volUUID": new_id()}
        return Job("copyImage", {"format": rng.choice(["raw", "cow"]), "dst": dst,
                                 "src": {"sdUUID": doms.sds[0], "imgUUID": img,
                                         "volUUID": top}}, doms.roots)

    async def check(c: Client, job: Job, kill: Kill) -> str:
        dst = job.params["dst"]
        await check_invariants(c, doms.sds[0], doms.roots[0])
        infos = await check_invariants(c, doms.sds[1], doms.roots[1])
        assert digest(src_path) == want
        if dst["volUUID"] not in infos:
            return "absent"
        assert digest(doms.roots[1] / "images" / dst["imgUUID"] / dst["volUUID"]) == want
        await done(c, "deleteImage", sdUUID=doms.sds[1], imgUUID=dst["imgUUID"])
        return "complete"

    trials = CrashTrials("copyImage", agent, agent_factory, rng,
                         outcomes=("complete", "absent"))
    agent = await trials.run(start, check)
    async with agent.client() as c:
        await doms.release(c)


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("fs_mount", [("ext4", 512)], indirect=True, ids=["ext4-512"])
async def test_kill9_during_move_image(fs_mount: FsMount,
                                       agent_factory: Callable[..., AgentProcess],
                                       tmp_path: Path) -> None:
    rng = random.Random(2025)
    agent = agent_factory(tmp_path / "state")
    async with agent.client() as c:
        doms = await localfs_domains(c, fs_mount.path, ["src", "dst"])
        img, base, top = await make_chain(c, doms.sds[0], doms.roots[0])
    want = digest(doms.roots[0] / "images" / img / top)
    where = 0

    async def start(c: Client) -> Job:
        return Job("moveImage", {"sdUUID": doms.sds[where], "imgUUID": img,
                                 "dstSdUUID": doms.sds[1 - where]}, doms.roots)

    async def check(c: Client, job: Job, kill: Kill) -> str:
        nonlocal where
        found = []
        for i in (0, 1):
            infos = await check_invariants(c, doms.sds[i], doms.roots[i])
            vols = {v for v, info in infos.items() if info["image"] == img}
            if vols:
                # whole: both volumes, the chain kept, the data equal
                assert vols == {base, top}, (i, vols)
                assert infos[top]["parent"] == base
                assert digest(doms.roots[i] / "images" / img / top) == want
                found.append(i)
        assert len(found) == 1, found
        outcome = "moved" if found[0] != where else "stayed"
        where = found[0]
        return outcome

    trials = CrashTrials("moveImage", agent, agent_factory, rng,
                         outcomes=("moved", "stayed"))
    agent = await trials.run(start, check)
    async with agent.client() as c:
        await doms.release(c)


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("fs_mount", [("xfs", 512)], indirect=True, ids=["xfs-512"])
async def test_kill9_during_snapshot_images(fs_mount: FsMount,
                                            agent_factory: Callable[..., AgentProcess],
                                            tmp_path: Path) -> None:
    """A snapshot of three disks on three domains is all or nothing, also
    when the agent is killed: after the restart every disk has the new
    layer, or none has."""
    rng = random.Random(2026)
    agent = agent_factory(tmp_path / "state")
    disks = []
    async with agent.client() as c:
        doms = await localfs_domains(c, fs_mount.path, ["a", "b", "c"])
        for sd, root in zip(doms.sds, doms.roots, strict=True):
            img, _, top = await make_chain(c, sd, root)
            disks.append({"sdUUID": sd, "imgUUID": img, "volUUID": top})

    async def start(c: Client) -> Job:
        return Job("snapshotImages", {"disks": [{**d, "newVolUUID": new_id()} for d in disks]},
                   doms.roots)

    async def check(c: Client, job: Job, kill: Kill) -> str:
        nonlocal disks
        have = []
        for d, root in zip(job.params["disks"], doms.roots, strict=True):
            infos = await check_invariants(c, d["sdUUID"], root)
            have.append(d["newVolUUID"] in infos)
            if d["newVolUUID"] in infos:
                assert infos[d["newVolUUID"]]["parent"] == d["volUUID"]
                assert infos[d["volUUID"]]["voltype"] == "INTERNAL"
            else:
                assert infos[d["volUUID"]]["voltype"] == "LEAF"
        assert all(have) or not any(have), have
        if not all(have):
            return "none"
        disks = [{"sdUUID": d["sdUUID"], "imgUUID": d["imgUUID"], "volUUID": d["newVolUUID"]}
                 for d in job.params["disks"]]
        return "all"

    trials = CrashTrials("snapshotImages", agent, agent_factory, rng,
                         outcomes=("all", "none"))
    agent = await trials.run(start, check)
    async with agent.client() as c:
        await doms.release(c)


COPIES = 12


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_kill9_right_after_copy_seen_done(make_fs_mount: Callable[..., FsMount],
                                                agent_factory: Callable[..., AgentProcess],
                                                tmp_path: Path) -> None:
    """Issue 22 (1): a dozen copyImage jobs of 64 MiB on one localfs domain,
    the agent killed the instant one is first seen done (getJobs or
    job.status), restarted on the same state dir: that job still reads
    done, its target listed, LEGAL and equal to the source; the others are
    done or interrupted with no target left."""
    fs = make_fs_mount("xfs", 4096, size=(COPIES + 4) * 64 * MiB)
    agent = agent_factory(tmp_path / "state")
    async with agent.client() as c:
        doms = await localfs_domains(c, fs.path, ["sd"])
        sd, root = doms.sds[0], doms.roots[0]
        img, vol = new_id(), new_id()
        await done(c, "createVolume", sdUUID=sd, imgUUID=img, volUUID=vol, size=64 * MiB,
                   format="raw", preallocate="sparse")
    src = root / "images" / img / vol
    subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x63 0 64M", str(src)],
                   check=True, capture_output=True)
    want = digest(src)

    async def start(c: Client) -> list[Job]:
        return [Job("copyImage", {"src": {"sdUUID": sd, "imgUUID": img, "volUUID": vol},
                                  "dst": {"sdUUID": sd, "imgUUID": new_id(),
                                          "volUUID": new_id()}}, doms.roots)
                for _ in range(COPIES)]

    async def check(c: Client, jobs: list[Job], seen: dict[str, dict[str, Any]]) -> None:
        infos = await check_invariants(c, sd, root)
        ended = await c.call("getJobs", jobUUIDs=[j.uuid for j in jobs])
        assert seen
        for job in jobs:
            dst = job.params["dst"]
            if ended[job.uuid]["status"] != "done":
                assert dst["volUUID"] not in infos
                continue
            assert ended[job.uuid]["result"]["uuid"] == dst["volUUID"]
            assert infos[dst["volUUID"]]["legality"] == "LEGAL"
            if job.uuid in seen:
                assert digest(root / "images" / dst["imgUUID"] / dst["volUUID"]) == want
            await done(c, "deleteImage", sdUUID=sd, imgUUID=dst["imgUUID"])

    agent, stats = await kill_after_done(agent, agent_factory, start, check)
    # the kills came amid the work: other copies still running
    assert stats.unended >= stats.trials, stats.summary()
    async with agent.client() as c:
        await doms.release(c)
