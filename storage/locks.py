"""Resource locks: one per resource, shared or exclusive, taken in one order.

A resource is (namespace, name), e.g. ("domain", sdUUID) or ("volume",
f"{sd}/{vol}"). Namespaces have a fixed rank (connection < target < domain
< image < volume); several locks requested together are always taken in
(rank, name) order, so two operations can never wait on each other in a
cycle. Locks are in-process (asyncio); leases between hosts are another
layer (storage/leases). Part of the storage layer: storage and ovfstore take
them, and the agent only creates the LockManager (agent/context.py).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field

from storage.errors import AcquireLockFailure

RANK = {"connection": 0, "target": 1, "domain": 2, "image": 3, "volume": 4, "ovfstore": 5}

SHARED, EXCLUSIVE = "shared", "exclusive"


@dataclass
class _RWLock:
    readers: int = 0
    writer: bool = False
    waiting_writers: int = 0
    # Holders plus waiters: the entry is dropped only when nobody uses it.
    users: int = 0
    cond: asyncio.Condition = field(default_factory=asyncio.Condition)


@dataclass(frozen=True, order=True)
class Request:
    rank: int
    name: str
    namespace: str
    mode: str = EXCLUSIVE


def request(namespace: str, name: str, mode: str = EXCLUSIVE) -> Request:
    if namespace not in RANK:
        raise ValueError(f"unknown lock namespace {namespace}")
    if mode not in (SHARED, EXCLUSIVE):
        raise ValueError(f"unknown lock mode {mode}")
    return Request(RANK[namespace], name, namespace, mode)


class LockManager:
    def __init__(self) -> None:
        self._locks: dict[tuple[str, str], _RWLock] = {}

    def held(self) -> list[dict[str, object]]:
        return [{"namespace": ns, "name": name, "readers": lk.readers, "writer": lk.writer}
                for (ns, name), lk in self._locks.items() if lk.readers or lk.writer]

    @contextlib.asynccontextmanager
    async def hold(self, *requests: Request, timeout: float | None = None,
                   nowait: bool = False) -> AsyncIterator[None]:
        """Hold every lock in `requests`, taken in rank order. With `nowait`,
        a lock that is busy fails at once with AcquireLockFailure; with
        `timeout`, after that many seconds."""
        ordered = _merge(requests)
        taken: list[Request] = []
        try:
            for r in ordered:
                await self._acquire(r, timeout, nowait)
                taken.append(r)
            yield
        finally:
            for r in reversed(taken):
                await self._release(r)

    def volumes(self, sd: str, img: str, *vols: str,
                parent: str | None = None) -> contextlib.AbstractAsyncContextManager[None]:
        """The locks of a change to volumes: their domain shared, their image
        and the volumes exclusive, a parent they are made on shared."""
        reqs = [request("domain", sd, SHARED), request("image", f"{sd}/{img}")]
        reqs += [request("volume", f"{sd}/{v}") for v in vols]
        if parent:
            reqs.append(request("volume", f"{sd}/{parent}", SHARED))
        return self.hold(*reqs)

    async def _acquire(self, r: Request, timeout: float | None, nowait: bool) -> None:
        key = (r.namespace, r.name)
        lk = self._locks.setdefault(key, _RWLock())
        exclusive = r.mode == EXCLUSIVE

        def free() -> bool:
            if exclusive:
                return not lk.writer and not lk.readers
            # Writers waiting block new readers, so a writer is not starved.
            return not lk.writer and not lk.waiting_writers

        lk.users += 1
        try:
            await self._wait(lk, r, free, exclusive, timeout, nowait)
        except BaseException:
            self._unuse(key, lk)
            raise

    async def _wait(self, lk: _RWLock, r: Request, free: Callable[[], bool], exclusive: bool,
                    timeout: float | None, nowait: bool) -> None:
        async with lk.cond:
            if not free():
                if nowait:
                    raise AcquireLockFailure(resource=f"{r.namespace} {r.name}",
                                             reason="in use by another operation")
                if exclusive:
                    lk.waiting_writers += 1
                try:
                    await asyncio.wait_for(lk.cond.wait_for(free), timeout)
                except TimeoutError:
                    raise AcquireLockFailure(resource=f"{r.namespace} {r.name}",
                                             reason=f"still busy after {timeout} s") from None
                finally:
                    if exclusive:
                        lk.waiting_writers -= 1
                        if not free():
                            lk.cond.notify_all()
            if exclusive:
                lk.writer = True
            else:
                lk.readers += 1

    async def _release(self, r: Request) -> None:
        key = (r.namespace, r.name)
        lk = self._locks[key]
        async with lk.cond:
            if r.mode == EXCLUSIVE:
                lk.writer = False
            else:
                lk.readers -= 1
            lk.cond.notify_all()
        self._unuse(key, lk)

    def _unuse(self, key: tuple[str, str], lk: _RWLock) -> None:
        lk.users -= 1
        if lk.users == 0 and self._locks.get(key) is lk:
            del self._locks[key]


def _merge(requests: Iterable[Request]) -> list[Request]:
    """Sort by (rank, name); the same resource asked twice is taken once, in
    the stronger mode."""
    best: dict[tuple[str, str], Request] = {}
    for r in requests:
        key = (r.namespace, r.name)
        if key not in best or r.mode == EXCLUSIVE:
            best[key] = r
    return sorted(best.values())
