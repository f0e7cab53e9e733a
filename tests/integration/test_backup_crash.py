"""kill -9 the agent at random points of backupVolume (full and incremental,
keeping the snapshot layer or merging it back) and createHibernationVolumes
(tests/integration/crashharness).

After each restart of a backup trial: the disk's data is unchanged as a VM
sees it, its chain is whole and valid (`qemu-img check`), a backup volume is
listed only if complete (it holds the disk at that point in time), nothing
half-made is left on storage, and a new backup of the disk (the same
backup again, if the killed one is gone) succeeds and is right."""

from __future__ import annotations

import random
import subprocess
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from rpc.client import Client
from storage.metadata import BLANK_UUID, LEGAL, READY
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
    run_job,
    volume_md,
)
from tests.integration.storagefixtures import FsMount

DISK_SIZE = 8 * MiB
# Trials on one disk before the next: its chain and bitmaps grow with each.
SERIES = 3


@dataclass
class Disk:
    img: str
    fmt: str                                 # of its base volume
    chain: list[str]                         # base first
    backups: list[tuple[str, str]] = field(default_factory=list)   # complete, oldest first
    trials: int = 0


@dataclass
class Trial:
    want: str                                # the disk's digest at the backup
    chain: list[str]                         # the disk before the job
    incremental: bool
    keep: bool


def backup_ref(sd: str, img: str, vol: str) -> dict[str, str]:
    return {"sdUUID": sd, "imgUUID": img, "volUUID": vol}


