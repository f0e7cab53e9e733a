"""The running agent's services, built once in main() and passed down."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from agent.config import Config
from agent.events import EventBus
from agent.host import Host
from agent.jobs import JobRegistry
from agent.locks import LockManager
from agent.metrics import Metrics


@dataclass
class Agent:
    config: Config
    events: EventBus
    metrics: Metrics
    jobs: JobRegistry
    host: Host
    locks: LockManager
    started: float = field(default_factory=time.time)

    @classmethod
    def create(cls, config: Config) -> Agent:
        events = EventBus(config.server.ws_queue_size)
        metrics = Metrics()
        jobs = JobRegistry(config.jobs, config.state_dir, events, metrics)
        host = Host(config.state_dir)
        return cls(config=config, events=events, metrics=metrics, jobs=jobs, host=host,
                   locks=LockManager())

    async def start(self) -> None:
        self.config.state_dir.mkdir(parents=True, exist_ok=True)
        self.host.load()
        await self.jobs.start()

    async def stop(self) -> None:
        await self.jobs.shutdown()
