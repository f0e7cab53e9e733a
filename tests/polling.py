"""Waiting in tests: poll a condition until it holds, with a deadline, never a
bare sleep standing in for "the other task got there"."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from storage.locks import LockManager


async def until(predicate: Callable[[], object], what: str, timeout: float = 5.0) -> None:
    """Return once predicate() is true; AssertionError naming `what` after
    `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        await asyncio.sleep(0.001)


async def until_async(check: Callable[[], Awaitable[object]], what: str,
                      timeout: float = 5.0, interval: float = 0.05) -> None:
    """until() for a condition that needs I/O (a call to the agent): await
    check() every `interval` until it is true."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        await asyncio.sleep(interval)


def lock_users(locks: LockManager, namespace: str, name: str) -> int:
    """Holders plus waiters of one lock."""
    lk = locks._locks.get((namespace, name))
    return lk.users if lk is not None else 0
