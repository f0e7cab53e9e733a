"""Server notifications: a bus that fans events out to WebSocket clients.

Each subscriber has a bounded queue. A client that does not read fast enough
is dropped (its queue overflows) rather than letting memory grow: the engine
reconnects and re-reads state with getJobs.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger("agent.events")


class Notification(dict[str, Any]):
    """A JSON-RPC notification, serialized once when published: every
    WebSocket client sends the same text (500 clients dumped it 500 times)."""

    __slots__ = ("text",)

    def __init__(self, method: str, params: dict[str, Any]) -> None:
        super().__init__(jsonrpc="2.0", method=method, params=params)
        self.text = json.dumps(self)


class Subscriber:
    def __init__(self, maxsize: int, wake: Callable[[], None] | None = None) -> None:
        self.queue: asyncio.Queue[Notification] = asyncio.Queue(maxsize)
        self.overflowed = asyncio.Event()
        # called after each event queued, and once on overflow (push)
        self.wake = wake

    def poll(self) -> Notification | None:
        """The next queued event without waiting; None when none is queued
        or this subscriber overflowed (see next())."""
        if self.overflowed.is_set() or self.queue.empty():
            return None
        return self.queue.get_nowait()

    async def next(self) -> Notification | None:
        """The next event; None once this subscriber was dropped for
        overflowing. One await on the queue, no task or asyncio.wait per
        event (issue 21: with 500 WebSocket clients those were a tenth of
        what each garbage collection walked). It never waits after an
        overflow: an overflow leaves the queue full."""
        if self.overflowed.is_set():
            return None
        return await self.queue.get()


class EventBus:
    def __init__(self, queue_size: int = 1000) -> None:
        self.queue_size = queue_size
        self._subscribers: set[Subscriber] = set()

    def subscribe(self, wake: Callable[[], None] | None = None) -> Subscriber:
        """A subscriber to pull from (next()), or, given `wake`, to be told
        when events wait (wake() on the publisher's stack: it must not
        block, and it reads them with poll())."""
        sub = Subscriber(self.queue_size, wake)
        self._subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        self._subscribers.discard(sub)

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def publish(self, method: str, params: dict[str, Any]) -> None:
        """Queue a JSON-RPC notification for every subscriber; never blocks."""
        if not self._subscribers:
            return
        message = Notification(method, params)
        for sub in list(self._subscribers):
            try:
                sub.queue.put_nowait(message)
            except asyncio.QueueFull:
                log.warning("Dropping a slow event subscriber (%d events queued)",
                            sub.queue.qsize())
                self._subscribers.discard(sub)
                sub.overflowed.set()
            if sub.wake is not None:
                sub.wake()
