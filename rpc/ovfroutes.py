"""The OVF store's routes on the main port (aiohttp, behind the same mutual
TLS as the JSON-RPC edge): PUT /ovfstore/{ticket}, GET /ovfstore/{sdUUID}.
What they mean is rpc.ovfhttp's (shared with the OVF data listener,
rpc.ovfdata); this module only adapts aiohttp's request and response."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import aiohttp.http_exceptions
from aiohttp import web

from ovfstore.store import ChunkBody
from rpc import ovfhttp
from rpc.ovfhttp import BodyBroken, Download, Reply
from rpc.server import AGENT_KEY

CHUNK = 1 << 20


def _response(reply: Reply) -> web.Response:
    if reply.body is None:
        return web.Response(status=reply.status, headers=reply.headers)
    return web.json_response(reply.body, status=reply.status, headers=reply.headers)


async def _chunks(request: web.Request, stall: float) -> AsyncIterator[bytes]:
    """The body's chunks as the transport hands them over (up to CHUNK,
    usually one TLS read); the store gathers them into large buffers. A
    client that stops sending would hold the domain's upload lock: each
    read must bring data within `stall` seconds."""
    it = aiter(request.content.iter_chunked(CHUNK))
    while True:
        try:
            async with asyncio.timeout(stall):
                chunk = await anext(it)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise ovfhttp.stalled(stall) from None
        except (OSError, aiohttp.ClientPayloadError,
                aiohttp.http_exceptions.HttpProcessingError) as e:
            raise BodyBroken(str(e) or type(e).__name__) from None
        yield chunk


async def put_ovf(request: web.Request) -> web.StreamResponse:
    agent = request.app[AGENT_KEY]
    length = request.content_length
    body = ChunkBody(_chunks(request, agent.config.server.body_timeout), length or 0)
    return _response(await ovfhttp.put(agent.ovf, request.match_info["ticket"], length, body,
                                       request.remote or "-"))


async def get_ovf(request: web.Request) -> web.StreamResponse:
    agent = request.app[AGENT_KEY]
    reply = await ovfhttp.get(agent.ovf, request.match_info["sdUUID"],
                              request.headers.get("Range"))
    if not isinstance(reply, Download):
        return _response(reply)
    response = web.StreamResponse(status=reply.status, headers=reply.headers)
    await response.prepare(request)
    async for chunk in reply.chunks:
        await response.write(chunk)
    await response.write_eof()
    return response


def routes() -> list[web.RouteDef]:
    return [web.put("/ovfstore/{ticket}", put_ovf), web.get("/ovfstore/{sdUUID}", get_ovf)]
