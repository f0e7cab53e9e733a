"""mergeSnapshots (issue 17: cold merge) and dirty bitmaps across layers, on
localfs domains on a real ext4 mount, through the real agent: chains of
three with the middle layer and the top merged, incremental backups across
a snapshot and a merge, refusals, and kill -9 during merges
(tests/integration/crashharness)."""

from __future__ import annotations

import asyncio
import itertools
import random
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from rpc.client import Client, RpcError
from tests.agentproc import AgentProcess
from tests.integration.crashharness import (
    Aim,
    CrashTrials,
    Job,
    Kill,
    MiB,
    bitmaps,
    check_invariants,
    digest,
    done,
    held,
    localfs_domains,
    new_id,
    qemu_check,
    qemu_info,
    run_job,
    volume_md,
)
from tests.integration.storagefixtures import FsMount, unmount

SIZE = 16 * MiB


def write(path: Path, fmt: str, offset: int, length: int, pattern: int) -> None:
    """What a VM would write into the volume at path."""
    subprocess.run(["qemu-io", "-f", fmt, "-c", f"write -P {pattern} {offset} {length}",
                    str(path)], check=True, capture_output=True)


def snapshot_copy(path: Path, dst: Path) -> Path:
    """What a VM reads of the volume at path (its chain), as a raw file."""
    subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", str(path), str(dst)], check=True,
                   capture_output=True)
    return dst


def same(a: Path, b: Path) -> bool:
    r = subprocess.run(["qemu-img", "compare", "-U", str(a), str(b)], capture_output=True,
                       text=True)
    assert r.returncode in (0, 1), r.stderr
    return r.returncode == 0


def backing(path: Path) -> str | None:
    return qemu_info(path)[0].get("backing-filename")


async def chain_agrees(c: Client, sd: str, root: Path, img: str) -> list[str]:
    """The image's volumes base first, as the metadata says; asserts qemu's
    backing chain says the same, types are LEAF/INTERNAL as they should be,
    and every qcow2 volume passes `qemu-img check`."""
    infos = {v: await c.call("getVolumeInfo", sdUUID=sd, imgUUID=img, volUUID=v)
             for v in await c.call("getVolumesList", sdUUID=sd, imgUUID=img)}
    by_parent = {i["parent"]: v for v, i in infos.items()}
    assert len(by_parent) == len(infos), infos
    [base] = [v for v, i in infos.items() if i["parent"] not in infos]
    chain = [base]
    while chain[-1] in by_parent:
        chain.append(by_parent[chain[-1]])
    assert len(chain) == len(infos), infos
    for i, v in enumerate(chain):
        info = infos[v]
        assert info["legality"] == "LEGAL" and info["status"] == "OK", info
        assert info["voltype"] == ("LEAF" if v == chain[-1] else "INTERNAL"), info
        path = root / "images" / img / v
        assert qemu_info(path)[0]["virtual-size"] == info["capacity"]
        assert backing(path) == (chain[i - 1] if i else None), (v, qemu_info(path))
        if info["format"] == "cow":
            qemu_check(path)
    return chain


