"""OVF store upload: a 1 GiB tar PUT over mutual TLS on loopback into a
localfs domain, beside limits measured in the same run, in turns:

- `dd` writing the same bytes with fsync to the same file system, with
  O_DIRECT as the store writes (the target's reference) and through the
  page cache: the storage's limit;
- the same PUT into bare servers that discard the body (same TLS settings,
  tests/bench/bare_server.py): aiohttp's StreamReader, as on the agent's
  main port; a blocking TLS socket read in a thread, as on the agent's OVF
  data listener (the transport's limit); the same also hashing the body
  with sha256 in a second thread, as every upload must (the most any
  upload can reach here);
- the same PUT into ovirt-imageio's server (the PyPI package of the test
  extras, started as tests/bench/transfer.py does: file backend, a raw
  file of the tar's size in the same directory, O_DIRECT and fsync, the
  agent's certificate), which neither checks the tar nor hashes it: the
  peer the agent must at least match (issue 21).

The agent is measured twice: on the URL uploadOvfTar hands out (the OVF
data listener) and on the main port (aiohttp). The client sends the file
in 4 MiB writes on a blocking TLS socket (as an engine's HTTP client
would), so that the client costs the same CPU for every server; the
machine has 2 cores for client and server together. Reported as medians
over the rounds: throughput, ratios taken within each round (same moment,
same load), the agent's RSS growth during an upload, the peak RSS of the
agent and of imageio's server (process and children), each server's CPU
time per GiB, the CPU time of the agent's busiest thread (what caps an upload
on a host with cores to spare), and the slowest ping answered during an
upload. Every PUT, whatever the server, runs under the same watching (the
client's thread shares the bench's process with it).

    python -m tests.bench ovf          (BENCH_OVF_ROUNDS=2 for a quick look)
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import subprocess
import tarfile
import tempfile
import threading
import time
import urllib.parse
import uuid
from pathlib import Path
from typing import Any

import psutil

from rpc.client import Client, client_ssl_context
from tests.agentproc import AgentProcess, free_port
from tests.bench.common import ROOT, median, python_cmd, save, table
from tests.bench.transfer import ImageioServer, PeakRSS

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
    ctx = client_ssl_context(pki / "ca.pem", pki / "client.pem", pki / "client.key")
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
    return elapsed, cpu, int(head.split()[1]), dict(json.loads(body)) if body.strip() else {}


async def _watch(proc: psutil.Process, stop: asyncio.Event) -> tuple[int, float]:
    """Until stop: the peak RSS and the CPU seconds of the busiest thread
    (the throughput cap where cores are not short). Threads that end
    during the upload (its hash and write threads) count as last seen."""
    peak = int(proc.memory_info().rss)
    first: dict[int, float] = {t.id: t.user_time + t.system_time for t in proc.threads()}
    last = dict(first)
    while not stop.is_set():
        peak = max(peak, int(proc.memory_info().rss))
        for t in proc.threads():
            first.setdefault(t.id, 0.0)
            last[t.id] = t.user_time + t.system_time
        await asyncio.sleep(0.05)
    for t in proc.threads():
        last[t.id] = t.user_time + t.system_time
    return peak, max(last[k] - first[k] for k in last)


async def _pings(c: Client, stop: asyncio.Event) -> list[float]:
    """Latency of ping calls, 100 ms apart, until stop (few: each costs the agent CPU)."""
    out = []
    while not stop.is_set():
        start = time.perf_counter()
        await c.call("ping")
        out.append(time.perf_counter() - start)
        await asyncio.sleep(0.1)
    return out


async def _observed(pc: Client, server: psutil.Process, target: int, path: str, tar: Path,
                    pki: Path) -> tuple[tuple[float, float, int, dict[str, Any]], int, float,
                                        float]:
    """put_file, watched the same way whatever the server (its peak RSS and
    busiest thread; a ping of the agent on `pc` every 100 ms): the client's
    thread shares the bench's process, and its GIL, with the watching, so
    every server is measured under it alike. Returns put_file's result, the
    peak, the busiest thread's CPU seconds and the slowest ping."""
    stop = asyncio.Event()
    watcher = asyncio.create_task(_watch(server, stop))
    pinger = asyncio.create_task(_pings(pc, stop))
    try:
        result = await asyncio.to_thread(put_file, target, path, tar, pki)
    finally:
        stop.set()
    peak, busiest = await watcher
    return result, peak, busiest, max(await pinger, default=0.0)


