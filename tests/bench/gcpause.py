"""Garbage collection pauses under ping load (issue 21): two agents side by
side, one with Python's collector defaults (HOSTAGENT_GC_DEFAULTS=1), one as
shipped (gc.freeze() after start-up, full collections at quiet moments: see
agent.gctune), loaded in turns by the same 64 mTLS ping clients.
Each agent times its collections with gc.callbacks (tests/bench/gcstats).

    python -m tests.bench gcpause
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from tests.agentproc import AgentProcess
from tests.bench.common import ROOT, median, save, table
from tests.bench.ping import REQUEST, _measure

SIDES = {"defaults": {"HOSTAGENT_GC_DEFAULTS": "1"}, "tuned": {}}


def _gc_summary(pauses: list[list[Any]], windows: list[tuple[float, float]]) -> dict[str, Any]:
    """The collections that started inside the load windows (not start-up's)."""
    inside = [(p[1], p[2], p[3] if len(p) > 3 else p[2]) for p in pauses
              if any(a <= p[0] <= b for a, b in windows)]
    return {"max_ms": max((ms for _, ms, _ in inside), default=0.0),
            "max_gen2_ms": max((ms for gen, ms, _ in inside if gen == 2), default=0.0),
            # the collector's own CPU time (wall time adds the machine's preemption)
            "max_cpu_ms": max((cpu for _, _, cpu in inside), default=0.0),
            "max_ms_by_gen": [max((ms for g, ms, _ in inside if g == gen), default=0.0)
                              for gen in range(3)],
            "max_cpu_ms_by_gen": [max((c for g, _, c in inside if g == gen), default=0.0)
                                  for gen in range(3)],
            "p50_cpu_ms_by_gen": [median([c for g, _, c in inside if g == gen] or [0.0])
                                  for gen in range(3)],
            "over_10ms": sum(1 for _, ms, _ in inside if ms > 10),
            "count": [sum(1 for g, _, _ in inside if g == gen) for gen in range(3)],
            "total_ms": sum(ms for _, ms, _ in inside)}


def run(runs: int = 6, seconds: float = 5.0, conc: int = 64) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-gcpause-") as tmp:
        work = Path(tmp)
        agents: dict[str, AgentProcess] = {}
        try:
            for name, env in SIDES.items():
                agents[name] = AgentProcess(work / name, env={
                    **env, "HOSTAGENT_GC_STATS": str(work / f"{name}.json"),
                    "PYTHONPATH": str(ROOT / "tests" / "bench" / "gcstats")}).start()
            body = work / "ping.json"
            body.write_bytes(REQUEST)
            targets = {}
            for name, agent in agents.items():
                assert agent.proc is not None
                targets[name] = (agent.url + "/jsonrpc", psutil.Process(agent.proc.pid))
            for url, proc in targets.values():  # warm up
                _measure(url, agents["tuned"].pki, proc, body, conc, 1.0)
            results: dict[str, list[dict[str, Any]]] = {name: [] for name in SIDES}
            windows: dict[str, list[tuple[float, float]]] = {name: [] for name in SIDES}
            for i in range(runs):
                order = list(SIDES) if i % 2 == 0 else list(reversed(SIDES))
                for name in order:
                    url, proc = targets[name]
                    start = time.monotonic()
                    results[name].append(_measure(url, agents[name].pki, proc, body, conc,
                                                  seconds))
                    windows[name].append((start, time.monotonic()))
        finally:
            for agent in agents.values():
                agent.stop()
        gcs = {name: _gc_summary(json.loads((work / f"{name}.json").read_text()),
                                 windows[name]) for name in SIDES}
    summary: dict[str, Any] = {}
    for name, rs in results.items():
        summary[name] = {k: median([r[k] for r in rs]) for k in
                         ("rps", "p50_ms", "p99_ms", "server_cpu_us_per_req")}
        summary[name]["errors"] = sum(r["errors"] for r in rs)
        summary[name]["gc"] = gcs[name]
    summary["params"] = {"runs": runs, "seconds": seconds, "concurrency": conc}
    summary["runs"] = results
    save("gcpause", summary)
    return summary


def report(s: dict[str, Any]) -> str:
    rows = [[name, s[name]["rps"], s[name]["p50_ms"], s[name]["p99_ms"],
             s[name]["server_cpu_us_per_req"], s[name]["gc"]["max_ms"],
             "/".join(str(c) for c in s[name]["gc"]["count"]),
             s[name]["gc"]["total_ms"], s[name]["errors"]] for name in SIDES]
    p = s["params"]
    return (f"ping, {p['concurrency']} mTLS clients, median of {p['runs']} x {p['seconds']} s "
            "per side, in turns\n"
            + table(rows, ["gc", "req/s", "p50 ms", "p99 ms", "server CPU us/req",
                           "longest GC ms", "collections gen0/1/2", "GC total ms", "errors"])
            + "\n(collections counted in the load windows only; CPU per request and the"
              " p99 are medians of the runs)")
