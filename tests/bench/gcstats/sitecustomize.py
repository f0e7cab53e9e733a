"""Loaded (through PYTHONPATH) into an agent started by `python -m tests.bench
gcpause`: times every garbage collection with gc.callbacks and writes, at
exit, each collection as [monotonic start, generation, ms] to the file named
by HOSTAGENT_GC_STATS (CLOCK_MONOTONIC is the machine's: the benchmark keeps
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
_pauses: list[list[Any]] = []


def _callback(phase: str, info: dict[str, int]) -> None:
    global _start
    if phase == "start":
        _start = time.monotonic()
        return
    _pauses.append([_start, info["generation"], 1000 * (time.monotonic() - _start)])


def _write() -> None:
    assert _OUT is not None
    with open(_OUT, "w") as f:
        json.dump(_pauses, f)


if _OUT:
    gc.callbacks.append(_callback)
    atexit.register(_write)
