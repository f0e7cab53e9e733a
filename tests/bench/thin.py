"""Thin block volumes grown ahead of a writer, measured inside the lab guest
(a multipath iSCSI LUN from tgtd, real LVM, qemu-storage-daemon writing
through NBD as a VM would):

- the agent watching the writer (prepareImage's `writer`): the time from
  each BLOCK_WRITE_THRESHOLD event to the re-armed threshold (p50, p99),
  while `qemu-img convert` writes DATA at RATE into a volume that started at
  one chunk, and whether any write failed;
- extendVolume called on an idle volume, a chunk at a time;
- a bare `lvextend` + `lvchange --refresh` of another LV of the same VG.

    python -m tests.bench thin      (on the host: boots the guest)

The LUN and the source data live in build/ on the host (the guest's /tmp is
a small tmpfs). Every LVM command in the User-Mode Linux guest (one vCPU)
costs most of a second, more while a writer runs: the ratio of the agent's
figures to the bare commands is the point.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from tests.bench.common import machine, run_in_guest, save, table

MiB = 1 << 20
GiB = 1 << 30
EXTENT = 8 * MiB
CHUNK = 256 * MiB
WATERMARK = 50
DATA = 1024 * MiB
RATE = 16 * MiB
ROOT = Path(__file__).resolve().parents[2]


def percentile(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


# ---- host side -------------------------------------------------------------------------

def run(runs: int = 10) -> dict[str, Any]:
    summary = run_in_guest("tests.bench.thin", str(runs), timeout=2400)
    summary["machine"] = machine()
    save("thin", summary)
    return summary


def report(r: dict[str, Any]) -> str:
    p = r["params"]
    rows = [[name, v["p50_s"], v["p99_s"], v["n"]] for name, v in r["latency"].items()]
    return "\n".join([
        f"thin: {p['data_mib']} MiB written at {p['rate_mib_s']} MiB/s through "
        f"qemu-storage-daemon, chunk {p['chunk_mib']} MiB, watermark {p['watermark']}%: "
        f"writer {'ok' if r['writer_ok'] else 'FAILED'}, LV grown "
        f"{[s // MiB for s in r['sizes']]} MiB",
        table(rows, ["extension", "p50 s", "p99 s", "n"]), ""])


# ---- guest side ------------------------------------------------------------------------

def _start_agent(state: Path) -> Any:
    from tests.agentproc import AgentProcess

    state.mkdir(parents=True, exist_ok=True)
    (state / "hostagent.toml").write_text(
        f"[storage]\nblock_extent_size = {EXTENT}\nmonitor_interval = 600.0\n"
        f"[thin]\nchunk_size = {CHUNK}\nwatermark_percent = {WATERMARK}\n")
    agent = AgentProcess(state)
    agent.log_path = state.parent / "agent.log"
    return agent.start(timeout=120)


def _stats(values: list[float]) -> dict[str, Any]:
    return {"p50_s": round(percentile(values, 50), 3), "p99_s": round(percentile(values, 99), 3),
            "n": len(values), "runs": values}


async def _guest(runs: int, work: Path, big: Path) -> dict[str, Any]:
    from storage import lvm
    from tests.lab import guestlib as g
    from tests.lab.test_thin_lab import StorageDaemon

    steps = g.Cleanup()
    result: dict[str, Any] = {}
    try:
        src = big / "src.raw"
        with open(src, "wb") as f:
            for _ in range(DATA // (16 * MiB)):
                f.write(os.urandom(16 * MiB))
        server = g.TargetServer(big / "luns").start()
        steps.push("stop tgtd", server.stop)
        initiator = g.Initiator().start()
        steps.push("stop iscsid", initiator.stop)
        mpd = g.Multipathd().start()
        steps.push("stop multipathd", mpd.stop)
        # sparse: the written volume (DATA and the margin), the idle one and
        # the bare LV (runs + 2 chunks each), the domain's own LVs
        target = server.create_target("benchthin",
                                      (2 * DATA + 2 * (runs + 2) * CHUNK + 2 * GiB,))
        steps.push("release target", lambda: [
            g.run_ok("iscsiadm", "-m", "node", "-T", target.iqn, "--logout"),
            g.run_ok("multipath", "-F")])
        agent = _start_agent(work / "agent" / "state")
        steps.push("stop agent", lambda: agent.stop())
        sd, img, vol, idle = (str(uuid.uuid4()) for _ in range(4))
        ref = {"sdUUID": sd, "imgUUID": img, "volUUID": vol}
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
            for v, size in ((vol, 2 * DATA), (idle, (runs + 2) * CHUNK)):
                job = str(uuid.uuid4())
                await c.call("createVolume", jobUUID=job, sdUUID=sd, imgUUID=img, volUUID=v,
                             size=size, format="cow", preallocate="sparse")
                info = await c.wait_job(job, timeout=300, poll=0.1)
                assert info["status"] == "done", info

            # 1. the agent watching a writer
            qsd = StorageDaemon(f"/dev/{sd}/{vol}", work)
            await c.call("prepareImage", **ref, purpose="vm",
                         writer={"qmpSocket": qsd.qmp_path, "nodeName": "file0"})
            sizes: list[int] = []
            async with c.notifications() as q:
                qsd.start()
                try:
                    writer = await asyncio.create_subprocess_exec(
                        "qemu-img", "convert", "-n", "-r", str(RATE), "-f", "raw",
                        "-O", "raw", str(src), qsd.nbd_url, stderr=asyncio.subprocess.PIPE)
                    _, err = await writer.communicate()
                    result["writer_ok"] = writer.returncode == 0
                    result["writer_error"] = err.decode()[-500:]
                finally:
                    qsd.daemon.stop()
                while not q.empty():
                    n = q.get_nowait()
                    if n.get("method") == "volume.extended":
                        sizes.append(n["params"]["size"])
            await c.call("teardownImage", **ref)
            watched = [float(line.rsplit(" re-armed ", 1)[1].split()[0])
                       for line in agent.log().splitlines() if "threshold re-armed" in line]

            # 2. extendVolume on an idle volume, a chunk at a time
            await c.call("prepareImage", sdUUID=sd, imgUUID=img, volUUID=idle, purpose="vm")
            verb: list[float] = []
            size = CHUNK
            for _ in range(runs):
                t = time.perf_counter()
                size = (await c.call("extendVolume", sdUUID=sd, imgUUID=img, volUUID=idle,
                                     minSize=size + CHUNK))["size"]
                verb.append(time.perf_counter() - t)
            await c.call("teardownImage", sdUUID=sd, imgUUID=img, volUUID=idle)

            # 3. bare lvextend + lvchange --refresh of another LV, same VG
            mpath = f"/dev/mapper/{g.Multipathd.map_name(lun['guid'])}"
            conf = lvm.build_config([mpath], activation=True)
            name = f"bare-{uuid.uuid4().hex[:8]}"
            g.run("lvm", "lvcreate", "--config", conf, "--name", name, "--size", f"{CHUNK}b",
                  "--activate", "y", "--zero", "n", sd)
            bare: list[float] = []
            for i in range(runs):
                t = time.perf_counter()
                g.run("lvm", "lvextend", "--config", conf, "--size", f"{(i + 2) * CHUNK}b",
                      f"{sd}/{name}")
                g.run("lvm", "lvchange", "--config", conf, "--refresh", f"{sd}/{name}")
                bare.append(time.perf_counter() - t)
            g.run("lvm", "lvremove", "--config", conf, "--force", f"{sd}/{name}")
            await c.call("formatStorageDomain", sdUUID=sd)
            for p in params:
                await c.call("disconnectStorageServer", domType="iscsi", connectionParams=[p])
        result["sizes"] = sizes
        result["latency"] = {"agent watching (event to re-armed)": _stats(watched),
                             "extendVolume, idle": _stats(verb),
                             "bare lvextend + lvchange --refresh, idle": _stats(bare)}
        result["params"] = {"runs": runs, "data_mib": DATA // MiB, "rate_mib_s": RATE // MiB,
                            "chunk_mib": CHUNK // MiB, "watermark": WATERMARK}
        return result
    finally:
        steps.run()


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
        print(report(run()))
