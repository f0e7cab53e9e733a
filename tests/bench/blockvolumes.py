"""Block domain volumes, measured inside the lab guest (a multipath iSCSI LUN
from tgtd, real LVM): createVolume latency per kind beside a bare
`lvcreate` of the same size on the same VG in the same run, and
getVolumesList time on a domain of 100, 500 and 1,000 volumes, with
prepareImage of a clone of a template there (its parent is looked up in
the template's image).

    python -m tests.bench blockvolumes      (on the host: boots the guest)

The large domains are populated outside the agent, in its exact on-storage
format: LVs tagged by `blockdomain.volume_tags`, added to the VG in one
`vgcfgrestore` (one lvcreate each would rewrite the whole VG text every time,
O(n^2): minutes), and each slot written with `blockdomain.encode_copy` of the
volume's metadata. The agent is restarted after populating (its LVM reports
are cached per VG), so each size is measured cold (the first call after a
restart: `lvs` runs) and warm (the following calls, with the VG report
cached for up to `cache_ttl`). Every process start in the User-Mode Linux
guest costs ~50-100 ms and every LVM command most of a second, so absolute
figures are much slower than on a real host; the ratios are the point.
"""

from __future__ import annotations

import asyncio
import json
import mmap
import os
import re
import secrets
import shutil
import string
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from storage.metadata import VolumeMetadata
from tests.bench.common import machine, median, run_in_guest, save, table

MiB = 1 << 20
EXTENT = 8 * MiB
VOLUME_SIZE = 1024 * MiB
KINDS = [("raw", "sparse"), ("raw", "preallocated"), ("cow", "sparse"),
         ("cow", "preallocated")]


# ---- host side -------------------------------------------------------------------------

def run(runs: int = 5, sizes: list[int] | None = None) -> dict[str, Any]:
    sizes = sizes or [100, 500, 1000]
    summary = run_in_guest("tests.bench.blockvolumes", str(runs), *map(str, sizes))
    summary["machine"] = machine()
    save("blockvolumes", summary)
    return summary


def report(r: dict[str, Any]) -> str:
    p = r["params"]
    rows = [[kind, v["agent_ms"], v["lvcreate_ms"], v["agent_ms"] / v["lvcreate_ms"],
             v.get("agent_in_a_row_ms", "-"),
             v["agent_in_a_row_ms"] / v["lvcreate_ms"] if "agent_in_a_row_ms" in v else "-",
             v.get("lvcreate_ay_an_ms", 0.0),
             v["agent_ms"] / v.get("lvcreate_ay_an_ms", v["agent_ms"]),
             v.get("lvcreate_ay_an_noudevsync_ms", "-")]
            for kind, v in r["create"].items()]
    lines = [f"block domain in the lab guest (User-Mode Linux, {r['guest_cpus']} vCPU; host "
             f"{r['machine']['cpus']} CPUs), {p['extent_mib']} MiB extents, median of "
             f"{p['runs']} runs",
             f"createVolume {VOLUME_SIZE // MiB} MiB (job submitted to done) beside a bare "
             "`lvcreate -an` of the same size, ms",
             table(rows, ["kind", "agent", "lvcreate -an", "ratio", "agent, creates in a row",
                          "ratio", "lvcreate -ay + lvchange -an",
                          "ratio", "the pair --noudevsync"]), ""]
    layers = [(key, r[key]["cow/sparse"]["layer_ms"])
              for key in ("create", "create_before", "create_again", "create_before_again")
              if "layer_ms" in r.get(key, {}).get("cow/sparse", {})]
    if layers:
        lines += ["createVolume of a snapshot layer on a cow top (its parent's bitmaps "
                  "carried), ms: " + ", ".join(f"{k} {v}" for k, v in layers), ""]
    sizes = sorted(r["list"], key=int)
    rows = [[int(s), v["cold_ms"], v["warm_ms"], v["warm_ms"] / int(s) * 1000,
             v.get("before_cold_ms", "-"), v.get("before_warm_ms", "-"),
             v["before_warm_ms"] / int(s) * 1000 if "before_warm_ms" in v else "-",
             v.get("clone_prepare_ms", "-"), v.get("before_clone_prepare_ms", "-"),
             v.get("clone_teardown_ms", "-"), v.get("before_clone_teardown_ms", "-"),
             v["populate_s"]]
            for s in sizes if (v := r["list"][s])]
    lines += ["getVolumesList on the block domain, ms per call (before: BENCH_BLOCK_BEFORE's "
              "tree, in turns)",
              table(rows, ["volumes", "cold (lvs)", "warm (cached)", "us/vol warm",
                           "before cold", "before warm", "before us/vol",
                           "clone prepare", "before clone prepare", "clone teardown",
                           "before clone teardown", "populate s"])]
    return "\n".join(lines)


