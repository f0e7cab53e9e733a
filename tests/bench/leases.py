"""Lease acquire/release latency per backend, through LeaseManager.acquire.

    python -m tests.bench leases      (on the host; boots the lab guest for sanlock)

local: OFD locks on files in a temp directory of this host (each syscall
through the lockspace's thread pool). sanlock: the real daemon in the lab
guest (User-Mode Linux, one vCPU, every syscall slow), a lockspace with
io_timeout 1 on ext4 on a loop device; beside it python3-sanlock doing the
bare acquire/release on the same daemon and lease (its C library, one
registered connection kept open), and the join/leave of a lockspace.
A sanlock acquire is a disk paxos round (several O_DIRECT reads and writes
of the lease area), a release one write: I/O bound, not agent bound.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from tests.bench.common import machine, median, run_in_guest, save, table

MiB = 1 << 20


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


async def _cycles(manager: Any, res: Any, runs: int) -> dict[str, float]:
    acq, rel = [], []
    for _ in range(runs):
        t0 = time.perf_counter()
        ctx = manager.acquire(res)
        await ctx.__aenter__()
        t1 = time.perf_counter()
        await ctx.__aexit__(None, None, None)
        t2 = time.perf_counter()
        acq.append(t1 - t0)
        rel.append(t2 - t1)
    return {"acquire_ms": _ms(median(acq)), "release_ms": _ms(median(rel)), "runs": runs}


# ---- host: local backend ---------------------------------------------------------------------

async def _local(runs: int) -> dict[str, Any]:
    from storage.leases import FileDomainLeases, LeaseManager, LocalBackend

    work = Path(tempfile.mkdtemp(prefix="bench-leases-"))
    try:
        sd = str(uuid.uuid4())
        root = work / sd
        (root / "dom_md").mkdir(parents=True)
        for name in ("ids", "leases"):
            (root / "dom_md" / name).write_bytes(b"\0" * MiB)
        areas = FileDomainLeases(sd, root)
        m = LeaseManager({"local": LocalBackend()})
        t0 = time.perf_counter()
        await m.add_lockspace(areas.lockspace(), 1, "local")
        join = time.perf_counter() - t0
        result = await _cycles(m, areas.domain_resource(), runs)
        t0 = time.perf_counter()
        await m.rem_lockspace(sd)
        result.update(join_ms=_ms(join), leave_ms=_ms(time.perf_counter() - t0))
        await m.close()
        return result
    finally:
        shutil.rmtree(work)


# ---- 100 createVolume with leases and without ----------------------------------------------

CREATES = 100


async def _creates(work: Path, policy: str, leases: bool, count: int) -> dict[str, Any]:
    """`count` createVolume jobs one after another on a localfs domain of an
    agent whose domains take leases of `policy`, or none (debug.no_leases)."""
    from tests.agentproc import AgentProcess
    from tests.bench.common import drop_localfs_domain, localfs_domain

    name = f"{policy}-{'leases' if leases else 'none'}"
    state = work / name
    state.mkdir()
    backends = '["local", "sanlock"]' if policy == "sanlock" else '["local"]'
    (state / "hostagent.toml").write_text(
        f'[leases]\nbackends = {backends}\npolicy = "{policy}"\nio_timeout = 1\n'
        f'run_dir = "{state / "run"}"\n[debug]\nno_leases = {"false" if leases else "true"}\n')
    data = work / f"{name}-data"
    data.mkdir()
    agent = AgentProcess(state).start()
    try:
        async with agent.client() as c:
            conn, sd, _ = await localfs_domain(c, data, ovfStore=False)
            img = str(uuid.uuid4())
            times = []
            for _ in range(count):
                job = str(uuid.uuid4())
                t0 = time.perf_counter()
                await c.call("createVolume", jobUUID=job, sdUUID=sd, imgUUID=img,
                             volUUID=str(uuid.uuid4()), size=1 << 30, format="cow",
                             preallocate="sparse")
                info = await c.wait_job(job, timeout=120)
                times.append(time.perf_counter() - t0)
                if info["status"] != "done":
                    raise RuntimeError(f"createVolume: {info}")
                img = str(uuid.uuid4())
            await drop_localfs_domain(c, conn, sd)
    finally:
        agent.stop()
    return {"create_ms": _ms(median(times)), "total_s": round(sum(times), 2), "count": count}


async def _creates_pair(policy: str, count: int, base: str = "/var/tmp") -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="bench-creates-", dir=base))
    try:
        return {"leases": await _creates(work, policy, True, count),
                "none": await _creates(work, policy, False, count)}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(runs: int = 200, guest_runs: int = 50) -> dict[str, Any]:
    local = asyncio.run(_local(runs))
    creates = asyncio.run(_creates_pair("local", CREATES))
    guest = run_in_guest("tests.bench.leases", str(guest_runs), timeout=900)
    summary = {"local": local, "creates_local": creates, **guest, "machine": machine()}
    save("leases", summary)
    return summary


def report(s: dict[str, Any]) -> str:
    loc, san, bare = s["local"], s["sanlock"], s["sanlock_bare"]
    rows = [
        ["local (host, OFD locks)", loc["acquire_ms"], loc["release_ms"], loc["join_ms"],
         loc["leave_ms"], loc["runs"]],
        ["sanlock (lab guest, agent)", san["acquire_ms"], san["release_ms"], san["join_ms"],
         san["leave_ms"], san["runs"]],
        ["sanlock (lab guest, python3-sanlock)", bare["acquire_ms"], bare["release_ms"], "",
         "", bare["runs"]],
    ]
    out = ("lease latency, median, ms (join/leave: one lockspace, io_timeout 1 for sanlock)\n"
           + table(rows, ["backend", "acquire", "release", "join", "leave", "runs"]))
    crows = []
    for key, where in (("creates_local", "local (host)"), ("creates_sanlock", "sanlock (guest)")):
        if key in s:
            w, wo = s[key]["leases"], s[key]["none"]
            crows.append([where, w["create_ms"], wo["create_ms"],
                          round(w["create_ms"] / wo["create_ms"], 2), w["total_s"],
                          wo["total_s"], w["count"]])
    if crows:
        out += ("\n\ncreateVolume on a localfs domain, with the policy's leases vs none, "
                "median ms per create\n"
                + table(crows, ["policy", "leases", "none", "ratio", "total s (leases)",
                                "total s (none)", "creates"]))
    return out


# ---- guest: sanlock backend --------------------------------------------------------------------

async def _guest(runs: int) -> dict[str, Any]:
    from storage.leases import (
        FileDomainLeases,
        LeaseManager,
        SanlockBackend,
        init_domain_areas,
    )
    from tests.lab import guestlib as g

    steps = g.Cleanup()
    try:
        daemon = g.SanlockDaemon().start()
        steps.push("stop sanlock", daemon.stop)
        # room for 2 x 100 volumes, each with a lease area sanlock writes whole
        fs = g.LoopFs(Path("/tmp/bench-leases.img"), Path("/mnt/bench-leases"), 1024 * MiB)
        fs.create()
        steps.push("destroy fs", fs.destroy)
        sd = str(uuid.uuid4())
        root = fs.mountpoint / sd
        (root / "dom_md").mkdir(parents=True)
        for name in ("ids", "leases"):
            with open(root / "dom_md" / name, "wb") as f:
                f.truncate(MiB)
        areas = FileDomainLeases(sd, root)
        await init_domain_areas(areas, "sanlock", 1)
        m = LeaseManager({"sanlock": SanlockBackend(run_dir="/tmp/bench-leases-run")})
        t0 = time.perf_counter()
        await m.add_lockspace(areas.lockspace(), 1, "sanlock", 1)
        join = time.perf_counter() - t0
        res = areas.domain_resource()
        agent = await _cycles(m, res, runs)

        sys.path.insert(0, str(g.PYLIB))
        import sanlock  # type: ignore[import-not-found]

        fd = sanlock.register()
        acq, rel = [], []
        for _ in range(runs):
            t0 = time.perf_counter()
            sanlock.acquire(sd.encode(), b"SDM", [(res.path, 0)], slkfd=fd)
            t1 = time.perf_counter()
            sanlock.release(sd.encode(), b"SDM", [(res.path, 0)], slkfd=fd)
            acq.append(t1 - t0)
            rel.append(time.perf_counter() - t1)
        os.close(fd)
        t0 = time.perf_counter()
        await m.rem_lockspace(sd)
        agent.update(join_ms=_ms(join), leave_ms=_ms(time.perf_counter() - t0))
        await m.close()
        # (ext4 on a loop device: sanlock needs O_DIRECT, hostfs has none)
        creates = await _creates_pair("sanlock", CREATES, str(fs.mountpoint))
        return {"sanlock": agent,
                "sanlock_bare": {"acquire_ms": _ms(median(acq)),
                                 "release_ms": _ms(median(rel)), "runs": runs},
                "creates_sanlock": creates,
                "guest_cpus": os.cpu_count()}
    finally:
        steps.run()


if __name__ == "__main__":
    if sys.argv[1:2] == ["--guest"]:
        print(json.dumps(asyncio.run(_guest(int(sys.argv[2])))))
    else:
        print(report(run()))
