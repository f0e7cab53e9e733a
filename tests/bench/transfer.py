"""Disk transfers: a 1 GiB image uploaded and downloaded with
ovirt-imageio's own client (`ovirt_imageio.client`, from PyPI) over TLS on
loopback, against the agent (a raw volume of a localfs domain, through its
qemu-nbd) and against ovirt-imageio's own server from the same package
(its file backend, a raw file in the same directory, the agent's
certificate, its unix-socket shortcut off), beside `dd` moving the same
bytes to and from the same file system; in turns, several rounds,
medians of throughput and of the per-round ratios.

    python -m tests.bench transfer
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from tests.agentproc import AgentProcess, free_port
from tests.bench.common import drop_localfs_domain, localfs_domain, median, save, table

MiB = 1024**2
SIZE = 1024 * MiB
ROUNDS = 5


def new_id() -> str:
    return str(uuid.uuid4())


class _UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost")
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.path)


class ImageioServer:
    """ovirt-imageio's daemon from the PyPI package, as this user, with a
    private control socket."""

    def __init__(self, base: Path, pki: Path) -> None:
        self.base = base
        self.port = free_port()
        self.control = str(base / "run" / "sock")
        (base / "run").mkdir(parents=True)
        (base / "conf" / "conf.d").mkdir(parents=True)
        (base / "conf" / "conf.d" / "50-bench.conf").write_text(f"""
