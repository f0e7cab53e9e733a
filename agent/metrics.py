"""Prometheus metrics of one agent: calls by verb and outcome, latency,
jobs by state, event-loop lag. A registry per agent, not the global one, so
tests can run several agents in one process."""

from __future__ import annotations

import asyncio
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.calls = Counter("hostagent_rpc_calls", "JSON-RPC calls by verb and outcome",
                             ["verb", "outcome"], registry=self.registry)
        self.latency = Histogram("hostagent_rpc_latency_seconds", "JSON-RPC call latency",
                                 ["verb"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.jobs = Gauge("hostagent_jobs", "Jobs known to the agent by state", ["state"],
                          registry=self.registry)
        self.loop_lag = Gauge("hostagent_event_loop_lag_seconds",
                              "Last measured event loop lag", registry=self.registry)
        self.loop_lag_max = Gauge("hostagent_event_loop_lag_max_seconds",
                                  "Largest event loop lag since start", registry=self.registry)
        self.transfer_bytes = Counter("hostagent_transfer_bytes",
                                      "Bytes moved by disk transfers (data listener)",
                                      ["direction"], registry=self.registry)
        self.volume_extends = Counter(
            "hostagent_volume_extends", "Extensions of thin volumes by outcome (ok, failed)",
            ["outcome"], registry=self.registry)
        self.ws_clients = Gauge("hostagent_websocket_clients", "Connected WebSocket clients",
                                registry=self.registry)
        self.gc_full = Histogram("hostagent_gc_full_collection_seconds",
                                 "Full garbage collections run by the agent (agent.gctune)",
                                 buckets=LATENCY_BUCKETS, registry=self.registry)

    def calls_answered(self) -> int:
        """Calls answered so far, every verb and outcome (agent.gctune's quiet
        moments: read once a second, not counted again on the call path)."""
        return int(sum(s.value for m in self.calls.collect() for s in m.samples
                       if s.name.endswith("_total")))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def watch_loop_lag(self, interval: float = 0.25) -> None:
        """Measure how late a timer fires: the time the loop was blocked."""
        loop = asyncio.get_running_loop()
        worst = 0.0
        while True:
            start = loop.time()
            await asyncio.sleep(interval)
            lag = max(0.0, loop.time() - start - interval)
            worst = max(worst, lag)
            self.loop_lag.set(lag)
            self.loop_lag_max.set(worst)


def now() -> float:
    return time.time()
