"""Shared pieces of the benchmarks: medians, result files, a table printer."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench-results"


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def machine() -> dict[str, Any]:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"cpus": os.cpu_count(), "memory_gib": round(mem / 2**30, 1),
            "kernel": platform.release(), "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def save(name: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **data}, indent=2) + "\n")
    return path


def table(rows: list[list[Any]], header: list[str]) -> str:
    cells = [header] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def python_cmd(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def run_json(argv: list[str], timeout: float) -> dict[str, Any]:
    out = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                         check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


async def localfs_domain(c: Any, path: Path, name: str = "bench",
                         **kw: Any) -> tuple[dict[str, str], str, Path]:
    """Connect `path` as localfs and make a domain there: (connection, sdUUID,
    domain root)."""
    import uuid

    conn = {"id": str(uuid.uuid4()), "connection": str(path)}
    await c.call("connectStorageServer", domType="localfs", connectionParams=[conn])
    sd = str(uuid.uuid4())
    info = await c.call("createStorageDomain", sdUUID=sd, domType="localfs", name=name,
                        connectionId=conn["id"], **kw)
    return conn, sd, Path(info["path"])


async def reactivation_ms(c: Any, sd: str) -> float:
    """Deactivate the domain, then activate it: the activation's ms (it
    collects the domain's garbage, reading every volume's metadata afresh)."""
    await c.call("deactivateStorageDomain", sdUUID=sd)
    t = time.perf_counter()
    await c.call("activateStorageDomain", sdUUID=sd)
    return 1000 * (time.perf_counter() - t)


async def drop_localfs_domain(c: Any, conn: dict[str, str], sd: str) -> None:
    await c.call("formatStorageDomain", sdUUID=sd)
    await c.call("disconnectStorageServer", domType="localfs", connectionParams=[conn])


def run_in_guest(module: str, *args: str, timeout: float = 1500) -> dict[str, Any]:
    """Run `python -m module --guest args...` in the lab guest; its last
    stdout line is the JSON result."""
    vm_run = ROOT / "tests" / "lab" / "vm" / "vm-run.sh"
    argv = [str(vm_run), "--timeout", str(int(timeout)), "--", sys.executable, "-m", module,
            "--guest", *args]
    return run_json(argv, timeout=timeout + 100)
