"""Async client of the agent: JSON-RPC over HTTPS (mutual TLS) and over the
WebSocket, with job notifications and job waiting.

    async with Client.for_dev("var") as c:
        await c.call("ping")
        await c.call("testStepJob", jobUUID=u)
        job = await c.wait_job(u, progress=print)
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import ssl
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import IO, Any

import aiohttp

ENDED = ("done", "failed", "aborted")


class RpcError(Exception):
    """An error object returned by the agent."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(f"{message} (code {code})")
        self.code = code
        self.message = message
        self.data = data

    @property
    def name(self) -> str:
        return str(self.data.get("name", "")) if isinstance(self.data, dict) else ""

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "data": self.data}


def verifying_context(ca: str | Path) -> ssl.SSLContext:
    """A client context that verifies the agent's certificate against `ca`
    strictly (RFC 5280 conformance, Python 3.13's default), TLS 1.2 or newer."""
    _readable(ca)
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    return ctx


def client_ssl_context(ca: str | Path, cert: str | Path, key: str | Path) -> ssl.SSLContext:
    """verifying_context() presenting the client certificate `cert`."""
    ctx = verifying_context(ca)
    _readable(cert)
    _readable(key)
    ctx.load_cert_chain(str(cert), str(key))
    return ctx


def _readable(path: str | Path) -> None:
    """Raise the OSError (with the path) that opening `path` gives: ssl's own
    errors for a missing file do not name it."""
    with open(path, "rb"):
        pass