# ---- guest side: populating the VG in the agent's format -----------------------------------

def _lvm(conf: str, *args: str) -> str:
    return subprocess.run(["lvm", args[0], "--config", conf, *args[1:]], check=True,
                          capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          env={**os.environ, "LVM_SUPPRESS_FD_WARNINGS": "1"}).stdout


def _lvm_uuid() -> str:
    """An LV id as LVM writes them: 32 alphanumerics in 6-4-4-4-4-4-6 groups."""
    chars = "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(32))
    parts, i = [], 0
    for n in (6, 4, 4, 4, 4, 4, 6):
        parts.append(chars[i:i + n])
        i += n
    return "-".join(parts)


def _used_extents(conf: str, vg: str) -> set[int]:
    out = _lvm(conf, "lvs", "--segments", "--noheadings", "-o", "seg_pe_ranges", vg)
    used: set[int] = set()
    for rng in out.split():
        for part in rng.split(" "):
            m = re.search(r":(\d+)-(\d+)$", part)
            if m:
                used.update(range(int(m.group(1)), int(m.group(2)) + 1))
    return used


def _number(vg_text: str, key: str) -> int:
    m = re.search(rf"\b{key} = (\d+)", vg_text)
    if m is None:
        raise RuntimeError(f"no {key} in the VG backup")
    return int(m.group(1))


def populate(conf: str, sd: str, count: int) -> None:
    """Add `count` raw sparse one-extent volumes to the stopped agent's domain
    `sd`: their LVs in one vgcfgrestore, then their metadata slots."""
    write_slots(conf, sd, add_lvs(conf, sd, count))


