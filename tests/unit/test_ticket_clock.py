"""Tickets (OVF uploads, disk transfers) live by the monotonic clock: a
step of the wall clock (NTP, an admin setting the date) neither ends one
early nor keeps one alive; `expires`, as reported, stays wall-clock time."""

from __future__ import annotations

import asyncio
import time
from typing import Any, cast

import pytest

from ovfstore.service import OvfService
from storage.errors import OvfTicketError, TransferTicketError
from storage.transfers import Transfer, TransferService

DAY = 86400.0
TTL = 60.0


def shift(monkeypatch: pytest.MonkeyPatch, clock: str, by: float) -> None:
    real = getattr(time, clock)
    monkeypatch.setattr(time, clock, lambda: real() + by)


def ovf_service() -> OvfService:
    return OvfService(cast(Any, None), cast(Any, None), slot_size=1 << 20,
                      member_limit=1 << 20, ticket_ttl=TTL)


def test_ovf_ticket_outlives_a_wall_clock_step_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    ovf = ovf_service()
    ticket = ovf.new_ticket("sd", 10, None)
    assert time.time() + TTL - 5 < ticket.expires <= time.time() + TTL
    shift(monkeypatch, "time", DAY)
    ovf.new_ticket("sd", 10, None)       # its sweep of expired tickets keeps the first
    assert ovf.take(ticket.id) is ticket


def test_ovf_ticket_ends_on_time_after_a_wall_clock_step_back(
        monkeypatch: pytest.MonkeyPatch) -> None:
    ovf = ovf_service()
    ticket = ovf.new_ticket("sd", 10, None)
    shift(monkeypatch, "time", -DAY)
    shift(monkeypatch, "monotonic", TTL + 1)
    with pytest.raises(OvfTicketError, match="expired"):
        ovf.take(ticket.id)


class _Volumes:
    registry = None
    prepared = None


def transfer(service: TransferService) -> Transfer:
    t = Transfer(id="t1", ticket="secret", sd="sd", img="img", vol="vol",
                 direction="upload", format="raw", dirty=None, inactivity=DAY,
                 expires=time.time() + TTL, deadline=time.monotonic() + TTL,
                 domain=cast(Any, None), md=cast(Any, None), state="open")
    service.transfers[t.id] = t
    service.tickets[t.ticket] = t
    return t


async def test_transfer_ticket_by_the_monotonic_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    service = TransferService(cast(Any, _Volumes()))
    t = transfer(service)
    with monkeypatch.context() as m:
        shift(m, "time", DAY)
        assert service.acquire("secret", write=True) is t
        service.release(t)
    with monkeypatch.context() as m:
        shift(m, "time", -DAY)
        shift(m, "monotonic", TTL + 1)
        with pytest.raises(TransferTicketError, match="expired"):
            service.acquire("secret", write=True)


async def test_transfer_watch_expires_it_by_the_monotonic_clock(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The transfer's watcher ends it at its monotonic deadline, whatever
    the wall clock says."""
    service = TransferService(cast(Any, _Volumes()))
    t = transfer(service)
    child = asyncio.create_task(asyncio.Event().wait())      # qemu-nbd, running
    try:
        shift(monkeypatch, "time", DAY)      # past `expires` on the wall clock
        t.deadline = time.monotonic() + 0.3
        watch = asyncio.create_task(service._watch(t, child))
        done, _ = await asyncio.wait({watch}, timeout=0.1)
        assert not done and t.state == "open"
        async with asyncio.timeout(5):
            await watch
        assert t.state == "expired" and t.error is not None
        assert "expired" in t.error.message
    finally:
        child.cancel()
