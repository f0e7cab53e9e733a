import asyncio

import pytest

from storage.errors import AcquireLockFailure
from storage.locks import EXCLUSIVE, SHARED, LockManager, request
from tests.polling import lock_users, until


async def test_exclusive_excludes():
    locks = LockManager()
    order = []
    leave = {"a": asyncio.Event(), "b": asyncio.Event()}

    async def op(name):
        async with locks.hold(request("volume", "v1")):
            order.append(f"{name}+")
            await leave[name].wait()
            order.append(f"{name}-")

    a = asyncio.create_task(op("a"))
    await until(lambda: order == ["a+"], "a holds the lock")
    b = asyncio.create_task(op("b"))
    await until(lambda: lock_users(locks, "volume", "v1") == 2, "b waits for it")
    assert order == ["a+"]
    leave["a"].set()
    await until(lambda: order == ["a+", "a-", "b+"], "b holds it once a left")
    leave["b"].set()
    await asyncio.gather(a, b)
    assert order in (["a+", "a-", "b+", "b-"], ["b+", "b-", "a+", "a-"])
    assert locks.held() == [] and locks._locks == {}


async def test_shared_together_exclusive_waits():
    locks = LockManager()
    inside = 0
    peak = 0

    leave = asyncio.Event()
    wrote = []

    async def reader():
        nonlocal inside, peak
        async with locks.hold(request("image", "i", SHARED)):
            inside += 1
            peak = max(peak, inside)
            await leave.wait()
            inside -= 1

    async def writer():
        async with locks.hold(request("image", "i", EXCLUSIVE)):
            assert inside == 0
            wrote.append(True)

    readers = [asyncio.create_task(reader()) for _ in range(2)]
    await until(lambda: inside == 2, "both readers inside together")
    w = asyncio.create_task(writer())
    await until(lambda: lock_users(locks, "image", "i") == 3, "the writer waits")
    assert wrote == []
    leave.set()
    await asyncio.gather(*readers, w)
    assert wrote == [True]
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
        await until(lambda: lock_users(locks, "volume", "v") == 2, "the waiter waits")
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

    inside: list[asyncio.Event] = []
    tasks = []

    async def hold(mode):
        key = "readers" if mode == SHARED else "writers"
        async with locks.hold(request("volume", "v", mode)):
            state[key] += 1
            check()
            leave = asyncio.Event()
            inside.append(leave)
            await leave.wait()
            state[key] -= 1

    def users():
        return lock_users(locks, "volume", "v")

    async def arrive(mode):
        before = users()
        tasks.append(asyncio.create_task(hold(mode)))
        await until(lambda: users() == before + 1, f"a {mode} request arrived")

    async def holders_leave():
        leaving, inside[:] = list(inside), []
        for ev in leaving:
            ev.set()
        await until(lambda: inside or all(t.done() for t in tasks), "the next holders")

    # a writer holds; a reader waits; the writer leaves; more writers arrive
    await arrive(EXCLUSIVE)
    await arrive(SHARED)
    await arrive(EXCLUSIVE)
    await holders_leave()
    await arrive(SHARED)
    await arrive(EXCLUSIVE)
    await holders_leave()
    await arrive(EXCLUSIVE)
    while not all(t.done() for t in tasks):
        await holders_leave()
    await asyncio.gather(*tasks)
    assert len(tasks) == 6
    assert violations == []
    assert locks._locks == {}


def test_unknown_namespace():
    with pytest.raises(ValueError, match="unknown lock namespace disk"):
        request("disk", "x")
