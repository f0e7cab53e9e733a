"""The lease interface the domain operations use, whatever the backend.

A `LeaseManager` holds one backend per lock policy ("local", "sanlock") and
knows which policy each joined domain uses. Per domain: `add_lockspace`
(activate: join with this host's id, 661 when refused), `rem_lockspace`
(deactivate). Per operation: `async with manager.acquire(resource) as lease:`
takes the lease (651 when another holder has it) and releases it on exit.

A lease can be lost while held (the storage under it failed, the lock
daemon died or revoked it). The backend reports that; the manager then
sets `lease.lost`, and, unless the caller opted out, cancels the task that
entered the `async with`: the work stops at its next await, and the block
raises `LeaseLost` (2112) instead of the cancellation, so a job fails with
that error. Work that cannot be interrupted should call `lease.check()`
between steps.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol

from storage.errors import (
    AcquireHostIdFailure,
    AcquireLockFailure,
    FileStorageDomainStaleNFSHandle,
    HostAgentError,
    LeaseHeld,
    LeaseLost,
    ResourceInUse,
    ResourceTimeout,
)
from storage.leases.layout import Lockspace, Resource

log = logging.getLogger("storage.leases")

LostCallback = Callable[[str], None]


class HostIdState(enum.StrEnum):
    FREE = "free"            # not joined on this host
    JOINING = "joining"      # add_lockspace under way
    JOINED = "joined"        # host id held
    LEAVING = "leaving"      # rem_lockspace under way
    FAILED = "failed"        # held, then lost (storage failed, daemon gone)


class LeaseBusy(Exception):
    """A backend's answer to one attempt: another holder has it; worth a retry."""


class Held(Protocol):
    """What a backend returns for a lease it acquired."""

    async def release(self) -> None: ...


class Backend(Protocol):
    """One lock backend. Every method runs on the event loop; blocking work
    is the backend's to move off it. `on_lost(reason)` is called on the
    loop, at most once per lockspace or lease, when the backend finds that
    a host id or lease it held is gone."""

    name: str

    async def add_lockspace(self, ls: Lockspace, host_id: int, io_timeout: int,
                            on_lost: LostCallback) -> None: ...

    async def rem_lockspace(self, ls: Lockspace, host_id: int) -> None: ...

    async def acquire(self, res: Resource, on_lost: LostCallback) -> Held: ...

    async def close(self) -> None: ...


@dataclass
class _Joined:
    lockspace: Lockspace
    host_id: int
    backend: Backend
    io_timeout: int
    state: HostIdState = HostIdState.JOINING
    reason: str | None = None
    since: float = field(default_factory=time.time)
    leases: set[Lease] = field(default_factory=set)


class Lease:
    """A held lease. `lost` is set when the backend reports the lease gone."""

    def __init__(self, resource: Resource, backend: str) -> None:
        self.resource = resource
        self.backend = backend
        self.acquired = time.time()
        self.lost = asyncio.Event()
        self.lost_reason: str | None = None
        self.held: Held | None = None
        self._callbacks: list[LostCallback] = []

    def add_lost_callback(self, callback: LostCallback) -> None:
        self._callbacks.append(callback)

    def check(self) -> None:
        """Raise LeaseLost if the lease is gone (for work between steps)."""
        if self.lost_reason is not None:
            raise LeaseLost(resource=str(self.resource), reason=self.lost_reason)

    def _set_lost(self, reason: str) -> None:
        if self.lost_reason is not None:
            return
        self.lost_reason = reason
        self.lost.set()
        log.error("Lease %s lost: %s", self.resource, reason)
        for callback in self._callbacks:
            try:
                callback(reason)
            except Exception:
                log.exception("lost-lease callback of %s failed", self.resource)

    def info(self) -> dict[str, Any]:
        return {"lockspace": self.resource.lockspace, "resource": self.resource.name,
                "path": self.resource.path, "offset": self.resource.offset,
                "backend": self.backend, "acquired": self.acquired,
                "lost": self.lost_reason}


