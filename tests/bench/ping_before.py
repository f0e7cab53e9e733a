"""The ping benchmark (tests/bench/ping.py) with a third server in the same
turns: the agent of another tree (the code before a change), so that a
before/after figure shares the machine's noise with the bare baseline.

    git archive REV | tar -x -C /tmp/before
    python -m tests.bench.ping_before /tmp/before [RUNS] [SECONDS]

Prints one JSON object: per server the medians (req/s, p50, p99, server CPU
us per request), the CPU ratio of each agent to bare aiohttp per run and
overall, the p99 ratios, and the load average at each run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import psutil

import tests.agentproc as agentproc
from tests.bench.common import ROOT, median, python_cmd
from tests.bench.ping import REQUEST, _measure

KEYS = ("rps", "p50_ms", "p99_ms", "server_cpu_us_per_req")


def run(before: Path, runs: int = 6, seconds: float = 5.0, conc: int = 64) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-ping-before-") as tmp:
        new = agentproc.AgentProcess(Path(tmp) / "after").start()
        # AgentProcess starts `python -m agent.daemon` in ROOT with ROOT first
        # on PYTHONPATH: the other tree's agent is started from that tree
        here, agentproc.ROOT = agentproc.ROOT, before
        try:
            old = agentproc.AgentProcess(Path(tmp) / "before").start()
        finally:
            agentproc.ROOT = here
        port = agentproc.free_port()
        bare = subprocess.Popen(python_cmd("tests.bench.bare_server", str(new.pki), str(port)),
                                cwd=ROOT, stdout=subprocess.PIPE, text=True,
                                env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin"})
        results: dict[str, list[dict[str, Any]]] = {"after": [], "before": [], "bare": []}
        try:
            assert bare.stdout is not None and "ready" in bare.stdout.readline()
            assert new.proc is not None and old.proc is not None
            body = Path(tmp) / "ping.json"
            body.write_bytes(REQUEST)
            targets = {
                "after": (new.url + "/jsonrpc", new.pki, psutil.Process(new.proc.pid)),
                "before": (old.url + "/jsonrpc", old.pki, psutil.Process(old.proc.pid)),
                "bare": (f"https://127.0.0.1:{port}/jsonrpc", new.pki, psutil.Process(bare.pid)),
            }
            for url, pki, proc in targets.values():     # warm up
                _measure(url, pki, proc, body, conc, 1.0)
            names = list(targets)
            for i in range(runs):
                for name in names[i % 3:] + names[:i % 3]:
                    url, pki, proc = targets[name]
                    r = _measure(url, pki, proc, body, conc, seconds)
                    r["load1"] = os.getloadavg()[0]
                    results[name].append(r)
        finally:
            bare.terminate()
            bare.wait(10)
            new.stop()
            old.stop()
    out: dict[str, Any] = {}
    for name, rs in results.items():
        out[name] = {k: median([r[k] for r in rs]) for k in KEYS}
        out[name]["errors"] = sum(r["errors"] for r in rs)
    cpu = "server_cpu_us_per_req"
    for name in ("after", "before"):
        out[f"ratio_cpu_{name}"] = out["bare"][cpu] / out[name][cpu]
        out[f"ratio_cpu_{name}_per_run"] = [b[cpu] / a[cpu] for a, b in
                                            zip(results[name], results["bare"], strict=True)]
        out[f"p99_vs_bare_{name}"] = out[name]["p99_ms"] / out["bare"]["p99_ms"]
    out["load1"] = [r["load1"] for r in results["after"]]
    out["params"] = {"runs": runs, "seconds": seconds, "concurrency": conc,
                     "before": str(before)}
    return out


if __name__ == "__main__":
    args = sys.argv[1:]
    print(json.dumps(run(Path(args[0]), *(int(args[1]),) if len(args) > 1 else (),
                         *(float(args[2]),) if len(args) > 2 else ())))
