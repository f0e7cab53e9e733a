"""The monitor loop of the domains active on this host: a check of each one
every monitor_interval (a direct read of its metadata, then its space), and
the removal of half-made volumes left while its storage failed."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from storage import commands
from storage.domains.base import Domain
from storage.domains.leasing import DomainLeases
from storage.errors import HostAgentError, LeaseHeld, VolumeDoesNotExist
from storage.locks import LockManager
from storage.metadata import CREATING, REMOVING, MetadataError, VolumeMetadata

log = logging.getLogger("storage.domains")


def full(space: dict[str, int]) -> dict[str, bool]:
    """A domain without free space is full: still monitored as ok (its
    checks only read), refusing new data with 397 until space is freed."""
    return {"full": space["free"] == 0} if "free" in space else {}


@dataclass
class Monitor:
    state: str = "unknown"        # unknown, ok, failing
    last_check: float | None = None
    delay: float | None = None
    error: str = ""
    space: dict[str, int] = field(default_factory=dict)
    task: asyncio.Task[None] | None = field(default=None, repr=False)

    def info(self) -> dict[str, Any]:
        return {"state": self.state, "lastCheck": self.last_check, "delay": self.delay,
                "error": self.error}


@dataclass
class Entry:
    domain: Domain
    conn_id: str | None
    active: bool = False
    monitor: Monitor = field(default_factory=Monitor)


class DomainMonitor:
    def __init__(self, locks: LockManager, *, io_timeout: float = 30.0,
                 interval: float = 10.0) -> None:
        self.locks = locks
        self.io_timeout = io_timeout
        self.interval = interval
        # sd -> the task removing half-made volumes left while it failed
        self._discarding: dict[str, asyncio.Task[None]] = {}

    def start(self, entry: Entry) -> None:
        if entry.monitor.task is None:
            entry.monitor.task = asyncio.create_task(self._run(entry),
                                                     name=f"monitor-{entry.domain.uuid}")

    async def stop(self, entry: Entry) -> None:
        for task in (entry.monitor.task, self._discarding.pop(entry.domain.uuid, None)):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        entry.monitor.task = None
        entry.monitor.state = "unknown"

    async def _run(self, entry: Entry) -> None:
        """Check the domain every interval: a direct read of its
        metadata, then its space. A check that has not ended after io_timeout
        makes the domain failing at once; it is then waited for (its delay
        growing), and no new check starts while a command the runner gave up
        on still waits on this domain's storage: checks do not pile up on hung
        storage. The next check that ends well makes the domain ok again."""
        mon = entry.monitor
        sd = entry.domain.uuid
        start = time.monotonic()
        while True:
            if any(sd in arg for _, argv in commands.lingering() for arg in argv):
                # A killed check (or another command on this domain) still
                # waits on the storage: one more would only wait beside it.
                self._failing(entry, "a command killed on its deadline still waits on the "
                                     "storage")
                mon.last_check = time.time()
                mon.delay = time.monotonic() - start
                await asyncio.sleep(self.interval)
                continue
            start = time.monotonic()
            error = await self._check(entry, start)
            if error is None:
                self._ok(entry)
            else:
                reason = error.message if isinstance(error, HostAgentError) else \
                    f"{type(error).__name__}: {error}"
                self._failing(entry, reason)
            await asyncio.sleep(self.interval)

    async def _check(self, entry: Entry, start: float) -> BaseException | None:
        """One check, waited for however long it takes; its error, or None
        with the domain's space recorded."""
        mon = entry.monitor

        async def check() -> dict[str, int]:
            await entry.domain.health_check(self.io_timeout)
            return await entry.domain.space()

        task = asyncio.create_task(check(), name=f"check-{entry.domain.uuid}")
        try:
            await asyncio.wait({task}, timeout=self.io_timeout)
            if not task.done():
                self._failing(entry, f"no answer from storage in {self.io_timeout:g} s")
                while not task.done():
                    mon.last_check = time.time()
                    mon.delay = time.monotonic() - start
                    await asyncio.wait({task}, timeout=self.interval)
        except asyncio.CancelledError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            raise
        mon.last_check = time.time()
        mon.delay = time.monotonic() - start
        error = task.exception()
        if error is None:
            mon.space = task.result()
        return error

    @staticmethod
    def _failing(entry: Entry, reason: str) -> None:
        mon = entry.monitor
        if mon.state != "failing":
            log.error("Domain %s is failing: %s", entry.domain.uuid, reason)
        mon.state, mon.error = "failing", reason

    def _ok(self, entry: Entry) -> None:
        mon = entry.monitor
        sd = entry.domain.uuid
        if mon.state == "failing":
            log.info("Domain %s recovered", sd)
        mon.state, mon.error = "ok", ""
        leases = entry.domain.leases
        if isinstance(leases, DomainLeases) and not leases.joined():
            # storage back, or the lock daemon: join again
            leases.start_join()
        if entry.domain.pending_discards and entry.active and sd not in self._discarding:
            # beside the checks: the storage may fail again meanwhile
            self._discarding[sd] = asyncio.create_task(
                self._finish_discards(entry), name=f"discard-{sd}")

    async def _finish_discards(self, entry: Entry) -> None:
        """Remove the half-made volumes whose removal failed while the storage
        failed, now that it answers: under each one's locks, and only while
        it is still half-made (a job run again may have made it since).
        What is still left then is tried again after the next good check."""
        domain = entry.domain
        try:
            for vol, md in list(domain.pending_discards.items()):
                try:
                    async with self.locks.volumes(domain.uuid, md.image, vol):
                        try:
                            now: VolumeMetadata | None = await domain.read_volume_md(
                                md.image, vol)
                        except (VolumeDoesNotExist, MetadataError):
                            # left without readable metadata (an LV still
                            # INITIALIZING), or gone already
                            now = md if vol in await domain.volume_ids(md.image) else None
                        if now is not None and now.state in (CREATING, REMOVING):
                            await domain.discard_volume(now)
                            log.info("Domain %s: removed half-made volume %s/%s",
                                     domain.uuid, md.image, vol)
                except LeaseHeld:
                    pass             # another host makes it now: its own
                except (HostAgentError, OSError) as e:
                    log.warning("Domain %s: half-made volume %s not removed yet: %s",
                                domain.uuid, vol, e)
                    return
                domain.pending_discards.pop(vol, None)
        finally:
            self._discarding.pop(domain.uuid, None)