@pytest.mark.parametrize("base_fmt", ["raw", "cow"])
async def test_merge_middle_then_top(make_fs_mount: Callable[..., FsMount], agent: AgentProcess,
                                     tmp_path: Path, base_fmt: str) -> None:
    fs = make_fs_mount("ext4")
    async with agent.client() as c:
        doms = await localfs_domains(c, fs.path, ["dom"])
        sd, root = doms.sds[0], doms.roots[0]
        img, base, mid, top = new_id(), new_id(), new_id(), new_id()

        def path(vol: str) -> Path:
            return root / "images" / img / vol

        await done(c, "createVolume", sdUUID=sd, imgUUID=img, volUUID=base, size=SIZE,
                   format=base_fmt, preallocate="sparse")
        write(path(base), "qcow2" if base_fmt == "cow" else "raw", 0, 4 * MiB, 0x11)
        await done(c, "createVolume", sdUUID=sd, imgUUID=img, volUUID=mid, size=SIZE,
                   format="cow", preallocate="sparse", parentVolUUID=base)
        write(path(mid), "qcow2", 2 * MiB, 4 * MiB, 0x22)
        # the top larger than its parents: base grows to its capacity
        await done(c, "createVolume", sdUUID=sd, imgUUID=img, volUUID=top, size=2 * SIZE,
                   format="cow", preallocate="sparse", parentVolUUID=mid)
        write(path(top), "qcow2", 5 * MiB, 2 * MiB, 0x33)
        write(path(top), "qcow2", SIZE + MiB, MiB, 0x44)
        was_mid = snapshot_copy(path(mid), tmp_path / "mid.raw")
        was_top = snapshot_copy(path(top), tmp_path / "top.raw")
        assert not same(was_mid, was_top)       # the comparisons below can fail
        gen = (await c.call("getVolumeInfo", sdUUID=sd, imgUUID=img, volUUID=base))[
            "generation"]

        # the middle layer: its child goes on base
        info = await run_job(c, "mergeSnapshots", sdUUID=sd, imgUUID=img, baseVolUUID=base,
                             topVolUUID=mid, generation=gen)
        assert info["status"] == "done", info
        assert info["progress"] == 100 and info["result"]["uuid"] == base
        assert await chain_agrees(c, sd, root, img) == [base, top]
        assert not path(mid).exists() and not path(mid).with_suffix(".meta").exists()
        assert same(path(top), was_top)         # the disk as a VM reads it
        assert same(path(base), was_mid)        # base holds what mid held over it

        # the top (the leaf): base is the leaf, at the top's capacity
        info = await run_job(c, "mergeSnapshots", sdUUID=sd, imgUUID=img, baseVolUUID=base,
                             topVolUUID=top)
        assert info["status"] == "done", info
        assert await chain_agrees(c, sd, root, img) == [base]
        assert info["result"]["capacity"] == 2 * SIZE and info["result"]["voltype"] == "LEAF"
        assert not path(top).exists()
        assert same(path(base), was_top)
        await done(c, "deleteImage", sdUUID=sd, imgUUID=img)
        await doms.release(c)


async def test_incremental_backup_across_snapshot_and_merge(
        make_fs_mount: Callable[..., FsMount], agent: AgentProcess, tmp_path: Path) -> None:
    """Full backup, snapshot (snapshotImages), write, merge, snapshot
    (createVolume), write, incremental backup: it holds only the changes
    and restores the disk."""
    fs = make_fs_mount("ext4")
    async with agent.client() as c:
        doms = await localfs_domains(c, fs.path, ["src", "bak"], dom_class=["data", "backup"])
        (sd, bak), (root, bak_root) = doms.sds, doms.roots
        img, disk = new_id(), new_id()

        def path(vol: str, r: Path = root, i: str = img) -> Path:
            return r / "images" / i / vol

        size = 64 * MiB
        await done(c, "createVolume", sdUUID=sd, imgUUID=img, volUUID=disk, size=size,
                   format="cow", preallocate="sparse")
        write(path(disk), "qcow2", 0, size, 0x5a)
        full_img, full = new_id(), new_id()
        res = await done(c, "backupVolume", src={"sdUUID": sd, "imgUUID": img, "volUUID": disk},
                         dst={"sdUUID": bak, "imgUUID": full_img, "volUUID": full},
                         keepSnapshot=False)
        assert res["merged"], res
        mark = f"backup-{full}"
        assert mark in {b["name"] for b in bitmaps(path(disk))}

        # a snapshot carries the bitmap to its new layer
        s1 = new_id()
        await done(c, "snapshotImages", disks=[{"sdUUID": sd, "imgUUID": img, "volUUID": disk,
                                                "newVolUUID": s1}])
        assert [b["name"] for b in bitmaps(path(s1)) if "in-use" not in b["flags"]] == [mark]
        changed = 0
        for off in (3, 17, 40):
            write(path(s1), "qcow2", off * MiB, MiB, 0x61 + off)
            changed += MiB
        # merging it keeps the bitmap (with what it recorded) in the base
        await done(c, "mergeSnapshots", sdUUID=sd, imgUUID=img, baseVolUUID=disk, topVolUUID=s1)
        assert await chain_agrees(c, sd, root, img) == [disk]
        # and a layer made by createVolume carries it too
        s2 = new_id()
        await done(c, "createVolume", sdUUID=sd, imgUUID=img, volUUID=s2, size=size,
                   format="cow", preallocate="sparse", parentVolUUID=disk)
        assert [b["name"] for b in bitmaps(path(s2)) if "in-use" not in b["flags"]] == [mark]
        write(path(s2), "qcow2", 60 * MiB, MiB, 0x7e)
        changed += MiB

        inc = new_id()
        res = await done(c, "backupVolume", src={"sdUUID": sd, "imgUUID": img, "volUUID": s2},
                         dst={"sdUUID": bak, "imgUUID": full_img, "volUUID": inc},
                         incrementalFrom={"sdUUID": bak, "imgUUID": full_img, "volUUID": full})
        assert res["incremental"], res
        restored = path(inc, bak_root, full_img)
        assert backing(restored) == full
        assert same(restored, path(s2))
        held = qemu_info(restored)[0]["actual-size"]
        print(f"incremental backup: {held} bytes on disk for {changed} bytes changed")
        assert changed <= held <= 2 * changed, (held, changed)
        await done(c, "deleteImage", sdUUID=sd, imgUUID=img)
        await done(c, "deleteImage", sdUUID=bak, imgUUID=full_img)
        await doms.release(c)


