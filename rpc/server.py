"""The HTTP edge: one aiohttp app behind mutual TLS.

Routes: POST /jsonrpc, GET /jsonrpc/ws (JSON-RPC plus server
notifications), GET /health, GET /metrics. Other modules add routes to the
same app (the OVF store streams) through `extra_routes`.

Hostile clients are bounded here: connections idle or slow to send their
request head are closed, a JSON-RPC body must arrive in time and within the
size limit (a larger Content-Length is refused unread), only JSON is
accepted, and a WebSocket client has a bounded number of calls running.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web
from aiohttp.http import WebSocketError, WebSocketWriter
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_request import BaseRequest

from agent import __version__
from agent.config import ServerConfig
from agent.context import Agent
from agent.events import EventBus
from rpc.dispatch import Dispatcher
from rpc.tlsguard import HandshakeGuard
from storage.fileio import CALLBACK_CONTEXT

log = logging.getLogger("rpc.server")

AGENT_KEY = web.AppKey("agent", Agent)
DISPATCHER_KEY = web.AppKey("dispatcher", Dispatcher)
WS_KEY: web.AppKey[set[web.WebSocketResponse]] = web.AppKey("websockets")
BODY_TIMEOUT_KEY = web.AppKey("body_timeout", float)

# A connection that has not sent a complete request (headers) this long after
# it was accepted or after its last response is closed: slow-loris clients
# and forgotten keep-alive connections do not hold sockets for aiohttp's
# default hour. Longer than aiohttp's client keep-alive (15 s), so a client
# never reuses a connection the agent is closing.
IDLE_TIMEOUT = 30.0
# The whole body of a JSON-RPC POST must arrive within this (at most
# max_body_bytes: 4 MiB in 30 s is 140 KB/s).
BODY_TIMEOUT = 30.0
# Calls one WebSocket client may have running at once.
WS_IN_FLIGHT = 64
JSON_TYPES = frozenset({"application/json", "application/json-rpc"})

PARSE_ERROR = json.dumps({"jsonrpc": "2.0", "id": None,
                          "error": {"code": -32700, "message": "Parse error",
                                    "data": "request body is not UTF-8"}})


def ssl_context(config: ServerConfig) -> ssl.SSLContext:
    """Server side of mutual TLS (every listener): TLS 1.3, or TLS 1.2 with
    forward-secret AEAD suites only (Mozilla's "intermediate" profile); a
    client certificate signed by the CA."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # TLS 1.2: ECDHE with AES-GCM or ChaCha20-Poly1305, no CBC (LUCKY13), no
    # static RSA, no DHE (its parameters would need managing). TLS 1.3's
    # suites are all AEAD and keep OpenSSL's defaults.
    ctx.set_ciphers("ECDHE+AESGCM:ECDHE+CHACHA20")
    # Python 3.11's ssl sets one key exchange group only; P-256 is the one
    # every TLS stack has (FIPS and Java 8 included). OpenSSL's default list
    # also offers X448 and P-521, which the profile does not allow.
    ctx.set_ecdh_curve("prime256v1")
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
    if request.content_type not in JSON_TYPES:
        raise web.HTTPUnsupportedMediaType(text="Content-Type must be application/json")
    # A declared length over the limit is refused before reading any of it
    # (aiohttp's own check counts the bytes as they arrive).
    limit = request.app[AGENT_KEY].config.server.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit,
                                            actual_size=request.content_length)
    try:
        if request.content.is_eof():
            # The whole body came with the head (every small call): reading
            # it cannot wait, so no timer is armed and cancelled (issue 21:
            # 3% of a ping's CPU).
            raw = await request.read()
        else:
            async with asyncio.timeout(request.app[BODY_TIMEOUT_KEY]):
                raw = await request.read()
    except TimeoutError:
        log.info("%s: request body not received in time, closing", request.remote)
        raise web.HTTPRequestTimeout(text="request body not received in time") from None
    except ConnectionError as e:
        # the client went away in the middle of its body: its doing, no traceback
        log.info("%s: connection lost while reading the request body: %s", request.remote, e)
        raise web.HTTPBadRequest(text="connection lost") from None
    try:
        body = raw.decode("utf-8")
    except UnicodeDecodeError:
        return web.Response(text=PARSE_ERROR, content_type="application/json")
    response = await dispatcher.dispatch(body, peer_name(request))
    if not response:
        return web.Response(status=204)
    return web.Response(text=response, content_type="application/json")


