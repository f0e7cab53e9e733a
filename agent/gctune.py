"""The agent's garbage collector once started (issue 21): start-up's objects
frozen out of sight, young collections rare, and the older generations
(where every connection's state ends up) collected by the agent itself at
a quiet moment, never by the collector in the middle of a request.

Why, measured under the load benchmark (64 HTTP + 500 WebSocket mTLS
clients, `python -m tests.bench load`, 2026-12-05, BENCHMARKS.md): CPython
3.11 walks a generation in one go, so a collection pauses the loop for its
whole walk. With gen0 at 10,000 a young collection runs 4-7 times a minute
(the requests' garbage is acyclic, freed by reference counting) and walks
the requests in flight: 6-14 ms. The generation-1 collection that followed
the 564 clients connecting at once walked their ~100,000 objects of
connection state in one piece: 18-44 ms, the run's longest pause. A gen0
threshold of 2,000 (gen1 at 5 or 10) made it no better: each of the 200
generation-1 collections a minute then walked the requests in flight again
(6-25 ms, up to 50 a run over 10 ms) and 3-5 s of collection a minute. So the
collector only ever runs young collections here (the gen1 and gen2
thresholds are out of reach): what survives one waits in generation 1,
unwalked, and `collect_quietly` runs a full collection when no call has
come for QUIET seconds (11-50 ms, while nobody waits), or, under load that
never pauses, FORCE_AFTER seconds after the last: cyclic garbage that
outlived a young collection waits at most that long.

HOSTAGENT_GC_DEFAULTS=1 keeps Python's defaults (the benchmark's other side).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import time
from collections.abc import Callable

log = logging.getLogger("agent.gc")

GEN0_THRESHOLD = 10_000
# Never reached: the collector starts no generation-1 or full collection.
GEN1_THRESHOLD = 1 << 30
GEN2_THRESHOLD = 1 << 30
QUIET = 2.0             # s without a call before a full collection
FORCE_AFTER = 600.0     # s at most between full collections, quiet or not
CHECK = 1.0             # s between looks


def defaults_kept() -> bool:
    return os.environ.get("HOSTAGENT_GC_DEFAULTS") == "1"


def tune_gc() -> None:
    """Once started: move what start-up made (modules, the verb table, the
    config, the domains) out of the collector's sight (no collection walks
    it again), and set the thresholds above."""
    if defaults_kept():
        return
    gc.collect()
    gc.freeze()
    gc.set_threshold(GEN0_THRESHOLD, GEN1_THRESHOLD, GEN2_THRESHOLD)


async def collect_quietly(calls: Callable[[], int], *, quiet: float = QUIET,
                          force_after: float = FORCE_AFTER, check: float = CHECK,
                          done: Callable[[float], None] = lambda _: None) -> None:
    """Run the full collections (see the module's doc): `calls()` counts the
    calls answered so far; a full collection once it has not changed for
    `quiet` seconds, or `force_after` seconds after the last one, and only
    if a young collection has promoted anything since. `done(s)`
    after each, with its duration."""
    if defaults_kept():
        return
    last_full = quiet_since = time.monotonic()
    seen = calls()
    while True:
        await asyncio.sleep(check)
        now = time.monotonic()
        if (n := calls()) != seen:
            seen, quiet_since = n, now
        if gc.get_count()[1:] == (0, 0):
            continue        # no young collection since the last: nothing promoted
        if now - quiet_since >= quiet or now - last_full >= force_after:
            start = time.perf_counter()
            found = gc.collect()
            took = time.perf_counter() - start
            last_full = time.monotonic()
            done(took)
            log.debug("Full collection: %d unreachable, %.1f ms", found, 1000 * took)