def add_lvs(conf: str, sd: str, count: int,
            per_image: int = 5) -> list[tuple[int, VolumeMetadata]]:
    """The LVs of `count` new volumes, tagged as the agent tags them; returns
    (slot, metadata) of each, for write_slots."""
    from storage.domains.blockdomain import slot_of, volume_tags
    from storage.metadata import BLANK_UUID

    lv_tags = [lv["lv_tags"].split(",") for lv in json.loads(_lvm(
        conf, "lvs", "--reportformat", "json", "-o", "lv_name,lv_tags", sd))["report"][0]["lv"]]
    used_slots = {s for tags in lv_tags if (s := slot_of(tags)) is not None}
    free_slots = (n for n in range(1, 1 << 30) if n not in used_slots)
    used = _used_extents(conf, sd)
    vg_text = Path(tempfile.mkstemp(prefix="vg-", suffix=".txt")[1])
    _lvm(conf, "vgcfgbackup", "-f", str(vg_text), sd)
    text = vg_text.read_text()
    pe_count = _number(text, "pe_count")
    free_pes = (pe for pe in range(pe_count) if pe not in used)
    entries, mds = [], []
    img = str(uuid.uuid4())
    now = int(time.time())
    for i in range(count):
        if i % per_image == 0:
            img = str(uuid.uuid4())
        vol = str(uuid.uuid4())
        slot = next(free_slots)
        md = VolumeMetadata(domain=sd, image=img, uuid=vol, parent=BLANK_UUID, format="RAW",
                            allocation="SPARSE", voltype="LEAF", capacity=EXTENT,
                            legality="LEGAL", generation=1)
        tags = volume_tags(md, slot)
        mds.append((slot, md))
        tag_list = ", ".join(f'"{t}"' for t in tags)
        entries.append(
            f'\t\t{vol} {{\n\t\t\tid = "{_lvm_uuid()}"\n'
            '\t\t\tstatus = ["READ", "WRITE", "VISIBLE"]\n\t\t\tflags = []\n'
            f"\t\t\ttags = [{tag_list}]\n\t\t\tcreation_time = {now}\n"
            '\t\t\tcreation_host = "bench"\n\t\t\tsegment_count = 1\n\n'
            "\t\t\tsegment1 {\n\t\t\t\tstart_extent = 0\n\t\t\t\textent_count = 1\n\n"
            '\t\t\t\ttype = "striped"\n\t\t\t\tstripe_count = 1\n\n'
            f'\t\t\t\tstripes = [\n\t\t\t\t\t"pv0", {next(free_pes)}\n\t\t\t\t]\n'
            "\t\t\t}\n\t\t}\n")
    seqno = _number(text, "seqno")
    text = text.replace(f"seqno = {seqno}", f"seqno = {seqno + 1}", 1)
    text = text.replace("\tlogical_volumes {\n", "\tlogical_volumes {\n\n" + "\n".join(entries),
                        1)
    vg_text.write_text(text)
    # vgcfgrestore wants the VG inactive: the (stopped) agent's metadata LV too
    _lvm(conf, "vgchange", "-an", sd)
    _lvm(conf, "vgcfgrestore", "-f", str(vg_text), sd)
    vg_text.unlink()
    return mds


def write_slots(conf: str, sd: str, mds: list[tuple[int, VolumeMetadata]]) -> None:
    """Each volume's slot: copy A and copy B of its metadata, in one write."""
    from storage.domains.blockdomain import SLOT_SIZE, encode_copy

    _lvm(conf, "lvchange", "-ay", f"{sd}/metadata")
    last = max(slot for slot, _ in mds)
    first = min(slot for slot, _ in mds)
    fd = os.open(f"/dev/{sd}/metadata", os.O_RDWR | os.O_DIRECT)
    try:
        length = (last + 1 - first) * SLOT_SIZE
        buf = mmap.mmap(-1, length)
        os.preadv(fd, [buf], first * SLOT_SIZE)
        for slot, md in mds:
            copy = encode_copy(md.encode())
            at = (slot - first) * SLOT_SIZE
            buf[at:at + 2 * len(copy)] = copy + copy
        assert os.pwritev(fd, [buf], first * SLOT_SIZE) == length
        os.fsync(fd)
        buf.close()
    finally:
        os.close(fd)


# ---- guest side: the measurements ---------------------------------------------------------

async def _job(c: Any, verb: str, **params: Any) -> float:
    job = str(uuid.uuid4())
    t = time.perf_counter()
    await c.call(verb, jobUUID=job, **params)
    info = await c.wait_job(job, timeout=300, poll=0.05)
    if info["status"] != "done":
        raise RuntimeError(f"{verb}: {info}")
    return time.perf_counter() - t


def _start_agent(state: Path, port: int | None = None) -> Any:
    from tests.agentproc import AgentProcess

    state.mkdir(parents=True, exist_ok=True)
    conf = f"[storage]\nblock_extent_size = {EXTENT}\nmonitor_interval = 600.0\n"
    if os.environ.get("BENCH_BLOCK_LOG"):
        # a timeline of each create: every command and lease step, timed
        conf += '[logging]\nlevel = "DEBUG"\n'
    (state / "hostagent.toml").write_text(conf)
    agent = AgentProcess(state, port=port)
    agent.log_path = state.parent / "agent.log"
    return agent.start(timeout=120)