async def test_merge_refused(make_fs_mount: Callable[..., FsMount], agent: AgentProcess) -> None:
    """A disk prepared for a VM (203), bad input naming its field; nothing
    changes on storage."""
    fs = make_fs_mount("ext4")
    async with agent.client() as c:
        doms = await localfs_domains(c, fs.path, ["dom"])
        sd, root = doms.sds[0], doms.roots[0]
        img, base, mid, top = new_id(), new_id(), new_id(), new_id()
        await done(c, "createVolume", sdUUID=sd, imgUUID=img, volUUID=base, size=SIZE,
                   format="cow", preallocate="sparse")
        for parent, vol in ((base, mid), (mid, top)):
            await done(c, "createVolume", sdUUID=sd, imgUUID=img, volUUID=vol, size=SIZE,
                       format="cow", preallocate="sparse", parentVolUUID=parent)
        ids = {"sdUUID": sd, "imgUUID": img}

        def state() -> dict[str, tuple[int, int]]:
            return {p.name: (p.stat().st_size, p.stat().st_mtime_ns)
                    for p in sorted((root / "images" / img).iterdir())}

        before = state()
        await c.call("prepareImage", **ids, volUUID=top, purpose="vm")
        info = await run_job(c, "mergeSnapshots", **ids, baseVolUUID=mid, topVolUUID=top)
        assert info["status"] == "failed" and info["error"]["code"] == 203, info
        await c.call("teardownImage", **ids)
        # a reader's chain would lose a volume under it
        await c.call("prepareImage", **ids, volUUID=top, purpose="read")
        info = await run_job(c, "mergeSnapshots", **ids, baseVolUUID=mid, topVolUUID=top)
        assert info["status"] == "failed" and info["error"]["code"] == 203, info
        await c.call("teardownImage", **ids)

        for params, field in [({"baseVolUUID": "nope", "topVolUUID": top}, "baseVolUUID"),
                              ({"baseVolUUID": mid, "topVolUUID": mid}, "topVolUUID"),
                              ({"baseVolUUID": mid}, "topVolUUID"),
                              ({"baseVolUUID": mid, "topVolUUID": top, "generation": -1},
                               "generation")]:
            with pytest.raises(RpcError) as e:
                await c.call("mergeSnapshots", jobUUID=new_id(), **ids, **params)
            assert e.value.code == -32602 and e.value.data["field"] == field, (params, e.value)
        for params, code, field in [
                ({"baseVolUUID": base, "topVolUUID": top}, 1000, "topVolUUID"),   # not its child
                ({"baseVolUUID": top, "topVolUUID": mid}, 1000, "topVolUUID"),
                ({"baseVolUUID": mid, "topVolUUID": new_id()}, 201, None),
                ({"baseVolUUID": mid, "topVolUUID": top, "generation": 7}, 911, None)]:
            info = await run_job(c, "mergeSnapshots", **ids, **params)
            assert info["status"] == "failed" and info["error"]["code"] == code, (params, info)
            if field:
                assert info["error"]["data"]["field"] == field, info
        assert state() == before
        await done(c, "deleteImage", sdUUID=sd, imgUUID=img)
        await doms.release(c)


