"""Disk transfers on the data listener: ovirt-imageio's HTTP protocol under
/images/{ticket}, served to its clients (ovirt_imageio.client, ovirt-img,
backup tools) unchanged.

    OPTIONS /images/{ticket}            features, max_readers, max_writers
    GET     /images/{ticket}            Range: bytes=a-b (206) or the whole image (200)
    PUT     /images/{ticket}            Content-Range: bytes a-b/*; ?flush=y|n
    PATCH   /images/{ticket}            {"op": "zero", "offset", "size", "flush"} | {"op": "flush"}
    GET     /images/{ticket}/extents    ?context=zero|dirty
    GET     /images/{ticket}/checksum   ?algorithm=blake2b&block_size=4194304
    GET     /images/{ticket}/checksum/algorithms

The ticket is the credential: no client certificate is needed here (the
listener asks for one, and the OVF routes require it). rpc.ovfdata accepts
the connection and reads the first request head; `serve` takes it from
there, keeping the connection for further requests as imageio's client
expects. Data moves in the listener's worker threads, one thread call per
request, 4 MiB at a time, between the TLS stream and the transfer's
qemu-nbd (storage/nbdclient.py), or the volume's file itself when the
export is that file as it is (a raw volume, format qcow2): no copy through
qemu-nbd there. Zero, flush and extents always go through qemu-nbd.

The checksum is imageio's block checksum (its docs/checksum.md): the image
in blocks of block_size bytes (the last one shorter), each block hashed
with the algorithm (blake2b: 32-byte digests), the block digests hashed in
order; a block known to be zero (extents) is hashed without reading it.
"""

from __future__ import annotations

import hashlib
import http
import json
import logging
import os
import re
import urllib.parse
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any, cast

from storage.errors import HostAgentError, InvalidParameter, http_status, wire_error
from storage.nbd import NbdError
from storage.nbdclient import NbdClient
from storage.transfers import Transfer, TransferService

if TYPE_CHECKING:
    from rpc.httpconn import _Connection, _Request

log = logging.getLogger("rpc.transferdata")

PATH_RE = re.compile(r"/images/([^/]+)(/extents|/checksum|/checksum/algorithms)?")
RANGE_RE = re.compile(r"bytes=(\d{1,19})-(\d{0,19})")
CONTENT_RANGE_RE = re.compile(r"bytes (\d{1,19})-(\d{1,19})/(\d{1,19}|\*)")
CHUNK = 4 * 1024 * 1024
MAX_PATCH = 4096
LINGER = 5.0              # s spent dropping a refused body (as rpc.ovfdata)
MAX_READERS = 8
MAX_WRITERS = 8
FEATURES = ["checksum", "extents", "zero", "flush"]
READ_FEATURES = ["checksum", "extents"]
BLOCK_SIZE = 4 * 1024 * 1024
DEFAULT_ALGORITHM = "blake2b"


def is_transfer_path(path: str) -> bool:
    return PATH_RE.fullmatch(path) is not None


class _Error(Exception):
    """A request the HTTP protocol refuses with its own status (405, 416,
    404, 400): `error` is what the body shows, through wire_error()."""

    def __init__(self, status: int, field: str, reason: str) -> None:
        self.error = InvalidParameter(field=field, reason=reason)
        super().__init__(self.error.message)
        self.status = status


def _head(status: int, headers: dict[str, str], keep: bool) -> bytes:
    lines = [f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}",
             *(f"{k}: {v}" for k, v in headers.items()),
             "Connection: keep-alive" if keep else "Connection: close", "", ""]
    return "\r\n".join(lines).encode("latin-1")


def _json(status: int, obj: Any, keep: bool, headers: dict[str, str] | None = None) -> bytes:
    body = json.dumps(obj).encode()
    return _head(status, {"Content-Type": "application/json",
                          "Content-Length": str(len(body)), **(headers or {})}, keep) + body


def _error_body(e: _Error | HostAgentError, keep: bool) -> bytes:
    # imageio's clients act on the status and show the body as the message
    if isinstance(e, _Error):
        return _json(e.status, {"error": wire_error(e.error)}, keep)
    return _json(http_status(e), {"error": wire_error(e)}, keep)


