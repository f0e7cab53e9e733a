"""copyImage against the bare tool, in turns on the same storage (a localfs
domain on /var/tmp, the machine's disk):

- a 2 GiB fully written raw volume: copyImage (a job over mTLS, progress
  on) vs `qemu-img convert -t none -T none -W` of the same file into the
  same directory: the ratio of throughputs;
- a 20 GiB sparse volume holding 200 MiB of data vs a 200 MiB fully
  written one, both by copyImage: zeros must cost next to nothing;
- the agent's RSS before and at its peak during the copies (sampled every
  50 ms): the data goes through qemu-img, never through the agent.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import psutil

from tests.agentproc import AgentProcess
from tests.bench.common import drop_localfs_domain, localfs_domain, median, save, table

MiB = 1024**2
GiB = 1024**3


def new_id() -> str:
    return str(uuid.uuid4())


def drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


async def _rss_peak(proc: psutil.Process, stop: asyncio.Event, peak: list[int]) -> None:
    while not stop.is_set():
        peak[0] = max(peak[0], proc.memory_info().rss)
        await asyncio.sleep(0.05)


async def _bench(work: Path, runs: int) -> dict[str, Any]:
    data = work / "data"
    data.mkdir()
    agent = AgentProcess(work / "state").start()
    proc = psutil.Process(agent.proc.pid if agent.proc else 0)
    try:
        async with agent.client() as c:
            conn, sd, root = await localfs_domain(c, data, ovfStore=False)

            async def volume(size: int, chunks: list[tuple[int, int]]) -> dict[str, str]:
                img, vol, job = new_id(), new_id(), new_id()
                await c.call("createVolume", jobUUID=job, sdUUID=sd, imgUUID=img,
                             volUUID=vol, size=size, format="raw", preallocate="sparse")
                assert (await c.wait_job(job, timeout=120))["status"] == "done"
                path = root / "images" / img / vol
                cmds = [f"write -P 0x{(i % 250) + 1:x} {off} {length}"
                        for i, (off, length) in enumerate(chunks)]
                for i in range(0, len(cmds), 50):
                    argv = ["qemu-io", "-f", "raw"]
                    for cmd in cmds[i:i + 50]:
                        argv += ["-c", cmd]
                    subprocess.run([*argv, str(path)], check=True, capture_output=True)
                return {"sdUUID": sd, "imgUUID": img, "volUUID": vol, "path": str(path)}

            async def copy(src: dict[str, str]) -> float:
                dst = {"sdUUID": sd, "imgUUID": new_id(), "volUUID": new_id()}
                job = new_id()
                drop_caches()
                t = time.perf_counter()
                await c.call("copyImage", jobUUID=job,
                             src={k: v for k, v in src.items() if k != "path"}, dst=dst)
                done = await c.wait_job(job, timeout=600, poll=0.05)
                elapsed = time.perf_counter() - t
                assert done["status"] == "done", done
                job = new_id()
                await c.call("deleteImage", jobUUID=job, sdUUID=sd, imgUUID=dst["imgUUID"])
                await c.wait_job(job, timeout=120)
                return elapsed

            def bare(src: dict[str, str]) -> float:
                out = data / f"bare-{new_id()}"
                drop_caches()
                t = time.perf_counter()
                subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", "-t", "none",
                                "-T", "none", "-W", src["path"], str(out)], check=True)
                elapsed = time.perf_counter() - t
                out.unlink()
                return elapsed

            full = await volume(2 * GiB, [(i * 256 * MiB, 256 * MiB) for i in range(8)])
            sparse = await volume(20 * GiB, [(i * 200 * MiB, 2 * MiB) for i in range(100)])
            small = await volume(200 * MiB, [(0, 200 * MiB)])

            rss_start = proc.memory_info().rss
            peak = [rss_start]
            stop = asyncio.Event()
            sampler = asyncio.create_task(_rss_peak(proc, stop, peak))
            agent_s, bare_s, sparse_s, small_s = [], [], [], []
            for _ in range(runs):
                agent_s.append(await copy(full))
                bare_s.append(bare(full))
                sparse_s.append(await copy(sparse))
                small_s.append(await copy(small))
            stop.set()
            await sampler
            rss_end = proc.memory_info().rss
            await drop_localfs_domain(c, conn, sd)
    finally:
        agent.stop()
    a, b = median(agent_s), median(bare_s)
    return {"full_2g": {"agent_s": a, "qemu_img_s": b,
                        "agent_mib_s": 2048 / a, "qemu_img_mib_s": 2048 / b,
                        "ratio": b / a, "runs_agent": agent_s, "runs_bare": bare_s},
            "sparse_20g_200m_s": median(sparse_s), "full_200m_s": median(small_s),
            "sparse_vs_full": median(sparse_s) / median(small_s),
            "rss_mib": {"start": rss_start / MiB, "peak": peak[0] / MiB,
                        "end": rss_end / MiB}}


def run(runs: int = 5) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-copy-", dir="/var/tmp") as tmp:
        os.chmod(tmp, 0o755)
        result = asyncio.run(_bench(Path(tmp), runs))
    result["params"] = {"runs": runs, "storage": "localfs on /var/tmp, page cache dropped "
                                                  "before each copy"}
    save("copy", result)
    return result


def report(r: dict[str, Any]) -> str:
    f = r["full_2g"]
    rows = [["copyImage", f["agent_s"], f["agent_mib_s"]],
            ["qemu-img convert", f["qemu_img_s"], f["qemu_img_mib_s"]]]
    rss = r["rss_mib"]
    return "\n".join([
        f"copy of a 2 GiB fully written raw volume, median of {r['params']['runs']} "
        f"({r['params']['storage']})",
        table(rows, ["copy", "s", "MiB/s"]),
        f"ratio (throughput, agent / bare): {f['ratio']:.3f}",
        "",
        f"20 GiB sparse with 200 MiB data: {r['sparse_20g_200m_s']:.2f} s; 200 MiB fully "
        f"written: {r['full_200m_s']:.2f} s; ratio {r['sparse_vs_full']:.2f}",
        f"agent RSS MiB: start {rss['start']:.0f}, peak {rss['peak']:.0f}, end "
        f"{rss['end']:.0f} (growth {rss['peak'] - rss['start']:.1f})"])
