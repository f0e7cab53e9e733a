"""IOPool: deadlines, calls that time out while queued never run, threads
that cannot keep the process alive."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator

import pytest

from storage.errors import ResourceTimeout
from storage.fileio import IOPool


@contextlib.contextmanager
def hanging(workers: int, timeout: float) -> Iterator[tuple[IOPool, threading.Event]]:
    """A pool, and an event its hung calls wait for (set at the end)."""
    pool = IOPool("t", workers=workers, timeout=timeout)
    hung = threading.Event()
    try:
        yield pool, hung
    finally:
        hung.set()
        pool.close()


async def test_result_and_error():
    pool = IOPool("t", workers=2, timeout=5)
    try:
        assert await pool.call(lambda a, b: a + b, 1, 2) == 3
        with pytest.raises(ZeroDivisionError):
            await pool.call(lambda: 1 // 0)
    finally:
        pool.close()


async def test_timeout_and_queued_call_never_runs():
    """A hung call costs its deadline; a call queued behind it whose deadline
    passed is dropped, not run once the storage answers."""
    ran: list[str] = []
    with hanging(workers=1, timeout=0.2) as (pool, hung):
        with pytest.raises(ResourceTimeout) as e:
            await pool.call(hung.wait)
        assert e.value.code == 851
        with pytest.raises(ResourceTimeout):
            await pool.call(ran.append, "late write")
        hung.set()
        assert await pool.call(lambda: "next") == "next"
        assert ran == []


async def test_threads_are_daemons_and_close_does_not_wait():
    pool = IOPool("t", workers=2, timeout=0.1)
    hung = threading.Event()
    try:
        for _ in range(2):
            with pytest.raises(ResourceTimeout):
                await pool.call(hung.wait)
        threads = [t for t in threading.enumerate() if t.name.startswith("io-t-")]
        assert len(threads) == 2 and all(t.daemon for t in threads)
        start = time.monotonic()
        pool.close()
        assert time.monotonic() - start < 0.1
        with pytest.raises(RuntimeError):
            await pool.call(lambda: None)
    finally:
        hung.set()
    for t in threads:
        t.join(5)
        assert not t.is_alive()


async def test_dropped_pool_stops_its_threads():
    import gc

    pool = IOPool("dropped", workers=2, timeout=5)
    for _ in range(2):
        await pool.call(time.sleep, 0)
    threads = [t for t in threading.enumerate() if t.name.startswith("io-dropped-")]
    assert threads
    del pool
    gc.collect()
    for t in threads:
        t.join(5)
        assert not t.is_alive()


async def test_each_call_times_out_at_its_own_deadline():
    """One timer per pool serves every deadline: calls with shorter
    deadlines than one already waiting, and ones after it, each fail at
    their own (and no earlier), while a longer one goes on."""
    async def timed(deadline: float | None) -> float:
        start = time.monotonic()
        with pytest.raises(ResourceTimeout):
            await pool.call(hung.wait, timeout=deadline)
        return time.monotonic() - start

    with hanging(workers=4, timeout=30) as (pool, hung):
        longest = asyncio.ensure_future(pool.call(hung.wait))      # 30 s
        took = await asyncio.gather(timed(0.6), timed(0.2), timed(0.4))
        for spent, deadline in zip(took, (0.6, 0.2, 0.4), strict=True):
            assert deadline <= spent < deadline + 1.0, (spent, deadline)
        assert not longest.done()
        hung.set()
        assert await longest is True


@pytest.mark.parametrize("key", [None, "k"])
async def test_a_cancelled_caller_s_queued_call_never_runs(key: str | None):
    """... and a keyed one holds no key: it never ran, it cannot land."""
    ran: list[str] = []
    with hanging(workers=1, timeout=5) as (pool, hung):
        busy = asyncio.ensure_future(pool.call(hung.wait))
        queued = asyncio.ensure_future(pool.call(ran.append, "late write", key=key))
        await asyncio.sleep(0)      # both queued
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await queued
        hung.set()
        assert await busy is True
        assert await pool.call(lambda: "next", key=key) == "next"
        assert ran == []


async def test_the_storage_s_own_timeout_is_851():
    def etimedout() -> None:
        raise TimeoutError(110, "Connection timed out")

    with hanging(workers=1, timeout=5) as (pool, _):
        with pytest.raises(ResourceTimeout) as e:
            await pool.call(etimedout)
        assert e.value.code == 851


async def test_no_write_of_a_record_while_an_earlier_one_is_late():
    """A keyed write that timed out while running may still land (storage
    answering at last). Until it returned, writes of its key are refused
    (851) and never run, so none lands before it and is undone by it;
    other keys and unkeyed calls go on (a queued one given up holds no
    key: test_a_cancelled_caller_s_queued_call_never_runs)."""
    writes: list[str] = []

    def write(value: str) -> None:
        if value == "old":
            hung.wait()
        writes.append(value)

    with hanging(workers=2, timeout=0.2) as (pool, hung):
        with pytest.raises(ResourceTimeout, match="did not finish"):
            await pool.call(write, "old", key="vol.meta")
        with pytest.raises(ResourceTimeout, match=r"earlier write of vol\.meta has not returned"):
            await pool.call(write, "new", key="vol.meta")
        await pool.call(write, "other", key="other.meta")
        assert await pool.call(lambda: "unkeyed") == "unkeyed"
        settled = asyncio.ensure_future(pool.settled("vol.meta"))
        await asyncio.sleep(0)
        assert not settled.done()
        hung.set()
        await asyncio.wait_for(settled, 5)
        await pool.call(write, "new", key="vol.meta")
        assert writes == ["other", "old", "new"]
        await pool.settled("vol.meta")      # none late: at once



async def test_a_write_outside_the_pool_holds_its_key():
    """IOPool.hold: a write of a record that runs on in a thread of its own
    (an OVF upload's writer) holds the key as a late call does, until the
    function it got is called from that thread."""
    with hanging(workers=1, timeout=5) as (pool, _):
        returned = pool.hold("store")
        assert pool.late("store") and not pool.late("other")
        with pytest.raises(ResourceTimeout, match="earlier write of store"):
            await pool.call(lambda: None, key="store")
        thread = threading.Thread(target=returned)
        thread.start()
        await asyncio.wait_for(pool.settled("store"), 5)
        thread.join()
        assert not pool.late("store")
        assert await pool.call(lambda: "next", key="store") == "next"