class _Session:
    """One connection's requests; its NBD connection, opened on first use."""

    def __init__(self, service: TransferService, conn: _Connection) -> None:
        self.service = service
        self.conn = conn
        self.nbd: NbdClient | None = None
        self.nbd_of: str | None = None
        self.fd: int | None = None
        self.fd_of: str | None = None

    # ---- worker thread side ----------------------------------------------------------

    def _client(self, t: Transfer) -> NbdClient:
        if self.nbd is None or self.nbd_of != t.id:
            if self.nbd is not None:
                self.nbd.close()
                self.nbd = None
            self.nbd = NbdClient(t.sock)
            self.nbd_of = t.id
        return self.nbd

    def _close(self) -> None:
        if self.nbd is not None:
            self.nbd.close()
            self.nbd = None
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def _file(self, t: Transfer) -> int:
        """The volume's file, for a transfer whose export is that file."""
        if self.fd is None or self.fd_of != t.id:
            if self.fd is not None:
                os.close(self.fd)
                self.fd = None
            self.fd = os.open(t.path, (os.O_RDWR if t.writable else os.O_RDONLY)
                              | os.O_CLOEXEC)
            self.fd_of = t.id
        return self.fd

    def _pread(self, t: Transfer, offset: int, view: memoryview) -> None:
        if not t.direct:
            self._client(t).readinto(offset, view)
            return
        done = 0
        try:
            fd = self._file(t)
            while done < len(view):
                n = os.preadv(fd, [view[done:]], offset + done)
                if not n:
                    raise NbdError(op="read", reason=f"the file ends at {offset + done}")
                done += n
        except OSError as e:
            raise NbdError(op="read", reason=e.strerror or str(e)) from None

    def _pwrite(self, t: Transfer, offset: int, view: memoryview) -> None:
        if not t.direct:
            self._client(t).write(offset, view)
            return
        done = 0
        try:
            fd = self._file(t)
            while done < len(view):
                done += os.pwritev(fd, [view[done:]], offset + done)
        except OSError as e:
            # the storage's error, not the client socket's (those end the connection)
            raise NbdError(op="write", reason=e.strerror or str(e)) from None

    def _read(self, t: Transfer, start: int, length: int, head: bytes) -> int:
        self.conn.sendall(head)
        buf = bytearray(min(CHUNK, length))
        view = memoryview(buf)
        done = 0
        while done < length:
            n = min(len(buf), length - done)
            self._pread(t, start + done, view[:n])
            # sendall takes any buffer (it wraps it in a memoryview)
            self.conn.sendall(cast(bytes, view[:n]))
            done += n
        return done

    def _write(self, t: Transfer, start: int, length: int, flush: bool) -> int:
        buf = bytearray(min(CHUNK, length) or 1)
        view = memoryview(buf)
        done = 0
        while done < length:
            want = min(len(buf), length - done)
            got = 0
            while got < want:
                n = self.conn.recv_body(view[got:want])
                if not n:
                    raise _Error(400, "body",
                                 f"cut short after {done + got} of {length} bytes")
                got += n
            self._pwrite(t, start + done, view[:got])
            done += got
        if flush:
            self._client(t).flush()
        return done

    def _zero(self, t: Transfer, start: int, length: int, flush: bool) -> None:
        nbd = self._client(t)
        nbd.zero(start, length)
        if flush:
            nbd.flush()

    def _flush(self, t: Transfer) -> None:
        self._client(t).flush()

    def _checksum(self, t: Transfer, algorithm: str, block_size: int,
                  zeroes: list[tuple[int, int]]) -> str:
        new: Callable[..., Any] = getattr(hashlib, algorithm, None) or partial(
            hashlib.new, algorithm)
        if algorithm in ("blake2b", "blake2s"):
            new = partial(new, digest_size=32)
        outer = new()
        zero_digest = new(bytes(block_size)).digest()
        buf = bytearray(block_size)
        view = memoryview(buf)
        zi = 0
        for start in range(0, t.size, block_size):
            n = min(block_size, t.size - start)
            while zi < len(zeroes) and zeroes[zi][1] <= start:
                zi += 1
            if zi < len(zeroes) and zeroes[zi][0] <= start and zeroes[zi][1] >= start + n:
                outer.update(zero_digest if n == block_size else new(bytes(n)).digest())
                continue
            self._pread(t, start, view[:n])
            outer.update(new(view[:n]).digest())
        return str(outer.hexdigest())

    # ---- event loop side -------------------------------------------------------------

    async def reply(self, data: bytes) -> None:
        self.conn.replied = True
        await self.conn.run(self.conn.sendall, data)

    async def handle(self, request: _Request, query: dict[str, str], keep: bool) -> None:
        m = PATH_RE.fullmatch(request.path)
        assert m is not None
        ticket, sub = urllib.parse.unquote(m.group(1)), m.group(2)
        method = request.method
        if sub == "/checksum/algorithms" and method == "GET":
            await self.reply(_json(200, {"algorithms": sorted(hashlib.algorithms_available)},
                                   keep))
            return
        if method == "OPTIONS" and sub is None:
            await self._options(ticket, keep)
            return
        if sub is None and method in ("GET", "PUT", "PATCH"):
            write = method != "GET"
        elif sub is not None and method == "GET":
            write = False
        else:
            raise _Error(405, "method", f"method {method} not allowed")
        t = self.service.acquire(ticket, write)
        moved = 0
        try:
            if sub == "/extents":
                context = query.get("context", "zero")
                if context not in ("zero", "dirty"):
                    raise _Error(400, "context", f"unknown context {context!r}")
                if context == "dirty" and t.dirty is None:
                    raise _Error(404, "context", "the transfer was started without dirty")
                await self.reply(_json(200, await self.service.extents(t, context), keep))
            elif sub == "/checksum":
                await self._get_checksum(t, query, keep)
            elif method == "GET":
                moved = await self._get(t, request, keep)
            elif method == "PUT":
                moved = await self._put(t, request, query, keep)
            else:
                await self._patch(t, request, keep)
        finally:
            self.service.release(t, moved)

    async def _options(self, ticket: str, keep: bool) -> None:
        if ticket == "*":
            await self.reply(_json(200, {"features": FEATURES}, keep,
                                   {"Allow": "OPTIONS,GET,PUT,PATCH"}))
            return
        t = self.service.acquire(ticket, False)
        self.service.release(t)
        features = FEATURES if t.writable else READ_FEATURES
        await self.reply(_json(200, {"features": features, "max_readers": MAX_READERS,
                                     "max_writers": MAX_WRITERS}, keep,
                               {"Allow": "OPTIONS,GET,PUT,PATCH" if t.writable
                                else "OPTIONS,GET"}))

    async def _get(self, t: Transfer, request: _Request, keep: bool) -> int:
        size = t.size
        rng = request.headers.get("Range")
        if rng is None:
            start, end, status = 0, size, 200
        else:
            m = RANGE_RE.fullmatch(rng.strip())
            if m is None:
                raise _Error(416, "Range", f"unsupported Range {rng!r}")
            start = int(m.group(1))
            end = int(m.group(2)) + 1 if m.group(2) else size
            if start >= end or end > size:
                self.conn.replied = True
                await self.conn.run(self.conn.sendall, _head(416, {
                    "Content-Range": f"bytes */{size}", "Content-Length": "0"}, keep))
                return 0
            status = 206
        headers = {"Content-Type": "application/octet-stream",
                   "Content-Length": str(end - start),
                   "Content-Disposition": "attachment"}
        if status == 206:
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        self.conn.replied = True
        return await self.conn.run(self._read, t, start, end - start,
                                   _head(status, headers, keep))

    async def _put(self, t: Transfer, request: _Request, query: dict[str, str],
                   keep: bool) -> int:
        length = request.content_length
        if length is None:
            raise _Error(400, "Content-Length", "Content-Length header is required")
        start = 0
        cr = request.headers.get("Content-Range")
        if cr is not None:
            m = CONTENT_RANGE_RE.fullmatch(cr.strip())
            if m is None or int(m.group(2)) - int(m.group(1)) + 1 != length:
                raise _Error(400, "Content-Range", f"bad Content-Range {cr!r}")
            start = int(m.group(1))
        if start + length > t.size:
            raise _Error(416, "Content-Range",
                         f"{length} bytes at {start} are past the end ({t.size})")
        flush = query.get("flush", "y")
        if flush not in ("y", "n"):
            raise _Error(400, "flush", "flush must be y or n")
        done = await self.conn.run(self._write, t, start, length, flush == "y")
        await self.reply(_head(200, {"Content-Length": "0"}, keep))
        return done

    async def _patch(self, t: Transfer, request: _Request, keep: bool) -> None:
        length = request.content_length
        if length is None or length > MAX_PATCH:
            raise _Error(400, "body", f"a PATCH body of at most {MAX_PATCH} bytes is required")
        buf = bytearray(length)
        got = 0
        while got < length:
            n = await self.conn.run(self.conn.recv_body, memoryview(buf)[got:])
            if not n:
                raise _Error(400, "body", "body cut short")
            got += n
        try:
            msg = json.loads(buf)
            op = msg["op"]
        except (ValueError, KeyError, TypeError):
            raise _Error(400, "body", "a JSON object with op is required") from None
        if op == "flush":
            await self.conn.run(self._flush, t)
        elif op == "zero":
            size, offset = msg.get("size"), msg.get("offset", 0)
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                       for v in (size, offset)):
                raise _Error(400, "body", "size and offset must be integers >= 0")
            if offset + size > t.size:
                raise _Error(416, "body",
                             f"{size} bytes at {offset} are past the end ({t.size})")
            await self.conn.run(self._zero, t, offset, size, bool(msg.get("flush", False)))
        else:
            raise _Error(400, "op", f"unknown op {op!r}")
        await self.reply(_head(200, {"Content-Length": "0"}, keep))

    async def _get_checksum(self, t: Transfer, query: dict[str, str], keep: bool) -> None:
        algorithm = query.get("algorithm", DEFAULT_ALGORITHM)
        if algorithm not in hashlib.algorithms_available:
            raise _Error(400, "algorithm", f"unknown algorithm {algorithm!r}")
        try:
            block_size = int(query.get("block_size", BLOCK_SIZE))
        except ValueError:
            raise _Error(400, "block_size", "block_size must be an integer") from None
        if not BLOCK_SIZE // 4 <= block_size <= BLOCK_SIZE * 4 or block_size % 4096:
            raise _Error(400, "block_size", "block_size must be 1-16 MiB, a multiple of 4096")
        zeroes = [(e["start"], e["start"] + e["length"])
                  for e in await self.service.extents(t, "zero") if e["zero"]]
        digest = await self.conn.run(self._checksum, t, algorithm, block_size, zeroes)
        await self.reply(_json(200, {"algorithm": algorithm, "block_size": block_size,
                                     "checksum": digest}, keep))


