"""Server notifications: a bus that fans events out to WebSocket clients.

Each subscriber has a bounded queue. A client that does not read fast enough
is dropped (its queue overflows) rather than letting memory grow: the engine
reconnects and re-reads state with getJobs.
"""

from __future__ import annotations

import asyncio
import json
import logging
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
    def __init__(self, maxsize: int) -> None:
        self.queue: asyncio.Queue[Notification] = asyncio.Queue(maxsize)
        self.overflowed = asyncio.Event()

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

    def subscribe(self) -> Subscriber:
        sub = Subscriber(self.queue_size)
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
