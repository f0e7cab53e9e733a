"""HTTP streams of the OVF store: PUT /ovfstore/{ticket}, GET /ovfstore/{sdUUID}.

Served on the main port (these aiohttp routes, behind the same mutual TLS as
the JSON-RPC edge) and on the OVF data listener (rpc.ovfdata), whose URL
uploadOvfTar hands out. Errors answer with an HTTP status and the same error
object as JSON-RPC: {"error": {code, message, data}}.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator

import aiohttp
import aiohttp.http_exceptions
from aiohttp import web

from ovfstore.store import ChunkBody, Header
from rpc.schema import UUID_RE
from rpc.server import AGENT_KEY
from storage.errors import (
    HostAgentError,
    OvfStoreError,
    http_status,
    wire_error,
)

log = logging.getLogger("rpc.ovfstore")

CHUNK = 1 << 20
# ASCII digits (\d also matches other scripts' digits, which int() reads),
# at most 19: a position past any tar's size, and far below Python's
# 4300-digit int() limit (issue 22.11: 5000 digits were a 500).
RANGE_RE = re.compile(r"bytes=([0-9]{0,19})-([0-9]{0,19})")


NOT_A_UUID = {"error": {"code": -32602, "message": "not a UUID",
                        "data": {"name": "InvalidParams", "field": "sdUUID"}}}


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """[start, end) of the tar that a Range header (one range, or none) asks
    for; None if it cannot be satisfied (416)."""
    if not header:
        return 0, size
    m = RANGE_RE.fullmatch(header.strip())
    if not m or (not m.group(1) and not m.group(2)):
        return None
    if m.group(1):
        start = int(m.group(1))
        end = min(size, int(m.group(2)) + 1) if m.group(2) else size
    else:
        start, end = max(0, size - int(m.group(2))), size
    return (start, end) if start < end else None


def download_headers(header: Header, start: int, end: int, partial: bool) -> dict[str, str]:
    headers = {"Content-Type": "application/x-tar", "Accept-Ranges": "bytes",
               "ETag": f'"{header.sha256}"', "X-OVF-Generation": str(header.generation),
               "Content-Length": str(end - start)}
    if partial:
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{header.size}"
    return headers


def _error(e: HostAgentError) -> web.Response:
    return web.json_response({"error": wire_error(e)}, status=http_status(e))


async def _stall_limited(chunks: AsyncIterator[bytes], seconds: float) -> AsyncIterator[bytes]:
    it = aiter(chunks)
    while True:
        try:
            async with asyncio.timeout(seconds):
                chunk = await anext(it)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise OvfStoreError(reason=f"no data for {seconds:g} s: upload abandoned") from None
        yield chunk


async def put_ovf(request: web.Request) -> web.StreamResponse:
    agent = request.app[AGENT_KEY]
    try:
        ticket = agent.ovf.take(request.match_info["ticket"])
    except HostAgentError as e:
        return _error(e)
    if request.content_length is None:
        missing = OvfStoreError(reason="Content-Length is required")
        return web.json_response({"error": missing.to_dict()}, status=411)

    # Chunks as the transport hands them over (up to CHUNK, usually one TLS
    # read); the store gathers them into large buffers for hashing and writing.
    # A client that stops sending would hold the domain's upload lock: each
    # read must bring data within server.body_timeout.
    chunks = _stall_limited(request.content.iter_chunked(CHUNK),
                            agent.config.server.body_timeout)
    try:
        result = await agent.ovf.upload(ticket, request.content_length,
                                        ChunkBody(chunks, request.content_length))
    except HostAgentError as e:
        log.info("OVF upload to %s refused: %s", ticket.sd, e.message)
        return _error(e)
    except (OSError, aiohttp.ClientPayloadError, aiohttp.http_exceptions.HttpProcessingError):
        # The body broke off: nothing was switched, the stored tar is unchanged.
        log.info("OVF upload to %s interrupted", ticket.sd)
        return _error(OvfStoreError(reason="the body ended before Content-Length"))
    return web.json_response(result)


async def get_ovf(request: web.Request) -> web.StreamResponse:
    agent = request.app[AGENT_KEY]
    sd = request.match_info["sdUUID"]
    if not UUID_RE.match(sd):
        return web.json_response(NOT_A_UUID, status=400)
    try:
        header, store = await agent.ovf.header(sd)
    except HostAgentError as e:
        return _error(e)
    rng = request.headers.get("Range")
    span = byte_range(rng, header.size)
    if span is None:
        return web.Response(status=416, headers={"Content-Range": f"bytes */{header.size}"})
    start, end = span
    response = web.StreamResponse(status=206 if rng else 200,
                                  headers=download_headers(header, start, end, bool(rng)))
    await response.prepare(request)
    async for chunk in store.read(start, end, header):
        await response.write(chunk)
    await response.write_eof()
    return response


def routes() -> list[web.RouteDef]:
    return [web.put("/ovfstore/{ticket}", put_ovf), web.get("/ovfstore/{sdUUID}", get_ovf)]
