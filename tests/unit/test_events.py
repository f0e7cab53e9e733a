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
