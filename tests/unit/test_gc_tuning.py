"""The agent's collector once started (issue 21, agent.gctune): start-up's
objects frozen out of every collection, young collections only, and full
collections run by the agent at a quiet moment (or forced under endless
load), never by the collector; HOSTAGENT_GC_DEFAULTS=1 keeps Python's
defaults. The thresholds are probed in a fresh interpreter, not to change
this one's collector."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

import pytest

from agent import gctune

PROBE = ("import gc, json; from agent.gctune import tune_gc; tune_gc(); "
         "print(json.dumps([gc.get_freeze_count(), gc.get_threshold()]))")


def probe(env: dict[str, str]) -> tuple[int, list[int]]:
    out = subprocess.run([sys.executable, "-c", PROBE], check=True, capture_output=True,
                         text=True, env={**os.environ, **env}, timeout=60).stdout
    frozen, threshold = json.loads(out)
    return frozen, threshold


def test_tune_gc_freezes_start_up_and_leaves_full_collections_to_the_agent() -> None:
    frozen, threshold = probe({"HOSTAGENT_GC_DEFAULTS": ""})
    assert frozen > 1000       # agent.daemon's imports alone
    assert threshold == [10_000, 1 << 30, 1 << 30]


def test_gc_defaults_kept_on_request() -> None:
    frozen, threshold = probe({"HOSTAGENT_GC_DEFAULTS": "1"})
    assert frozen == 0
    assert threshold[0] == 700


class FakeCollector:
    """gc.get_count and gc.collect as agent.gctune sees them: `old` is the
    count of young collections since the last full one."""

    def __init__(self) -> None:
        self.old = 0
        self.full = 0
        self.collected = asyncio.Event()

    def get_count(self) -> tuple[int, int, int]:
        return (0, self.old, 0)

    def collect(self, generation: int = 2) -> int:
        assert generation == 2
        self.full += 1
        self.old = 0
        self.collected.set()
        return 0


@pytest.fixture
def collector(monkeypatch: pytest.MonkeyPatch) -> FakeCollector:
    fake = FakeCollector()
    monkeypatch.setattr(gctune.gc, "get_count", fake.get_count)
    monkeypatch.setattr(gctune.gc, "collect", fake.collect)
    monkeypatch.delenv("HOSTAGENT_GC_DEFAULTS", raising=False)
    return fake


class Calls:
    """The calls answered, as collect_quietly reads them: while `busy`, a
    new call at each of its looks (never quiet, however late the loop runs
    it); the looks counted."""

    def __init__(self) -> None:
        self.busy = True
        self.count = 0
        self.looks = 0
        self.looked = asyncio.Event()

    def __call__(self) -> int:
        self.looks += 1
        self.looked.set()
        self.count += self.busy
        return self.count

    async def wait_looks(self, n: int) -> None:
        while self.looks < n:
            self.looked.clear()
            await asyncio.wait_for(self.looked.wait(), 5)


def quiet_collector(calls: Calls, **timing: float) -> asyncio.Task[None]:
    return asyncio.create_task(gctune.collect_quietly(calls, check=0.01, **timing))


async def test_full_collection_waits_for_a_quiet_moment(collector: FakeCollector) -> None:
    calls = Calls()
    task = quiet_collector(calls, quiet=0.05, force_after=60)
    try:
        collector.old = 3
        await calls.wait_looks(30)          # busy through 30 looks, 0.3 s at least
        assert collector.full == 0
        calls.busy = False
        await asyncio.wait_for(collector.collected.wait(), 5)
        assert collector.full == 1
        # quiet, but no young collection since: no second one
        await calls.wait_looks(calls.looks + 20)
        assert collector.full == 1
    finally:
        task.cancel()


async def test_full_collection_forced_under_endless_load(collector: FakeCollector) -> None:
    calls = Calls()
    started = time.monotonic()
    task = quiet_collector(calls, quiet=60, force_after=0.2)
    try:
        collector.old = 1
        await asyncio.wait_for(collector.collected.wait(), 5)
        assert time.monotonic() - started >= 0.2
        assert calls.busy and collector.full == 1
    finally:
        task.cancel()


def test_calls_answered_counts_every_verb_and_outcome() -> None:
    from agent.metrics import Metrics
    m = Metrics()
    assert m.calls_answered() == 0
    m.calls.labels("ping", "ok").inc()
    m.calls.labels("ping", "ok").inc()
    m.calls.labels("createVolume", "invalid").inc()
    assert m.calls_answered() == 3
