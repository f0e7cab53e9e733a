"""The OVF store's HTTP contract, once, for both listeners that serve it:
PUT /ovfstore/{ticket} and GET /ovfstore/{sdUUID}.

What a request means lives here: the ticket (the upload's credential) and
the client certificate, the parameters and their checks, the domain's room
(OvfService), streaming the body into the store and the store out, the
Range header, and every status and error body (through storage/errors.py's
wire_error() and http_status()). A transport only turns its request into
these calls and sends the Reply or Download they return:

- rpc.ovfroutes: aiohttp routes on the main port;
- rpc.ovfdata: the OVF data listener (rpc.httpconn), whose URL
  uploadOvfTar hands out.

A transport gives the upload's body as an ovfstore.store.Body whose
readinto() raises stalled() when the client sends nothing for
server.body_timeout, and BodyBroken when the connection breaks.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from ovfstore.service import OvfService
from ovfstore.store import Body, Header
from rpc.schema import UUID_RE
from storage.errors import HostAgentError, OvfStoreError, http_status, wire_error

log = logging.getLogger("rpc.ovfstore")

PATH_RE = re.compile(r"/ovfstore/([^/]+)")
# ASCII digits (\d also matches other scripts' digits, which int() reads),
# at most 19: a position past any tar's size, and far below Python's
# 4300-digit int() limit (issue 22.11: 5000 digits were a 500).
RANGE_RE = re.compile(r"bytes=([0-9]{0,19})-([0-9]{0,19})")


class BodyBroken(Exception):
    """The client's connection broke in the middle of an upload's body."""


@dataclass(frozen=True)
class Reply:
    """A whole reply: a JSON body (None: no body) and extra headers."""

    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Download:
    """A GET's reply head and the tar's bytes to stream after it."""

    status: int
    headers: dict[str, str]
    chunks: AsyncIterator[bytes]


def error(e: HostAgentError, status: int | None = None) -> Reply:
    return Reply(status or http_status(e), {"error": wire_error(e)})


def refusal(status: int, name: str, message: str,
            headers: dict[str, str] | None = None) -> Reply:
    """A request refused before the contract's own checks (no route, a
    method, no certificate, a broken request head)."""
    return Reply(status, {"error": {"code": -32600, "message": message,
                                    "data": {"name": name}}}, headers or {})


NOT_A_UUID = Reply(400, {"error": {"code": -32602, "message": "not a UUID",
                                   "data": {"name": "InvalidParams", "field": "sdUUID"}}})
CERT_REQUIRED = refusal(403, "Forbidden", "a client certificate is required")


def stalled(seconds: float) -> OvfStoreError:
    """What a body's readinto() raises when no data came for `seconds`."""
    return OvfStoreError(reason=f"no data for {seconds:g} s: upload abandoned")


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


async def put(ovf: OvfService, ticket_id: str, content_length: int | None, body: Body,
              peer: str) -> Reply:
    """PUT /ovfstore/{ticket_id}: the body into the ticket's domain's store.
    The ticket is used up whatever happens; after any refusal or a broken
    body the stored tar is the one before."""
    try:
        ticket = ovf.take(ticket_id)
    except HostAgentError as e:
        return error(e)
    if content_length is None:
        return error(OvfStoreError(reason="Content-Length is required"), 411)
    try:
        result = await ovf.upload(ticket, content_length, body)
    except HostAgentError as e:
        log.info("OVF upload to %s from %s refused: %s", ticket.sd, peer, e.message)
        return error(e)
    except BodyBroken as e:
        # nothing was switched; the client is most likely gone, and this
        # reply, if it can be sent at all, is for a client that stopped sending
        log.info("OVF upload to %s from %s interrupted: %s", ticket.sd, peer, e)
        return error(OvfStoreError(reason="the body ended before Content-Length"))
    return Reply(200, result)


async def get(ovf: OvfService, sd: str, range_header: str | None) -> Reply | Download:
    """GET /ovfstore/{sd}: the stored tar, or the part a Range asks for."""
    if not UUID_RE.match(sd):
        return NOT_A_UUID
    try:
        header, store = await ovf.header(sd)
    except HostAgentError as e:
        return error(e)
    span = byte_range(range_header, header.size)
    if span is None:
        return Reply(416, None, {"Content-Range": f"bytes */{header.size}"})
    start, end = span
    partial = bool(range_header)
    return Download(206 if partial else 200, download_headers(header, start, end, partial),
                    store.read(start, end, header))
