"""Many volumes in one block domain, made through the agent one after the
other, measured inside the lab guest (issue 21): each createVolume's time
(job submitted to done) as the count grows, a bare `lvcreate -an` of the
same size on the same VG every STEP creates beside it (LVM rewrites the
whole VG text on every change, so both grow with the count), and at every
STEP the VG's metadata area use (LVM keeps the text in a circular area on
each PV: VDSM makes it 128 MiB; the agent's DEFAULT_MDA_SIZE) and the time
of getVolumesList.

    python -m tests.bench blockscale             (1,000 volumes; on the host)
    BENCH_SCALE_COUNT=200 python -m tests.bench blockscale
    BENCH_BLOCK_LOG=build/x.log   the agent's debug log, copied there
    python -m tests.bench.blockscale --timeline build/x.log
                                  where each create's time went, from that log

Each step's figures are also appended to build/blockscale-progress.jsonl as
they come, so a run stopped early still shows the curve up to there. The
LUN file lives under build/ (the guest's /tmp is a small tmpfs).
"""

from __future__ import annotations

import asyncio
import datetime
import itertools
import json
import os
import re
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from tests.bench.blockvolumes import EXTENT, MiB, _job, _lvm, _start_agent
from tests.bench.common import ROOT, machine, median, reactivation_ms, run_in_guest, save, table

VOLUME_SIZE = 1024 * MiB       # raw sparse: the LV holds its capacity, 1 MiB is zeroed
STEP = 50
PROGRESS = Path(os.environ.get("BENCH_SCALE_PROGRESS",
                               ROOT / "build" / "blockscale-progress.jsonl"))


def run(count: int | None = None) -> dict[str, Any]:
    count = count or int(os.environ.get("BENCH_SCALE_COUNT", "1000"))
    summary = run_in_guest("tests.bench.blockscale", str(count), timeout=7200)
    summary["machine"] = machine()
    save("blockscale", summary)
    return summary


def report(r: dict[str, Any]) -> str:
    rows = [[s["count"], s["create_p50_ms"], s["lvcreate_ms"],
             s["create_p50_ms"] / s["lvcreate_ms"], s["list_ms"],
             1000 * s["list_ms"] / s["count"], s.get("activate_ms", "-"), s["mda_free"] / 1024]
            for s in r["steps"]]
    return (f"{r['count']} raw volumes of {VOLUME_SIZE // MiB} MiB made one by one in one block "
            f"domain (lab guest; metadata area {r['mda_size_mib']} MiB per PV), per step of "
            f"{STEP}: createVolume p50 of the step, a bare `lvcreate -an` at its end\n"
            + table(rows, ["volumes", "create p50 ms", "lvcreate ms", "ratio",
                           "getVolumesList ms", "us/vol", "activate ms", "vg_mda_free KiB"]))


async def _step_figures(c: Any, conf: str, sd: str, n: int) -> dict[str, Any]:
    t = time.perf_counter()
    _lvm(conf, "lvcreate", "--name", f"bare-{uuid.uuid4().hex[:8]}", "--size",
         f"{VOLUME_SIZE}b", "--activate", "n", "--zero", "n", sd)
    bare = time.perf_counter() - t
    t = time.perf_counter()
    vols = await c.call("getVolumesList", sdUUID=sd)
    listed = time.perf_counter() - t
    assert len(vols) == n, (len(vols), n)
    activated = await reactivation_ms(c, sd)
    vg = json.loads(_lvm(conf, "vgs", "--reportformat", "json", "--units", "b", "--nosuffix",
                         "-o", "vg_mda_size,vg_mda_free", sd))["report"][0]["vg"][0]
    return {"lvcreate_ms": round(1000 * bare, 1), "list_ms": round(1000 * listed, 1),
            "activate_ms": round(activated, 1),
            "mda_size": int(vg["vg_mda_size"]), "mda_free": int(vg["vg_mda_free"])}


