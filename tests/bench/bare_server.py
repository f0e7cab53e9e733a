"""The baselines of the benchmarks: bare servers behind the same mutual TLS
settings as the agent.

On PORT, an aiohttp app:
- POST /jsonrpc returns the same body as the agent's ping (ping benchmark).
- POST /jsonrpc-floor answers the request through jsonrpcserver's own steps
  alone (parse, create_request, call, to_response, to_serializable_one,
  serialise) with a ping method that returns {}: no validation, metrics,
  logging nor checks. What any server with jsonrpcserver as its dispatcher
  costs at least, on the same HTTP and TLS (ping benchmark, issue 21).
- PUT /sink reads the request body the way the main port's OVF upload does
  (aiohttp's StreamReader, in chunks of up to 1 MiB) and discards it.

On THREAD_PORT (optional), a blocking TLS server with a thread per
connection, the way the agent's OVF data listener reads a body: the socket
in 256 KiB reads, TLS over memory BIOs, decrypted straight into 4 MiB
buffers (ovf benchmark).
- PUT /sink discards the body: the most a TLS upload can reach here.
- PUT /sink-sha256 also hashes it in a second thread, as every upload must
  be hashed: the most any upload that keeps its sha256 can reach here.

    python -m tests.bench.bare_server PKI_DIR PORT [THREAD_PORT]
"""

from __future__ import annotations

import hashlib
import json
import queue
import socket
import ssl
import sys
import threading
from pathlib import Path
from typing import cast

from aiohttp import web
from jsonrpcserver import Result, Success
from jsonrpcserver.async_dispatcher import call
from jsonrpcserver.dispatcher import create_request, to_response
from jsonrpcserver.response import to_serializable_one

from agent.config import ServerConfig
from rpc.ovfroutes import CHUNK
from rpc.server import ssl_context

BODY = b'{"jsonrpc": "2.0", "result": {}, "id": 1}'
BUFFER = 4 << 20


async def handle(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(body=BODY, content_type="application/json")


async def ping(peer: str) -> Result:
    return Success({})


async def floor(request: web.Request) -> web.Response:
    req = create_request(json.loads(await request.text()))
    result = await call(req, request.remote, ping)
    return web.Response(text=json.dumps(to_serializable_one(to_response(req, result))),
                        content_type="application/json")


async def sink(request: web.Request) -> web.Response:
    received = 0
    async for chunk in request.content.iter_chunked(CHUNK):
        received += len(chunk)
    return web.json_response({"size": received})


def _hash_in_thread(bufs: queue.SimpleQueue[tuple[bytearray, int] | None],
                    free: queue.SimpleQueue[bytearray], digest: hashlib._Hash) -> None:
    while (item := bufs.get()) is not None:
        buf, n = item
        digest.update(memoryview(buf)[:n])
        free.put(buf)


class _TlsStream:
    """Server side of TLS over memory BIOs on a blocking socket, read in
    large chunks (as the agent's OVF data listener does)."""

    def __init__(self, sock: socket.socket, ctx: ssl.SSLContext) -> None:
        self.sock = sock
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = ctx.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self.raw = memoryview(bytearray(256 * 1024))
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self.flush()
                self.fill()
        self.flush()

    def fill(self) -> bool:
        n = self.sock.recv_into(self.raw)
        if not n:
            self.incoming.write_eof()
            return False
        self.incoming.write(self.raw[:n])
        return True

    def flush(self) -> None:
        if self.outgoing.pending:
            self.sock.sendall(self.outgoing.read())

    def recv_into(self, buf: memoryview) -> int:
        while True:
            try:
                return cast(int, self.tls.read(len(buf), buf))
            except ssl.SSLWantReadError:
                self.flush()
                if not self.fill():
                    return 0
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return 0

    def sendall(self, data: bytes) -> None:
        self.tls.write(data)
        self.flush()


def _thread_sink(conn: socket.socket, ctx: ssl.SSLContext) -> None:
    with conn:
        s = _TlsStream(conn, ctx)
        head = b""
        scratch = memoryview(bytearray(16384))
        while b"\r\n\r\n" not in head:
            n = s.recv_into(scratch)
            if not n:
                return
            head += scratch[:n]
        head, _, rest = head.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        path = lines[0].split()[1]
        length = next(int(v) for k, _, v in (h.partition(":") for h in lines[1:])
                      if k.strip().lower() == "content-length")
        digest = hashlib.sha256()
        free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        full: queue.SimpleQueue[tuple[bytearray, int] | None] = queue.SimpleQueue()
        for _ in range(4):
            free.put(bytearray(BUFFER))
        hasher = None
        if path == "/sink-sha256":
            hasher = threading.Thread(target=_hash_in_thread, args=(full, free, digest))
            hasher.start()
        received = len(rest)
        buf = free.get()
        used = len(rest)
        buf[:used] = rest
        view = memoryview(buf)
        while received < length:
            n = s.recv_into(view[used:used + min(BUFFER - used, length - received)])
            if not n:
                break
            received += n
            used += n
            if used == BUFFER:
                if hasher is not None:
                    full.put((buf, used))
                    buf = free.get()
                    view = memoryview(buf)
                used = 0
        if hasher is not None:
            full.put((buf, used))
            full.put(None)
            hasher.join()
        body = json.dumps({"size": received, "sha256": digest.hexdigest()}).encode()
        s.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))


def _thread_server(ls: socket.socket, ctx: ssl.SSLContext) -> None:
    while True:
        conn, _ = ls.accept()
        threading.Thread(target=_thread_sink, args=(conn, ctx), daemon=True).start()


def main() -> None:
    pki, port = Path(sys.argv[1]), int(sys.argv[2])
    config = ServerConfig(host="127.0.0.1", port=port, ca_file=str(pki / "ca.pem"),
                          cert_file=str(pki / "server.pem"), key_file=str(pki / "server.key"))
    if len(sys.argv) > 3:
        ls = socket.create_server(("127.0.0.1", int(sys.argv[3])), backlog=64)
        threading.Thread(target=_thread_server, args=(ls, ssl_context(config)),
                         daemon=True).start()
    app = web.Application()
    app.add_routes([web.post("/jsonrpc", handle), web.post("/jsonrpc-floor", floor),
                    web.put("/sink", sink)])
    web.run_app(app, host="127.0.0.1", port=port, ssl_context=ssl_context(config),
                access_log=None, print=lambda *a: print("ready", flush=True), backlog=1024)


if __name__ == "__main__":
    main()
