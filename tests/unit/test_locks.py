import asyncio

import pytest

from storage.errors import AcquireLockFailure
from storage.locks import EXCLUSIVE, SHARED, LockManager, request


async def test_exclusive_excludes():
    locks = LockManager()
    order = []

    async def op(name, delay):
        async with locks.hold(request("volume", "v1")):
            order.append(f"{name}+")
            await asyncio.sleep(delay)
            order.append(f"{name}-")

    await asyncio.gather(op("a", 0.05), op("b", 0.01))
    assert order in (["a+", "a-", "b+", "b-"], ["b+", "b-", "a+", "a-"])
    assert locks.held() == [] and locks._locks == {}


async def test_shared_together_exclusive_waits():
    locks = LockManager()
    inside = 0
    peak = 0

    async def reader():
        nonlocal inside, peak
        async with locks.hold(request("image", "i", SHARED)):
            inside += 1
            peak = max(peak, inside)
            await asyncio.sleep(0.05)
            inside -= 1

    async def writer():
        await asyncio.sleep(0.01)
        async with locks.hold(request("image", "i", EXCLUSIVE)):
            assert inside == 0

    await asyncio.gather(reader(), reader(), writer())
    assert peak == 2
    assert locks._locks == {}


async def test_nowait_and_timeout_fail_with_651():
    locks = LockManager()
    async with locks.hold(request("domain", "d")):
        with pytest.raises(AcquireLockFailure) as e:
            async with locks.hold(request("domain", "d"), nowait=True):
                pass
        assert e.value.code == 651
        with pytest.raises(AcquireLockFailure):
            async with locks.hold(request("domain", "d"), timeout=0.05):
                pass
    assert locks._locks == {}


async def test_fixed_order_prevents_deadlock():
    locks = LockManager()

    async def op(first, second):
        for _ in range(20):
            async with locks.hold(request("volume", first), request("volume", second)):
                await asyncio.sleep(0)

    async with asyncio.timeout(5):
        await asyncio.gather(op("a", "b"), op("b", "a"), op("a", "b"))


async def test_cancelled_waiter_leaves_no_entry():
    locks = LockManager()
    async with locks.hold(request("volume", "v")):
        task = asyncio.create_task(locks.hold(request("volume", "v")).__aenter__())
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert locks._locks == {}


async def test_waiting_reader_never_shares_with_a_new_writer():
    locks = LockManager()
    state = {"readers": 0, "writers": 0}
    violations = []

    def check():
        if state["writers"] > 1 or (state["writers"] and state["readers"]):
            violations.append(dict(state))

    async def hold(mode, delay):
        await asyncio.sleep(delay)
        key = "readers" if mode == SHARED else "writers"
        async with locks.hold(request("volume", "v", mode)):
            state[key] += 1
            check()
            await asyncio.sleep(0.01)
            state[key] -= 1

    # a writer holds; a reader waits; the writer leaves; more writers arrive
    await asyncio.gather(hold(EXCLUSIVE, 0), hold(SHARED, 0.001), hold(EXCLUSIVE, 0.002),
                         hold(SHARED, 0.011), hold(EXCLUSIVE, 0.012), hold(EXCLUSIVE, 0.02))
    assert violations == []
    assert locks._locks == {}


def test_unknown_namespace():
    with pytest.raises(ValueError):
        request("disk", "x")
