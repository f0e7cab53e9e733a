"""A small asyncio QMP client (qemu and qemu-storage-daemon monitors): the
greeting and capabilities negotiation, commands with ids, events on a queue.

QMP is line-delimited JSON over a Unix socket. A monitor serves one client
at a time: a VM manager and the agent each need their own monitor.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
from typing import Any

log = logging.getLogger("storage.qmp")

# A greeting or a reply never comes this late from a live monitor.
DEFAULT_TIMEOUT = 30.0
_LINE_LIMIT = 16 << 20


class QMPError(Exception):
    """An error reply ({"error": {"class", "desc"}}) or a broken connection."""

    def __init__(self, message: str, error_class: str = "") -> None:
        super().__init__(message)
        self.error_class = error_class


class QMPClient:
    def __init__(self, path: str, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.path = path
        self.timeout = timeout
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._pending: dict[str, asyncio.Future[Any]] = {}
        self._ids = itertools.count(1)
        self._read_task: asyncio.Task[None] | None = None
        self.closed = asyncio.Event()

    async def connect(self) -> QMPClient:
        # asyncio.timeout, not wait_for: Python 3.11's wait_for swallows a
        # cancellation that arrives as its awaitable completes (gh-86296)
        async with asyncio.timeout(self.timeout):
            reader, self._writer = await asyncio.open_unix_connection(
                self.path, limit=_LINE_LIMIT)
        self._reader = reader
        try:
            async with asyncio.timeout(self.timeout):
                greeting = await reader.readline()
            if "QMP" not in json.loads(greeting or b"{}"):
                raise QMPError(f"{self.path}: not a QMP monitor")
            self._read_task = asyncio.create_task(self._read_loop())
            await self.execute("qmp_capabilities")
        except BaseException:
            await self.close()
            raise
        return self

    async def __aenter__(self) -> QMPClient:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def execute(self, command: str, arguments: dict[str, Any] | None = None,
                      timeout: float | None = None) -> Any:
        """The command's `return` value; QMPError for an error reply or a
        connection that closed first."""
        if self._writer is None or self.closed.is_set():
            raise QMPError(f"{self.path}: not connected")
        msg_id = f"ha-{next(self._ids)}"
        msg: dict[str, Any] = {"execute": command, "id": msg_id}
        if arguments:
            msg["arguments"] = arguments
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = fut
        try:
            self._writer.write(json.dumps(msg).encode() + b"\n")
            await self._writer.drain()
            async with asyncio.timeout(timeout or self.timeout):
                return await fut
        except (OSError, ConnectionError) as e:
            raise QMPError(f"{self.path}: {e}") from None
        finally:
            self._pending.pop(msg_id, None)

    async def next_event(self, name: str | None = None,
                         timeout: float | None = None) -> dict[str, Any]:
        """The next event (named `name`; others are dropped)."""
        while True:
            async with asyncio.timeout(timeout):
                ev = await self.events.get()
            if ev.get("event") == "_CLOSED":
                raise QMPError(f"{self.path}: connection closed")
            if name is None or ev.get("event") == name:
                return ev

    async def _read_loop(self) -> None:
        assert self._reader is not None
        try:
            while line := await self._reader.readline():
                try:
                    msg = json.loads(line)
                except ValueError:
                    log.warning("%s: not JSON: %r", self.path, line[:200])
                    continue
                if "event" in msg:
                    self.events.put_nowait(msg)
                    continue
                fut = self._pending.get(str(msg.get("id")))
                if fut is None or fut.done():
                    continue
                if "error" in msg:
                    err = msg["error"]
                    fut.set_exception(QMPError(str(err.get("desc")), str(err.get("class"))))
                else:
                    fut.set_result(msg.get("return"))
        except (OSError, ConnectionError, ValueError) as e:
            log.debug("%s: read failed: %s", self.path, e)
        finally:
            self.closed.set()
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(QMPError(f"{self.path}: connection closed"))
            self.events.put_nowait({"event": "_CLOSED"})

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError, ConnectionError):
                await self._writer.wait_closed()
        if self._read_task is not None:
            self._read_task.cancel()
            # not `await task` under suppress(CancelledError): that would
            # swallow a cancellation of the caller arriving here
            await asyncio.wait([self._read_task])
        self.closed.set()