def _cpu(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return float(t.user + t.system)


WRITERS = ["agent", "agent_main", "imageio", "bare", "bare_thread", "bare_thread_sha", "dd",
           "dd_buffered"]


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
    imageio = ImageioServer(work / "imageio", agent.pki)
    assert imageio.proc is not None
    imageio_proc = psutil.Process(imageio.proc.pid)
    peak = {"agent": PeakRSS(agent.proc.pid), "imageio": PeakRSS(imageio.proc.pid)}
    port, thread_port = free_port(), free_port()
    bare = subprocess.Popen(python_cmd("tests.bench.bare_server", str(agent.pki), str(port),
                                       str(thread_port)),
                            cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin"})
    secs: dict[str, list[float]] = {k: [] for k in WRITERS}
    cpu: dict[str, list[float]] = {k: [] for k in WRITERS if not k.startswith("dd")}
    cpu["client"] = []
    rss_growth: list[float] = []
    thread_cpu: dict[str, list[float]] = {"agent": [], "agent_main": []}
    pings: dict[str, list[float]] = {"agent": [], "agent_main": []}
    try:
        assert bare.stdout is not None and "ready" in bare.stdout.readline()
        bare_proc = psutil.Process(bare.pid)
        async with Client.for_dev(agent.state_dir, port=agent.port) as c, \
                Client.for_dev(agent.state_dir, port=agent.port) as pc:
            cid, sd = new_id(), new_id()
            await c.call("connectStorageServer", domType="localfs",
                         connectionParams=[{"id": cid, "connection": str(data)}])
            await c.call("createStorageDomain", sdUUID=sd, domType="localfs", name="bench",
                         connectionId=cid)

            async def agent_run(name: str) -> None:
                t = await c.call("uploadOvfTar", sdUUID=sd, size=real, sha256=sha)
                url = urllib.parse.urlsplit(t["url"])
                target = url.port if name == "agent" else agent.port
                assert target is not None
                before = proc.memory_info().rss
                cpu0 = _cpu(proc)
                (elapsed, client_cpu, status, reply), peak, busiest, slowest = await _observed(
                    pc, proc, target, t["path"], tar, agent.pki)
                pings[name].append(slowest * 1000)
                if name == "agent":
                    rss_growth.append((peak - before) / MiB)
                assert status == 200 and reply["sha256"] == sha, reply
                secs[name].append(elapsed)
                cpu[name].append((_cpu(proc) - cpu0) / gib)
                thread_cpu[name].append(busiest / gib)
                cpu["client"].append(client_cpu / gib)

            async def bare_run(name: str) -> None:
                target, path = {"bare": (port, "/sink"), "bare_thread": (thread_port, "/sink"),
                                "bare_thread_sha": (thread_port, "/sink-sha256")}[name]
                cpu0 = _cpu(bare_proc)
                (elapsed, client_cpu, status, reply), *_ = await _observed(
                    pc, bare_proc, target, path, tar, agent.pki)
                assert status == 200 and reply["size"] == real, reply
                if name == "bare_thread_sha":
                    assert reply["sha256"] == sha, reply
                secs[name].append(elapsed)
                cpu[name].append((_cpu(bare_proc) - cpu0) / gib)
                cpu["client"].append(client_cpu / gib)

            async def imageio_run(name: str) -> None:
                # the same PUT into ovirt-imageio's server: a raw file of the
                # tar's size in the same directory, written with O_DIRECT and
                # fsync'd (its file backend); no tar check, no sha256
                target = data / "imageio-target"
                with open(target, "wb") as f:
                    f.truncate(real)
                url = urllib.parse.urlsplit(imageio.ticket(target, ["write"]))
                cpu0 = _cpu(imageio_proc)
                (elapsed, client_cpu, status, _), *_ = await _observed(
                    pc, imageio_proc, imageio.port, url.path, tar, agent.pki)
                assert status == 200, status
                secs[name].append(elapsed)
                cpu[name].append((_cpu(imageio_proc) - cpu0) / gib)
                cpu["client"].append(client_cpu / gib)
                target.unlink()

            async def dd_run(name: str) -> None:
                target = data / "dd-target"
                direct = ["oflag=direct"] if name == "dd" else []
                start = time.perf_counter()
                await asyncio.to_thread(
                    subprocess.run, ["dd", f"if={tar}", f"of={target}", "bs=1M", *direct,
                                     "conv=fsync", "status=none"], check=True)
                secs[name].append(time.perf_counter() - start)
                target.unlink()

            async def one(name: str) -> None:
                if name.startswith("agent"):
                    await agent_run(name)
                elif name.startswith("bare"):
                    await bare_run(name)
                elif name == "imageio":
                    await imageio_run(name)
                else:
                    await dd_run(name)

            await agent_run("agent")     # warm up: first allocation of the store's slot
            await imageio_run("imageio")
            for v in (*secs.values(), *cpu.values(), *thread_cpu.values(), *pings.values(),
                      rss_growth):
                v.clear()
            for i in range(runs):     # in turns, so that load from elsewhere hits all
                for name in WRITERS[i % len(WRITERS):] + WRITERS[:i % len(WRITERS)]:
                    await one(name)
            await c.call("formatStorageDomain", sdUUID=sd)
            await c.call("disconnectStorageServer", domType="localfs",
                         connectionParams=[{"id": cid, "connection": str(data)}])
    finally:
        peak_mib = {k: v.stop() for k, v in peak.items()}
        bare.terminate()
        bare.wait(10)
        imageio.stop()
        agent.stop()
    mibs = {k: [real / MiB / s for s in v] for k, v in secs.items()}

    def ratio(a: str, b: str) -> float:
        # per round (same moment, same load), then the median
        return median([x / y for x, y in zip(mibs[a], mibs[b], strict=True)])

    return {"size": real,
            **{f"{k}_mib_s": median(v) for k, v in mibs.items()},
            "ratio": ratio("agent", "dd"),
            "ratio_buffered_dd": ratio("agent", "dd_buffered"),
            "ratio_main_dd": ratio("agent_main", "dd"),
            "ratio_imageio": ratio("agent", "imageio"),
            "ratio_main_imageio": ratio("agent_main", "imageio"),
            "peak_rss_mib": peak_mib,
            "ratio_bare": ratio("agent", "bare_thread"),
            "ratio_bare_sha": ratio("agent", "bare_thread_sha"),
            "ratio_bare_dd": ratio("bare_thread", "dd"),
            "ratio_bare_sha_dd": ratio("bare_thread_sha", "dd"),
            "cpu_s_per_gib": {k: median(v) for k, v in cpu.items()},
            "busiest_thread_cpu_s_per_gib": {k: median(v) for k, v in thread_cpu.items()},
            "ping_max_ms": {k: median(v) for k, v in pings.items()},
            "rss_growth_mib": median(rss_growth),
            "rss_growth_max_mib": max(rss_growth),
            "runs": {"mib_s": mibs, "cpu_s_per_gib": cpu, "rss_growth_mib": rss_growth,
                     "busiest_thread_cpu_s_per_gib": thread_cpu, "ping_max_ms": pings}}


def run(size: int = 1024 * MiB, runs: int = 5) -> dict[str, Any]:
    runs = int(os.environ.get("BENCH_OVF_ROUNDS", runs))     # fewer for a quick look
    with tempfile.TemporaryDirectory(prefix="bench-ovf-", dir="/var/tmp") as tmp:
        result = asyncio.run(_bench(Path(tmp), size, runs))
    result["params"] = {"runs": runs, "storage": "localfs on /var/tmp (the root disk)",
                        "client": f"blocking TLS socket, {SEND // MiB} MiB writes"}
    save("ovf", result)
    return result


def report(r: dict[str, Any]) -> str:
    cpu = r["cpu_s_per_gib"]
    busiest = r["busiest_thread_cpu_s_per_gib"]
    ping = r["ping_max_ms"]
    rows = [["agent, upload URL (OVF data listener)", r["agent_mib_s"], cpu["agent"]],
            ["agent, main port (aiohttp)", r["agent_main_mib_s"], cpu["agent_main"]],
            ["ovirt-imageio's server (file backend: O_DIRECT, fsync; no tar check, no "
             "sha256)", r["imageio_mib_s"], cpu["imageio"]],
            ["bare TLS sink, thread (data listener's transport)", r["bare_thread_mib_s"],
             cpu["bare_thread"]],
            ["bare TLS sink, thread + sha256", r["bare_thread_sha_mib_s"],
             cpu["bare_thread_sha"]],
            ["bare aiohttp TLS sink (main port's transport)", r["bare_mib_s"], cpu["bare"]],
            ["dd oflag=direct conv=fsync", r["dd_mib_s"], "-"],
            ["dd conv=fsync", r["dd_buffered_mib_s"], "-"]]
    return (f"OVF store upload of {r['size'] / MiB:.0f} MiB, median of "
            f"{r['params']['runs']} rounds ({r['params']['storage']}; client: "
            f"{r['params']['client']}, {cpu['client']:.2f} CPU s/GiB)\n"
            + table(rows, ["writer", "MiB/s", "server CPU s/GiB"])
            + f"\nagent/imageio {r['ratio_imageio']:.2f} (goal >= 1; main port/imageio "
              f"{r['ratio_main_imageio']:.2f}); peak RSS, process and children: agent "
              f"{r['peak_rss_mib']['agent']:.0f} MiB, imageio "
              f"{r['peak_rss_mib']['imageio']:.0f} MiB"
            + f"\nratio agent/dd {r['ratio']:.2f} (target >= 0.8; vs dd without O_DIRECT "
              f"{r['ratio_buffered_dd']:.2f}; main port/dd {r['ratio_main_dd']:.2f})\n"
              f"agent/bare TLS sink {r['ratio_bare']:.2f}; agent/bare TLS sink + sha256 "
              f"{r['ratio_bare_sha']:.2f}\n"
              f"limits here: bare TLS sink/dd {r['ratio_bare_dd']:.2f}; "
              f"bare TLS sink + sha256/dd {r['ratio_bare_sha_dd']:.2f}\n"
              f"agent RSS growth {r['rss_growth_mib']:.1f} MiB (max "
              f"{r['rss_growth_max_mib']:.1f}; must be < 50)\n"
              f"agent's busiest thread, CPU s/GiB (the cap with cores to spare): data "
              f"listener {busiest['agent']:.2f}, main port {busiest['agent_main']:.2f}\n"
              f"slowest ping during an upload: data listener {ping['agent']:.0f} ms, "
              f"main port {ping['agent_main']:.0f} ms")
