"""The OVF data listener: PUT and GET /ovfstore on a port of their own
(ovf.data_port), the one whose URL uploadOvfTar hands out.

On the main port aiohttp reads a request body on the event loop, TLS record
by record through asyncio's memory BIO: an upload's decryption, copies and
per-chunk bookkeeping all run on the loop thread, which caps the upload
rate and delays every other request. Here the loop only accepts and
coordinates; each connection's socket and TLS work (handshake, request
head, body, reply) runs in a worker thread in large steps: the body is
decrypted straight into the store's 4 MiB buffers, one thread hand-off per
buffer, while other threads hash and write the previous ones. Tickets,
locks, checks and the store's pipeline are those of the main port
(OvfService).

One request per connection (every reply says Connection: close). Bounded:
the TLS handshake runs on the loop, outside the connection slots, within
server.handshake_timeout and at most server.max_peer_handshakes at once per
client address (rpc.tlsguard), at most MAX_PENDING in all; then at most
MAX_CONNECTIONS connections at once (more wait for a slot); the request
head within server.idle_timeout; each body read and reply write within
server.body_timeout.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import http
import http.client
import io
import json
import logging
import re
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from email.message import Message
from typing import Any, TypeVar, cast

from agent.context import Agent
from rpc.dispatch import GENERIC_MESSAGE
from rpc.ovfroutes import NOT_A_UUID, byte_range, download_headers, error_status
from rpc.schema import UUID_RE
from rpc.tlsguard import HandshakeGuard
from storage.errors import HostAgentError, OvfStoreError

log = logging.getLogger("rpc.ovfdata")

T = TypeVar("T")

MAX_CONNECTIONS = 16
# Accepted sockets not yet in a slot (handshaking, or waiting for a slot);
# past this the listener stops accepting until one ends. Each is a socket
# and a few KiB, and lasts at most server.handshake_timeout if it does not
# complete its handshake.
MAX_PENDING = 1024
HANDSHAKE_READ = 16 * 1024
MAX_HEAD = 64 * 1024         # request line and headers
LINGER = 5.0                 # s spent dropping what a client still sends after a reply
ABORT_WAIT = 5.0             # s a thread gets to return once its socket was shut down
RAW_READ = 256 * 1024        # bytes of the socket read at once (TLS records, several)
PATH_RE = re.compile(r"/ovfstore/([^/]+)")
DIGITS_RE = re.compile(r"[0-9]{1,19}")


class _HttpError(Exception):
    """A request refused before it reaches the store."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class _ClientGone(Exception):
    """The client's socket failed or was reset in the middle of a body."""


@dataclass
class _Request:
    method: str
    path: str
    headers: Message
    content_length: int | None
    expect_continue: bool


def _parse_head(head: bytes) -> _Request:
    line, _, rest = head.partition(b"\r\n")
    parts = line.split(b" ")
    if len(parts) != 3 or parts[2] not in (b"HTTP/1.0", b"HTTP/1.1"):
        raise _HttpError(400, "bad request line")
    try:
        method, target = parts[0].decode("ascii"), parts[1].decode("ascii")
        headers = http.client.parse_headers(io.BytesIO(rest))
    except (UnicodeDecodeError, http.client.HTTPException) as e:
        raise _HttpError(400, f"bad request head: {e}") from None
    lengths = {v.strip() for v in headers.get_all("Content-Length", [])}
    if len(lengths) > 1 or any(not DIGITS_RE.fullmatch(v) for v in lengths):
        raise _HttpError(400, "bad Content-Length")
    if lengths and "Transfer-Encoding" in headers:
        raise _HttpError(400, "both Content-Length and Transfer-Encoding")
    return _Request(method=method, path=target.split("?", 1)[0], headers=headers,
                    content_length=int(lengths.pop()) if lengths else None,
                    expect_continue=headers.get("Expect", "").lower() == "100-continue")


def _response_head(status: int, headers: dict[str, str]) -> bytes:
    lines = [f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}",
             *(f"{k}: {v}" for k, v in headers.items()), "Connection: close", "", ""]
    return "\r\n".join(lines).encode("latin-1")


def _json_response(status: int, obj: Any, headers: dict[str, str] | None = None) -> bytes:
    body = json.dumps(obj).encode()
    return _response_head(status, {"Content-Type": "application/json",
                                   "Content-Length": str(len(body)), **(headers or {})}) + body


def _error_response(e: HostAgentError, status: int | None = None) -> bytes:
    return _json_response(status or error_status(e), {"error": e.to_dict()})


