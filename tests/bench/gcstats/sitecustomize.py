"""Loaded (through PYTHONPATH) into an agent started by `python -m tests.bench
gcpause`: times every garbage collection with gc.callbacks and writes, at
exit, each collection as [monotonic start, generation, ms, CPU ms of the
collecting thread] to the file named by HOSTAGENT_GC_STATS (wall time
includes the machine's preemption of the agent; CPU time is the
collector's own work) (CLOCK_MONOTONIC is the machine's: the benchmark keeps
those within its load windows)."""

from __future__ import annotations

import atexit
import gc
import json
import os
import time
from typing import Any

_OUT = os.environ.get("HOSTAGENT_GC_STATS")
_start = 0.0
_cpu = 0.0
_pauses: list[list[Any]] = []


def _callback(phase: str, info: dict[str, int]) -> None:
    global _start, _cpu
    if phase == "start":
        _start = time.monotonic()
        _cpu = time.thread_time()
        return
    _pauses.append([_start, info["generation"], 1000 * (time.monotonic() - _start),
                    1000 * (time.thread_time() - _cpu)])


def _write() -> None:
    assert _OUT is not None
    with open(_OUT, "w") as f:
        json.dump(_pauses, f)


if _OUT:
    gc.callbacks.append(_callback)
    atexit.register(_write)