class Client:
    def __init__(self, base_url: str, ssl_context: ssl.SSLContext | None, *,
                 timeout: float = 300.0, connections: int = 8) -> None:
        self.base_url = base_url.rstrip("/")
        self.ssl = ssl_context
        self.timeout = timeout
        self.connections = connections
        self._ids = itertools.count(1)
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._ws_reader: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._listeners: set[asyncio.Queue[dict[str, Any]]] = set()
        # connections used and not yet closed: close() waits for their
        # sockets (a connection the agent closed, or one left by its
        # response, leaves the session's pool, whose close waits for the rest)
        self._closing: set[asyncio.Future[None]] = set()
        # one WebSocket and one reader for every caller: two tasks connecting
        # at once (two wait_job) would each start a reader of the same socket
        self._ws_connecting = asyncio.Lock()

    @classmethod
    def for_dev(cls, state_dir: str | Path, port: int = 54321, host: str = "127.0.0.1",
                **kw: Any) -> Client:
        pki = Path(state_dir) / "pki"
        ctx = client_ssl_context(pki / "ca.pem", pki / "client.pem", pki / "client.key")
        return cls(f"https://{host}:{port}", ctx, **kw)

    @classmethod
    def from_files(cls, host: str, port: int, ca: str | Path, cert: str | Path,
                   key: str | Path, **kw: Any) -> Client:
        return cls(f"https://{host}:{port}", client_ssl_context(ca, cert, key), **kw)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(ssl=self.ssl if self.ssl else False,
                                             limit=self.connections)
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=self.timeout))
        return self._session

    async def close(self) -> None:
        await self._close_ws()
        if self._session is not None:
            # waits for its pooled connections' sockets (aiohttp 3.12+)
            await self._session.close()
            # and these: their TLS transports close the socket on a later
            # loop iteration; ended before the caller's loop, or they leak
            if self._closing:
                await asyncio.wait(set(self._closing), timeout=self.timeout)
        self._session = None

    def _track(self, connection: Any) -> None:
        """Remember the connection's "closed" future, for close()."""
        closed = _protocol_closed(connection)
        if closed is not None and closed not in self._closing:
            self._closing.add(closed)
            closed.add_done_callback(self._closed)

    def _closed(self, closed: asyncio.Future[None]) -> None:
        self._closing.discard(closed)
        if not closed.cancelled():
            closed.exception()      # a connection lost on the way is no error here

    async def _close_ws(self) -> None:
        # Stop our reader first: closing a WebSocket that another task is
        # reading can return before its connection is released, which leaks
        # the socket.
        if self._ws_reader is not None:
            self._ws_reader.cancel()
            # (or it ended on its own with the connection: answering a ping
            # on a closing transport raises; closing goes on regardless)
            with contextlib.suppress(asyncio.CancelledError, aiohttp.ClientError, OSError):
                await self._ws_reader
        if self._ws is not None:
            # (aiohttp keeps a WebSocket's connection private)
            self._track(getattr(self._ws, "_conn", None))
            with contextlib.suppress(aiohttp.ClientError, OSError, asyncio.TimeoutError):
                await self._ws.close()
        self._ws = self._ws_reader = None

    # ---- HTTP ----------------------------------------------------------------

    async def post_raw(self, body: str | bytes | IO[bytes]) -> tuple[int, Any]:
        """POST a raw body to /jsonrpc; returns (HTTP status, the decoded JSON
        response, or None when the body is empty or not JSON)."""
        async with self.session.post(f"{self.base_url}/jsonrpc", data=body,
                                     headers={"Content-Type": "application/json"}) as r:
            self._track(r.connection)
            text = await r.text()
            if r.status != 200 or not text:
                return r.status, None
            return r.status, json.loads(text)

    async def call(self, method: str, **params: Any) -> Any:
        """Call `method` with named params; returns its result or raises RpcError."""
        request = {"jsonrpc": "2.0", "id": next(self._ids), "method": method,
                   "params": params}
        status, response = await self.post_raw(json.dumps(request))
        if response is None:
            raise RpcError(-32603, f"empty response (HTTP {status})")
        return _unwrap(response)

    async def batch(self, calls: list[tuple[str, dict[str, Any]]]) -> list[Any]:
        """Several calls in one request; each item is a result or an RpcError."""
        requests = [{"jsonrpc": "2.0", "id": i, "method": m, "params": p}
                    for i, (m, p) in enumerate(calls)]
        _, responses = await self.post_raw(json.dumps(requests))
        by_id = {r.get("id"): r for r in responses or []}
        out: list[Any] = []
        for i in range(len(calls)):
            try:
                out.append(_unwrap(by_id[i]))
            except RpcError as e:
                out.append(e)
        return out

    async def get(self, path: str) -> tuple[int, bytes]:
        async with self.session.get(f"{self.base_url}{path}") as r:
            self._track(r.connection)
            return r.status, await r.read()

    # ---- WebSocket -------------------------------------------------------------

    async def connect_ws(self) -> None:
        """Connect the WebSocket, or connect it again if its connection ended
        (the agent restarted, a ping went unanswered while this process was
        busy): a call after that is not refused for a connection long gone."""
        async with self._ws_connecting:
            if self._ws is not None and not self._ws.closed and self._ws_reader is not None \
                    and not self._ws_reader.done():
                return
            await self._close_ws()
            self._ws = await self.session.ws_connect(f"{self.base_url}/jsonrpc/ws",
                                                     heartbeat=30.0, max_msg_size=0)
            self._ws_reader = asyncio.create_task(self._read_ws())

    async def _read_ws(self) -> None:
        assert self._ws is not None
        try:
            async for msg in self._ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                data = json.loads(msg.data)
                for item in data if isinstance(data, list) else [data]:
                    if "method" in item and "id" not in item:
                        for q in list(self._listeners):
                            q.put_nowait(item)
                    else:
                        fut = self._pending.pop(item.get("id"), None)
                        if fut is not None and not fut.done():
                            fut.set_result(item)
        finally:
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(ConnectionError("WebSocket closed"))
            self._pending.clear()
            for q in list(self._listeners):
                q.put_nowait({"method": "ws.closed", "params": {}})

    async def ws_call(self, method: str, **params: Any) -> Any:
        """Call over the WebSocket (connecting it if needed)."""
        await self.connect_ws()
        assert self._ws is not None
        rid = next(self._ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        await self._ws.send_str(json.dumps({"jsonrpc": "2.0", "id": rid, "method": method,
                                            "params": params}))
        return _unwrap(await asyncio.wait_for(fut, self.timeout))

    @contextlib.asynccontextmanager
    async def notifications(self) -> AsyncIterator[asyncio.Queue[dict[str, Any]]]:
        """A queue receiving every notification while the context is open."""
        await self.connect_ws()
        q: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._listeners.add(q)
        try:
            yield q
        finally:
            self._listeners.discard(q)

    async def wait_job(self, job_uuid: str, *, timeout: float | None = None,
                       progress: Callable[[dict[str, Any]], None] | None = None,
                       poll: float = 2.0) -> dict[str, Any]:
        """Follow a job until it ends, through notifications with a getJobs
        poll as a safety net; returns its final info."""
        deadline = None if timeout is None else time.monotonic() + timeout
        async with self.notifications() as q:
            while True:
                jobs = await self.ws_call("getJobs", jobUUIDs=[job_uuid])
                if job_uuid not in jobs:
                    raise RpcError(401, f"Unknown job: {job_uuid}", {"name": "UnknownTask"})
                info = jobs[job_uuid]
                if progress:
                    progress(info)
                if info["status"] in ENDED:
                    return dict(info)
                end = time.monotonic() + poll
                while (left := end - time.monotonic()) > 0:
                    if deadline is not None and time.monotonic() > deadline:
                        raise TimeoutError(f"job {job_uuid} did not end in {timeout}s")
                    try:
                        note = await asyncio.wait_for(q.get(), left)
                    except TimeoutError:
                        break
                    params = note.get("params", {})
                    if note.get("method") == "job.status" and \
                            params.get("jobUUID") == job_uuid:
                        if progress:
                            progress(params)
                        if params.get("status") in ENDED:
                            return dict(params)


def _unwrap(response: dict[str, Any]) -> Any:
    if "error" in response:
        e = response["error"]
        raise RpcError(e.get("code", 0), e.get("message", ""), e.get("data"))
    return response.get("result")


def _protocol_closed(connection: Any) -> asyncio.Future[None] | None:
    """The future a connection's protocol sets once its socket is closed;
    None if it is closed already (or aiohttp no longer has it)."""
    closed = getattr(getattr(connection, "protocol", None), "closed", None)
    return closed if isinstance(closed, asyncio.Future) else None
