"""The OVF data listener: PUT and GET /ovfstore on a port of their own
(ovf.data_port), the one whose URL uploadOvfTar hands out.

On the main port aiohttp reads a request body on the event loop, TLS record
by record through asyncio's memory BIO: an upload's decryption, copies and
per-chunk bookkeeping all run on the loop thread, which caps the upload
rate and delays every other request. Here the loop only accepts and
coordinates; each connection's socket and TLS work (handshake, request
head, body, reply) runs in a worker thread in large steps: the body is
decrypted straight into the store's 8 MiB buffers, the connection's thread
going from one to the next by itself (ovfstore.pipeline), while other
threads hash and write the previous ones. What a
request means (ticket, checks, statuses, error bodies) is rpc.ovfhttp's,
as on the main port; this module routes and sends.

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
import logging
import socket
import ssl
from typing import TypeVar

from agent.context import Agent
from rpc import ovfhttp, transferdata
from rpc.httpconn import (
    LINGER,
    _Connection,
    _HttpError,
    _json_response,
    _response_head,
    _SocketBody,
)
from rpc.ovfhttp import Download, Reply
from rpc.server import ssl_context
from rpc.tlsguard import HandshakeGuard
from storage.errors import HostAgentError, wire_error

log = logging.getLogger("rpc.ovfdata")

T = TypeVar("T")

MAX_CONNECTIONS = 16
# Accepted sockets not yet in a slot (handshaking, or waiting for a slot);
# past this the listener stops accepting until one ends. Each is a socket
# and a few KiB, and lasts at most server.handshake_timeout if it does not
# complete its handshake.
MAX_PENDING = 1024


class DataListener:
    """The listener's life: start() binds (before READY=1), stop() ends it
    (after the main site stops accepting, before the agent stops)."""

    def __init__(self, agent: Agent, tls: ssl.SSLContext | None) -> None:
        server = agent.config.server
        self.agent = agent
        if tls is not None:
            # Disk transfer URLs (rpc.transferdata) need no client certificate
            # (their ticket is the credential, as with ovirt-imageio): one is
            # asked for, verified if sent, and required by the OVF routes.
            tls = ssl_context(server)
            tls.verify_mode = ssl.CERT_OPTIONAL
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
        self.agent.transfers.data_port = self.port
        self._accepting = asyncio.create_task(self._accept(sock), name="ovf-data-accept")
        log.info("OVF data listener on %s://%s:%d", "https" if self.tls else "http",
                 self.host, self.port)
        return self.port

    async def stop(self) -> None:
        """Stop accepting; transfers under way get server.shutdown_timeout
        to end, then are cut."""
        self.agent.ovf.data_port = None
        self.agent.transfers.data_port = None
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
                        500, {"error": wire_error(Exception())}))

    async def _exchange(self, conn: _Connection) -> None:
        try:
            request = await conn.run(conn.read_head, timeout=self.idle_timeout)
        except _HttpError as e:
            await self._reply(conn, ovfhttp.refusal(e.status, "InvalidRequest", e.reason))
            return
        except (OSError, TimeoutError) as e:
            # too slow, gone
            log.info("OVF data connection from %s dropped: %s", conn.peer,
                     e or type(e).__name__)
            return
        if request is None:
            return
        conn.sock.settimeout(self.body_timeout)
        if transferdata.is_transfer_path(request.path):
            await transferdata.serve(self.agent.transfers, conn, request, self.idle_timeout)
            return
        if conn.tls is not None and not conn.tls.getpeercert():
            # the handshake asks for a certificate without requiring one (a
            # transfer's ticket is its credential): the refusal is here
            self.guard.refused(conn.peer, "peer did not return a certificate", "request")
            await self._reply(conn, ovfhttp.CERT_REQUIRED)
            return
        m = ovfhttp.PATH_RE.fullmatch(request.path)
        if m is None:
            await self._reply(conn, ovfhttp.refusal(404, "NotFound", "no such resource"))
        elif request.method == "PUT":
            await self._reply(conn, await ovfhttp.put(
                self.agent.ovf, m.group(1), request.content_length,
                _SocketBody(conn, self.body_timeout), conn.cn))
        elif request.method == "GET":
            reply = await ovfhttp.get(self.agent.ovf, m.group(1), request.headers.get("Range"))
            if isinstance(reply, Download):
                await self._download(conn, reply, m.group(1))
            else:
                await self._reply(conn, reply)
        else:
            await self._reply(conn, ovfhttp.refusal(
                405, "MethodNotAllowed", f"method {request.method} not allowed",
                {"Allow": "GET, PUT"}))

    async def _reply(self, conn: _Connection, reply: Reply) -> None:
        """Send a whole reply; then, if the request's body was not read to
        its end, a lingering close."""
        if reply.body is None:
            data = _response_head(reply.status, {**reply.headers, "Content-Length": "0"})
        else:
            data = _json_response(reply.status, reply.body, reply.headers)
        conn.replied = True
        try:
            await conn.run(conn.sendall, data)
            if conn.body_left or not conn.framed:
                await conn.run(conn.linger, timeout=LINGER)
        except (OSError, TimeoutError):
            pass

    async def _download(self, conn: _Connection, reply: Download, sd: str) -> None:
        conn.replied = True
        try:
            await conn.run(conn.sendall, _response_head(reply.status, reply.headers))
            async for chunk in reply.chunks:
                await conn.run(conn.sendall, chunk)
        except (OSError, TimeoutError) as e:
            log.info("OVF download of %s to %s cut: %s", sd, conn.cn, e or type(e).__name__)
        except HostAgentError as e:
            # too late for an error reply: the client sees a short body
            log.warning("OVF download of %s to %s failed: %s", sd, conn.cn, e.message)
