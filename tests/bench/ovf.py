"""OVF store upload: a 1 GiB tar PUT over mutual TLS on loopback into a
localfs domain, beside two limits measured in the same run, in turns:

- `dd` writing the same bytes (O_DIRECT, fsync) to the same file system:
  the storage's limit;
- the same PUT into a bare aiohttp app that discards the body
  (tests/bench/bare_server.py, same TLS settings): the transport's limit.

The client sends the file in 4 MiB writes on a blocking TLS socket (as an
engine's HTTP client would), so that the client costs the same CPU for both
servers; the machine has 2 cores for client and server together. The
agent's RSS growth during its uploads and each server's CPU time per GiB
are reported too.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import ssl
import subprocess
import tarfile
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import psutil

from rpc.client import Client
from tests.agentproc import AgentProcess, free_port
from tests.bench.common import ROOT, median, python_cmd, save, table

MiB = 1024**2
SEND = 4 * MiB


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


def put_file(port: int, path: str, tar: Path,
             pki: Path) -> tuple[float, float, int, dict[str, Any]]:
    """PUT tar to 127.0.0.1:port (blocking): (seconds, the client's CPU
    seconds, HTTP status, JSON reply)."""
    ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    ctx.load_cert_chain(str(pki / "client.pem"), str(pki / "client.key"))
    size = tar.stat().st_size
    buf = bytearray(SEND)
    view = memoryview(buf)
    with socket.create_connection(("127.0.0.1", port)) as raw, \
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s, \
            open(tar, "rb", buffering=0) as f:
        start = time.perf_counter()
        cpu = time.thread_time()
        s.sendall(f"PUT {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                  f"Content-Length: {size}\r\nConnection: close\r\n\r\n".encode())
        while n := f.readinto(buf):
            s.sendall(view[:n])
        reply = b""
        while data := s.recv(65536):
            reply += data
        elapsed = time.perf_counter() - start
        cpu = time.thread_time() - cpu
    head, _, body = reply.partition(b"\r\n\r\n")
    return elapsed, cpu, int(head.split()[1]), dict(json.loads(body))


async def _peak_rss(proc: psutil.Process, stop: asyncio.Event) -> int:
    peak = int(proc.memory_info().rss)
    while not stop.is_set():
        peak = max(peak, int(proc.memory_info().rss))
        await asyncio.sleep(0.05)
    return peak


def _cpu(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return float(t.user + t.system)


async def _bench(work: Path, size: int, runs: int) -> dict[str, Any]:
    data = work / "data"
    data.mkdir()
    tar = work / "upload.tar"
    sha = make_tar(tar, size)
    real = tar.stat().st_size
    gib = real / 2**30
    conf = work / "state" / "hostagent.toml"
    conf.parent.mkdir()
    conf.write_text(f"[ovf]\nmax_tar_size = {real + 64 * MiB}\n")
    agent = AgentProcess(work / "state").start()
    assert agent.proc is not None
    proc = psutil.Process(agent.proc.pid)
    port = free_port()
    bare = subprocess.Popen(python_cmd("tests.bench.bare_server", str(agent.pki), str(port)),
                            cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin"})
    try:
        assert bare.stdout is not None and "ready" in bare.stdout.readline()
        bare_proc = psutil.Process(bare.pid)
        async with Client.for_dev(agent.state_dir, port=agent.port) as c:
            cid, sd = new_id(), new_id()
            await c.call("connectStorageServer", domType="localfs",
                         connectionParams=[{"id": cid, "connection": str(data)}])
            await c.call("createStorageDomain", sdUUID=sd, domType="localfs", name="bench",
                         connectionId=cid)
            secs: dict[str, list[float]] = {"agent": [], "bare": [], "dd": []}
            cpu: dict[str, list[float]] = {"agent": [], "bare": [], "client": []}
            rss_growth: list[float] = []

            async def agent_run() -> None:
                t = await c.call("uploadOvfTar", sdUUID=sd, size=real, sha256=sha)
                before = proc.memory_info().rss
                cpu0 = _cpu(proc)
                stop = asyncio.Event()
                sampler = asyncio.create_task(_peak_rss(proc, stop))
                elapsed, client_cpu, status, reply = await asyncio.to_thread(
                    put_file, agent.port, t["path"], tar, agent.pki)
                stop.set()
                rss_growth.append((await sampler - before) / MiB)
                assert status == 200 and reply["sha256"] == sha, reply
                secs["agent"].append(elapsed)
                cpu["agent"].append((_cpu(proc) - cpu0) / gib)
                cpu["client"].append(client_cpu / gib)

            async def bare_run() -> None:
                cpu0 = _cpu(bare_proc)
                elapsed, client_cpu, status, reply = await asyncio.to_thread(
                    put_file, port, "/sink", tar, agent.pki)
                assert status == 200 and reply["size"] == real, reply
                secs["bare"].append(elapsed)
                cpu["bare"].append((_cpu(bare_proc) - cpu0) / gib)
                cpu["client"].append(client_cpu / gib)

            async def dd_run() -> None:
                target = data / "dd-target"
                start = time.perf_counter()
                await asyncio.to_thread(
                    subprocess.run, ["dd", f"if={tar}", f"of={target}", "bs=1M",
                                     "oflag=direct", "conv=fsync", "status=none"], check=True)
                secs["dd"].append(time.perf_counter() - start)
                target.unlink()

            order = [agent_run, bare_run, dd_run]
            await agent_run()     # warm up: first allocation of the store's slot
            secs["agent"].clear()
            cpu["agent"].clear()
            cpu["client"].clear()
            for i in range(runs):     # in turns, so that load from elsewhere hits all
                for fn in order[i % 3:] + order[:i % 3]:
                    await fn()
            await c.call("formatStorageDomain", sdUUID=sd)
            await c.call("disconnectStorageServer", domType="localfs",
                         connectionParams=[{"id": cid, "connection": str(data)}])
    finally:
        bare.terminate()
        bare.wait(10)
        agent.stop()
    mibs = {k: [real / MiB / s for s in v] for k, v in secs.items()}
    med = {k: median(v) for k, v in mibs.items()}
    # ratios per round (same moment, same load), then their median
    rounds = list(zip(mibs["agent"], mibs["bare"], mibs["dd"], strict=True))
    return {"size": real, "agent_mib_s": med["agent"], "bare_mib_s": med["bare"],
            "dd_mib_s": med["dd"],
            "ratio": median([a / d for a, _, d in rounds]),
            "ratio_bare": median([a / b for a, b, _ in rounds]),
            "ratio_bare_dd": median([b / d for _, b, d in rounds]),
            "cpu_s_per_gib": {k: median(v) for k, v in cpu.items()},
            "rss_growth_mib": max(rss_growth),
            "runs": {"mib_s": mibs, "cpu_s_per_gib": cpu, "rss_growth_mib": rss_growth}}


def run(size: int = 1024 * MiB, runs: int = 5) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-ovf-", dir="/var/tmp") as tmp:
        result = asyncio.run(_bench(Path(tmp), size, runs))
    result["params"] = {"runs": runs, "storage": "localfs on /var/tmp (the root disk)",
                        "client": f"blocking TLS socket, {SEND // MiB} MiB writes"}
    save("ovf", result)
    return result


def report(r: dict[str, Any]) -> str:
    cpu = r["cpu_s_per_gib"]
    rows = [["agent PUT /ovfstore over mTLS", r["agent_mib_s"], cpu["agent"]],
            ["bare aiohttp mTLS sink (PUT /sink)", r["bare_mib_s"], cpu["bare"]],
            ["dd oflag=direct conv=fsync", r["dd_mib_s"], "-"]]
    return (f"OVF store upload of {r['size'] / MiB:.0f} MiB, median of "
            f"{r['params']['runs']} rounds ({r['params']['storage']}; client: "
            f"{r['params']['client']}, {cpu['client']:.2f} CPU s/GiB)\n"
            + table(rows, ["writer", "MiB/s", "server CPU s/GiB"])
            + f"\nratio agent/dd {r['ratio']:.2f} (target >= 0.8); agent/bare-TLS-sink "
              f"{r['ratio_bare']:.2f}; bare-TLS-sink/dd {r['ratio_bare_dd']:.2f}\n"
              f"agent RSS growth {r['rss_growth_mib']:.1f} MiB (must be < 50)")
