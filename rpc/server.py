"""The HTTP edge: one aiohttp app behind mutual TLS.

Routes: POST /jsonrpc, GET /jsonrpc/ws (JSON-RPC plus server
notifications), GET /health, GET /metrics. Other modules add routes to the
same app (the OVF store streams) through `extra_routes`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
from collections.abc import AsyncIterator, Iterable
from typing import Any

from aiohttp import WSMsgType, web

from agent import __version__
from agent.config import ServerConfig
from agent.context import Agent
from rpc.dispatch import Dispatcher

log = logging.getLogger("rpc.server")

AGENT_KEY = web.AppKey("agent", Agent)
DISPATCHER_KEY = web.AppKey("dispatcher", Dispatcher)
WS_KEY: web.AppKey[set[web.WebSocketResponse]] = web.AppKey("websockets")

PARSE_ERROR = json.dumps({"jsonrpc": "2.0", "id": None,
                          "error": {"code": -32700, "message": "Parse error",
                                    "data": "request body is not UTF-8"}})


def ssl_context(config: ServerConfig) -> ssl.SSLContext:
    """Server side of mutual TLS: TLS 1.2+, a client certificate signed by the CA."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(config.cert_file, config.key_file)
    ctx.load_verify_locations(cafile=config.ca_file)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def peer_name(request: web.Request) -> str:
    transport = request.transport
    cert = transport.get_extra_info("peercert") if transport else None
    if cert:
        for rdn in cert.get("subject", ()):
            for key, value in rdn:
                if key == "commonName":
                    return str(value)
    return request.remote or "-"


async def handle_jsonrpc(request: web.Request) -> web.StreamResponse:
    dispatcher = request.app[DISPATCHER_KEY]
    raw = await request.read()
    try:
        body = raw.decode("utf-8")
    except UnicodeDecodeError:
        return web.Response(text=PARSE_ERROR, content_type="application/json")
    response = await dispatcher.dispatch(body, peer_name(request))
    if not response:
        return web.Response(status=204)
    return web.Response(text=response, content_type="application/json")


async def handle_ws(request: web.Request) -> web.StreamResponse:
    agent = request.app[AGENT_KEY]
    dispatcher = request.app[DISPATCHER_KEY]
    clients = request.app[WS_KEY]
    config = agent.config.server
    if len(clients) >= config.max_ws_clients:
        raise web.HTTPServiceUnavailable(text="too many WebSocket clients")
    ws = web.WebSocketResponse(heartbeat=30.0, max_msg_size=config.max_body_bytes)
    await ws.prepare(request)
    peer = peer_name(request)
    sub = agent.events.subscribe()
    clients.add(ws)
    agent.metrics.ws_clients.set(len(clients))
    calls: set[asyncio.Task[None]] = set()
    send_lock = asyncio.Lock()

    async def send(text: str) -> None:
        async with send_lock:
            if not ws.closed:
                await ws.send_str(text)

    async def pump_events() -> None:
        overflow = asyncio.create_task(sub.overflowed.wait())
        try:
            while True:
                get = asyncio.create_task(sub.queue.get())
                done, _ = await asyncio.wait({get, overflow},
                                             return_when=asyncio.FIRST_COMPLETED)
                if get not in done:
                    get.cancel()
                    await ws.close(code=1013, message=b"too slow: events dropped")
                    return
                await send(json.dumps(get.result()))
        finally:
            overflow.cancel()

    async def answer(text: str) -> None:
        response = await dispatcher.dispatch(text, peer)
        if response:
            await send(response)

    pump = asyncio.create_task(pump_events())
    try:
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                task = asyncio.create_task(answer(msg.data))
                calls.add(task)
                task.add_done_callback(calls.discard)
            elif msg.type == WSMsgType.BINARY:
                await send(PARSE_ERROR)
            elif msg.type == WSMsgType.ERROR:
                log.info("WebSocket from %s closed with error %s", peer, ws.exception())
    finally:
        agent.events.unsubscribe(sub)
        clients.discard(ws)
        agent.metrics.ws_clients.set(len(clients))
        pump.cancel()
        for task in calls:
            task.cancel()
        await asyncio.gather(pump, *calls, return_exceptions=True)
    return ws


async def handle_health(request: web.Request) -> web.StreamResponse:
    agent = request.app[AGENT_KEY]
    return web.json_response({"status": "ok", "version": __version__,
                              "hostId": agent.host.host_id})


async def handle_metrics(request: web.Request) -> web.StreamResponse:
    agent = request.app[AGENT_KEY]
    return web.Response(body=agent.metrics.render(),
                        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


async def _background(app: web.Application) -> AsyncIterator[None]:
    agent = app[AGENT_KEY]
    tasks = [asyncio.create_task(agent.metrics.watch_loop_lag(), name="loop-lag")]
    yield
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _close_websockets(app: web.Application) -> None:
    clients: set[web.WebSocketResponse] = app[WS_KEY]
    for ws in list(clients):
        with contextlib.suppress(Exception):
            await ws.close(code=1001, message=b"agent shutting down")


def make_app(agent: Agent, dispatcher: Dispatcher,
             extra_routes: Iterable[web.RouteDef] = ()) -> web.Application:
    app = web.Application(client_max_size=agent.config.server.max_body_bytes)
    app[AGENT_KEY] = agent
    app[DISPATCHER_KEY] = dispatcher
    app[WS_KEY] = set()
    app.add_routes([
        web.post("/jsonrpc", handle_jsonrpc),
        web.get("/jsonrpc/ws", handle_ws),
        web.get("/health", handle_health),
        web.get("/metrics", handle_metrics),
        *extra_routes,
    ])
    app.cleanup_ctx.append(_background)
    app.on_shutdown.append(_close_websockets)
    return app


def describe(config: ServerConfig) -> dict[str, Any]:
    scheme = "https" if config.tls else "http"
    return {"url": f"{scheme}://{config.host}:{config.port}/jsonrpc"}
