"""The per-call cost of the JSON-RPC dispatch (issue 21): a single request
runs through jsonrpcserver's own steps without its batch pipeline, so a
call whose verb does not wait is answered without a trip through the event
loop, and with a bounded amount of Python work. The answers themselves are
tests/unit/test_dispatch.py's."""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

from agent import config as cfg
from agent.context import Agent
from rpc.dispatch import Dispatcher
from tests.unit.test_dispatch import U, table

ECHO = json.dumps({"jsonrpc": "2.0", "method": "echo", "params": {"volUUID": U}, "id": 7})

# Python and C calls made to dispatch ECHO, counted with sys.setprofile:
# 274 through jsonrpcserver's dispatch_to_serializable (Either chains,
# signature binding, asyncio.gather), 91 through the steps called directly.
MAX_CALLS = 150


@pytest.fixture
async def dispatcher(tmp_path: Path) -> AsyncIterator[Dispatcher]:
    config = cfg.load(tmp_path / "none.toml", cfg.dev_overrides(tmp_path, 1))
    agent = Agent.create(config)
    await agent.start()
    yield Dispatcher(agent, table.enabled(config))
    await agent.stop()


def run_without_loop(d: Dispatcher, body: str) -> Any:
    """The answer if dispatch finished at its first step; fails if it
    handed control to the event loop (a task, a gather, a timer)."""
    coro = d.dispatch(body)
    try:
        waiting = coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    pytest.fail(f"dispatch waited on the event loop for {waiting!r}")


@pytest.mark.parametrize("body, expected", [
    (ECHO, {"jsonrpc": "2.0", "result": {"volUUID": U, "n": 1}, "id": 7}),
    (json.dumps({"jsonrpc": "2.0", "method": "nope", "id": "a"}),
     {"jsonrpc": "2.0", "error": {"code": -32601, "message": "Method not found",
                                  "data": "nope"}, "id": "a"}),
    (json.dumps({"jsonrpc": "2.0", "method": "echo", "params": {"volUUID": "x"}, "id": 2}),
     None),
])
async def test_single_call_is_answered_without_the_event_loop(dispatcher: Dispatcher,
                                                               body: str,
                                                               expected: Any) -> None:
    answer = json.loads(run_without_loop(dispatcher, body))
    if expected is None:    # invalid params: the code is what counts here
        assert answer["error"]["code"] == -32602
    else:
        assert answer == expected


async def test_notification_is_run_without_the_event_loop(dispatcher: Dispatcher) -> None:
    body = json.dumps({"jsonrpc": "2.0", "method": "echo", "params": {"volUUID": U}})
    assert run_without_loop(dispatcher, body) == ""
    text = dispatcher.agent.metrics.render().decode()
    assert 'hostagent_rpc_calls_total{outcome="ok",verb="echo"} 1.0' in text


async def test_single_call_python_work_is_bounded(dispatcher: Dispatcher) -> None:
    await dispatcher.dispatch(ECHO)      # first call: lazy imports, caches
    calls = 0

    def count(frame: FrameType, event: str, arg: Any) -> None:
        nonlocal calls
        if event in ("call", "c_call"):
            calls += 1

    sys.setprofile(count)
    try:
        answer = await dispatcher.dispatch(ECHO)
    finally:
        sys.setprofile(None)
    assert json.loads(answer)["result"]["volUUID"] == U
    assert 0 < calls <= MAX_CALLS, calls