class _MaskedFramesOnly:
    """In front of aiohttp's WebSocket frame reader: RFC 6455 section 5.1,
    a server MUST close the connection on a frame from the client that is
    not masked. aiohttp (3.14) reads such frames as any other. This follows
    the frame boundaries (headers parsed, payloads skipped) and, at the
    first unmasked frame, fails the connection as aiohttp does for its own
    protocol errors: close code 1002, nothing more read."""

    MAX_HEAD = 14

    def __init__(self, parser: Any, queue: Any) -> None:
        self.parser = parser
        self.queue = queue
        self._head = b""      # a frame header cut by a read
        self._skip = 0        # payload bytes of the current frame still to come
        self._failed = False

    def _unmasked_at(self, data: bytes) -> int:
        """Where in data the first unmasked frame starts; -1 if none."""
        pos, n = 0, len(data)
        while pos < n:
            if self._skip:
                step = min(self._skip, n - pos)
                self._skip -= step
                pos += step
                continue
            head = self._head + data[pos:pos + self.MAX_HEAD]
            if len(head) >= 2 and not head[1] & 0x80:
                return max(0, pos - len(self._head))
            size = head[1] & 0x7F if len(head) >= 2 else 0
            extra = {126: 2, 127: 8}.get(size, 0)
            if len(head) < 2 + extra + 4:
                self._head = head      # all of data: the rest comes next read
                return -1
            if extra:
                size = int.from_bytes(head[2:2 + extra], "big")
            pos += 2 + extra + 4 - len(self._head)
            self._head = b""
            self._skip = size
        return -1

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        if self._failed:
            return True, b""
        data = bytes(data)
        bad = self._unmasked_at(data)
        if bad >= 0:
            # the frames before it are read, as they would have been alone
            self._failed = True
            if bad:
                self.parser.feed_data(data[:bad])
            self.queue.set_exception(WebSocketError(WSCloseCode.PROTOCOL_ERROR,
                                                    "unmasked frame from the client"))
            return True, b""
        result: tuple[bool, bytes] = self.parser.feed_data(data)
        return result

    def feed_eof(self) -> None:
        self.parser.feed_eof()


class _WebSocketResponse(web.WebSocketResponse):
    """Puts _MaskedFramesOnly in front of the reader. This uses aiohttp's
    internals (_post_start, the handler's _payload_parser and
    _message_tail, as in aiohttp 3.14): a change there fails
    tests/integration/test_edge_strict.py::test_unmasked_client_frame_closes_the_websocket."""

    def _post_start(self, request: BaseRequest, protocol: str | None,
                    writer: WebSocketWriter) -> None:
        # Frames that came with the upgrade request go through the check
        # too: aiohttp hands them to its reader in set_parser.
        handler = request.protocol
        tail, handler._message_tail = handler._message_tail, b""
        super()._post_start(request, protocol, writer)
        check = _MaskedFramesOnly(handler._payload_parser, self._reader)
        handler._payload_parser = check
        if tail:
            eof, _ = check.feed_data(tail)
            if eof:
                handler.close()


class _Notifications:
    """A WebSocket client's notifications, sent by a task that runs only
    while some wait: a client with none to send has no task waiting on its
    queue (500 idle pumps, each re-made at every event, were ~2,500 objects
    every young collection walked, issue 21). Overflowed: the WebSocket is
    closed with 1013."""

    def __init__(self, bus: EventBus, ws: web.WebSocketResponse,
                 send: Callable[[str], Awaitable[None]]) -> None:
        self.bus, self.ws, self.send = bus, ws, send
        self.sub = bus.subscribe(wake=self._wake)
        self.task: asyncio.Task[None] | None = None

    def _wake(self) -> None:
        # Called by the bus as it publishes: start the sender unless it
        # runs (one about to end reads the new event first: nothing runs
        # between its last poll and its end). The shared context: the
        # publisher's (a job's, a request's) is not the sender's.
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self._send(), context=CALLBACK_CONTEXT)

    async def _send(self) -> None:
        while (event := self.sub.poll()) is not None:
            await self.send(event.text)
        if self.sub.overflowed.is_set():
            await self.ws.close(code=1013, message=b"too slow: events dropped")

    def close(self) -> list[asyncio.Task[None]]:
        """Unsubscribed; the sender's task, if any, to cancel and await."""
        self.bus.unsubscribe(self.sub)
        return [self.task] if self.task is not None else []


