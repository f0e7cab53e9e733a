"""rpc.ovfhttp, the OVF store's HTTP contract both listeners serve: which
reply each outcome of a PUT or GET gets (the store itself is faked here;
tests/integration/test_ovfstore.py runs the real one through both ports)."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from ovfstore.service import Ticket
from ovfstore.store import Header
from rpc import ovfhttp
from rpc.ovfhttp import BodyBroken, Download, Reply
from storage.errors import (
    AcquireLockFailure,
    HostAgentError,
    NoSpaceLeftOnDomain,
    OvfTicketError,
    StorageDomainDoesNotExist,
)

SD = str(uuid.uuid4())
HEADER = Header(generation=3, slot=1, size=10_000, sha256="ab" * 32)


class FakeStore:
    def read(self, start: int, end: int, header: Header) -> AsyncIterator[bytes]:
        async def chunks() -> AsyncIterator[bytes]:
            yield bytes(end - start)
        return chunks()


class FakeService:
    """take()/upload()/header() of OvfService, with the outcome to give."""

    def __init__(self, upload: BaseException | None = None,
                 header: HostAgentError | None = None) -> None:
        self.tickets = {"good": Ticket("good", SD, 10, None, expires=float("inf"),
                                       deadline=float("inf"))}
        self.upload_error = upload
        self.header_error = header
        self.uploaded: list[int | None] = []

    def take(self, ticket_id: str) -> Ticket:
        ticket = self.tickets.pop(ticket_id, None)
        if ticket is None:
            raise OvfTicketError(reason="unknown, used or expired ticket")
        return ticket

    async def upload(self, ticket: Ticket, content_length: int | None,
                     body: Any) -> dict[str, Any]:
        self.uploaded.append(content_length)
        if self.upload_error is not None:
            raise self.upload_error
        return {"generation": 4, "size": 10, "sha256": "cd" * 32}

    async def header(self, sd: str) -> tuple[Header, FakeStore]:
        if self.header_error is not None:
            raise self.header_error
        return HEADER, FakeStore()


async def put(service: FakeService, ticket: str = "good",
              length: int | None = 10) -> Reply:
    return await ovfhttp.put(service, ticket, length, object(), "peer")  # type: ignore[arg-type]


async def test_put_outcomes(caplog: pytest.LogCaptureFixture) -> None:
    ok = FakeService()
    assert await put(ok) == Reply(200, {"generation": 4, "size": 10, "sha256": "cd" * 32})
    # the ticket is used up by the first attempt, whatever its outcome
    used = await put(ok)
    assert used.status == 403 and used.body["error"]["code"] == 2111
    # no Content-Length: 411, and the store is never called
    no_length = FakeService()
    reply = await put(no_length, length=None)
    assert reply.status == 411 and "Content-Length" in reply.body["error"]["message"]
    assert no_length.uploaded == []
    # the store's errors through errors.py's translator, with their status
    for error, status, code in [(AcquireLockFailure(resource="x"), 409, 651),
                                (NoSpaceLeftOnDomain(sdUUID=SD), 507, 397)]:
        reply = await put(FakeService(upload=error))
        assert (reply.status, reply.body["error"]["code"]) == (status, code), reply
    # a broken body: an error reply (if the client still reads) and a log line
    with caplog.at_level(logging.INFO, logger="rpc.ovfstore"):
        reply = await put(FakeService(upload=BodyBroken("reset by peer")))
    assert reply.status == 400
    assert reply.body["error"]["message"].endswith("the body ended before Content-Length")
    assert f"OVF upload to {SD} from peer interrupted" in caplog.text


async def test_get_outcomes() -> None:
    whole = await ovfhttp.get(FakeService(), SD, None)
    assert isinstance(whole, Download) and whole.status == 200
    assert whole.headers["Content-Length"] == "10000"
    assert whole.headers["ETag"] == f'"{"ab" * 32}"'
    assert "Content-Range" not in whole.headers
    assert [len(c) async for c in whole.chunks] == [10_000]
    part = await ovfhttp.get(FakeService(), SD, "bytes=100-199")
    assert isinstance(part, Download) and part.status == 206
    assert part.headers["Content-Range"] == "bytes 100-199/10000"
    assert [len(c) async for c in part.chunks] == [100]
    tail = await ovfhttp.get(FakeService(), SD, "bytes=-5000")
    assert isinstance(tail, Download) and tail.headers["Content-Range"] == \
        "bytes 5000-9999/10000"
    assert await ovfhttp.get(FakeService(), SD, "bytes=10000-") == \
        Reply(416, None, {"Content-Range": "bytes */10000"})
    assert await ovfhttp.get(FakeService(), "not-a-uuid", None) == ovfhttp.NOT_A_UUID
    gone = await ovfhttp.get(FakeService(header=StorageDomainDoesNotExist(sdUUID=SD)), SD, None)
    assert isinstance(gone, Reply) and gone.status == 404 and gone.body["error"]["code"] == 358


@pytest.mark.parametrize(("header", "span"), [
    (None, (0, 100)), ("bytes=0-0", (0, 1)), ("bytes=90-", (90, 100)),
    ("bytes=-10", (90, 100)), ("bytes=-500", (0, 100)), ("bytes=50-500", (50, 100)),
    ("bytes=100-", None), ("bytes=-", None), ("bytes=5-2", None), ("bytes=0-1,3-4", None),
    ("bytes=\u0661-2", None), ("bytes=" + "9" * 20 + "-", None)])
def test_byte_range(header: str | None, span: tuple[int, int] | None) -> None:
    assert ovfhttp.byte_range(header, 100) == span
