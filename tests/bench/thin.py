"""Thin block volumes grown ahead of a writer, measured inside the lab guest
(a multipath iSCSI LUN from tgtd, real LVM, qemu-storage-daemon writing
through NBD as a VM would). In rounds, in turns:

- the agent watching the writer (prepareImage's `writer`) while `qemu-img
  convert` writes DATA (2 GiB) with no rate limit into a volume that starts
  at one chunk: the time from each BLOCK_WRITE_THRESHOLD event to the
  re-armed threshold (p50, p99 over every extension of every round), the
  LVM commands the agent ran per extension and their time (its
  storage.commands log), whether any write failed, the write rate;
- extendVolume called on an idle volume, a chunk at a time;
- a bare `lvextend` + `lvchange --refresh` of another LV of the same VG.
If the unlimited writer failed (ENOSPC), rates of RATES are tried in turn:
the highest that writes DATA with no failure is reported.

    python -m tests.bench thin [ROUNDS]     (on the host: boots the guest)
    BENCH_THIN_LOG=build/thin.log ...       (the agent's whole DEBUG log
                                             kept there: a timeline of
                                             each extension)
    BENCH_THIN_URGENT_NICE=0 ...            (the agent's [thin] urgent_nice:
                                             0 runs the extensions' LVM at
                                             the agent's own priority)

The LUN and the source data live in build/ on the host (the guest's /tmp is
a small tmpfs). Every LVM command in the User-Mode Linux guest (one vCPU)
costs most of a second, more while a writer runs: the ratio of the agent's
figures to the bare commands is the point.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from tests.bench.common import machine, run_in_guest, save, table

MiB = 1 << 20
GiB = 1 << 30
EXTENT = 8 * MiB
CHUNK = 512 * MiB
WATERMARK = 50
DATA = 2048 * MiB
RATES = (32 * MiB, 16 * MiB, 8 * MiB)     # tried in turn if the unlimited writer fails
BLOCK = 64 * MiB
ROOT = Path(__file__).resolve().parents[2]


def percentile(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


# ---- host side -------------------------------------------------------------------------

def run(runs: int = 3) -> dict[str, Any]:
    load = os.getloadavg()
    try:
        summary = run_in_guest("tests.bench.thin", str(runs), timeout=3600)
    except subprocess.CalledProcessError as e:
        print(str(e.stderr)[-4000:], file=sys.stderr)
        raise
    summary["machine"] = machine()
    summary["load_average"] = {"before": [round(x, 2) for x in load],
                               "after": [round(x, 2) for x in os.getloadavg()]}
    save("thin", summary)
    return summary


def report(r: dict[str, Any]) -> str:
    p = r["params"]
    rows = [[name, v["p50_s"], v["p99_s"], v["n"]] for name, v in r["latency"].items()]
    writes = "; ".join(
        f"{w['rate']}: {'ok' if w['ok'] else 'FAILED'} in {w['seconds']} s "
        f"({w['mib_s']} MiB/s), LV {[s // MiB for s in w['sizes']]} MiB" for w in r["writes"])
    return "\n".join([
        f"thin: {p['data_mib']} MiB through qemu-storage-daemon, chunk {p['chunk_mib']} MiB, "
        f"watermark {p['watermark']}%: {writes}",
        f"highest rate with no failed write: {r['highest_ok_rate']}",
        f"LVM commands per extension (agent watching): {r['lvm_per_extension']}",
        f"agent peak RSS {r['agent_peak_rss_mib']} MiB; load average {r.get('load_average')}",
        *(["an extension's steps (p50/max s, BENCH_THIN_LOG): " + "; ".join(
            f"{k} {v['p50_s']}/{v['max_s']}" for k, v in r["timeline"].items())]
          if r.get("timeline") else []),
        table(rows, ["extension", "p50 s", "p99 s", "n"]), ""])


# ---- guest side ------------------------------------------------------------------------

def _start_agent(state: Path) -> Any:
    from tests.agentproc import AgentProcess

    state.mkdir(parents=True, exist_ok=True)
    (state / "hostagent.toml").write_text(
        f"[storage]\nblock_extent_size = {EXTENT}\nmonitor_interval = 600.0\n"
        f"[thin]\nchunk_size = {CHUNK}\nwatermark_percent = {WATERMARK}\n"
        # BENCH_THIN_URGENT_NICE=0: extensions at the agent's own priority
        f"urgent_nice = {int(os.environ.get('BENCH_THIN_URGENT_NICE', '-10'))}\n"
        # every command the agent runs, with its time: what an extension costs
        '[logging.levels]\n"storage.commands" = "DEBUG"\n' +
        # a timeline of each extension: every command, lease and QMP step
        ('[logging]\nlevel = "DEBUG"\n' if os.environ.get("BENCH_THIN_LOG") else ""))
    agent = AgentProcess(state)
    agent.log_path = state.parent / "agent.log"
    return agent.start(timeout=120)


def _stats(values: list[float]) -> dict[str, Any]:
    return {"p50_s": round(percentile(values, 50), 3), "p99_s": round(percentile(values, 99), 3),
            "n": len(values), "runs": values}


LVM_RAN = re.compile(r"\blvm (\w+) .*: rc=\d+ in ([\d.]+) s")
REARMED = re.compile(r"threshold re-armed ([\d.]+) s after the event")
# the timeline of an extension in the agent's DEBUG log (BENCH_THIN_LOG)
STAMP = r"^\S+ (\d+):(\d+):(\d+),(\d+) "
STEP = re.compile(STAMP + r".*(?:(writes at \d+, ([\d.]+) s after the writer sent it)"
                  r"|(lvm lvextend .*: started,)|(lvm lvextend .*: rc=0 in ([\d.]+) s)"
                  r"|(threshold \d+ armed in ([\d.]+) s)|(threshold re-armed))", re.MULTILINE)
# the next threshold is armed alongside the lvextend (writers.WriterWatch._grow)
STEPS = ("event sent to handled", "handled to lvextend's spawn", "lvextend's spawn",
         "lvextend running", "lvextend to done", "arming (QMP, alongside the lvextend)")


def _timeline(log: str) -> list[dict[str, float]]:
    """Per extension, how long each step took (STEPS), from the DEBUG log."""
    out: list[dict[str, float]] = []
    t: dict[str, float] = {}
    for m in STEP.finditer(log):
        h, mi, sec, ms = (int(x) for x in m.groups()[:4])
        now = h * 3600 + mi * 60 + sec + ms / 1000
        if m.group(5):
            t = {"handled": now, "sent": now - float(m.group(6))}
        elif m.group(7) and "handled" in t:
            t["started"] = now
        elif m.group(8) and "started" in t:
            t["done"], t["spawn"] = now, now - float(m.group(9))
        elif m.group(10) and "handled" in t:
            t["arming"] = t.get("arming", 0.0) + float(m.group(11))
        elif m.group(12) and "done" in t:
            out.append(dict(zip(STEPS, (
                round(t["handled"] - t["sent"], 3), round(t["spawn"] - t["handled"], 3),
                round(t["started"] - t["spawn"], 3), round(t["done"] - t["started"], 3),
                round(now - t["done"], 3), round(t.get("arming", 0.0), 3)),
                strict=True)))
            t = {}
    return out


def _source(path: Path) -> None:
    """DATA bytes of non-zero data, each 64 MiB stretch a different rotation
    of one random block (cheap to make in the guest, no two alike)."""
    base = os.urandom(BLOCK)
    with open(path, "wb") as f:
        for i in range(DATA // BLOCK):
            cut = i * 4096 + 512
            f.write(base[cut:] + base[:cut])


async def _write_round(c: Any, agent: Any, sd: str, src: Path, work: Path,
                       rate: int | None) -> dict[str, Any]:
    """A fresh volume (one chunk) in an image of its own, prepared with the agent watching its
    writer; DATA written at `rate` (None: no limit). The agent's log of the
    round: its extensions' latencies and the LVM commands it ran."""
    from tests.lab.test_thin_lab import StorageDaemon

    vol, img = str(uuid.uuid4()), str(uuid.uuid4())
    ref = {"sdUUID": sd, "imgUUID": img, "volUUID": vol}
    job = str(uuid.uuid4())
    await c.call("createVolume", jobUUID=job, sdUUID=sd, imgUUID=img, volUUID=vol,
                 size=DATA + 2 * CHUNK, format="cow", preallocate="sparse")
    info = await c.wait_job(job, timeout=300, poll=0.1)
    assert info["status"] == "done", info
    qsd = StorageDaemon(f"/dev/{sd}/{vol}", work)
    await c.call("prepareImage", **ref, purpose="vm",
                 writer={"qmpSocket": qsd.qmp_path, "nodeName": "file0"})
    mark = len(_log(agent))
    sizes: list[int] = []
    async with c.notifications() as q:
        qsd.start()
        try:
            t = time.perf_counter()
            writer = await asyncio.create_subprocess_exec(
                "qemu-img", "convert", "-n", *(["-r", str(rate)] if rate else []),
                "-f", "raw", "-O", "raw", str(src), qsd.nbd_url,
                stderr=asyncio.subprocess.PIPE)
            _, err = await writer.communicate()
            seconds = time.perf_counter() - t
            # the last extension (the margin beyond the last write) may still run
            deadline = time.monotonic() + 60
            while writer.returncode == 0 and time.monotonic() < deadline and (
                    not sizes or sizes[-1] < DATA + CHUNK * WATERMARK // 100):
                with contextlib.suppress(TimeoutError):
                    n = await asyncio.wait_for(q.get(), 1)
                    if n.get("method") == "volume.extended":
                        sizes.append(n["params"]["size"])
        finally:
            qsd.daemon.stop()
        while not q.empty():
            n = q.get_nowait()
            if n.get("method") == "volume.extended":
                sizes.append(n["params"]["size"])
    log = _log(agent)[mark:]
    await c.call("teardownImage", **ref)
    job = str(uuid.uuid4())
    await c.call("deleteImage", jobUUID=job, sdUUID=sd, imgUUID=img)
    info = await c.wait_job(job, timeout=300, poll=0.1)
    assert info["status"] == "done", info
    lvm: dict[str, list[float]] = {}
    for m in LVM_RAN.finditer(log):
        lvm.setdefault(m.group(1), []).append(float(m.group(2)))
    return {"rate": f"{rate // MiB} MiB/s" if rate else "unlimited", "ok": writer.returncode == 0,
            "error": err.decode()[-300:], "seconds": round(seconds, 1),
            "mib_s": round(DATA / MiB / seconds, 1), "sizes": sizes,
            "latencies": [float(x) for x in REARMED.findall(log)],
            "timeline": _timeline(log),
            "lvm": {k: {"n": len(v), "seconds": round(sum(v), 2)} for k, v in lvm.items()}}


async def _guest(runs: int, work: Path, big: Path) -> dict[str, Any]:
    from storage import lvm
    from tests.lab import guestlib as g

    steps = g.Cleanup()
    result: dict[str, Any] = {}
    try:
        src = big / "src.raw"
        _source(src)
        server = g.TargetServer(big / "luns").start()
        steps.push("stop tgtd", server.stop)
        initiator = g.Initiator().start()
        steps.push("stop iscsid", initiator.stop)
        mpd = g.Multipathd().start()
        steps.push("stop multipathd", mpd.stop)
        # sparse: a written volume at a time (DATA and a chunk), the idle one
        # and the bare LV (runs x rounds + 2 chunks each), the domain's own LVs
        target = server.create_target("benchthin",
                                      (DATA + 2 * (3 * runs + 2) * CHUNK + 4 * GiB,))
        steps.push("release target", lambda: [
            g.run_ok("iscsiadm", "-m", "node", "-T", target.iqn, "--logout"),
            g.run_ok("multipath", "-F")])
        agent = _start_agent(work / "agent" / "state")
        steps.push("stop agent", lambda: agent.stop())
        sd, img, idle = (str(uuid.uuid4()) for _ in range(3))
        async with agent.client() as c:
            params = [{"id": str(uuid.uuid4()), "connection": p.split(":")[0], "port": 3260,
                       "iqn": target.iqn} for p in g.PORTALS]
            statuses = await c.call("connectStorageServer", domType="iscsi",
                                    connectionParams=params)
            assert all(s["status"] == 0 for s in statuses), statuses
            [lun] = await c.call("getDeviceList")
            await c.call("createStorageDomain", sdUUID=sd, domType="iscsi", name="bench",
                         devices=[lun["guid"]], ovfStore=False)
            steps.push("deactivate the VG", lambda: g.run_ok("lvm", "vgchange", "-an", sd))
            job = str(uuid.uuid4())
            await c.call("createVolume", jobUUID=job, sdUUID=sd, imgUUID=img, volUUID=idle,
                         size=(3 * runs + 2) * CHUNK, format="cow", preallocate="sparse")
            assert (await c.wait_job(job, timeout=300, poll=0.1))["status"] == "done"
            mpath = f"/dev/mapper/{g.Multipathd.map_name(lun['guid'])}"
            conf = lvm.build_config([mpath], activation=True)
            name = f"bare-{uuid.uuid4().hex[:8]}"
            g.run("lvm", "lvcreate", "--config", conf, "--name", name, "--size", f"{CHUNK}b",
                  "--activate", "y", "--zero", "n", sd)

            writes: list[dict[str, Any]] = []
            verb: list[float] = []
            bare: list[float] = []
            size = CHUNK
            for r in range(runs):
                # 1. the agent watching a writer at full speed
                writes.append(await _write_round(c, agent, sd, src, work, None))
                # 2. extendVolume on an idle volume, a chunk at a time
                await c.call("prepareImage", sdUUID=sd, imgUUID=img, volUUID=idle,
                             purpose="vm")
                for _ in range(3):
                    t = time.perf_counter()
                    size = (await c.call("extendVolume", sdUUID=sd, imgUUID=img,
                                         volUUID=idle, minSize=size + CHUNK))["size"]
                    verb.append(time.perf_counter() - t)
                await c.call("teardownImage", sdUUID=sd, imgUUID=img, volUUID=idle)
                # 3. bare lvextend + lvchange --refresh of another LV, same VG
                for i in range(3):
                    t = time.perf_counter()
                    g.run("lvm", "lvextend", "--config", conf, "--size",
                          f"{(3 * r + i + 2) * CHUNK}b", f"{sd}/{name}")
                    g.run("lvm", "lvchange", "--config", conf, "--refresh", f"{sd}/{name}")
                    bare.append(time.perf_counter() - t)
            highest = "unlimited" if all(w["ok"] for w in writes) else None
            if highest is None:
                for rate in RATES:
                    writes.append(await _write_round(c, agent, sd, src, work, rate))
                    if writes[-1]["ok"]:
                        highest = writes[-1]["rate"]
                        break
            g.run("lvm", "lvremove", "--config", conf, "--force", f"{sd}/{name}")
            await c.call("formatStorageDomain", sdUUID=sd)
            for p in params:
                await c.call("disconnectStorageServer", domType="iscsi", connectionParams=[p])
        watched = [x for w in writes for x in w["latencies"]]
        extensions = sum(len(w["sizes"]) for w in writes)
        per: dict[str, float] = {}
        for w in writes:
            for k, v in w["lvm"].items():
                per[k] = per.get(k, 0) + v["n"]
        lvm_s = sum(v["seconds"] for w in writes for v in w["lvm"].values())
        result["writes"] = writes
        result["highest_ok_rate"] = highest
        result["lvm_per_extension"] = {
            **{k: round(n / max(1, extensions), 2) for k, n in per.items()},
            "seconds": round(lvm_s / max(1, extensions), 2)}
        each = [x for w in writes for x in w["timeline"]]
        if each:
            result["timeline"] = {k: {"p50_s": round(percentile([x[k] for x in each], 50), 3),
                                      "max_s": max(x[k] for x in each)} for k in STEPS}
        result["agent_peak_rss_mib"] = _peak_rss(agent.proc.pid)
        result["latency"] = {"agent watching (event to re-armed), full speed": _stats(watched),
                             "extendVolume, idle": _stats(verb),
                             "bare lvextend + lvchange --refresh, idle": _stats(bare)}
        result["params"] = {"runs": runs, "data_mib": DATA // MiB, "chunk_mib": CHUNK // MiB,
                            "watermark": WATERMARK}
        return result
    finally:
        steps.run()
        if os.environ.get("BENCH_THIN_LOG"):
            shutil.copy(work / "agent" / "agent.log", os.environ["BENCH_THIN_LOG"])


def _log(agent: Any) -> str:
    """The agent's whole log (AgentProcess.log() is its tail)."""
    return str(agent.log_path.read_text(errors="replace"))


def _peak_rss(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def guest_main(runs: int) -> None:
    work = Path("/tmp") / f"bench-thin-{uuid.uuid4().hex[:6]}"
    work.mkdir()
    big = ROOT / "build" / f"bench-thin-{uuid.uuid4().hex[:6]}"
    big.mkdir(parents=True)
    try:
        result = asyncio.run(_guest(runs, work, big))
    finally:
        shutil.rmtree(big, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--guest"]:
        guest_main(int(sys.argv[2]))
    else:
        print(report(run(*(int(a) for a in sys.argv[1:2]))))