async def handle_ws(request: web.Request) -> web.StreamResponse:
    agent = request.app[AGENT_KEY]
    dispatcher = request.app[DISPATCHER_KEY]
    clients = request.app[WS_KEY]
    config = agent.config.server
    if len(clients) >= config.max_ws_clients:
        raise web.HTTPServiceUnavailable(text="too many WebSocket clients")
    ws = _WebSocketResponse(heartbeat=30.0, max_msg_size=config.max_body_bytes)
    await ws.prepare(request)
    peer = peer_name(request)
    calls: set[asyncio.Task[None]] = set()
    in_flight = asyncio.Semaphore(WS_IN_FLIGHT)
    send_lock = asyncio.Lock()

    async def send(text: str) -> None:
        async with send_lock:
            if not ws.closed:
                await ws.send_str(text)

    async def answer(text: str) -> None:
        response = await dispatcher.dispatch(text, peer)
        if response:
            await send(response)

    def answered(task: asyncio.Task[None]) -> None:
        calls.discard(task)
        in_flight.release()

    notifications = _Notifications(agent.events, ws, send)
    clients.add(ws)
    agent.metrics.ws_clients.set(len(clients))
    try:
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                # At most WS_IN_FLIGHT calls run per client: beyond that the
                # agent stops reading the socket until one ends (TCP
                # back-pressure instead of a task per message, unbounded).
                await in_flight.acquire()
                task = asyncio.create_task(answer(msg.data))
                calls.add(task)
                task.add_done_callback(answered, context=CALLBACK_CONTEXT)
            elif msg.type == WSMsgType.BINARY:
                await send(PARSE_ERROR)
            elif msg.type == WSMsgType.ERROR:
                log.info("WebSocket from %s closed with error %s", peer, ws.exception())
    finally:
        clients.discard(ws)
        agent.metrics.ws_clients.set(len(clients))
        tasks = [*calls, *notifications.close()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
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


class _ConnectionLog:
    """The logger aiohttp's connection handler is given: a request it cannot
    parse (bad request line, header too long...) is the client's error,
    logged in one line; anything else keeps its traceback."""

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger

    def debug(self, msg: str, *args: Any, **kw: Any) -> None:
        self.logger.debug(msg, *args, **kw)

    def exception(self, msg: str, *args: Any, exc_info: Any = True, **kw: Any) -> None:
        if isinstance(exc_info, HttpProcessingError):
            reason = " ".join(str(exc_info.message).split())[:200]
            self.logger.info(msg + ": %s (HTTP %d)", *args, reason, exc_info.code)
        else:
            self.logger.exception(msg, *args, exc_info=exc_info, **kw)


def make_app(agent: Agent, dispatcher: Dispatcher,
             extra_routes: Iterable[web.RouteDef] = (), *,
             idle_timeout: float = IDLE_TIMEOUT,
             body_timeout: float = BODY_TIMEOUT) -> web.Application:
    # aiohttp's keepalive_timeout runs from the moment a connection is
    # accepted and after each response, and closes the connection if no
    # complete request head arrived by then: the idle and header timeout.
    app = web.Application(client_max_size=agent.config.server.max_body_bytes,
                          handler_args={"keepalive_timeout": idle_timeout,
                                        "logger": _ConnectionLog(log)})
    app[AGENT_KEY] = agent
    app[BODY_TIMEOUT_KEY] = body_timeout
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


class _TlsFront(asyncio.Protocol):
    """A connection of the main port until its TLS handshake is done: then
    its TLS transport goes to aiohttp's request handler. asyncio's own
    TLS server logs nothing of a refused handshake (only in debug mode) and
    gives it 60 s; here it gets server.handshake_timeout, a per-address
    limit and a log line (rpc.tlsguard)."""

    def __init__(self, site: TlsSite) -> None:
        self.site = site
        self.early = b""          # application data that came with the handshake's end
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        peer = transport.get_extra_info("peername")
        address = str(peer[0]) if peer else "-"
        if not self.site.guard.admit(address):
            transport.abort()
            return
        # start_tls takes the reading over
        transport.pause_reading()
        task = asyncio.get_running_loop().create_task(self._handshake(transport, address))
        self.site.handshakes.add(task)
        task.add_done_callback(self.site.handshakes.discard)

    async def _handshake(self, transport: asyncio.Transport, address: str) -> None:
        guard = self.site.guard
        loop = asyncio.get_running_loop()
        try:
            # asyncio's own deadline (a backstop here) fails with a
            # ConnectionAbortedError that reads as the client's doing
            async with asyncio.timeout(guard.timeout):
                tls = await loop.start_tls(transport, self, self.site.tls, server_side=True,
                                           ssl_handshake_timeout=guard.timeout + 1)
        except (OSError, TimeoutError, ConnectionError) as e:
            guard.failed(address, e)
            transport.abort()
            return
        except asyncio.CancelledError:
            transport.abort()
            raise
        finally:
            guard.release(address)
        if tls is None or self.lost:
            transport.abort()
            return
        handler = self.site.handler()
        tls.set_protocol(handler)
        handler.connection_made(tls)
        if self.early:
            handler.data_received(self.early)

    def data_received(self, data: bytes) -> None:
        self.early += data

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True


class TlsSite(web.TCPSite):
    """web.TCPSite whose TLS handshakes go through _TlsFront."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, tls: ssl.SSLContext,
                 guard: HandshakeGuard, **kw: Any) -> None:
        super().__init__(runner, host, port, **kw)
        self.tls = tls
        self.guard = guard
        self.handshakes: set[asyncio.Task[None]] = set()

    def handler(self) -> asyncio.Protocol:
        server = self._runner.server
        assert server is not None
        protocol: asyncio.Protocol = server()
        return protocol

    async def start(self) -> None:
        self._runner._reg_site(self)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _TlsFront(self), self._host, self._port, backlog=self._backlog,
            reuse_address=self._reuse_address, reuse_port=self._reuse_port)
        self._bound_port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        await super().stop()
        for task in list(self.handshakes):
            task.cancel()
        await asyncio.gather(*self.handshakes, return_exceptions=True)


def describe(config: ServerConfig) -> dict[str, Any]:
    scheme = "https" if config.tls else "http"
    return {"url": f"{scheme}://{config.host}:{config.port}/jsonrpc"}
