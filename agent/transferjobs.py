"""Disk transfers as jobs: each transfer is also a job of type "transfer"
whose id is its transferId, so getJobs, `job.status` notifications,
abortJob, the jobs gauge and the records that survive a crash cover
transfers like every other long operation (getTransfer stays the
transfer's own view, with its bytes and expiry)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from agent.jobs import JobContext, JobRegistry
from storage.errors import HostAgentError, TransferTicketError
from storage.transfers import Transfer, TransferService

JOB_TYPE = "transfer"


def attach(jobs: JobRegistry, transfers: TransferService) -> None:
    """Every transfer startTransfer opens becomes a job (its record on disk
    before the volume changes); an interrupted one is recovered at start."""

    async def track(t: Transfer) -> None:
        async def work(ctx: JobContext) -> dict[str, Any]:
            t.on_progress = ctx.progress
            try:
                await t.closed.wait()
            except asyncio.CancelledError:
                if ctx.job.abort_requested:
                    # abortJob closes the transfer as cancelTransfer does
                    with contextlib.suppress(HostAgentError):
                        await transfers.cancel(t.id)
                raise
            if t.state == "finished":
                return {"transferred": t.transferred}
            if t.state == "cancelled" and t.error is None:
                # cancelTransfer: reported as an aborted job, as abortJob's
                # (the registry's way to end a job aborted)
                ctx.job.abort_requested = True
                raise asyncio.CancelledError
            raise t.error or TransferTicketError(reason=f"the transfer is {t.state}")

        await jobs.submit_recorded(
            t.id, JOB_TYPE, work, slot=False,
            description=f"{t.direction} of {t.sd}/{t.img}/{t.vol} as {t.format}",
            params={"sdUUID": t.sd, "imgUUID": t.img, "volUUID": t.vol,
                    "direction": t.direction, "format": t.format})

    transfers.track = track
    jobs.register_recovery(JOB_TYPE, lambda job: transfers.recover(job.params))
