"""The agent's collector once started (issue 21): start-up's objects frozen
out of every collection, gen0 collected less often; HOSTAGENT_GC_DEFAULTS=1
keeps Python's defaults. Each case runs in a fresh interpreter, not to
change this one's collector."""

from __future__ import annotations

import json
import os
import subprocess
import sys

PROBE = ("import gc, json; from agent.daemon import tune_gc; tune_gc(); "
         "print(json.dumps([gc.get_freeze_count(), gc.get_threshold()]))")


def probe(env: dict[str, str]) -> tuple[int, list[int]]:
    out = subprocess.run([sys.executable, "-c", PROBE], check=True, capture_output=True,
                         text=True, env={**os.environ, **env}, timeout=60).stdout
    frozen, threshold = json.loads(out)
    return frozen, threshold


def test_tune_gc_freezes_start_up_and_raises_gen0() -> None:
    frozen, threshold = probe({"HOSTAGENT_GC_DEFAULTS": ""})
    assert frozen > 1000       # agent.daemon's imports alone
    assert threshold[0] == 10_000


def test_gc_defaults_kept_on_request() -> None:
    frozen, threshold = probe({"HOSTAGENT_GC_DEFAULTS": "1"})
    assert frozen == 0
    assert threshold[0] == 700