@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_kill9_during_merge(make_fs_mount: Callable[..., FsMount],
                                  agent_factory: Callable[..., AgentProcess],
                                  tmp_path: Path) -> None:
    """kill -9 at random points of merges of a chain's middle layer or top.
    After each restart: one whole chain that metadata and qemu agree on,
    every volume LEGAL and `qemu-img check`-clean, the disk reading as
    before; top either gone (the merge done or finished by the restarted
    agent) or there with the chain as it was, and then a merge again works."""
    rng = random.Random(2029)
    fs = make_fs_mount("ext4")
    agent = agent_factory(tmp_path / "state")
    async with agent.client() as c:
        doms = await localfs_domains(c, fs.path, ["dom"])
    sd, root = doms.sds[0], doms.roots[0]
    leaked: set[str] = set()
    started = 0

    def path(img: str, vol: str) -> Path:
        return root / "images" / img / vol

    async def start(c: Client) -> Job:
        nonlocal started
        started += 1
        img, chain = new_id(), [new_id(), new_id(), new_id()]
        await done(c, "createVolume", sdUUID=sd, imgUUID=img, volUUID=chain[0],
                   size=8 * MiB, format=rng.choice(["raw", "cow"]), preallocate="sparse")
        fmt = qemu_info(path(img, chain[0]))[0]["format"]
        write(path(img, chain[0]), fmt, 0, 8 * MiB, rng.randrange(1, 255))
        for parent, vol in itertools.pairwise(chain):
            await done(c, "createVolume", sdUUID=sd, imgUUID=img, volUUID=vol, size=8 * MiB,
                       format="cow", preallocate="sparse", parentVolUUID=parent)
            write(path(img, vol), "qcow2", rng.randrange(5) * MiB, 4 * MiB,
                  rng.randrange(1, 255))
        # the middle layer or the top (the leaf)
        i = 1 + started % 2
        params = {"sdUUID": sd, "imgUUID": img, "baseVolUUID": chain[i - 1],
                  "topVolUUID": chain[i]}
        want = digest(path(img, chain[-1]))
        top = chain[i]
        # A commit of a trial's few MiB lasts a few ms, about one look at
        # the processes: it is held (stopped) the moment it is seen, then
        # let run in slices until it has written into base (base's mtime
        # moved), and killed there.
        base = path(img, chain[i - 1])
        base_mtime = base.stat().st_mtime_ns
        step = ("time", "commit", "finish")[started % 3]
        aim = {"time": None,
               "commit": Aim("commit", lambda: held(
                   trials.agent, ("qemu-img", "commit"),
                   lambda: base.stat().st_mtime_ns != base_mtime), 0.0),
               "finish": Aim("finish", lambda: marked(img, top), 0.0)}[step]
        return Job("mergeSnapshots", params, [root], (chain, want), aim)

    def marked(img: str, vol: str) -> bool:
        md = volume_md(root, img, vol)
        return md is None or md.legality == "ILLEGAL"

    def phase(job: Job) -> str:
        img, top = job.params["imgUUID"], job.params["topVolUUID"]
        md = volume_md(root, img, top)
        if md is None or md.state != "READY":
            return "removal"
        return "finish" if md.legality == "ILLEGAL" else "commit"

    async def check(c: Client, job: Job, kill: Kill) -> str:
        chain, want = job.data
        img, top = job.params["imgUUID"], job.params["topVolUUID"]
        infos = await check_invariants(c, sd, root, deep=True, leaked=leaked)
        now = await chain_agrees(c, sd, root, img)
        assert digest(path(img, now[-1])) == want
        outcome = "merged"
        if top in infos:
            assert now == chain, (now, chain)
            outcome = "kept"
            # the engine merges again
            info = await run_job(c, "mergeSnapshots", **job.params)
            assert info["status"] == "done", info
            now = await chain_agrees(c, sd, root, img)
            assert digest(path(img, now[-1])) == want
        assert now == [v for v in chain if v != top], (now, chain)
        await done(c, "deleteImage", sdUUID=sd, imgUUID=img)
        return outcome

    trials = CrashTrials("mergeSnapshots", agent, agent_factory, rng,
                         outcomes=("merged", "kept"), phases={"commit": 2, "finish": 2},
                         commands={"qemu-img commit": 2})
    agent = await trials.run(start, check, phase)
    print(f"merge trials: volumes with leaked clusters {len(leaked)}")
    async with agent.client() as c:
        await doms.release(c)