async def _guest(runs: int, sizes: list[int], work: Path) -> dict[str, Any]:
    from storage import lvm
    from tests.lab import guestlib as g

    steps = g.Cleanup()
    result: dict[str, Any] = {"create": {}, "list": {}}
    try:
        server = g.iscsi_services(work, steps)
        # sparse: room for every measured volume and the largest domain
        # (5 LVs per run: the agent's two, three bare ones; 4 rounds with a before tree;
        # and the snapshot layers, runs + 2 a round)
        lun_size = ((len(KINDS) * (runs + 1) * 5 + runs + 2) * 4 * (VOLUME_SIZE + 2 * EXTENT)
                    + max(sizes) * EXTENT + 4096 * MiB)
        target = server.create_target("benchblock", (lun_size,))
        steps.push("release target", lambda: [
            g.run_ok("iscsiadm", "-m", "node", "-T", target.iqn, "--logout"),
            g.run_ok("multipath", "-F")])
        state = work / "agent" / "state"
        agent = _start_agent(state)
        steps.push("stop agent", lambda: agent.stop())
        sd = str(uuid.uuid4())
        async with agent.client() as c:
            params = [{"id": str(uuid.uuid4()), "connection": p.split(":")[0], "port": 3260,
                       "iqn": target.iqn} for p in g.PORTALS]
            statuses = await c.call("connectStorageServer", domType="iscsi",
                                    connectionParams=params)
            assert all(s["status"] == 0 for s in statuses), statuses
            [lun] = await c.call("getDeviceList")
            await c.call("createStorageDomain", sdUUID=sd, domType="iscsi", name="bench",
                         devices=[lun["guid"]], ovfStore=False)
        mpath = f"/dev/mapper/{g.Multipathd.map_name(lun['guid'])}"
        steps.push("deactivate the VG", lambda: g.run_ok("lvm", "vgchange", "-an", sd))
        conf = lvm.build_config([mpath], activation=True)

        if os.environ.get("BENCH_BLOCK_NO_CREATE") != "1":
            async with agent.client() as c:
                await _creates(c, conf, sd, runs, result["create"])
            if os.environ.get("BENCH_BLOCK_BEFORE"):
                agent.stop()
                agent = await _creates_before(state, agent.port, conf, sd, runs, result)
        async with agent.client() as c:
            # a template and a clone of it (an image of its own over the
            # template's volume): its prepare looks up its parent
            template = str(uuid.uuid4())
            await _job(c, "createVolume", sdUUID=sd, imgUUID=str(uuid.uuid4()),
                       volUUID=template, size=64 * MiB, format="raw", preallocate="sparse")
            clone = (str(uuid.uuid4()), str(uuid.uuid4()))
            await _job(c, "createVolume", sdUUID=sd, imgUUID=clone[0], volUUID=clone[1],
                       size=64 * MiB, format="cow", preallocate="sparse",
                       parentVolUUID=template)
            have = len(await c.call("getVolumesList", sdUUID=sd))
        for size in (s for s in sizes if s > have):
            agent.stop()
            t = time.perf_counter()
            populate(conf, sd, size - have)
            populate_s = time.perf_counter() - t
            have = size
            agent, result["list"][str(size)] = await _listings(state, agent.port, sd, size, runs,
                                                               clone)
            result["list"][str(size)]["populate_s"] = round(populate_s, 1)
        async with agent.client() as c:
            await c.call("formatStorageDomain", sdUUID=sd)
            for p in params:
                await c.call("disconnectStorageServer", domType="iscsi", connectionParams=[p])
        result["params"] = {"runs": runs, "sizes": sizes, "extent_mib": EXTENT // MiB}
        result["guest_cpus"] = os.cpu_count()
        return result
    finally:
        steps.run()
        if os.environ.get("BENCH_BLOCK_LOG"):
            shutil.copy(work / "agent" / "agent.log", os.environ["BENCH_BLOCK_LOG"])


async def _creates_before(state: Path, port: int, conf: str, sd: str, runs: int,
                          result: dict[str, Any]) -> Any:
    """The creates again with BENCH_BLOCK_BEFORE's tree's agent, then this
    tree's once more (so each side runs twice, in turns: after, before,
    after, before). Returns this tree's agent, running."""
    from tests import agentproc

    here = agentproc.ROOT
    for key, root in (("create_before", Path(os.environ["BENCH_BLOCK_BEFORE"])),
                      ("create_again", here), ("create_before_again",
                                              Path(os.environ["BENCH_BLOCK_BEFORE"]))):
        agentproc.ROOT = root
        try:
            agent = _start_agent(state, port)
        finally:
            agentproc.ROOT = here
        result[key] = {}
        async with agent.client() as c:
            await _creates(c, conf, sd, runs, result[key])
        agent.stop()
    return _start_agent(state, port)


async def _creates(c: Any, conf: str, sd: str, runs: int, result: dict[str, Any]) -> None:
    """createVolume of each kind beside the bare LVM commands, in turns."""
    for fmt, prealloc in KINDS:
        agent_s, bare_s, seq_s, nosync_s = [], [], [], []
        for i in range(runs + 1):   # the first run warms caches up and is dropped
            a = await _job(c, "createVolume", sdUUID=sd, imgUUID=str(uuid.uuid4()),
                           volUUID=str(uuid.uuid4()), size=VOLUME_SIZE, format=fmt,
                           preallocate=prealloc)
            t = time.perf_counter()
            _lvm(conf, "lvcreate", "--name", f"bare-{uuid.uuid4().hex[:8]}", "--size",
                 f"{VOLUME_SIZE}b", "--activate", "n", "--zero", "n", sd)
            b = time.perf_counter() - t
            # the least a block volume needs of LVM: an LV active to
            # write its header, inactive after (udev waits included)
            name = f"bare-{uuid.uuid4().hex[:8]}"
            t = time.perf_counter()
            _lvm(conf, "lvcreate", "--name", name, "--size", f"{VOLUME_SIZE}b",
                 "--activate", "y", "--zero", "n", sd)
            _lvm(conf, "lvchange", "--activate", "n", f"{sd}/{name}")
            q = time.perf_counter() - t
            # the same pair not waiting for udev (--noudevsync)
            name = f"bare-{uuid.uuid4().hex[:8]}"
            t = time.perf_counter()
            _lvm(conf, "lvcreate", "--noudevsync", "--name", name, "--size",
                 f"{VOLUME_SIZE}b", "--activate", "y", "--zero", "n", sd)
            _lvm(conf, "lvchange", "--noudevsync", "--activate", "n", f"{sd}/{name}")
            nu = time.perf_counter() - t
            if i:
                agent_s.append(a)
                bare_s.append(b)
                seq_s.append(q)
                nosync_s.append(nu)
        # the same creates in a row, nothing else changing the VG between
        # them: the agent's cached LV report holds (no lvs; issue 21). The
        # bare commands above change the VG as another host would, so each
        # create in turns with them runs an lvs under the domain lease (so
        # does the first in a row: dropped).
        row_s = []
        for _ in range(runs + 1):
            row_s.append(await _job(c, "createVolume", sdUUID=sd, imgUUID=str(uuid.uuid4()),
                                    volUUID=str(uuid.uuid4()), size=VOLUME_SIZE, format=fmt,
                                    preallocate=prealloc))
        row_s = row_s[1:]
        layer_s = await _layers(c, sd, runs) if (fmt, prealloc) == ("cow", "sparse") else []
        result[f"{fmt}/{prealloc}"] = {
            "agent_ms": round(1000 * median(agent_s), 1),
            "agent_in_a_row_ms": round(1000 * median(row_s), 1),
            "lvcreate_ms": round(1000 * median(bare_s), 1),
            "lvcreate_ay_an_ms": round(1000 * median(seq_s), 1),
            "lvcreate_ay_an_noudevsync_ms": round(1000 * median(nosync_s), 1),
            "runs": {"agent": agent_s, "agent_in_a_row": row_s, "lvcreate": bare_s,
                     "lvcreate_ay_an": seq_s, "lvcreate_ay_an_noudevsync": nosync_s,
                     "layer": layer_s}}
        if layer_s:
            result[f"{fmt}/{prealloc}"]["layer_ms"] = round(1000 * median(layer_s), 1)


async def _layers(c: Any, sd: str, runs: int) -> list[float]:
    """Snapshot layers (createVolume with a parent) in a row on an image's
    top, a cow one: the create carries the parent's dirty bitmaps (it has
    none here); the first is dropped."""
    img, top = str(uuid.uuid4()), str(uuid.uuid4())
    await _job(c, "createVolume", sdUUID=sd, imgUUID=img, volUUID=top, size=VOLUME_SIZE,
               format="cow", preallocate="sparse")
    times = []
    for _ in range(runs + 1):
        vol = str(uuid.uuid4())
        times.append(await _job(c, "createVolume", sdUUID=sd, imgUUID=img, volUUID=vol,
                                size=VOLUME_SIZE, format="cow", preallocate="sparse",
                                parentVolUUID=top))
        top = vol
    return times[1:]


async def _listings(state: Path, port: int, sd: str, size: int, runs: int,
                    clone: tuple[str, str]) -> tuple[Any, dict[str, Any]]:
    """getVolumesList of the domain of `size` volumes: the agent restarted
    min(runs, 3) times, one cold call and `runs` warm ones each; then
    `runs` prepareImage and teardownImage of the clone (image, volume). With
    BENCH_BLOCK_BEFORE=DIR (a tree of the code before a change, `git archive
    REV | tar -x -C DIR`), that tree's agent in turns with this one's, on
    the same domain."""
    from tests import agentproc

    trees = {"": agentproc.ROOT}
    if os.environ.get("BENCH_BLOCK_BEFORE"):
        trees["before_"] = Path(os.environ["BENCH_BLOCK_BEFORE"])
    times: dict[str, list[float]] = {f"{k}{w}": [] for k in trees
                                     for w in ("cold", "warm", "clone_prepare",
                                               "clone_teardown")}
    here = agentproc.ROOT
    agent = None
    try:
        for _ in range(min(runs, 3)):
            for key, root in trees.items():
                agentproc.ROOT = root
                agent = _start_agent(state, port)
                async with agent.client() as c:
                    t = time.perf_counter()
                    vols = await c.call("getVolumesList", sdUUID=sd)
                    times[f"{key}cold"].append(time.perf_counter() - t)
                    assert len(vols) == size, (len(vols), size)
                    for _ in range(runs):
                        t = time.perf_counter()
                        await c.call("getVolumesList", sdUUID=sd)
                        times[f"{key}warm"].append(time.perf_counter() - t)
                    for _ in range(runs):
                        t = time.perf_counter()
                        await c.call("prepareImage", sdUUID=sd, imgUUID=clone[0],
                                     volUUID=clone[1], purpose="read")
                        times[f"{key}clone_prepare"].append(time.perf_counter() - t)
                        t = time.perf_counter()
                        await c.call("teardownImage", sdUUID=sd, imgUUID=clone[0],
                                     volUUID=clone[1])
                        times[f"{key}clone_teardown"].append(time.perf_counter() - t)
                agent.stop()
    finally:
        agentproc.ROOT = here
    agent = _start_agent(state, port)
    out: dict[str, Any] = {f"{k}_ms": round(1000 * median(v), 1) for k, v in times.items()}
    out["runs"] = times
    return agent, out


def guest_main(runs: int, sizes: list[int]) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-block-", dir="/tmp"))
    result = asyncio.run(_guest(runs, sizes, work))
    print(json.dumps(result))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--guest"]:
        guest_main(int(sys.argv[2]), [int(a) for a in sys.argv[3:]])
    else:
        print(report(run()))
