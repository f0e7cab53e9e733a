"""The agent under load: 64 HTTP clients and 500 WebSocket clients over mutual
TLS for 60 s of mixed verbs, from two generator processes of their own.

Most clients loop over ping (50%), getVolumeInfo (30%) and getJobs (20%) on
a localfs domain; 8 HTTP and 4 WebSocket clients instead loop createVolume,
getJobs until the job is done, deleteVolume and clearJob. Every job's status
changes are also sent to all 500 WebSockets as notifications. Reported:
throughput, p50/p99 per verb, errors (must be 0), the agent's RSS and open
fds before and after, and bench-results/load-latency.svg (latency and
throughput per second).

    python -m tests.bench load                        # as part of make bench
    python -m tests.bench.load worker SPEC_FILE       # one generator (internal)
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import ssl
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from html import escape
from pathlib import Path
from typing import Any

import psutil

from rpc.client import client_ssl_context
from tests.agentproc import AgentProcess
from tests.bench.common import (
    RESULTS,
    ROOT,
    drop_localfs_domain,
    localfs_domain,
    python_cmd,
    save,
    table,
)
from tests.bench.gcpause import _gc_summary
from tests.bench.loadgen import exchange, post_request

GiB = 1024**3
READ_MIX = (("ping", 0.5), ("getVolumeInfo", 0.3), ("getJobs", 0.2))
VERBS = ("ping", "getVolumeInfo", "getJobs", "createVolume", "deleteVolume", "clearJob")
ENDED = ("done", "failed", "aborted")

Call = Callable[[str, dict[str, Any]], Awaitable[Any]]


class CallFailed(Exception):
    pass


# ---- the generator (its own process) ------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.t: list[float] = []
        self.verb: list[int] = []
        self.ms: list[float] = []
        self.errors = 0
        self.examples: list[str] = []
        self.start = 0.0

    def error(self, what: str) -> None:
        self.errors += 1
        if len(self.examples) < 5:
            self.examples.append(what)

    async def timed(self, call: Call, method: str, params: dict[str, Any]) -> Any:
        t = time.perf_counter()
        try:
            result = await call(method, params)
        except Exception as e:
            self.error(f"{method}: {e!r}"[:300])
            raise CallFailed from e
        self.t.append(t - self.start)
        self.verb.append(VERBS.index(method))
        self.ms.append(1000 * (time.perf_counter() - t))
        return result


def _unwrap(method: str, data: dict[str, Any]) -> Any:
    if "error" in data:
        raise RuntimeError(f"{method}: {data['error'].get('code')} "
                           f"{data['error'].get('message')}")
    return data["result"]


async def http_client(spec: dict[str, Any], ctx: ssl.SSLContext) -> Call:
    reader, writer = await asyncio.open_connection("127.0.0.1", spec["port"], ssl=ctx)
    ids = iter(range(1, 1 << 62))

    async def call(method: str, params: dict[str, Any]) -> Any:
        body = json.dumps({"jsonrpc": "2.0", "id": next(ids), "method": method,
                           "params": params}).encode()
        status, data = await exchange(reader, writer, post_request("127.0.0.1", "/jsonrpc",
                                                                   body))
        if status != b"200":
            raise RuntimeError(f"HTTP {status.decode()}")
        return _unwrap(method, json.loads(data))

    return call


async def ws_client(spec: dict[str, Any], session: Any) -> Call:
    import aiohttp

    ws = await session.ws_connect(f"https://127.0.0.1:{spec['port']}/jsonrpc/ws",
                                  autoping=True, max_msg_size=0)
    ids = iter(range(1, 1 << 62))

    async def call(method: str, params: dict[str, Any]) -> Any:
        rid = next(ids)
        await ws.send_str(json.dumps({"jsonrpc": "2.0", "id": rid, "method": method,
                                      "params": params}))
        while True:
            msg = await ws.receive()
            if msg.type != aiohttp.WSMsgType.TEXT:
                raise RuntimeError(f"WebSocket: {msg.type.name}")
            data = json.loads(msg.data)
            if data.get("id") == rid:  # else a notification (job.status)
                return _unwrap(method, data)

    return call


async def reader_loop(call: Call, rec: Recorder, spec: dict[str, Any], rng: random.Random,
                      until: float) -> None:
    verbs = [v for v, _ in READ_MIX]
    weights = [w for _, w in READ_MIX]
    while time.perf_counter() < until:
        verb = rng.choices(verbs, weights)[0]
        params: dict[str, Any] = {}
        if verb == "getVolumeInfo":
            img, vol = rng.choice(spec["volumes"])
            params = {"sdUUID": spec["sd"], "imgUUID": img, "volUUID": vol}
        elif verb == "getJobs":
            params = {"jobUUIDs": [spec["job"]]}
        try:
            await rec.timed(call, verb, params)
        except CallFailed:
            await asyncio.sleep(0.1)


async def writer_loop(call: Call, rec: Recorder, spec: dict[str, Any], until: float) -> None:
    """createVolume, wait for its job, deleteVolume: each cycle leaves nothing."""
    sd = spec["sd"]
    while time.perf_counter() < until:
        job, img, vol = (str(uuid.uuid4()) for _ in range(3))
        try:
            await rec.timed(call, "createVolume", {
                "jobUUID": job, "sdUUID": sd, "imgUUID": img, "volUUID": vol, "size": GiB,
                "format": "cow", "preallocate": "sparse"})
            while True:
                info = (await rec.timed(call, "getJobs", {"jobUUIDs": [job]}))[job]
                if info["status"] in ENDED:
                    break
                await asyncio.sleep(0.05)
            if info["status"] != "done":
                rec.error(f"createVolume job {info['status']}: {info.get('error')}")
            else:
                await rec.timed(call, "deleteVolume", {"sdUUID": sd, "imgUUID": img,
                                                       "volUUID": vol})
            await rec.timed(call, "clearJob", {"jobUUID": job})
        except CallFailed:
            await asyncio.sleep(0.1)


async def generate(spec: dict[str, Any]) -> dict[str, Any]:
    import aiohttp

    ctx = client_ssl_context(spec["ca"], spec["cert"], spec["key"])
    rec = Recorder()
    gate = asyncio.Semaphore(32)  # TLS handshakes at a time while connecting
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx, limit=0))

    async def connect() -> Call:
        async with gate:
            if spec["kind"] == "http":
                return await http_client(spec, ctx)
            return await ws_client(spec, session)

    try:
        t = time.perf_counter()
        calls = await asyncio.gather(*(connect() for _ in range(spec["clients"])))
        connect_s = time.perf_counter() - t
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        rec.start = time.perf_counter()
        until = rec.start + spec["seconds"]
        rng = random.Random(spec["seed"])
        loops = [writer_loop(c, rec, spec, until) if i < spec["writers"]
                 else reader_loop(c, rec, spec, random.Random(rng.random()), until)
                 for i, c in enumerate(calls)]
        await asyncio.gather(*loops)
        elapsed = time.perf_counter() - rec.start
        ended = time.monotonic()    # the machine's clock, as the agent's gcstats
    finally:
        await session.close()
    with open(spec["samples"], "w") as f:
        json.dump({"t": rec.t, "verb": rec.verb, "ms": rec.ms}, f)
    return {"requests": len(rec.ms), "errors": rec.errors, "examples": rec.examples,
            "elapsed": elapsed, "ended": ended, "connect_s": connect_s}


# ---- the run (parent process) ---------------------------------------------------------------


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * q))]


def _resources(proc: psutil.Process) -> dict[str, float]:
    return {"rss_mib": proc.memory_info().rss / 2**20, "fds": proc.num_fds()}


async def _quiet_full(agent: AgentProcess, load_end: float,
                      timeout: float = 15.0) -> dict[str, float] | None:
    """The full collection the agent runs once the calls stop (agent.gctune),
    seen in its /metrics (reading them is no call): how long after the load
    it ran and what it took; None if the agent reports none (an older tree,
    or none came within `timeout`)."""
    async with agent.client() as c:
        while time.monotonic() - load_end < timeout:
            status, body = await c.get("/metrics")
            assert status == 200, status
            found = dict(re.findall(
                r"^hostagent_gc_full_collection_seconds_(count|sum) (\S+)$",
                body.decode(), re.M))
            if not found:
                return None
            if float(found["count"]) >= 1:
                return {"after_s": time.monotonic() - load_end,
                        "ms": 1000 * float(found["sum"]) / float(found["count"])}
            await asyncio.sleep(0.25)
    return None


async def _setup(agent: AgentProcess, store: Path, volumes: int) -> dict[str, Any]:
    async with agent.client() as c:
        conn, sd, _ = await localfs_domain(c, store, ovfStore=False)
        vols, job = [], ""
        for _ in range(volumes):
            job, img, vol = (str(uuid.uuid4()) for _ in range(3))
            await c.call("createVolume", jobUUID=job, sdUUID=sd, imgUUID=img, volUUID=vol,
                         size=GiB, format="cow", preallocate="sparse")
            info = await c.wait_job(job, timeout=60, poll=0.2)
            assert info["status"] == "done", info
            vols.append([img, vol])
        return {"conn": conn, "sd": sd, "volumes": vols, "job": job}


async def _teardown(agent: AgentProcess, setup: dict[str, Any]) -> None:
    async with agent.client() as c:
        await drop_localfs_domain(c, setup["conn"], setup["sd"])


def run(seconds: float = 60.0, http_clients: int = 64, ws_clients: int = 500,
        http_writers: int = 8, ws_writers: int = 4) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-load-") as tmp:
        work = Path(tmp)
        (work / "store").mkdir()
        # the agent times each of its collections (tests/bench/gcstats)
        agent = AgentProcess(work / "agent", env={
            "HOSTAGENT_GC_STATS": str(work / "gc.json"),
            "PYTHONPATH": str(ROOT / "tests" / "bench" / "gcstats")}).start()
        workers: list[subprocess.Popen[str]] = []
        try:
            setup = asyncio.run(_setup(agent, work / "store", volumes=16))
            assert agent.proc is not None
            proc = psutil.Process(agent.proc.pid)
            before = _resources(proc)
            for kind, clients, writers in (("http", http_clients, http_writers),
                                           ("ws", ws_clients, ws_writers)):
                spec = {"kind": kind, "clients": clients, "writers": writers,
                        "port": agent.port, "ca": str(agent.pki / "ca.pem"),
                        "cert": str(agent.pki / "client.pem"),
                        "key": str(agent.pki / "client.key"), "sd": setup["sd"],
                        "volumes": setup["volumes"], "job": setup["job"],
                        "seconds": seconds, "seed": len(workers),
                        "samples": str(work / f"{kind}-samples.json")}
                (work / f"{kind}.json").write_text(json.dumps(spec))
                workers.append(subprocess.Popen(
                    python_cmd("tests.bench.load", "worker", str(work / f"{kind}.json")),
                    cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                    env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}))
            for w in workers:
                assert w.stdout is not None
                line = w.stdout.readline()
                assert line.strip() == "ready", f"generator did not connect: {line!r}"
            for w in workers:
                assert w.stdin is not None
                w.stdin.write("go\n")
                w.stdin.flush()
            # The agent's own figures each second, while the generators run.
            timeline = []
            start = time.monotonic()
            while any(w.poll() is None for w in workers):
                timeline.append({"t": time.monotonic() - start, **_resources(proc)})
                time.sleep(1.0)
                if time.monotonic() - start > seconds + 60:
                    raise RuntimeError("the generators did not end")
            gens = {}
            for kind, w in zip(("http", "ws"), workers, strict=True):
                out, _ = w.communicate()
                assert w.returncode == 0, f"{kind} generator failed"
                gens[kind] = json.loads(out.strip().splitlines()[-1])
                gens[kind]["samples"] = json.loads((work / f"{kind}-samples.json").read_text())
            # collections of the load only: from the go to the last call's
            # answer (not the generators' exit, which writing their samples
            # delays past the agent's quiet full collection on long runs)
            window = (start, max(g["ended"] for g in gens.values()))
            after = _resources(proc)
            quiet_full = asyncio.run(_quiet_full(agent, window[1]))
            asyncio.run(_teardown(agent, setup))
        finally:
            for w in workers:
                if w.poll() is None:
                    w.kill()
                    w.wait()
            agent.stop()
        gc_pauses = _gc_summary(json.loads((work / "gc.json").read_text()), [window])
    summary = _summarize(gens, seconds)
    summary["gc"] = gc_pauses
    summary["gc_quiet_full"] = quiet_full
    summary.update({"agent_before": before, "agent_after": after, "agent_timeline": timeline,
                    "params": {"seconds": seconds, "http_clients": http_clients,
                               "ws_clients": ws_clients, "http_writers": http_writers,
                               "ws_writers": ws_writers, "read_mix": dict(READ_MIX)}})
    summary["plot"] = str(_plot(summary).relative_to(ROOT))
    save("load", summary)
    return summary


def _summarize(gens: dict[str, Any], seconds: float) -> dict[str, Any]:
    out: dict[str, Any] = {"errors": 0, "error_examples": [], "transports": {}, "verbs": {},
                           "series": {}}
    per_verb: dict[str, list[float]] = {v: [] for v in VERBS}
    for kind, g in gens.items():
        s = g["samples"]
        out["errors"] += g["errors"]
        out["error_examples"] += g["examples"]
        out["transports"][kind] = {"requests": g["requests"], "rps": g["requests"] / g["elapsed"],
                                   "p50_ms": _pct(s["ms"], 0.5), "p99_ms": _pct(s["ms"], 0.99),
                                   "connect_s": g["connect_s"]}
        for verb, ms in zip(s["verb"], s["ms"], strict=True):
            per_verb[VERBS[verb]].append(ms)
        # Per second of the run: requests, p50 and p99 of what started then.
        buckets: list[list[float]] = [[] for _ in range(int(seconds) + 1)]
        for t, ms in zip(s["t"], s["ms"], strict=True):
            buckets[min(int(t), len(buckets) - 1)].append(ms)
        out["series"][kind] = [{"t": i, "requests": len(b), "p50_ms": _pct(b, 0.5),
                                "p99_ms": _pct(b, 0.99)} for i, b in enumerate(buckets) if b]
    total = sum(t["requests"] for t in out["transports"].values())
    out["rps"] = total / seconds
    out["verbs"] = {v: {"count": len(ms), "p50_ms": _pct(ms, 0.5), "p99_ms": _pct(ms, 0.99)}
                    for v, ms in per_verb.items() if ms}
    return out


def _plot(s: dict[str, Any]) -> Path:
    """Two panels, per second of the run: p50/p99 latency (log scale) and
    requests, for each transport."""
    import math

    width, left, right, panel_h, top = 820, 70, 20, 230, 50
    colors = {"http": "#3465a4", "ws": "#cc0000"}
    secs = max((p["t"] for series in s["series"].values() for p in series), default=1) + 1
    plot_w = width - left - right

    def x(t: float) -> float:
        return left + plot_w * t / secs

    parts = []
    # Panel 1: latency, log10 from 0.1 ms up.
    lat_values = [p[k] for series in s["series"].values() for p in series
                  for k in ("p50_ms", "p99_ms")]
    hi = math.ceil(math.log10(max([*lat_values, 1.0])))
    lo = -1
    y0 = top

    def y_lat(ms: float) -> float:
        v = min(max(math.log10(max(ms, 0.1)), lo), hi)
        return y0 + panel_h * (1 - (v - lo) / (hi - lo))

    for e in range(lo, hi + 1):
        yy = y_lat(10.0**e)
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{yy:.1f}" y2="{yy:.1f}" '
                     f'stroke="#ddd"/><text x="{left - 6}" y="{yy + 4:.1f}" font-size="11" '
                     f'text-anchor="end">{10.0**e:g} ms</text>')
    for kind, series in s["series"].items():
        for key, dash in (("p50_ms", ""), ("p99_ms", ' stroke-dasharray="5,3"')):
            pts = " ".join(f"{x(p['t'] + 0.5):.1f},{y_lat(p[key]):.1f}" for p in series)
            parts.append(f'<polyline points="{pts}" fill="none" stroke="{colors[kind]}" '
                         f'stroke-width="1.5"{dash}/>')
    # Panel 2: requests per second.
    y1 = top + panel_h + 50
    peak = max((p["requests"] for series in s["series"].values() for p in series), default=1)

    def y_rps(n: float) -> float:
        return y1 + panel_h * (1 - n / peak)

    for frac in (0, 0.5, 1):
        yy = y_rps(peak * frac)
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{yy:.1f}" y2="{yy:.1f}" '
                     f'stroke="#ddd"/><text x="{left - 6}" y="{yy + 4:.1f}" font-size="11" '
                     f'text-anchor="end">{peak * frac:.0f}</text>')
    for kind, series in s["series"].items():
        pts = " ".join(f"{x(p['t'] + 0.5):.1f},{y_rps(p['requests']):.1f}" for p in series)
        parts.append(f'<polyline points="{pts}" fill="none" stroke="{colors[kind]}" '
                     f'stroke-width="1.5"/>')
    for t in range(0, int(secs) + 1, 10):
        parts.append(f'<text x="{x(t):.1f}" y="{y1 + panel_h + 16}" font-size="11" '
                     f'text-anchor="middle">{t} s</text>')
    p = s["params"]
    b, a = s["agent_before"], s["agent_after"]
    title = (f"agent under load: {p['http_clients']} HTTP + {p['ws_clients']} WebSocket "
             f"mTLS clients, {s['rps']:.0f} req/s, {s['errors']} errors; RSS "
             f"{b['rss_mib']:.0f} → {a['rss_mib']:.0f} MiB, fds {b['fds']:.0f} → "
             f"{a['fds']:.0f}")
    legend = []
    lx = left
    for kind in s["series"]:
        legend.append(f'<line x1="{lx}" x2="{lx + 24}" y1="38" y2="38" '
                      f'stroke="{colors[kind]}" stroke-width="2"/><text x="{lx + 30}" y="42" '
                      f'font-size="11">{kind}</text>')
        lx += 80
    legend.append(f'<text x="{lx}" y="42" font-size="11">solid p50, dashed p99 '
                  f'(per second, log scale)</text>')
    height = y1 + panel_h + 30
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif"><rect width="100%" height="100%" fill="white"/>'
           f'<text x="8" y="20" font-size="13">{escape(title)}</text>' + "".join(legend)
           + f'<text x="8" y="{y1 - 12}" font-size="12">requests per second</text>'
           + "".join(parts) + "</svg>\n")
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "load-latency.svg"
    path.write_text(svg)
    return path


def report(s: dict[str, Any]) -> str:
    p = s["params"]
    rows = [[v, d["count"], d["count"] / p["seconds"], d["p50_ms"], d["p99_ms"]]
            for v, d in s["verbs"].items()]
    trows = [[k, d["requests"], d["rps"], d["p50_ms"], d["p99_ms"], d["connect_s"]]
             for k, d in s["transports"].items()]
    b, a = s["agent_before"], s["agent_after"]
    peak_rss = max(x["rss_mib"] for x in s["agent_timeline"])
    peak_fds = max(x["fds"] for x in s["agent_timeline"])
    return (f"{p['http_clients']} HTTP + {p['ws_clients']} WebSocket clients (mTLS), "
            f"{p['seconds']:.0f} s of mixed verbs: {s['rps']:.0f} req/s, "
            f"errors {s['errors']}" + (f" e.g. {s['error_examples'][:2]}" if s["errors"] else "")
            + "\n" + table(rows, ["verb", "calls", "per s", "p50 ms", "p99 ms"]) + "\n"
            + table(trows, ["transport", "calls", "req/s", "p50 ms", "p99 ms", "connect s"])
            + f"\nagent RSS {b['rss_mib']:.0f} -> {a['rss_mib']:.0f} MiB (peak {peak_rss:.0f}), "
              f"open fds {b['fds']:.0f} -> {a['fds']:.0f} (peak {peak_fds:.0f}); "
              f"chart {s['plot']}\n" + _gc_line(s.get("gc")) + _quiet_line(s))


def _quiet_line(s: dict[str, Any]) -> str:
    full = s.get("gc_quiet_full")
    if full is None:
        return "\nfull collection once the calls stopped: none reported"
    return (f"\nfull collection once the calls stopped: {full['after_s']:.1f} s after the "
            f"load, {full['ms']:.1f} ms")


def _gc_line(gc: dict[str, Any] | None) -> str:
    if gc is None:
        return "GC: not measured"
    by_gen = "/".join(f"{w:.1f}" for w in gc["max_ms_by_gen"])
    cpu_by_gen = "/".join(f"{c:.1f}" for c in gc["max_cpu_ms_by_gen"])
    return (f"GC during the load: longest pause {gc['max_ms']:.1f} ms wall, "
            f"{gc['max_cpu_ms']:.1f} ms CPU; longest per generation 0/1/2 {by_gen} ms wall, "
            f"{cpu_by_gen} ms CPU (median "
            f"{'/'.join(f'{c:.1f}' for c in gc['p50_cpu_ms_by_gen'])}); "
            f"{gc['over_10ms']} over 10 ms; collections {'/'.join(map(str, gc['count']))}, "
            f"total {gc['total_ms']:.0f} ms")


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        spec = json.loads(Path(sys.argv[2]).read_text())
        print(json.dumps(asyncio.run(generate(spec))))
    else:
        summary = run(*(float(a) for a in sys.argv[1:2]))
        print(report(summary))