def kill_once_marked(agent: AgentProcess, root: Path, img: str, top: str,
                     timeout: float = 30.0) -> bool:
    """kill -9 the agent the moment top is marked ILLEGAL (the merge's point
    of no return; the rebase of top's child, a qemu-img run, comes next):
    True if it died with top still there."""
    meta = root / "images" / img / f"{top}.meta"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if b"LEGALITY=ILLEGAL" in meta.read_bytes():
                break
        except FileNotFoundError:
            break       # removed: the merge ended before it was seen
        time.sleep(0.0002)
    agent.kill()
    md = volume_md(root, img, top)
    return md is not None and md.legality == "ILLEGAL"


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_merge_finished_when_its_domain_comes_back(
        make_fs_mount: Callable[..., FsMount], agent_factory: Callable[..., AgentProcess],
        tmp_path: Path) -> None:
    """kill -9 past a merge's point of no return, and the domain's storage
    is missing when the agent starts again (a host rebooted with its storage
    down): the merge cannot be finished then, and its layer stays ILLEGAL,
    the disk unusable. Once the engine connects the storage again the
    merge is finished with no restart: the chain whole, reading as before,
    preparable."""
    fs = make_fs_mount("ext4")
    agent = agent_factory(tmp_path / "state")
    async with agent.client() as c:
        doms = await localfs_domains(c, fs.path, ["dom"])
    sd, root, conn = doms.sds[0], doms.roots[0], doms.conns[0]
    merges = 0
    while True:
        merges += 1
        assert merges <= 5, "no kill landed past the point of no return in 5 merges"
        img, base, top, leaf = new_id(), new_id(), new_id(), new_id()
        async with agent.client() as c:
            await done(c, "createVolume", sdUUID=sd, imgUUID=img, volUUID=base, size=SIZE,
                       format="cow", preallocate="sparse")
            for parent, vol in ((base, top), (top, leaf)):
                await done(c, "createVolume", sdUUID=sd, imgUUID=img, volUUID=vol,
                           size=SIZE, format="cow", preallocate="sparse", parentVolUUID=parent)
            for i, vol in enumerate((base, top, leaf)):
                write(root / "images" / img / vol, "qcow2", i * 2 * MiB, 4 * MiB, 0x11 * (i + 1))
            want = digest(root / "images" / img / leaf)
            await c.call("mergeSnapshots", jobUUID=(job := new_id()), sdUUID=sd, imgUUID=img,
                         baseVolUUID=base, topVolUUID=top)
        if kill_once_marked(agent, root, img, top):
            break
        agent = agent_factory(agent.state_dir, port=agent.port)
    print(f"killed past the point of no return at merge {merges}")
    unmount(fs.path)
    agent = agent_factory(agent.state_dir, port=agent.port)
    async with agent.client() as c:
        with pytest.raises(RpcError) as e:
            await c.call("getVolumeInfo", sdUUID=sd, imgUUID=img, volUUID=top)
        assert e.value.code == 358, e.value
        [info] = (await c.call("getJobs", jobUUIDs=[job])).values()
        assert info["status"] == "failed" and info["recovering"], info
        subprocess.run(["mount", fs.device, fs.path], check=True)
        [st] = await c.call("connectStorageServer", domType="localfs", connectionParams=[conn])
        assert st["status"] == 0, st
        t = time.monotonic()
        while (await c.call("getJobs", jobUUIDs=[job]))[job].get("recovering"):
            assert time.monotonic() - t < 30, agent.log()[-3000:]
            await asyncio.sleep(0.2)
        print(f"merge finished {time.monotonic() - t:.2f} s after the storage came back")
        assert await chain_agrees(c, sd, root, img) == [base, leaf]
        assert digest(root / "images" / img / leaf) == want
        prepared = await c.call("prepareImage", sdUUID=sd, imgUUID=img, volUUID=leaf,
                                purpose="read")
        assert [v["volUUID"] for v in prepared["chain"]] == [base, leaf], prepared
        await c.call("teardownImage", sdUUID=sd, imgUUID=img, volUUID=leaf)
        await done(c, "deleteImage", sdUUID=sd, imgUUID=img)
        await doms.release(c)
