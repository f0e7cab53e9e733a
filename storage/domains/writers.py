"""The agent watching a VM's writer of a thin volume through QMP
(prepareImage's `writer`): the write threshold armed on the node that opens
the volume, an extension on each BLOCK_WRITE_THRESHOLD event, the threshold
re-armed, a writer paused on ENOSPC resumed.

The writer's monitor socket may appear after prepareImage (disks are
prepared before their VM starts) and go away and come back (the writer
restarts): the watch connects whenever it is there, until it is stopped
(teardownImage).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from storage.errors import HostAgentError
from storage.qmp import QMPClient, QMPError
from storage.thin import ThinPolicy

log = logging.getLogger("storage.writers")

# How often a missing socket is looked for, and a failed extension or
# connection tried again (a full VG: extension resumes when space comes back).
RETRY_INTERVAL = 1.0

Extend = Callable[[int], Awaitable[int]]


class WriterWatch:
    def __init__(self, name: str, qmp_socket: str, node: str, thin: ThinPolicy, *,
                 current: Callable[[], Awaitable[int]], extend: Extend,
                 retry_interval: float = RETRY_INTERVAL) -> None:
        self.name = name
        self.qmp_socket = qmp_socket
        self.node = node
        self.thin = thin
        self._current = current
        self._extend = extend
        self.retry_interval = retry_interval
        self.size = 0
        self.connected = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> WriterWatch:
        self._task = asyncio.create_task(self._run(), name=f"writer {self.name}")
        return self

    async def stop(self) -> None:
        if self._task is not None:
            while not self._task.done():
                self._task.cancel()
                await asyncio.wait([self._task], timeout=1)
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                async with QMPClient(self.qmp_socket) as qmp:
                    self.connected.set()
                    log.info("Writer of %s: watching node %s through %s", self.name,
                             self.node, self.qmp_socket)
                    await self._watch(qmp)
            except (FileNotFoundError, ConnectionRefusedError) as e:
                # not started yet, or gone: looked for again
                log.debug("Writer of %s: %s", self.name, e)
            except (TimeoutError, OSError, QMPError) as e:
                log.info("Writer of %s: %s (connecting again)", self.name, e)
            except HostAgentError as e:
                # the volume's size unknown for now (its domain not active yet
                # after a restart, the storage failing): tried again
                log.warning("Writer of %s: %s (trying again)", self.name, e.message)
            finally:
                self.connected.clear()
            await asyncio.sleep(self.retry_interval)

    async def _watch(self, qmp: QMPClient) -> None:
        self.size = await self._current()
        # the writer may be past the threshold already (it ran before the
        # agent connected): extend at once rather than wait for a write
        await self._arm(qmp)
        highest = await self._highest_offset(qmp)
        if highest is not None and highest > self.thin.threshold(self.size):
            await self._grow(qmp, highest)
        while True:
            ev = await qmp.next_event()
            data: dict[str, Any] = ev.get("data") or {}
            if ev.get("event") == "BLOCK_WRITE_THRESHOLD" and data.get("node-name") == self.node:
                await self._grow(qmp, int(data["write-threshold"]) +
                                 int(data["amount-exceeded"]))
            elif ev.get("event") == "BLOCK_IO_ERROR" and data.get("nospace"):
                # a VM paused on ENOSPC (werror=enospc): the threshold came too late
                highest = await self._highest_offset(qmp)
                await self._grow(qmp, max(highest or 0, self.size))

    async def _grow(self, qmp: QMPClient, allocation: int) -> None:
        """Extend until it works (a full VG: every retry_interval), re-arm, resume."""
        started = time.monotonic()
        old = self.size
        want = self.thin.next_size(old, allocation)
        while True:
            try:
                self.size = await self._extend(want)
                break
            except HostAgentError as e:
                log.warning("Writer of %s: extending to %d failed: %s", self.name, want,
                            e.message)
                await asyncio.sleep(self.retry_interval)
        if self.size > old:
            await self._arm(qmp)
            log.info("Writer of %s: extended from %d to %d, threshold re-armed %.3f s after "
                     "the event", self.name, old, self.size, time.monotonic() - started)
        else:
            # as large as the full capacity needs: nothing more to watch
            log.info("Writer of %s: at its full size %d", self.name, self.size)
        await self._resume(qmp)

    async def _arm(self, qmp: QMPClient) -> None:
        await qmp.execute("block-set-write-threshold",
                          {"node-name": self.node,
                           "write-threshold": self.thin.threshold(self.size)})

    async def _highest_offset(self, qmp: QMPClient) -> int | None:
        for s in await qmp.execute("query-blockstats", {"query-nodes": True}):
            if s.get("node-name") == self.node:
                return int(s["stats"]["wr_highest_offset"])
        return None

    async def _resume(self, qmp: QMPClient) -> None:
        """`cont` a VM paused by an I/O error (ENOSPC); qemu-storage-daemon
        has no run state and never pauses."""
        try:
            status = await qmp.execute("query-status")
        except QMPError as e:
            if e.error_class == "CommandNotFound":
                return
            raise
        if status.get("status") == "io-error":
            log.info("Writer of %s: resuming the VM paused on an I/O error", self.name)
            await qmp.execute("cont")