[daemon]
drop_privileges = false
systemd_enable = false
run_dir = {base}/run
[tls]
enable = true
key_file = {pki}/server.key
cert_file = {pki}/server.pem
ca_file = {pki}/ca.pem
[remote]
host = 127.0.0.1
port = {self.port}
[local]
enable = false
[control]
transport = unix
socket = {self.control}
[handlers]
keys = stderr
[logger_root]
level = WARNING
handlers = stderr
""")
        with open(base / "daemon.log", "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c",
                 "from ovirt_imageio._internal import server; server.main()",
                 "--conf-dir", str(base / "conf")], stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + 30
        while not os.path.exists(self.control):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("imageio server did not start: "
                                   + (base / "daemon.log").read_text()[-2000:])
            time.sleep(0.05)

    def ticket(self, path: Path, ops: list[str]) -> str:
        tid = new_id()
        body = json.dumps({"uuid": tid, "size": path.stat().st_size, "timeout": 3600,
                           "url": f"file://{path}", "ops": ops}).encode()
        con = _UnixHTTP(self.control)
        con.request("PUT", f"/tickets/{tid}", body=body,
                    headers={"Content-Type": "application/json"})
        r = con.getresponse()
        r.read()
        con.close()
        assert r.status == 200, r.status
        return f"https://127.0.0.1:{self.port}/images/{tid}"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _timed(fn: Any, *args: Any, **kw: Any) -> float:
    start = time.perf_counter()
    fn(*args, **kw)
    return time.perf_counter() - start


class PeakRSS:
    """The largest resident memory of a process and its descendants (the
    agent's qemu-nbd, imageio's workers), sampled every 20 ms in a thread."""

    def __init__(self, pid: int) -> None:
        import psutil
        self.proc = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        import psutil
        while not self._stop.wait(0.02):
            try:
                procs = [self.proc, *self.proc.children(recursive=True)]
                total = 0
                for p in procs:
                    with contextlib.suppress(psutil.Error):
                        total += p.memory_info().rss
            except psutil.Error:
                return
            self.peak = max(self.peak, total)

    def stop(self) -> float:
        """The peak, MiB."""
        self._stop.set()
        self._thread.join()
        return self.peak / MiB


def _dd(*args: str) -> float:
    start = time.perf_counter()
    subprocess.run(["dd", "bs=8M", "status=none", *args], check=True)
    return time.perf_counter() - start


async def _run(work: Path) -> dict[str, Any]:
    from ovirt_imageio import client

    src = work / "src.raw"
    with open(src, "wb") as f:
        block = os.urandom(8 * MiB)
        for _ in range(SIZE // len(block)):
            f.write(block[1:] + block[:1])      # not dedupable, not zero
            block = block[1:] + block[:1]
    agent = AgentProcess(work / "state").start(timeout=60)
    ca = str(agent.pki / "ca.pem")
    imageio = ImageioServer(work / "imageio", agent.pki)
    storage = work / "storage"
    storage.mkdir()
    assert agent.proc is not None and imageio.proc is not None
    rss = {"agent": PeakRSS(agent.proc.pid), "imageio": PeakRSS(imageio.proc.pid)}
    times: dict[str, list[float]] = {k: [] for k in (
        "agent_up", "imageio_up", "dd_up", "agent_down", "imageio_down", "dd_down")}
    try:
        async with agent.client() as c:
            conn, sd, _ = await localfs_domain(c, storage, ovfStore=False)
            try:
                for _ in range(ROUNDS):
                    # upload: agent, imageio, dd, each into a new sparse raw target
                    img, vol = new_id(), new_id()
                    job = new_id()
                    await c.call("createVolume", jobUUID=job, sdUUID=sd, imgUUID=img,
                                 volUUID=vol, size=SIZE, format="raw", preallocate="sparse")
                    await c.wait_job(job, timeout=60, poll=0.2)
                    t = await c.call("startTransfer", sdUUID=sd, imgUUID=img, volUUID=vol,
                                     direction="upload")
                    times["agent_up"].append(await asyncio.to_thread(
                        _timed, client.upload, str(src), t["url"], ca))
                    await c.call("finalizeTransfer", transferId=t["transferId"])
                    target = storage / "imageio.raw"
                    with open(target, "wb") as f:
                        f.truncate(SIZE)
                    url = imageio.ticket(target, ["write"])
                    times["imageio_up"].append(await asyncio.to_thread(
                        _timed, client.upload, str(src), url, ca))
                    times["dd_up"].append(_dd(f"if={src}", f"of={storage / 'dd.raw'}",
                                              "conv=fsync"))
                    # download: agent, imageio, dd, each to a new file in work/
                    t = await c.call("startTransfer", sdUUID=sd, imgUUID=img, volUUID=vol,
                                     direction="download")
                    out = work / "out.raw"
                    times["agent_down"].append(await asyncio.to_thread(
                        _timed, client.download, t["url"], str(out), ca, fmt="raw"))
                    await c.call("finalizeTransfer", transferId=t["transferId"])
                    out.unlink()
                    url = imageio.ticket(target, ["read"])
                    times["imageio_down"].append(await asyncio.to_thread(
                        _timed, client.download, url, str(out), ca, fmt="raw"))
                    out.unlink()
                    times["dd_down"].append(_dd(f"if={storage / 'dd.raw'}", f"of={out}",
                                                "conv=fsync"))
                    out.unlink()
                    for p in (target, storage / "dd.raw"):
                        p.unlink()
                    await c.call("deleteVolume", sdUUID=sd, imgUUID=img, volUUID=vol)
            finally:
                await drop_localfs_domain(c, conn, sd)
    finally:
        peak = {k: r.stop() for k, r in rss.items()}
        imageio.stop()
        agent.stop()
    mibs = {k: median([SIZE / MiB / s for s in v]) for k, v in times.items()}
    ratios = {d: median([i / a for a, i in zip(times[f"agent_{d}"], times[f"imageio_{d}"],
                                                   strict=True)])
              for d in ("up", "down")}
    return {"size": SIZE, "rounds": ROUNDS, "seconds": times, "mib_s": mibs,
            "agent_vs_imageio": ratios, "peak_rss_mib": peak}


def run() -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="bench-transfer-", dir="/var/tmp"))
    try:
        result = asyncio.run(_run(work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    save("transfer", result)
    return result


def report(r: dict[str, Any]) -> str:
    m = r["mib_s"]
    rows = [[d, m[f"agent_{k}"], m[f"imageio_{k}"], m[f"dd_{k}"], r["agent_vs_imageio"][k]]
            for d, k in (("upload", "up"), ("download", "down"))]
    out = table(rows, ["1 GiB, MiB/s", "agent", "imageio server", "dd", "agent/imageio"])
    peak = r.get("peak_rss_mib")
    if peak:
        out += (f"\npeak resident memory, process and children: agent {peak['agent']:.0f} MiB, "
                f"imageio server {peak['imageio']:.0f} MiB")
    return out