async def serve(service: TransferService, conn: _Connection, request: _Request | None,
                idle_timeout: float) -> None:
    """Serve requests on the connection, the first one already read, until
    the client closes, sends a request that is not a transfer's, or an
    error leaves the stream out of step."""
    session = _Session(service, conn)
    try:
        while request is not None and is_transfer_path(request.path):
            query = dict(urllib.parse.parse_qsl(request.query))
            # the connection is kept only if its stream stays in step
            keep = request.headers.get("Connection", "").lower() != "close" and \
                "Transfer-Encoding" not in request.headers
            try:
                await session.handle(request, query, keep)
            except (_Error, HostAgentError) as e:
                if isinstance(e, NbdError):
                    log.warning("Transfer request %s failed: %s", request.method, e.message)
                if conn.replied:
                    return        # too late for an error reply: the client sees a short body
                keep = keep and not conn.body_left
                await session.reply(_error_body(e, keep))
                if conn.body_left or not conn.framed:
                    # the client still sends its body: read it out, or it gets a reset
                    await conn.run(conn.linger, timeout=LINGER)
            if not keep or conn.body_left or conn.pending:
                return
            conn.replied = False
            request = await conn.run(conn.read_head, timeout=idle_timeout)
    except (OSError, TimeoutError) as e:
        log.debug("Transfer connection from %s ended: %s", conn.peer, e or type(e).__name__)
    finally:
        if session.nbd is not None or session.fd is not None:
            await conn.run(session._close)