def chain_of(infos: dict[str, dict[str, Any]], img: str) -> list[str]:
    """The image's volumes base first; asserts they form one chain."""
    vols = {v: i for v, i in infos.items() if i["image"] == img}
    children = {i["parent"]: v for v, i in vols.items()}
    assert len(children) == len(vols), f"not one chain: {vols}"
    chain = [children[BLANK_UUID]]
    while chain[-1] in children:
        chain.append(children[chain[-1]])
    assert len(chain) == len(vols), f"not one chain: {vols}"
    for v in chain:
        assert vols[v]["voltype"] == ("LEAF" if v == chain[-1] else "INTERNAL"), vols[v]
    return chain


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_kill9_during_backup(make_fs_mount: Callable[..., FsMount],
                                   agent_factory: Callable[..., AgentProcess],
                                   tmp_path: Path) -> None:
    rng = random.Random(2027)
    fs = make_fs_mount("ext4")
    agent = agent_factory(tmp_path / "state")
    async with agent.client() as c:
        doms = await localfs_domains(c, fs.path, ["src", "bak"], dom_class=["data", "backup"])
    (src, bak), (src_root, bak_root) = doms.sds, doms.roots
    disk: Disk | None = None
    made = started = 0
    gaps: Counter[str] = Counter()
    details: list[str] = []
    stale: set[str] = set()      # bitmaps named after backups that are not there
    leaked: set[str] = set()     # volumes with leaked clusters
    inconsistent: set[str] = set()   # bitmaps found in-use after a restart

    def path(img: str, vol: str, root: Path = src_root) -> Path:
        return root / "images" / img / vol

    def tracks(d: Disk, backup_vol: str) -> bool:
        """The disk's top holds a usable record of its changes since that backup."""
        return any(b["name"] == f"backup-{backup_vol}" and "in-use" not in b["flags"]
                   for b in bitmaps(path(d.img, d.chain[-1])))

    async def retire(c: Client, d: Disk) -> None:
        await done(c, "deleteImage", sdUUID=src, imgUUID=d.img)
        for img in {img for img, _ in d.backups}:
            await done(c, "deleteImage", sdUUID=bak, imgUUID=img)

    async def new_disk(c: Client) -> Disk:
        nonlocal made
        made += 1
        # every other disk has a raw base: merging back into it drops the bitmaps
        fmt = "cow" if made % 2 else "raw"
        d = Disk(new_id(), fmt, [new_id()])
        await done(c, "createVolume", sdUUID=src, imgUUID=d.img, volUUID=d.chain[0],
                   size=DISK_SIZE, format=fmt, preallocate="sparse")
        guest_write(d, 0, DISK_SIZE)
        return d

    def guest_write(d: Disk, offset: int, length: int) -> None:
        """What a VM would write, into the disk's top volume."""
        top = path(d.img, d.chain[-1])
        fmt = "qcow2" if d.fmt == "cow" or len(d.chain) > 1 else "raw"
        subprocess.run(["qemu-io", "-f", fmt, "-c",
                        f"write -P {rng.randrange(1, 255)} {offset} {length}", str(top)],
                       check=True, capture_output=True)

    async def start(c: Client) -> Job:
        nonlocal disk, started
        if disk is None or disk.trials >= SERIES:
            if disk is not None:
                await retire(c, disk)
            disk = await new_disk(c)
        disk.trials += 1
        guest_write(disk, rng.randrange(DISK_SIZE // MiB) * MiB, MiB)
        last = disk.backups[-1] if disk.backups else None
        incremental = bool(last and tracks(disk, last[1]) and rng.random() < 0.6)
        # One trial in six kills at a point in time; the others aim at a
        # step: the snapshot layer (from when it appears), the copy (from
        # when the layer is made), the merge back (from when the backup
        # volume is LEGAL), its qemu-img commit (the one command that writes
        # the disk), the end of a backup that keeps its layer. The snapshot
        # layer takes most of a job's time (two qemu-img runs a bitmap):
        # timing alone seldom reaches the others.
        started += 1
        step = ("time", "layer", "copy", "merge back", "commit", "end")[started % 6]
        keep = step == "end" or (step in ("time", "layer", "copy") and rng.random() < 0.5)
        params: dict[str, Any] = {
            "src": backup_ref(src, disk.img, disk.chain[-1]),
            "dst": backup_ref(bak, last[0] if incremental and last else new_id(), new_id()),
            "keepSnapshot": keep}
        if incremental and last:
            params["incrementalFrom"] = backup_ref(bak, *last)
        t = Trial(digest(path(disk.img, disk.chain[-1])), list(disk.chain), incremental, keep)
        img = disk.img
        aim = {"time": None,
               "layer": Aim("snapshot layer", lambda: bool(new_volumes(img, t.chain)), 0.1),
               # (the copy of a trial's few MiB takes tens of ms)
               "copy": Aim("copy", lambda: bool(new_volumes(img, t.chain, READY)), 0.03),
               "merge back": Aim("merge back", lambda: backup_legal(params["dst"]), 0.3),
               # (or once it is over: the layer gone). A commit of the few MiB
               # a trial writes lasts a few ms, about what one look at the
               # agent's processes takes: it is held (stopped) the moment it
               # is seen, and killed there.
               "commit": Aim("commit", lambda: held(trials.agent, ("qemu-img", "commit")) or (
                   backup_legal(params["dst"]) and not new_volumes(img, t.chain)), 0.0),
               "end": Aim("end", lambda: backup_legal(params["dst"]), 0.05),
               }[step]
        return Job("backupVolume", params, [src_root, bak_root], t, aim)

    def new_volumes(img: str, chain: list[str], state: str | None = None) -> list[str]:
        """Volumes of the image not in chain (with metadata in that state)."""
        names = {p.name.split(".")[0] for p in (src_root / "images" / img).iterdir()}
        return [v for v in names - {"", *chain} if state is None or (
            (md := volume_md(src_root, img, v)) is not None and md.state == state)]

    def backup_legal(dst: dict[str, str]) -> bool:
        md = volume_md(bak_root, dst["imgUUID"], dst["volUUID"])
        return md is not None and md.legality == LEGAL and md.state == READY

    def phase(job: Job) -> str:
        """With the agent dead: which step of the backup the kill cut."""
        t: Trial = job.data
        img = job.params["src"]["imgUUID"]
        dst = job.params["dst"]
        target = path(dst["imgUUID"], dst["volUUID"], bak_root)
        if not (target.exists() or target.with_name(f"{target.name}.meta").exists()):
            if not new_volumes(img, t.chain) or new_volumes(img, t.chain, "CREATING"):
                return "snapshot layer"
            return "copy"       # planned: the extents to copy, the space
        if not backup_legal(dst):
            return "copy"
        return "merge back" if not t.keep else "end"

    async def check(c: Client, job: Job, kill: Kill) -> str:
        nonlocal disk
        assert disk is not None
        t: Trial = job.data
        dst = job.params["dst"]
        infos = await check_invariants(c, src, src_root, deep=True, leaked=leaked)
        binfos = await check_invariants(c, bak, bak_root)
        # the disk: one whole chain that starts with the one it had, the
        # same data in every view a VM may have of it
        chain = chain_of(infos, disk.img)
        assert chain[:len(t.chain)] == t.chain, (chain, t.chain)
        new = chain[len(t.chain):]
        assert digest(path(disk.img, chain[-1])) == t.want
        if new:
            assert digest(path(disk.img, t.chain[-1])) == t.want
        disk.chain = chain
        complete = dst["volUUID"] in binfos
        info = (await c.call("getJobs", jobUUIDs=[job.uuid])).get(job.uuid)
        if complete:
            # a listed backup is the whole disk at that point in time
            assert info is not None and info["status"] == "done", info
            result = info["result"]
            expected_parent = job.params["incrementalFrom"]["volUUID"] if t.incremental \
                else BLANK_UUID
            assert binfos[dst["volUUID"]]["parent"] == expected_parent
            assert digest(path(dst["imgUUID"], dst["volUUID"], bak_root)) == t.want
            assert not qemu_check(path(dst["imgUUID"], dst["volUUID"], bak_root))
            if t.keep:
                assert new == [result["snapshotVolUUID"]], (new, result)
            else:
                assert result["merged"] and not new, (new, result)
            disk.backups.append((dst["imgUUID"], dst["volUUID"]))
        elif new:
            # the job failed (interrupted), so the engine never learnt of
            # this layer: a leftover, listed, that nothing removes
            gaps["snapshot layer left by an interrupted backup"] += 1
        # Dirty bitmaps. One named after a backup that is not there is dead
        # weight (a backup's bitmap outlives its deletion just the same). An
        # inconsistent one (in-use on storage: the kill cut a qemu-img that
        # had the volume open for writing, a commit or bitmap of the merge
        # back) no longer knows what changed: it must not break backups.
        broken = set()
        for v in chain:
            if infos[v]["format"] != "cow":
                continue
            for b in bitmaps(path(disk.img, v)):
                if "in-use" in b["flags"]:
                    broken.add(b["name"])
                elif b["name"].removeprefix("backup-") not in binfos:
                    stale.add(b["name"])
        inconsistent.update(broken)
        last = disk.backups[-1] if disk.backups else None
        if last and f"backup-{last[1]}" in {b["name"] for b in bitmaps(
                path(disk.img, chain[-1])) if "in-use" in b["flags"]}:
            # an incremental backup from it is refused, clearly, and makes nothing
            before = (sorted(infos), sorted(binfos))
            info = await run_job(c, "backupVolume", src=backup_ref(src, disk.img, chain[-1]),
                                 dst=backup_ref(bak, last[0], new_id()),
                                 incrementalFrom=backup_ref(bak, *last))
            after = (sorted(await check_invariants(c, src, src_root)),
                     sorted(await check_invariants(c, bak, bak_root)))
            if info["status"] != "failed" or info["error"]["code"] != 1000 or after != before:
                gaps["an incremental backup from an inconsistent bitmap"] += 1
                details.append(f"{kill.phase}, incremental from inconsistent bitmap: "
                               f"{info['status']} {info['error']}")
                if after != before:
                    disk.chain = chain_of(await check_invariants(c, src, src_root), disk.img)
                    chain = disk.chain

        # A new backup of the disk: the same one again if it is gone (as an
        # engine retries), or the next one.
        again: dict[str, Any] = {"src": backup_ref(src, disk.img, chain[-1]),
                                 "keepSnapshot": rng.random() < 0.5}
        if not complete:
            again["dst"] = dst
            if t.incremental and tracks(disk, job.params["incrementalFrom"]["volUUID"]):
                again["incrementalFrom"] = job.params["incrementalFrom"]
            elif t.incremental:
                # a full backup starts an image of its own
                again["dst"] = {**dst, "imgUUID": new_id()}
        elif last and tracks(disk, last[1]) and rng.random() < 0.6:
            again["dst"] = backup_ref(bak, last[0], new_id())
            again["incrementalFrom"] = backup_ref(bak, *last)
        else:
            again["dst"] = backup_ref(bak, new_id(), new_id())
        info = await run_job(c, "backupVolume", **again)
        if info["status"] != "done":
            gaps["a backup after the kill failed"] += 1
            details.append(f"{kill.phase}, {'same' if not complete else 'next'} backup: "
                           f"{info['error']['message']}")
            await retire(c, disk)
            disk = None
            return "complete" if complete else "absent"
        b = again["dst"]
        assert digest(path(b["imgUUID"], b["volUUID"], bak_root)) == t.want
        assert not qemu_check(path(b["imgUUID"], b["volUUID"], bak_root))
        disk.backups.append((b["imgUUID"], b["volUUID"]))
        disk.chain = chain_of(await check_invariants(c, src, src_root), disk.img)
        return "complete" if complete else "absent"

    trials = CrashTrials("backupVolume", agent, agent_factory, rng,
                         outcomes=("complete", "absent"),
                         phases={"snapshot layer": 2, "copy": 2, "merge back": 3},
                         # the command that writes the disk
                         commands={"qemu-img commit": 2})
    agent = await trials.run(start, check, phase)
    async with agent.client() as c:
        if disk is not None:
            await retire(c, disk)
        await doms.release(c)
    print(f"backup trials: {made} disks, bitmaps named after missing backups {len(stale)}, "
          f"volumes with leaked clusters {len(leaked)}, inconsistent bitmaps "
          f"{len(inconsistent)}, "
          f"violations {dict(gaps)}")
    for line in details:
        print(f"  {line}")
    if gaps:
        raise AssertionError(f"invariants violated: {dict(gaps)}")


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_kill9_during_create_hibernation_volumes(
        make_fs_mount: Callable[..., FsMount], agent_factory: Callable[..., AgentProcess],
        tmp_path: Path) -> None:
    """The memory volumes of a hibernating VM are made both or none, and its
    disk is left as it was."""
    rng = random.Random(2028)
    fs = make_fs_mount("xfs")
    agent = agent_factory(tmp_path / "state")
    async with agent.client() as c:
        doms = await localfs_domains(c, fs.path, ["dom"])
        sd, root = doms.sds[0], doms.roots[0]
        disk = backup_ref(sd, new_id(), new_id())
        await done(c, "createVolume", **disk, size=DISK_SIZE, format="cow",
                   preallocate="sparse")
        before = await c.call("getVolumeInfo", **disk)

    async def start(c: Client) -> Job:
        memory = {"sdUUID": sd, "imgUUID": new_id(), "dumpVolUUID": new_id(),
                  "metaVolUUID": new_id(), "size": rng.choice([64, 256]) * MiB}
        return Job("createHibernationVolumes", {"memory": memory, "disks": [disk]}, [root])

    async def check(c: Client, job: Job, kill: Kill) -> str:
        m = job.params["memory"]
        infos = await check_invariants(c, sd, root)
        assert infos[disk["volUUID"]] == before
        have = [v in infos for v in (m["dumpVolUUID"], m["metaVolUUID"])]
        assert all(have) or not any(have), have
        if not any(have):
            return "none"
        assert infos[m["dumpVolUUID"]]["capacity"] == m["size"]
        assert (infos[m["dumpVolUUID"]]["diskType"], infos[m["metaVolUUID"]]["diskType"]) == \
            ("MEMD", "MEMM")
        await done(c, "deleteImage", sdUUID=sd, imgUUID=m["imgUUID"])
        return "both"

    trials = CrashTrials("createHibernationVolumes", agent, agent_factory, rng,
                         outcomes=("both", "none"))
    agent = await trials.run(start, check)
    async with agent.client() as c:
        await done(c, "deleteImage", sdUUID=sd, imgUUID=disk["imgUUID"])
        await doms.release(c)
