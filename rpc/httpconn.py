"""One HTTP/1.1 connection of the data listener (rpc.ovfdata) served from a
worker thread: its socket and TLS work, the request head's parsing, bodies
and replies. The OVF routes (rpc.ovfdata, meaning rpc.ovfhttp's) and the
disk transfer routes (rpc.transferdata) both speak through it.

The request head is parsed here (the request line, then the standard
library's header parser, then the framing checks), not by h11: h11 parses
a head no faster (`python -m tests.bench httpparse`: 33 us against 32,
48 against 36 on a more loaded machine) and hands a body over as
its own bytes objects, after copying each read into its buffer; here the
body is decrypted straight into the store's or the transfer's buffer,
which h11's Data events cannot do (0.14 CPU-s/GiB through h11 against
0.04 for one copy, on an upload path of about 1.9 CPU-s/GiB where CPU is
the limit). Bodies are read by their
Content-Length only (no chunked decoding to get wrong)."""

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

from rpc.ovfhttp import BodyBroken, stalled

log = logging.getLogger("rpc.ovfdata")

T = TypeVar("T")

HANDSHAKE_READ = 16 * 1024
MAX_HEAD = 64 * 1024         # request line and headers
LINGER = 5.0                 # s spent dropping what a client still sends after a reply
ABORT_WAIT = 5.0             # s a thread gets to return once its socket was shut down
# Bytes of the socket read at once (TLS records, several) into the memory
# BIO. 1 MiB rather than 256 KiB: a quarter of the recv() calls and BIO
# writes (each holding the GIL while it copies) take 4-6% less CPU per GiB
# of OVF upload (1.73-1.77 against 1.81-1.83 CPU-s, interleaved); disk
# transfers kept their pace beside imageio (tests.bench transfer, two runs
# each, interleaved: upload 1.30/1.39 of imageio against 1.30/1.18, download
# 1.05/1.25 against 1.09/1.13). A connection holds this buffer while it lives.
RAW_READ = 1 << 20
DIGITS_RE = re.compile(r"[0-9]{1,19}")


class _HttpError(Exception):
    """A request refused before it reaches the store."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass
class _Request:
    method: str
    path: str
    headers: Message
    content_length: int | None
    expect_continue: bool
    query: str = ""


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
    path, _, query = target.partition("?")
    return _Request(method=method, path=path, headers=headers,
                    content_length=int(lengths.pop()) if lengths else None,
                    expect_continue=headers.get("Expect", "").lower() == "100-continue",
                    query=query)


def _response_head(status: int, headers: dict[str, str]) -> bytes:
    lines = [f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}",
             *(f"{k}: {v}" for k, v in headers.items()), "Connection: close", "", ""]
    return "\r\n".join(lines).encode("latin-1")


def _json_response(status: int, obj: Any, headers: dict[str, str] | None = None) -> bytes:
    body = json.dumps(obj).encode()
    return _response_head(status, {"Content-Type": "application/json",
                                   "Content-Length": str(len(body)), **(headers or {})}) + body


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
    """An upload's body as the store reads it (ovfstore.store.Body), with
    the errors rpc.ovfhttp expects of a body."""

    def __init__(self, conn: _Connection, stall: float) -> None:
        self.conn = conn
        self.stall = stall

    async def readinto(self, buf: memoryview) -> int:
        return await self._run(self.conn.recv_body, buf)

    async def pump(self, fill: Callable[[Callable[[memoryview], int]], int]) -> int:
        """The store's pump in the connection's thread, reading the body
        there, buffer after buffer (ovfstore.store.ThreadedBody)."""
        return await self._run(fill, self.conn.recv_body)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            return await self.conn.run(fn, *args)
        except TimeoutError:
            # the socket's timeout: one read brought nothing in time
            raise stalled(self.stall) from None
        except OSError as e:
            raise BodyBroken(str(e) or type(e).__name__) from None
