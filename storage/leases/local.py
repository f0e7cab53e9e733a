"""The local lock backend: open file description (OFD) byte-range locks.

No daemon and no binding: a host id is a write lock on one byte of the
domain's `ids` file (the byte where sanlock keeps that host's delta lease),
a lease a write lock on the first byte of its resource area. OFD locks
belong to the open file, not the process: they conflict between processes
and between two opens in one process, go when the file is closed or the
holder dies (SIGKILL included), and are forwarded to the server on NFSv4
(so they also hold between hosts there; on NFSv3 through lockd, and on a
block device only within this host).

Every syscall on the domain runs with a deadline, in the lockspace's IOPool
or, in the agent, in the lock holder process (lockholder.py: the agent
itself keeps no file open on the storage, which on a hung FUSE file system
would block every process it starts).
A monitor re-checks held locks every `check_interval` from a second open
file: a lock the kernel no longer shows (an NFSv4 lease that expired and
was not reclaimed) is lost at once; a check that keeps failing or timing
out for `fail_after` seconds (storage gone) loses it too.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Protocol

from storage.errors import (
    AcquireHostIdFailure,
    AcquireLockFailure,
    FileStorageDomainStaleNFSHandle,
    ResourceTimeout,
)
from storage.fileio import IOPool
from storage.leases.base import LeaseBusy, LostCallback
from storage.leases.layout import Lockspace, Resource
from storage.leases.lockholder import HolderLocker, LockHolder
from storage.leases.ofdlock import lock_visible, try_lock

log = logging.getLogger("storage.leases.local")

class Locker(Protocol):
    """Where one lockspace's locks are taken and held (with its deadline:
    ResourceTimeout when storage does not answer, OSError when it fails)."""

    async def lock(self, path: str, offset: int) -> int | None:
        """A handle of the lock taken, or None when another holder has it."""

    async def visible(self, path: str, offset: int) -> bool: ...

    async def unlock(self, handle: int) -> None: ...

    def close(self) -> None: ...


class ThreadLocker:
    """Locks held by this process, taken in an IOPool (handles are fds)."""

    def __init__(self, name: str, workers: int, timeout: float) -> None:
        self.pool = IOPool(name, workers, timeout=timeout)

    async def lock(self, path: str, offset: int) -> int | None:
        return await self.pool.call(try_lock, path, offset)

    async def visible(self, path: str, offset: int) -> bool:
        return await self.pool.call(lock_visible, path, offset)

    async def unlock(self, handle: int) -> None:
        await self.pool.call(os.close, handle)

    def close(self) -> None:
        self.pool.close()


@dataclass(eq=False)
class _Lock:
    what: str
    path: str
    offset: int
    fd: int | None          # the locker's handle (an fd with ThreadLocker)
    locker: Locker
    on_lost: LostCallback
    failing_since: float | None = None
    lost: bool = False
    checking: bool = False

    async def close(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            await self.locker.unlock(fd)


@dataclass(eq=False)
class _Space:
    lockspace: Lockspace
    host_id: int
    locker: Locker
    lock: _Lock
    leases: set[LocalLease] = field(default_factory=set)


class LocalLease:
    def __init__(self, backend: LocalBackend, space: _Space, lock: _Lock) -> None:
        self.backend = backend
        self.space = space
        self.lock = lock

    async def release(self) -> None:
        self.space.leases.discard(self)
        await self.lock.close()


class LocalBackend:
    """Backend "local". `check_interval`/`fail_after` in seconds; `fail_after`
    defaults to 8 io_timeouts of the lockspace (as sanlock's renewal fails)."""

    name = "local"

    def __init__(self, *, check_interval: float = 10.0, fail_after: float | None = None,
                 workers: int = 4, holder: LockHolder | None = None) -> None:
        """`holder`: keep the locks in that helper process (the agent does);
        without one, in this process."""
        self.check_interval = check_interval
        self.fail_after = fail_after
        self.workers = workers
        self.holder = holder
        self._spaces: dict[str, _Space] = {}
        self._fail_after: dict[str, float] = {}
        self._monitor: asyncio.Task[None] | None = None
        self._closing = False

    @property
    def drops_all_on_close(self) -> bool:
        """With a holder, close() drops every lock at once (see LeaseManager.close)."""
        return self.holder is not None

    async def add_lockspace(self, ls: Lockspace, host_id: int, io_timeout: int,
                            on_lost: LostCallback) -> None:
        space = self._spaces.get(ls.name)
        if space is not None and space.lock.lost:
            # joined, then lost: let go of what is left and join again
            await self.rem_lockspace(space.lockspace, space.host_id)
            space = None
        if space is not None:
            if space.host_id == host_id:
                return
            raise AcquireHostIdFailure(sdUUID=ls.name,
                                       reason=f"joined with host id {space.host_id}")
        offset = ls.offset + (host_id - 1) * ls.geometry.sector_size
        locker: Locker = (
            HolderLocker(self.holder, float(io_timeout)) if self.holder is not None
            else ThreadLocker(f"lease-{ls.name[:8]}", self.workers, float(io_timeout)))
        try:
            fd = await locker.lock(ls.path, offset)
        except (OSError, ResourceTimeout) as e:
            locker.close()
            raise AcquireHostIdFailure(sdUUID=ls.name, reason=_reason(e, ls.path)) from None
        except BaseException:
            locker.close()
            raise
        if fd is None:
            locker.close()
            raise AcquireHostIdFailure(
                sdUUID=ls.name, reason=f"host id {host_id} is held by another agent "
                                       f"(lock on {ls.path} byte {offset})")
        lock = _Lock(f"host id {host_id} of {ls.name}", ls.path, offset, fd, locker, on_lost)
        self._spaces[ls.name] = _Space(ls, host_id, locker, lock)
        self._fail_after[ls.name] = (8.0 * io_timeout if self.fail_after is None
                                     else self.fail_after)
        self._start_monitor()

    async def rem_lockspace(self, ls: Lockspace, host_id: int) -> None:
        space = self._spaces.get(ls.name)
        if space is None:
            return
        for lease in list(space.leases):
            await lease.release()
        try:
            await space.lock.close()
        finally:
            del self._spaces[ls.name]
            space.locker.close()

    async def acquire(self, res: Resource, on_lost: LostCallback) -> LocalLease:
        space = self._spaces.get(res.lockspace)
        if space is None or space.lock.lost:
            raise AcquireLockFailure(resource=str(res), reason="lockspace not joined")
        try:
            fd = await space.locker.lock(res.path, res.offset)
        except OSError as e:
            if e.errno == errno.ESTALE:
                # the domain's NFS export was re-created: not a lock conflict
                raise FileStorageDomainStaleNFSHandle(path=res.path) from None
            raise AcquireLockFailure(resource=str(res), reason=_reason(e, res.path)) from None
        if fd is None:
            raise LeaseBusy(f"held by another process or host (lock on {res.path} "
                            f"byte {res.offset})")
        lease = LocalLease(self, space,
                           _Lock(f"lease {res}", res.path, res.offset, fd, space.locker, on_lost))
        space.leases.add(lease)
        return lease

    async def close(self) -> None:
        # a flag as well as the cancel: the monitor may be between two calls
        self._closing = True
        if self._monitor is not None:
            self._monitor.cancel()
            await asyncio.gather(self._monitor, return_exceptions=True)
            self._monitor = None
        if self.holder is not None:
            # the helper's exit drops every lock at once: no close per lock,
            # each of which could wait its deadline on hung storage
            for space in self._spaces.values():
                space.lock.fd = None
                for lease in space.leases:
                    lease.lock.fd = None
            self._spaces.clear()
            await self.holder.close()
            return
        for space in list(self._spaces.values()):
            await self.rem_lockspace(space.lockspace, space.host_id)

    # ---- monitoring --------------------------------------------------------------------

    def _start_monitor(self) -> None:
        self._closing = False
        if self._monitor is None or self._monitor.done():
            self._monitor = asyncio.create_task(self._monitor_loop(),
                                                name="local-lease-monitor")

    async def _monitor_loop(self) -> None:
        while not self._closing:
            await asyncio.sleep(self.check_interval)
            await self.check_all()

    async def check_all(self) -> None:
        """Check every held lock once (the monitor's step; tests call it)."""
        checks = []
        for space in list(self._spaces.values()):
            fail_after = self._fail_after[space.lockspace.name]
            checks.append(self._check(space.lock, fail_after))
            checks.extend(self._check(lease.lock, fail_after) for lease in list(space.leases))
        await asyncio.gather(*checks)

    async def _check(self, lock: _Lock, fail_after: float) -> None:
        if lock.lost or lock.fd is None or lock.checking:
            return
        lock.checking = True
        try:
            held = await lock.locker.visible(lock.path, lock.offset)
        except (OSError, ResourceTimeout) as e:
            now = time.monotonic()
            if lock.failing_since is None:
                lock.failing_since = now
                log.warning("Checking %s failed: %s", lock.what, _reason(e, lock.path))
            if lock.fd is not None and now - lock.failing_since >= fail_after:
                self._lost(lock, f"storage failing for {now - lock.failing_since:.0f} s: "
                                 f"{_reason(e, lock.path)}")
            return
        finally:
            lock.checking = False
        lock.failing_since = None
        if not held and lock.fd is not None:
            self._lost(lock, f"the lock on {lock.path} is gone")

    def _lost(self, lock: _Lock, reason: str) -> None:
        if lock.lost:
            return
        lock.lost = True
        log.error("%s lost: %s", lock.what, reason)
        lock.on_lost(reason)


def _reason(e: BaseException, path: str) -> str:
    if isinstance(e, OSError):
        return f"{path}: {os.strerror(e.errno) if e.errno else e}"
    return str(e)
