"""The leases one domain's operations take, bound to the host's LeaseManager.

Every write to shared storage runs under a lease another host would need
for the same write:

- the domain lease (resource "SDM" of the domain's lockspace) around
  changes of domain metadata and, on block domains, of the VG's LVM metadata
  (lvcreate, lvremove, lvextend, tag changes, metadata slots). It is waited
  for (up to `domain_timeout`): such changes are short.
- a volume's lease around every write of its data or metadata (create, copy
  target, snapshot layer, delete, extend, OVF store upload). It is not
  waited for: a volume another host writes is refused with 651 (LeaseHeld).

Both need this host's id joined in the domain's lockspace. Joining runs in
the background on activation (sanlock takes a few io_timeouts); a write
waits for a join under way, and fails with 661 if the host id cannot be had
(no such backend on this host, the lock daemon down, storage gone): a write
is never made unprotected.

The domain lease is re-entrant within one task (a create holding it calls
the kind's LV code, which takes it too) and queued within this agent (two
jobs of this host wait for each other instead of one failing).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

from storage.errors import AcquireHostIdFailure, AcquireLockFailure, HostAgentError, LeaseHeld
from storage.leases import (
    BlockDomainLeases,
    FileDomainLeases,
    HostIdState,
    LeaseContext,
    LeaseManager,
    Resource,
)
from storage.metadata import DomainMetadata, VolumeMetadata

log = logging.getLogger("storage.domains.leasing")


class LeasedDomain(Protocol):
    """What DomainLeases needs of its domain (not the Domain class: base.py
    holds its leases, so importing it here would make a cycle)."""

    @property
    def uuid(self) -> str: ...

    @property
    def md(self) -> DomainMetadata: ...

    def lease_areas(self) -> FileDomainLeases | BlockDomainLeases: ...

    def forget_cache(self) -> None: ...

    async def volume_lease(self, img: str, vol: str) -> Resource: ...


class DomainLeases:
    """The Leases (leaseapi.py) of a domain that the host's LeaseManager watches."""

    # Fairness between hosts: sanlock keeps no queue, and other hosts poll
    # for the domain lease (LeaseManager.retry_interval); this host's queued
    # writers would take it again the moment it is released and starve them
    # until its whole queue is done (lab: 50 queued creates, 8 minutes, so
    # the other host's writes failed after domain_timeout). After holding it
    # SDM_TURN seconds in a row with writers still queued here, it is let go
    # for SDM_YIELD seconds.
    SDM_TURN = 10.0
    SDM_YIELD = 2.0

    def __init__(self, manager: LeaseManager, domain: LeasedDomain, *, host_id: int,
                 io_timeout: int, domain_timeout: float, join_wait: float = 120.0,
                 on_joined: Callable[[], Awaitable[None]] | None = None) -> None:
        self.manager = manager
        self.domain = domain
        self.host_id = host_id
        self.io_timeout = io_timeout
        self.domain_timeout = domain_timeout
        # how long a write waits for a join under way
        self.join_wait = join_wait
        self.join_error: str | None = None
        self._join: asyncio.Task[None] | None = None
        self._sdm_lock = asyncio.Lock()
        self._sdm_owner: asyncio.Task[Any] | None = None
        self._sdm_queued = 0
        self._sdm_turn: float | None = None     # when this host's turn began
        # volume -> (its lease held by `hold`, the task that took it)
        self._held: dict[str, tuple[LeaseContext, asyncio.Task[Any] | None]] = {}
        # run after each successful join (the domain's garbage collection)
        self.on_joined = on_joined

    @property
    def sd(self) -> str:
        return self.domain.uuid

    @property
    def policy(self) -> str:
        return self.domain.md.lock_policy

    # ---- host id -----------------------------------------------------------------------

    def joined(self) -> bool:
        return bool(self.manager.host_id_status(self.sd)["state"] == HostIdState.JOINED)

    def start_join(self) -> None:
        """Join the lockspace in the background (activation, monitor retry)."""
        if self.joined() or (self._join is not None and not self._join.done()):
            return
        self._join = asyncio.create_task(self._do_join(), name=f"join-{self.sd}")

    async def _do_join(self) -> None:
        if self.manager.host_id_status(self.sd)["state"] == HostIdState.FAILED:
            # lost earlier (storage failed, daemon restarted): leave, then join anew
            with contextlib.suppress(HostAgentError):
                await self.manager.rem_lockspace(self.sd)
        try:
            await self.manager.add_lockspace(self.domain.lease_areas().lockspace(),
                                             self.host_id, self.policy, self.io_timeout)
        except HostAgentError as e:
            # the reason only: ensure_writable wraps it in a 661 of its own
            # (else "Cannot acquire host id on domain X: Cannot acquire host
            # id on domain X: ...")
            reason = str(e.fields.get("reason") or e.message)
            if reason != self.join_error:      # the monitor retries: log changes
                log.error("Domain %s: %s", self.sd, e.message)
            self.join_error = reason
            return
        self.join_error = None
        if self.on_joined is not None:
            try:
                await self.on_joined()
            except HostAgentError as e:
                log.error("Domain %s: after joining: %s", self.sd, e.message)

    async def leave(self) -> None:
        """Leave the lockspace (deactivate, format). ResourceInUse while a
        lease of the domain is held."""
        if self._join is not None and not self._join.done():
            self._join.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._join
        self._join = None
        await self.manager.rem_lockspace(self.sd)
        self.join_error = None

    async def wait_joined(self, timeout: float) -> bool:
        """Wait up to `timeout` for a join under way; True if joined."""
        task = self._join
        if task is not None and not task.done() and task is not asyncio.current_task():
            await asyncio.wait({task}, timeout=timeout)
        return self.joined()

    async def ensure_writable(self) -> None:
        """Wait for a join under way; 661 unless this host's id is held."""
        task = self._join
        if await self.wait_joined(self.join_wait):
            return
        state = self.manager.host_id_status(self.sd)
        reason = self.join_error or (state.get("reason") if state["state"] == "failed"
                                     else None) or f"host id is {state['state']}"
        if task is not None and not task.done():
            reason = f"joining the lockspace takes more than {self.join_wait:g} s"
        raise AcquireHostIdFailure(sdUUID=self.sd,
                                   reason=f"{reason} (lock policy {self.policy}); "
                                          "writes are refused")

    def status(self) -> dict[str, Any]:
        status = dict(self.manager.host_id_status(self.sd))
        status["policy"] = self.policy
        if self._join is not None and not self._join.done():
            status["state"] = HostIdState.JOINING.value
        if self.join_error and status["state"] == HostIdState.FREE.value:
            status["reason"] = self.join_error
        return status

    # ---- the domain lease ----------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def metadata(self) -> AsyncIterator[None]:
        task = asyncio.current_task()
        if task is not None and self._sdm_owner is task:
            yield
            return
        await self.ensure_writable()
        self._sdm_queued += 1
        try:
            await self._sdm_lock.acquire()
        finally:
            self._sdm_queued -= 1
        try:
            self._sdm_owner = task
            async with self.manager.acquire(self.domain.lease_areas().domain_resource(),
                                            timeout=self.domain_timeout):
                if self._sdm_turn is None:
                    self._sdm_turn = time.monotonic()
                # what this host cached of shared metadata may be stale
                self.domain.forget_cache()
                yield
        finally:
            self._sdm_owner = None
            try:
                if not self._sdm_queued:
                    self._sdm_turn = None
                elif (self._sdm_turn is not None
                      and time.monotonic() - self._sdm_turn > self.SDM_TURN):
                    # the other hosts' turn (still holding the local lock)
                    self._sdm_turn = None
                    await asyncio.sleep(self.SDM_YIELD)
            finally:
                self._sdm_lock.release()

    # ---- volume leases ----------------------------------------------------------------------

    async def _resource(self, md: VolumeMetadata) -> Resource:
        return await self.domain.volume_lease(md.image, md.uuid)

    def _held_here(self, md: VolumeMetadata) -> bool:
        """True if this task holds the lease of `md` (taken by `hold`);
        LeaseHeld if another task of this agent does."""
        held = self._held.get(md.uuid)
        if held is None:
            return False
        if held[1] is not asyncio.current_task():
            raise LeaseHeld(resource=f"{self.sd}:{md.uuid}",
                            reason="held by another job of this host")
        return True

    @contextlib.asynccontextmanager
    async def volume(self, md: VolumeMetadata) -> AsyncIterator[None]:
        """The volume's lease around a block (re-entrant within a task)."""
        if self._held_here(md):
            yield
            return
        await self.hold(md)
        try:
            yield
        finally:
            # LeaseLost here, if it was lost (the block was cancelled for it)
            await self.drop(md)

    async def hold(self, md: VolumeMetadata) -> None:
        """Take the volume's lease and keep it until `drop` (a volume being
        made: held from its creation to its commit or removal). Losing it
        cancels the task that took it."""
        if self._held_here(md):
            return
        await self.ensure_writable()
        ctx = self.manager.acquire(await self._resource(md), timeout=0)
        await ctx.__aenter__()
        self._held[md.uuid] = (ctx, asyncio.current_task())

    async def drop(self, md: VolumeMetadata) -> None:
        """Release a lease taken by `hold`; LeaseLost if it was lost meanwhile."""
        held = self._held.pop(md.uuid, None)
        if held is not None:
            await held[0].__aexit__(None, None, None)

    def check(self, md: VolumeMetadata) -> None:
        """LeaseLost if the held lease of `md` is gone (before a commit)."""
        held = self._held.get(md.uuid)
        if held is not None and held[0].lease is not None:
            held[0].lease.check()

    async def busy(self, md: VolumeMetadata) -> bool:
        """True while another host or job holds the volume's lease (a volume
        CREATING there is being made, not left behind by a crash)."""
        if md.uuid in self._held:
            return True
        try:
            res = await self._resource(md)
        except HostAgentError:
            return False
        try:
            async with self.manager.acquire(res, timeout=0, cancel_on_lost=False):
                return False
        except LeaseHeld:
            return True
        except AcquireLockFailure as e:
            # no readable lease area (a crash before it was made): nobody can hold it
            log.info("Lease of volume %s cannot be taken (%s): taken as free", md.uuid,
                     e.message)
            return False