class LeaseManager:
    """Host ids and leases of every domain this agent has joined."""

    def __init__(self, backends: Mapping[str, Backend], *,
                 acquire_timeout: float = 0.0, retry_interval: float = 0.5,
                 default_io_timeout: int = 10) -> None:
        self.backends = dict(backends)
        self.acquire_timeout = acquire_timeout
        self.retry_interval = retry_interval
        self.default_io_timeout = default_io_timeout
        self._spaces: dict[str, _Joined] = {}
        self._held: dict[tuple[str, str], Lease] = {}
        self._space_locks: dict[str, asyncio.Lock] = {}

    def _backend(self, policy: str) -> Backend:
        try:
            return self.backends[policy]
        except KeyError:
            raise AcquireHostIdFailure(
                sdUUID="?", reason=f"lock policy {policy!r} is not configured "
                                   f"(have: {', '.join(sorted(self.backends))})") from None

    # ---- host ids --------------------------------------------------------------------

    async def add_lockspace(self, ls: Lockspace, host_id: int, policy: str = "local",
                            io_timeout: int | None = None) -> None:
        """Join `ls` with `host_id` (activate). Idempotent for the same host id;
        AcquireHostIdFailure (661) when it cannot be had."""
        ls.check_host_id(host_id)
        if policy not in self.backends:
            raise AcquireHostIdFailure(
                sdUUID=ls.name, reason=f"lock policy {policy!r} is not configured")
        backend = self.backends[policy]
        lock = self._space_locks.setdefault(ls.name, asyncio.Lock())
        async with lock:
            joined = self._spaces.get(ls.name)
            if joined is not None and joined.state == HostIdState.JOINED:
                if joined.host_id == host_id and joined.backend is backend:
                    return
                raise AcquireHostIdFailure(
                    sdUUID=ls.name, reason=f"joined already with host id {joined.host_id} "
                                           f"({joined.backend.name})")
            if joined is not None and joined.leases:
                raise AcquireHostIdFailure(
                    sdUUID=ls.name, reason="leases of the failed lockspace are still held")
            iot = io_timeout or self.default_io_timeout
            joined = _Joined(ls, host_id, backend, iot)
            self._spaces[ls.name] = joined
            try:
                await backend.add_lockspace(ls, host_id, iot,
                                            lambda reason: self._lockspace_lost(joined, reason))
            except BaseException as e:
                if self._spaces.get(ls.name) is joined:
                    del self._spaces[ls.name]
                if isinstance(e, HostAgentError) and not isinstance(e, AcquireHostIdFailure):
                    raise AcquireHostIdFailure(sdUUID=ls.name, reason=e.message) from e
                raise
            if joined.state == HostIdState.JOINING:
                joined.state = HostIdState.JOINED
                joined.since = time.time()
        log.info("Joined lockspace %s with host id %d (%s)", ls.name, host_id, backend.name)

    async def rem_lockspace(self, sd_uuid: str) -> None:
        """Leave the domain's lockspace (deactivate). Refused (ResourceInUse)
        while a lease of the domain is held; a no-op if not joined."""
        lock = self._space_locks.setdefault(sd_uuid, asyncio.Lock())
        async with lock:
            joined = self._spaces.get(sd_uuid)
            if joined is None:
                return
            if joined.leases:
                raise ResourceInUse(
                    resource=f"host id of {sd_uuid}",
                    reason=f"{len(joined.leases)} lease(s) held: "
                           + ", ".join(sorted(lease.resource.name for lease in joined.leases)))
            joined.state = HostIdState.LEAVING
            try:
                await joined.backend.rem_lockspace(joined.lockspace, joined.host_id)
            except BaseException:
                joined.state = HostIdState.JOINED if joined.reason is None else HostIdState.FAILED
                raise
            del self._spaces[sd_uuid]
        log.info("Left lockspace %s", sd_uuid)

    def _lockspace_lost(self, joined: _Joined, reason: str) -> None:
        if self._spaces.get(joined.lockspace.name) is not joined:
            return
        if joined.state in (HostIdState.FAILED, HostIdState.LEAVING):
            return
        joined.state = HostIdState.FAILED
        joined.reason = reason
        joined.since = time.time()
        log.error("Host id %d on %s lost: %s", joined.host_id, joined.lockspace.name, reason)
        for lease in list(joined.leases):
            lease._set_lost(f"host id lost: {reason}")

    def host_id_status(self, sd_uuid: str) -> dict[str, Any]:
        """For getStorageDomainInfo: this host's id on the domain and its state."""
        joined = self._spaces.get(sd_uuid)
        if joined is None:
            return {"hostId": None, "state": HostIdState.FREE.value, "backend": None}
        return {"hostId": joined.host_id, "state": joined.state.value,
                "backend": joined.backend.name, "since": joined.since,
                "reason": joined.reason, "leases": len(joined.leases)}

    # ---- leases ------------------------------------------------------------------------

    def acquire(self, resource: Resource, *, timeout: float | None = None,
                cancel_on_lost: bool = True) -> LeaseContext:
        """`async with manager.acquire(res) as lease:` — see the module doc.
        `timeout`: how long to retry while another holder has it (default the
        manager's acquire_timeout; 0: one attempt)."""
        return LeaseContext(self, resource,
                            self.acquire_timeout if timeout is None else timeout,
                            cancel_on_lost)

    async def _acquire(self, resource: Resource, timeout: float) -> Lease:
        joined = self._spaces.get(resource.lockspace)
        if joined is None or joined.state != HostIdState.JOINED:
            state = joined.state.value if joined else HostIdState.FREE.value
            raise AcquireLockFailure(resource=str(resource),
                                     reason=f"host id on domain is {state}")
        if resource.key in self._held:
            raise LeaseHeld(resource=str(resource), reason="held by this agent")
        lease = Lease(resource, joined.backend.name)
        # reserve the key now: a second acquire in this agent fails at once
        self._held[resource.key] = lease
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    lease.held = await joined.backend.acquire(resource, lease._set_lost)
                    break
                except LeaseBusy as e:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise LeaseHeld(resource=str(resource), reason=str(e)) from None
                    await asyncio.sleep(min(self.retry_interval, left))
                except AcquireLockFailure:
                    raise
                except ResourceTimeout:
                    raise       # storage did not answer: 851, as any I/O on it
                except FileStorageDomainStaleNFSHandle:
                    raise       # the export was re-created: 384, as any I/O on it
                except HostAgentError as e:
                    raise AcquireLockFailure(resource=str(resource), reason=e.message) from e
        except BaseException:
            del self._held[resource.key]
            raise
        if joined.state != HostIdState.JOINED:
            # the host id went while we acquired: the lease is worth nothing
            await self._release(lease)
            raise AcquireLockFailure(resource=str(resource), reason="host id lost")
        joined.leases.add(lease)
        return lease

    async def _release(self, lease: Lease) -> None:
        try:
            if lease.held is not None:
                await lease.held.release()
        finally:
            self._held.pop(lease.resource.key, None)
            joined = self._spaces.get(lease.resource.lockspace)
            if joined is not None:
                joined.leases.discard(lease)

    def held(self) -> list[dict[str, Any]]:
        """For getStats: every lease this agent holds."""
        return [lease.info() for lease in self._held.values() if lease.held is not None]

    async def close(self) -> None:
        """Release every lease and leave every lockspace (agent shutdown),
        except those a backend's daemon keeps for the next agent."""
        def drops_all(backend: Backend) -> bool:
            # its close() lets go of everything at once (no call per lease,
            # each of which could wait its deadline on hung storage)
            return bool(getattr(backend, "drops_all_on_close", False))

        for lease in list(self._held.values()):
            if drops_all(self.backends[lease.backend]):
                self._held.pop(lease.resource.key, None)
                continue
            try:
                await self._release(lease)
            except Exception:
                log.exception("releasing %s at shutdown failed", lease.resource)
        for sd_uuid, joined in list(self._spaces.items()):
            if drops_all(joined.backend):
                del self._spaces[sd_uuid]
                continue
            if getattr(joined.backend, "keeps_lockspaces", False):
                continue
            try:
                await self.rem_lockspace(sd_uuid)
            except Exception:
                log.exception("leaving lockspace %s at shutdown failed", sd_uuid)
        for backend in self.backends.values():
            await backend.close()


