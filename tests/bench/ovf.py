"""OVF store upload: a 1 GiB tar PUT over mutual TLS on loopback into a
localfs domain, beside `dd` writing the same bytes (O_DIRECT, fsync) to the
same file system; and the agent's RSS during the upload."""

from __future__ import annotations

import asyncio
import hashlib
import os
import ssl
import subprocess
import tarfile
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from tests.agentproc import AgentProcess
from tests.bench.common import median, save, table

MiB = 1024**2


def new_id() -> str:
    return str(uuid.uuid4())


def make_tar(path: Path, size: int, member: int = 32 * MiB) -> str:
    """A tar of ~size bytes of random-ish members; returns its sha256."""
    block = os.urandom(MiB)
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for _ in range(max(1, size // member)):
            info = tarfile.TarInfo(f"{new_id()}.ovf")
            info.size = member
            r, w = os.pipe()

            def feed(w: int = w) -> None:
                with os.fdopen(w, "wb") as f:
                    for _ in range(member // MiB):
                        f.write(block)

            t = threading.Thread(target=feed)
            t.start()
            with os.fdopen(r, "rb") as f:
                tar.addfile(info, f)
            t.join()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 * MiB):
            h.update(chunk)
    return h.hexdigest()


async def _upload(agent: AgentProcess, c: Any, sd: str, tar: Path, sha: str) -> float:
    size = tar.stat().st_size
    t = await c.call("uploadOvfTar", sdUUID=sd, size=size, sha256=sha)
    ctx = ssl.create_default_context(cafile=str(agent.pki / "ca.pem"))
    ctx.load_cert_chain(str(agent.pki / "client.pem"), str(agent.pki / "client.key"))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as s:
        start = time.perf_counter()
        with open(tar, "rb") as f:
            async with s.put(f"{agent.url}{t['path']}", data=f,
                             headers={"Content-Length": str(size)}) as r:
                body = await r.json()
        elapsed = time.perf_counter() - start
    assert r.status == 200 and body["sha256"] == sha, body
    return elapsed


async def _peak_rss(proc: psutil.Process, stop: asyncio.Event) -> int:
    peak = proc.memory_info().rss
    while not stop.is_set():
        peak = max(peak, proc.memory_info().rss)
        await asyncio.sleep(0.05)
    return peak


async def _bench(work: Path, size: int, runs: int) -> dict[str, Any]:
    data = work / "data"
    data.mkdir()
    tar = work / "upload.tar"
    sha = make_tar(tar, size)
    real = tar.stat().st_size
    conf = work / "state" / "hostagent.toml"
    conf.parent.mkdir()
    conf.write_text(f"[ovf]\nmax_tar_size = {real + 64 * MiB}\n")
    agent = AgentProcess(work / "state").start()
    assert agent.proc is not None
    proc = psutil.Process(agent.proc.pid)
    try:
        async with agent.client() as c:
            cid, sd = new_id(), new_id()
            await c.call("connectStorageServer", domType="localfs",
                         connectionParams=[{"id": cid, "connection": str(data)}])
            await c.call("createStorageDomain", sdUUID=sd, domType="localfs", name="bench",
                         connectionId=cid)
            agent_s, dd_s, rss_growth = [], [], []
            for _ in range(runs):
                before = proc.memory_info().rss
                stop = asyncio.Event()
                sampler = asyncio.create_task(_peak_rss(proc, stop))
                agent_s.append(await _upload(agent, c, sd, tar, sha))
                stop.set()
                rss_growth.append((await sampler - before) / MiB)
                target = data / "dd-target"
                start = time.perf_counter()
                subprocess.run(["dd", f"if={tar}", f"of={target}", "bs=1M", "oflag=direct",
                                "conv=fsync", "status=none"], check=True)
                dd_s.append(time.perf_counter() - start)
                target.unlink()
            await c.call("formatStorageDomain", sdUUID=sd)
            await c.call("disconnectStorageServer", domType="localfs",
                         connectionParams=[{"id": cid, "connection": str(data)}])
    finally:
        agent.stop()
    agent_mbs = real / MiB / median(agent_s)
    dd_mbs = real / MiB / median(dd_s)
    return {"size": real, "agent_mib_s": agent_mbs, "dd_mib_s": dd_mbs,
            "ratio": agent_mbs / dd_mbs, "rss_growth_mib": max(rss_growth),
            "runs": {"agent_s": agent_s, "dd_s": dd_s, "rss_growth_mib": rss_growth}}


def run(size: int = 1024 * MiB, runs: int = 3) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-ovf-", dir="/var/tmp") as tmp:
        result = asyncio.run(_bench(Path(tmp), size, runs))
    result["params"] = {"runs": runs, "storage": "localfs on /var/tmp (the root disk)"}
    save("ovf", result)
    return result


def report(r: dict[str, Any]) -> str:
    rows = [["agent PUT over mTLS", r["agent_mib_s"]], ["dd oflag=direct conv=fsync",
                                                         r["dd_mib_s"]]]
    return (f"OVF store upload of {r['size'] / MiB:.0f} MiB, median of "
            f"{r['params']['runs']} ({r['params']['storage']})\n"
            + table(rows, ["writer", "MiB/s"])
            + f"\nratio agent/dd {r['ratio']:.2f} (must be >= 0.8); agent RSS growth "
              f"{r['rss_growth_mib']:.1f} MiB (must be < 50)")
