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


async def test_full_collection_waits_for_a_quiet_moment(collector: FakeCollector) -> None:
    calls = 0
    task = asyncio.create_task(gctune.collect_quietly(lambda: calls, quiet=0.1,
                                                      force_after=60, check=0.01))
    try:
        collector.old = 3
        busy_until = time.monotonic() + 0.5
        while time.monotonic() < busy_until:      # a call every 5 ms: never quiet
            calls += 1
            await asyncio.sleep(0.005)
        assert collector.full == 0
        await asyncio.wait_for(collector.collected.wait(), 5)   # calls stopped
        assert collector.full == 1
        # quiet, but nothing new in the old generation: no second one
        idle_until = time.monotonic() + 0.3
        while time.monotonic() < idle_until:
            await asyncio.sleep(0.01)
        assert collector.full == 1
    finally:
        task.cancel()


async def test_full_collection_forced_under_endless_load(collector: FakeCollector) -> None:
    calls = 0
    task = asyncio.create_task(gctune.collect_quietly(lambda: calls, quiet=60,
                                                      force_after=0.2, check=0.01))
    try:
        collector.old = 1
        started = time.monotonic()
        while not collector.collected.is_set():
            assert time.monotonic() - started < 5
            calls += 1
            await asyncio.sleep(0.005)
        assert time.monotonic() - started >= 0.2
    finally:
        task.cancel()