class LeaseContext:
    """The async context manager of LeaseManager.acquire."""

    # a lost lease's holder is cancelled again this often until it leaves the
    # block: on 3.11 asyncio.wait_for can swallow a cancellation
    RECANCEL_INTERVAL = 1.0

    def __init__(self, manager: LeaseManager, resource: Resource, timeout: float,
                 cancel_on_lost: bool) -> None:
        self.manager = manager
        self.resource = resource
        self.timeout = timeout
        self.cancel_on_lost = cancel_on_lost
        self.lease: Lease | None = None
        self._task: asyncio.Task[Any] | None = None
        self._cancels = 0
        self._recancel: asyncio.TimerHandle | None = None
        self._exiting = False

    async def __aenter__(self) -> Lease:
        lease = await self.manager._acquire(self.resource, self.timeout)
        self.lease = lease
        self._task = asyncio.current_task()
        if self.cancel_on_lost and self._task is not None:
            lease.add_lost_callback(self._on_lost)
            if lease.lost_reason is not None:
                self._on_lost(lease.lost_reason)
        return lease

    def _on_lost(self, reason: str) -> None:
        if self._cancels == 0:
            self._cancel()

    def _cancel(self) -> None:
        task = self._task
        if task is None or self._exiting or task.done():
            return
        self._cancels += 1
        assert self.lease is not None
        task.cancel(f"lease {self.resource} lost: {self.lease.lost_reason}")
        self._recancel = asyncio.get_running_loop().call_later(self.RECANCEL_INTERVAL,
                                                               self._cancel)

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        lease = self.lease
        assert lease is not None
        self._exiting = True
        if self._recancel is not None:
            self._recancel.cancel()
        release = asyncio.ensure_future(self.manager._release(lease))
        try:
            await asyncio.shield(release)
        except asyncio.CancelledError as e:
            # cancelled while releasing: finish the release first
            await asyncio.wait([release])
            if not self._cancels:
                raise
            exc_type, exc = asyncio.CancelledError, e      # ours, delivered late
        except Exception:
            log.exception("Releasing %s failed", self.resource)
        if lease.lost_reason is None:
            return
        error = LeaseLost(resource=str(self.resource), reason=lease.lost_reason)
        if self._cancels and self._task is not None:
            remaining = 0
            for _ in range(self._cancels):
                remaining = self._task.uncancel()
            if remaining and exc_type is asyncio.CancelledError:
                # someone else cancelled the task too: that cancellation goes on
                if exc is not None:
                    raise exc
                return
            # our cancellation becomes the error the job reports
            raise error from exc
        if exc_type is None or issubclass(exc_type, Exception):
            raise error from exc