async def _guest(count: int, work: Path) -> dict[str, Any]:
    from storage import lvm
    from tests.lab import guestlib as g

    steps = g.Cleanup()
    lun_dir = Path(tempfile.mkdtemp(prefix="blockscale-", dir=ROOT / "build"))

    def remove_luns() -> None:
        for p in lun_dir.iterdir():
            p.unlink()
        lun_dir.rmdir()
    steps.push("remove the LUN file", remove_luns)
    PROGRESS.unlink(missing_ok=True)
    result: dict[str, Any] = {"count": count, "steps": []}
    try:
        server = g.iscsi_services(work, steps)
        lun_size = (count + count // STEP + 2) * (VOLUME_SIZE + EXTENT) + 4096 * MiB
        target = server.create_target("benchscale", (lun_size,), lun_dir=lun_dir)
        steps.push("release target", lambda: [
            g.run_ok("iscsiadm", "-m", "node", "-T", target.iqn, "--logout"),
            g.run_ok("multipath", "-F")])
        agent = _start_agent(work / "agent" / "state")
        steps.push("stop agent", lambda: agent.stop())
        sd = str(uuid.uuid4())
        async with agent.client() as c:
            params = [{"id": str(uuid.uuid4()), "connection": p.split(":")[0], "port": 3260,
                       "iqn": target.iqn} for p in g.PORTALS]
            await c.call("connectStorageServer", domType="iscsi", connectionParams=params)
            [lun] = await c.call("getDeviceList")
            await c.call("createStorageDomain", sdUUID=sd, domType="iscsi", name="scale",
                         devices=[lun["guid"]], ovfStore=False)
            mpath = f"/dev/mapper/{g.Multipathd.map_name(lun['guid'])}"
            steps.push("deactivate the VG", lambda: g.run_ok("lvm", "vgchange", "-an", sd))
            conf = lvm.build_config([mpath], activation=True)
            times: list[float] = []
            for i in range(1, count + 1):
                times.append(await _job(c, "createVolume", sdUUID=sd, imgUUID=str(uuid.uuid4()),
                                        volUUID=str(uuid.uuid4()), size=VOLUME_SIZE,
                                        format="raw", preallocate="sparse"))
                if i % STEP == 0 or i == count:
                    step = {"count": i, "create_p50_ms": round(1000 * median(times[-STEP:]), 1),
                            "create_max_ms": round(1000 * max(times[-STEP:]), 1),
                            "t": round(sum(times), 1),
                            **await _step_figures(c, conf, sd, i)}
                    result["steps"].append(step)
                    with PROGRESS.open("a") as f:
                        f.write(json.dumps(step) + "\n")
            result["mda_size_mib"] = result["steps"][-1]["mda_size"] // MiB
            result["create_ms"] = [round(1000 * t, 1) for t in times]
            await c.call("formatStorageDomain", sdUUID=sd)
            for p in params:
                await c.call("disconnectStorageServer", domType="iscsi", connectionParams=[p])
        return result
    finally:
        steps.run()
        if os.environ.get("BENCH_BLOCK_LOG"):    # the agent's debug timeline
            shutil.copy(work / "agent" / "agent.log", os.environ["BENCH_BLOCK_LOG"])


_TIMELINE_MARKS = (("start", "(createVolume) started"), ("lvcreate", "lvcreate"),
                   ("lvcreated", "lvcreate"), ("created", "Created volume"),
                   ("done", "(createVolume) done"))


def timeline(log: Path, per: int = 100) -> str:
    """Medians per `per` creates of each stretch of a create, from the
    agent's DEBUG log (BENCH_BLOCK_LOG): job start to its lvcreate, the
    lvcreate, to the volume created, to the job done."""
    jobs: dict[str, dict[str, float]] = {}
    for line in log.read_text().splitlines():
        m = re.search(r"\[job=([0-9a-f-]+)\]", line)
        if m is None:
            continue
        t = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
        marks = jobs.setdefault(m.group(1), {})
        if "lvcreate" in line:
            marks["lvcreate" if "started" in line else "lvcreated"] = t
        else:
            for name, text in _TIMELINE_MARKS:
                if text in line and name != "lvcreate":
                    marks[name] = t
    names = [n for n, _ in _TIMELINE_MARKS]
    done = [j for j in jobs.values() if all(n in j for n in names)]
    rows = []
    for first in range(0, len(done), per):
        part = done[first:first + per]
        rows.append([f"{first}-{first + len(part) - 1}"]
                    + [round(1000 * median([j[b] - j[a] for j in part]))
                       for a, b in itertools.pairwise(names)]
                    + [round(1000 * median([j["done"] - j["start"] for j in part]))])
    return table(rows, ["creates", "start -> lvcreate ms", "lvcreate ms", "-> created ms",
                        "-> done ms", "total ms"])


def guest_main(count: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-scale-", dir="/tmp"))
    print(json.dumps(asyncio.run(_guest(count, work))))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--guest"]:
        guest_main(int(sys.argv[2]))
    elif sys.argv[1:2] == ["--timeline"]:
        print(timeline(Path(sys.argv[2])))
    else:
        print(report(run()))