class _Connection:
    """One accepted socket. Its blocking calls run in the listener's threads,
    one at a time; the loop can cut any of them short by shutting the
    socket down.

    TLS runs over memory BIOs (ssl.SSLObject, as asyncio does), not an
    ssl.SSLSocket: the socket is read in large chunks and the records are
    decrypted from memory, where an SSLSocket makes two read() calls per
    16 KiB record (header, then body), each a wake-up and its TCP
    bookkeeping: a third less CPU per GiB received."""

    def __init__(self, raw: socket.socket, tls: ssl.SSLContext | None,
                 pool: concurrent.futures.Executor, timeout: float) -> None:
        self.pool = pool
        self.sock = raw
        try:
            self.peer = str(raw.getpeername()[0])
        except OSError:
            self.peer = "-"
        self.timeout = timeout
        raw.settimeout(timeout)
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self.tls: ssl.SSLObject | None = None
        if tls is not None:
            self.tls = tls.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._raw = memoryview(bytearray(RAW_READ))
        self.pending = b""        # body bytes that came in with the head
        self.body_left = 0        # body bytes the client announced and has not sent yet
        self.framed = True        # the body's end is known (no Transfer-Encoding)
        self.continued = False    # the client sends its body (100 Continue sent if it asked)
        self.replied = False      # a response (or its head) was sent

    async def run(self, fn: Callable[..., T], *args: Any, timeout: float | None = None) -> T:
        """fn(*args) in a worker thread. On the deadline or cancellation the
        socket is shut down, which ends the call, and the thread is waited
        for before this returns: the socket is never closed under it."""
        fut = asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)
        try:
            async with asyncio.timeout(timeout):
                return await asyncio.shield(fut)
        except (TimeoutError, asyncio.CancelledError):
            if not fut.done():
                self.abort()
                await asyncio.wait([fut], timeout=ABORT_WAIT)
                if fut.done() and not fut.cancelled():
                    fut.exception()       # retrieved: it is the shutdown's doing
            raise

    async def handshake(self, timeout: float) -> None:
        """The TLS handshake, on the loop: waiting for a client that sends
        nothing holds no worker thread and no connection slot (issue 22.2).
        The handshake's own CPU work (a few key operations) runs on the
        loop, as it does for the main port."""
        if self.tls is None:
            return
        loop = asyncio.get_running_loop()
        self.sock.setblocking(False)
        try:
            async with asyncio.timeout(timeout):
                while True:
                    try:
                        self.tls.do_handshake()
                        break
                    except ssl.SSLWantReadError:
                        if self._outgoing.pending:
                            await loop.sock_sendall(self.sock, self._outgoing.read())
                        data = await loop.sock_recv(self.sock, HANDSHAKE_READ)
                        if not data:
                            raise ConnectionError("closed during the TLS handshake") from None
                        self._incoming.write(data)
                    except ssl.SSLError:
                        # the alert, so that the client learns why; never waits
                        with contextlib.suppress(OSError):
                            self.sock.send(self._outgoing.read())
                        raise
                if self._outgoing.pending:
                    await loop.sock_sendall(self.sock, self._outgoing.read())
        finally:
            self.sock.settimeout(self.timeout)

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.sock.close()

    @property
    def cn(self) -> str:
        """The client certificate's common name, for the log."""
        cert: dict[str, Any] = {}
        if self.tls is not None:
            cert = dict(self.tls.getpeercert() or {})
        for rdn in cert.get("subject", ()):
            for key, value in rdn:
                if key == "commonName":
                    return f"{value}@{self.peer}"
        return self.peer

    # ---- blocking steps (worker threads) -------------------------------------------

    def _fill(self) -> bool:
        """Feed TLS the next bytes of the socket; False at its end."""
        n = self.sock.recv_into(self._raw)
        if not n:
            self._incoming.write_eof()
            return False
        self._incoming.write(self._raw[:n])
        return True

    def _flush(self) -> None:
        if self._outgoing.pending:
            self.sock.sendall(self._outgoing.read())

    def _recv(self, buf: memoryview) -> int:
        """Some bytes of the stream into buf (one TLS record at most); 0 at its end."""
        if self.tls is None:
            return self.sock.recv_into(buf)
        while True:
            try:
                # with a buffer, read() returns a count (typeshed knows bytes only)
                n = cast(int, self.tls.read(len(buf), buf))
            except ssl.SSLWantReadError:
                self._flush()     # e.g. a reply to the client's key update
                if not self._fill():
                    return 0
                continue
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return 0          # closed, with or without close_notify
            return n

    def sendall(self, data: bytes) -> None:
        if self.tls is None:
            self.sock.sendall(data)
            return
        view = memoryview(data)
        for i in range(0, len(view), RAW_READ):
            self.tls.write(view[i:i + RAW_READ])
            self._flush()

    def read_head(self) -> _Request | None:
        """The request line and headers (after the handshake); None if the
        client closed without sending a request."""
        head = bytearray()
        buf = memoryview(bytearray(16384))
        while (end := head.find(b"\r\n\r\n")) < 0:
            if len(head) > MAX_HEAD:
                raise _HttpError(431, "request head too large")
            n = self._recv(buf)
            if not n:
                if head:
                    raise _HttpError(400, "request head cut short")
                return None
            head += buf[:n]
        request = _parse_head(bytes(head[:end + 2]))
        self.pending = bytes(head[end + 4:])
        self.body_left = request.content_length or 0
        self.framed = "Transfer-Encoding" not in request.headers
        # without "Expect: 100-continue" the client sends its body at once
        self.continued = not request.expect_continue
        return request

    def recv_body(self, buf: memoryview) -> int:
        """Fill buf with the next bytes of the body (never past its
        Content-Length); fewer only if the client closed."""
        if self.body_left and not self.continued:
            self.continued = True
            self.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        buf = buf[:self.body_left]
        n = min(len(self.pending), len(buf))
        buf[:n] = self.pending[:n]
        self.pending = self.pending[n:]
        while n < len(buf):
            got = self._recv(buf[n:])
            if not got:
                break
            n += got
        self.body_left -= n
        return n

    def linger(self) -> None:
        """Lingering close, once the reply is sent: stop sending and drop
        whatever the client still sends (unread, undecrypted) until it
        closes, so that it reads the reply instead of a reset. The caller
        bounds the time."""
        self.sock.settimeout(LINGER)
        self.sock.shutdown(socket.SHUT_WR)
        while self.sock.recv_into(self._raw):
            pass


