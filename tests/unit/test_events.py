"""The event bus: each notification serialized once for all subscribers; a
subscriber that falls behind is dropped and told so."""

from __future__ import annotations

import asyncio
import json

import pytest

from agent import events
from agent.events import EventBus


async def test_every_subscriber_gets_one_text_in_order() -> None:
    bus = EventBus(queue_size=10)
    subs = [bus.subscribe() for _ in range(3)]
    bus.publish("job.status", {"id": "a", "status": "running"})
    bus.publish("job.status", {"id": "a", "status": "done"})
    got = [[await s.next() for _ in range(2)] for s in subs]
    assert got[0][0] is got[1][0] is got[2][0]       # one object, one dumps
    assert [json.loads(m.text) for m in got[0] if m] == [
        {"jsonrpc": "2.0", "method": "job.status", "params": {"id": "a", "status": s}}
        for s in ("running", "done")]


async def test_the_text_is_taken_when_published(monkeypatch: pytest.MonkeyPatch) -> None:
    bus = EventBus()
    dumps = 0
    real = json.dumps

    def counting(obj: object) -> str:
        nonlocal dumps
        dumps += 1
        return real(obj)
    monkeypatch.setattr(events.json, "dumps", counting)
    bus.publish("job.status", {"id": "x"})          # nobody listens: not serialized
    assert dumps == 0
    sub = bus.subscribe()
    params = {"id": "y", "status": "running"}
    bus.publish("job.status", params)
    params["status"] = "changed later"
    message = await sub.next()
    assert message is not None and dumps == 1
    assert json.loads(message.text)["params"]["status"] == "running"


async def test_an_overflowed_subscriber_is_dropped_and_its_next_ends() -> None:
    bus = EventBus(queue_size=2)
    slow, fast = bus.subscribe(), bus.subscribe()
    for i in range(3):
        bus.publish("e", {"i": i})
        assert await fast.next() is not None
    assert bus.subscribers == 1          # slow dropped at the third event
    assert await slow.next() is None     # at once: no wait on a full queue
    waiting = asyncio.ensure_future(fast.next())
    await asyncio.sleep(0)
    assert not waiting.done()            # a subscriber keeping up waits
    bus.publish("e", {"i": 3})
    assert (await waiting) is not None


class _FakeWs:
    def __init__(self) -> None:
        self.closed_with: int | None = None

    async def close(self, code: int, message: bytes) -> None:
        self.closed_with = code


async def test_a_websocket_s_notifications_run_only_while_events_wait() -> None:
    """rpc.server._Notifications: events sent in order by a task that ends
    once none waits (an idle client has no task waiting on its queue), and
    is started again by the next event."""
    from typing import Any, cast

    from rpc.server import _Notifications

    bus = EventBus(queue_size=10)
    sent: list[int] = []
    gate = asyncio.Event()

    async def send(text: str) -> None:
        await gate.wait()
        sent.append(json.loads(text)["params"]["i"])

    n = _Notifications(bus, cast(Any, _FakeWs()), send)
    assert n.task is None                    # nothing published: no task
    for i in range(3):
        bus.publish("e", {"i": i})
    first = n.task
    assert first is not None
    gate.set()
    await first
    assert sent == [0, 1, 2]
    bus.publish("e", {"i": 3})               # the next event starts another
    assert n.task is not first and n.task is not None
    await n.task
    assert sent == [0, 1, 2, 3]
    assert n.close() == [n.task] and bus.subscribers == 0


async def test_a_websocket_that_falls_behind_is_closed_with_1013() -> None:
    from typing import Any, cast

    from rpc.server import _Notifications

    bus = EventBus(queue_size=2)
    ws, sent, gate = _FakeWs(), [], asyncio.Event()

    async def send(text: str) -> None:
        await gate.wait()
        sent.append(text)

    n = _Notifications(bus, cast(Any, ws), send)
    for i in range(3):                       # before the sender ran
        bus.publish("e", {"i": i})
    assert bus.subscribers == 0              # dropped at the overflow
    gate.set()
    assert n.task is not None
    await n.task
    # nothing more is sent after an overflow: the engine reconnects and
    # reads the state again (getJobs)
    assert ws.closed_with == 1013 and sent == []


async def test_a_websocket_overflowing_while_sending_is_closed_after_that_send() -> None:
    from typing import Any, cast

    from rpc.server import _Notifications

    bus = EventBus(queue_size=2)
    ws, sent = _FakeWs(), []
    sending, gate = asyncio.Event(), asyncio.Event()

    async def send(text: str) -> None:
        sending.set()
        await gate.wait()
        sent.append(json.loads(text)["params"]["i"])

    n = _Notifications(bus, cast(Any, ws), send)
    bus.publish("e", {"i": 0})
    await sending.wait()                     # the sender holds event 0
    for i in range(1, 4):
        bus.publish("e", {"i": i})           # 1, 2 queued; 3 overflows
    assert bus.subscribers == 0
    gate.set()
    assert n.task is not None
    await n.task
    assert sent == [0] and ws.closed_with == 1013
