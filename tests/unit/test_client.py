"""The RPC client library's WebSocket side, against a local aiohttp server."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from aiohttp import web

from rpc.client import Client


@pytest.fixture
async def jobs_server() -> Any:
    """A WebSocket endpoint that answers getJobs with an ended job only once
    `release` is set, counting the WebSockets opened."""
    opened: list[web.WebSocketResponse] = []
    release = asyncio.Event()

    async def ws(request: web.Request) -> web.WebSocketResponse:
        sock = web.WebSocketResponse()
        await sock.prepare(request)
        opened.append(sock)
        async for msg in sock:
            req = json.loads(msg.data)
            await release.wait()
            [uuid] = req["params"]["jobUUIDs"]
            await sock.send_str(json.dumps({"jsonrpc": "2.0", "id": req["id"], "result": {
                uuid: {"jobUUID": uuid, "status": "done"}}}))
        return sock

    app = web.Application()
    app.router.add_get("/jsonrpc/ws", ws)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield f"http://127.0.0.1:{port}", opened, release
    await runner.cleanup()


async def test_concurrent_waits_share_one_websocket(jobs_server: Any) -> None:
    """Two wait_job at once on a fresh client: before, each connected its
    own WebSocket and started a second reader of the one kept, which failed
    with "Concurrent call to receive() is not allowed"."""
    url, opened, release = jobs_server
    async with Client(url, None, timeout=10) as client:
        waits = [asyncio.create_task(client.wait_job(u, timeout=10)) for u in ("a", "b")]
        # both calls are on the wire before any answer comes
        async with asyncio.timeout(10):
            while len(client._pending) < 2:
                await asyncio.sleep(0.01)
        release.set()
        done = await asyncio.gather(*waits)
    assert [d["status"] for d in done] == ["done", "done"]
    assert len(opened) == 1


async def test_a_call_after_the_websocket_closed_connects_again(jobs_server: Any) -> None:
    """The agent closed the WebSocket (a ping unanswered while the caller's
    process was busy, in a CI run): the next call connects a new one instead
    of failing to write on the closed one."""
    url, opened, release = jobs_server
    release.set()
    async with Client(url, None, timeout=10) as client:
        assert (await client.ws_call("getJobs", jobUUIDs=["a"]))["a"]["status"] == "done"
        await opened[0].close()
        async with asyncio.timeout(10):
            assert client._ws_reader is not None
            await asyncio.wait({client._ws_reader})
        assert (await client.ws_call("getJobs", jobUUIDs=["b"]))["b"]["status"] == "done"
    assert len(opened) == 2