class _SocketBody:
    """An upload's body as the store reads it (ovfstore.store.Body)."""

    def __init__(self, conn: _Connection, stall: float) -> None:
        self.conn = conn
        self.stall = stall

    async def readinto(self, buf: memoryview) -> int:
        try:
            return await self.conn.run(self.conn.recv_body, buf)
        except TimeoutError:
            # the socket's timeout: this one read brought nothing in time
            raise OvfStoreError(reason=f"no data for {self.stall:g} s: upload abandoned") \
                from None
        except OSError as e:
            raise _ClientGone(str(e)) from None


class DataListener:
    """The listener's life: start() binds (before READY=1), stop() ends it
    (after the main site stops accepting, before the agent stops)."""

    def __init__(self, agent: Agent, tls: ssl.SSLContext | None) -> None:
        server = agent.config.server
        self.agent = agent
        self.tls = tls
        self.host = server.host
        self.port = agent.config.ovf.data_port
        self.idle_timeout = server.idle_timeout
        self.body_timeout = server.body_timeout
        self.grace = server.shutdown_timeout
        self.guard = HandshakeGuard("OVF data port", server.handshake_timeout,
                                    server.max_peer_handshakes)
        self._pending = asyncio.Semaphore(MAX_PENDING)
        self._pool = concurrent.futures.ThreadPoolExecutor(MAX_CONNECTIONS,
                                                           thread_name_prefix="ovf-data")
        self._slots = asyncio.Semaphore(MAX_CONNECTIONS)
        self._sock: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._connections: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        """Listen on ovf.data_port (0: a port the system picks); the port.
        Raises OSError if it cannot."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.create_server((self.host, self.port), family=family, backlog=128,
                                    dualstack_ipv6=self.host == "::")
        sock.setblocking(False)
        self._sock = sock
        self.port = int(sock.getsockname()[1])
        self.agent.ovf.data_port = self.port
        self._accepting = asyncio.create_task(self._accept(sock), name="ovf-data-accept")
        log.info("OVF data listener on %s://%s:%d", "https" if self.tls else "http",
                 self.host, self.port)
        return self.port

    async def stop(self) -> None:
        """Stop accepting; transfers under way get server.shutdown_timeout
        to end, then are cut."""
        self.agent.ovf.data_port = None
        if self._accepting is not None:
            self._accepting.cancel()
            await asyncio.gather(self._accepting, return_exceptions=True)
        if self._sock is not None:
            self._sock.close()
        if self._connections:
            _, late = await asyncio.wait(self._connections, timeout=self.grace)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        self._pool.shutdown(wait=False)

    async def _accept(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._pending.acquire()
            try:
                raw, addr = await loop.sock_accept(sock)
            except OSError as e:
                # out of file descriptors or memory: try again a little later
                self._pending.release()
                log.warning("OVF data listener: accept failed: %s", e)
                await asyncio.sleep(0.5)
                continue
            except BaseException:
                self._pending.release()
                raise
            peer = str(addr[0])
            if not self.guard.admit(peer):
                raw.close()
                self._pending.release()
                continue
            task = asyncio.create_task(self._serve(raw, peer))
            self._connections.add(task)
            task.add_done_callback(self._connections.discard)

    async def _serve(self, raw: socket.socket, peer: str) -> None:
        pending = True        # counted in _pending until it has a slot
        conn: _Connection | None = None
        try:
            try:
                conn = _Connection(raw, self.tls, self._pool, self.idle_timeout)
                await conn.handshake(self.guard.timeout)
            except (OSError, TimeoutError) as e:
                # no client certificate, another CA, not TLS, too slow, gone
                self.guard.failed(peer, e)
                return
            finally:
                self.guard.release(peer)
            async with self._slots:
                self._pending.release()
                pending = False
                await self._run(conn)
        finally:
            if pending:
                self._pending.release()
            if conn is not None:
                conn.close()
            else:
                raw.close()

    async def _run(self, conn: _Connection) -> None:
        try:
            await self._exchange(conn)
        except Exception:
            log.exception("OVF data request from %s failed", conn.peer)
            if not conn.replied:
                with contextlib.suppress(Exception):
                    await conn.run(conn.sendall, _json_response(
                        500, {"error": {"code": 100, "message": GENERIC_MESSAGE,
                                        "data": {"name": "GeneralException"}}}))

    async def _exchange(self, conn: _Connection) -> None:
        try:
            request = await conn.run(conn.read_head, timeout=self.idle_timeout)
        except _HttpError as e:
            await self._reply(conn, _json_response(e.status, {"error": {
                "code": -32600, "message": e.reason, "data": {"name": "InvalidRequest"}}}))
            return
        except (OSError, TimeoutError) as e:
            # too slow, gone
            log.info("OVF data connection from %s dropped: %s", conn.peer,
                     e or type(e).__name__)
            return
        if request is None:
            return
        conn.sock.settimeout(self.body_timeout)
        m = PATH_RE.fullmatch(request.path)
        if m is None:
            await self._reply(conn, _json_response(404, {"error": {
                "code": -32600, "message": "no such resource", "data": {"name": "NotFound"}}}))
        elif request.method == "PUT":
            await self._put(conn, request, m.group(1))
        elif request.method == "GET":
            await self._get(conn, request, m.group(1))
        else:
            await self._reply(conn, _json_response(405, {"error": {
                "code": -32600, "message": f"method {request.method} not allowed",
                "data": {"name": "MethodNotAllowed"}}}, {"Allow": "GET, PUT"}))

    async def _reply(self, conn: _Connection, data: bytes) -> None:
        """Send a whole reply; then, if the request's body was not read to
        its end, a lingering close."""
        conn.replied = True
        try:
            await conn.run(conn.sendall, data)
            if conn.body_left or not conn.framed:
                await conn.run(conn.linger, timeout=LINGER)
        except (OSError, TimeoutError):
            pass

    async def _put(self, conn: _Connection, request: _Request, ticket_id: str) -> None:
        ovf = self.agent.ovf
        try:
            ticket = ovf.take(ticket_id)
        except HostAgentError as e:
            await self._reply(conn, _error_response(e))
            return
        if request.content_length is None:
            missing = OvfStoreError(reason="Content-Length is required")
            await self._reply(conn, _error_response(missing, 411))
            return
        body = _SocketBody(conn, self.body_timeout)
        try:
            result = await ovf.upload(ticket, request.content_length, body)
        except HostAgentError as e:
            log.info("OVF upload to %s from %s refused: %s", ticket.sd, conn.cn, e.message)
            await self._reply(conn, _error_response(e))
            return
        except _ClientGone as e:
            # nothing was switched, the stored tar is unchanged
            log.info("OVF upload to %s from %s interrupted: %s", ticket.sd, conn.cn, e)
            return
        await self._reply(conn, _json_response(200, result))

    async def _get(self, conn: _Connection, request: _Request, sd: str) -> None:
        if not UUID_RE.match(sd):
            await self._reply(conn, _json_response(400, NOT_A_UUID))
            return
        try:
            header, store = await self.agent.ovf.header(sd)
        except HostAgentError as e:
            await self._reply(conn, _error_response(e))
            return
        rng = request.headers.get("Range")
        span = byte_range(rng, header.size)
        if span is None:
            await self._reply(conn, _response_head(416, {
                "Content-Range": f"bytes */{header.size}", "Content-Length": "0"}))
            return
        start, end = span
        conn.replied = True
        try:
            await conn.run(conn.sendall, _response_head(
                206 if rng else 200, download_headers(header, start, end, bool(rng))))
            async for chunk in store.read(start, end, header):
                await conn.run(conn.sendall, chunk)
        except (OSError, TimeoutError) as e:
            log.info("OVF download of %s to %s cut: %s", sd, conn.cn, e or type(e).__name__)
        except HostAgentError as e:
            # too late for an error reply: the client sees a short body
            log.warning("OVF download of %s to %s failed: %s", sd, conn.cn, e.message)
