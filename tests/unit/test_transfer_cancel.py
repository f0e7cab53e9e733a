"""cancelTransfer of an upload whose ticket just expired or failed: its
close (requests draining, qemu-nbd stopping, the volume's lease let go) may
still be under way; the volume is removed only once it has ended (before,
the removal found the lease held by this agent: 651)."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest

from storage.transfers import Transfer, TransferService


class _Volumes:
    registry = None
    prepared = None

    def __init__(self) -> None:
        self.deleted: list[str] = []

    async def delete_volume(self, sd: str, img: str, vol: str) -> None:
        self.deleted.append(vol)


class _Closed(asyncio.Event):
    """The transfer's `closed`, telling when someone waits for it."""

    def __init__(self) -> None:
        super().__init__()
        self.awaited = asyncio.Event()

    async def wait(self) -> bool:   # type: ignore[override]
        self.awaited.set()
        return await super().wait()


@pytest.mark.parametrize("state", ["expired", "failed"])
async def test_cancel_removes_the_upload_after_its_close(state):
    volumes = _Volumes()
    service = TransferService(cast(Any, volumes))
    closed = _Closed()
    t = Transfer(id="t1", ticket="secret", sd="sd", img="img", vol="vol",
                 direction="upload", format="raw", dirty=None, inactivity=60.0,
                 expires=0.0, deadline=0.0, domain=cast(Any, None), md=cast(Any, None), state=state,
                 closed=closed)
    service.transfers[t.id] = t
    cancelling = asyncio.create_task(service.cancel(t.id))
    async with asyncio.timeout(5):
        await closed.awaited.wait()     # the cancel waits for the close...
    assert volumes.deleted == [] and not cancelling.done()
    closed.set()                        # ...which ends
    info = await cancelling
    assert volumes.deleted == ["vol"]
    assert info["state"] == "cancelled"
