"""Disk transfer verbs (ovirt-imageio's protocol on the data listener):
startTransfer, getTransfer, finalizeTransfer, cancelTransfer."""

from __future__ import annotations

from typing import Any

from agent.context import Agent
from rpc.schema import UUID, Enum, Field, Number, Str
from rpc.table import TABLE
from rpc.verbs.common import IMG_UUID, SD_UUID, VOL_UUID
from rpc.verbs.ovf import _public_host

TRANSFER_ID = Field("transferId", UUID(), description="The id startTransfer returned")
TRANSFER_INFO = {"type": "object", "required": [
    "transferId", "direction", "active", "transferred", "expires"]}


@TABLE.verb("startTransfer", "Open a disk transfer of one volume: a single-use ticket and the "
            "url that serves it on the data listener with ovirt-imageio's HTTP protocol "
            "(OPTIONS, GET with Range, PUT with Content-Range, PATCH zero and flush, "
            "/extents, /checksum). The url needs no client certificate: its ticket is the "
            "credential. The volume is leased and kept active until the transfer closes. "
            "format raw (default): the guest's view through qemu-nbd; qcow2: a cow volume's "
            "file as it is. An upload's volume (a leaf) is ILLEGAL until finalizeTransfer "
            "checked it. dirty: a bitmap whose changes /extents?context=dirty reports. The "
            "transfer is also a job (type transfer, jobUUID = transferId): getJobs, "
            "job.status, abortJob.",
            [SD_UUID, IMG_UUID, VOL_UUID,
             Field("direction", Enum(["upload", "download"])),
             Field("format", Enum(["raw", "qcow2"]), required=False, default="raw"),
             Field("dirty", Str(max_len=1000, pattern=r"[A-Za-z0-9_.:-]+",
                                pattern_doc="a bitmap name"), required=False),
             Field("inactivityTimeout", Number(1, 86400), required=False,
                   description="Seconds without a request before the ticket closes "
                               "(default: the agent's transfers.inactivity_timeout, 60; "
                               "at most transfers.max_inactivity_timeout)")],
            result={"type": "object", "required": ["transferId", "url", "expires"]},
            tags=["transfers"])
async def start_transfer(agent: Agent, sdUUID: str, imgUUID: str, volUUID: str,
                         direction: str, format: str, dirty: str | None,
                         inactivityTimeout: float | None) -> dict[str, Any]:
    t = await agent.transfers.start(sdUUID, imgUUID, volUUID, direction, format, dirty,
                                    None if inactivityTimeout is None
                                    else float(inactivityTimeout))
    scheme = "https" if agent.config.server.tls else "http"
    port = agent.transfers.data_port or agent.config.ovf.data_port
    return {"transferId": t.id, "expires": t.expires, "size": t.size,
            "url": f"{scheme}://{_public_host(agent)}:{port}/images/{t.ticket}"}


@TABLE.verb("getTransfer", "A transfer's state: direction, whether its ticket is open, bytes "
            "transferred, expiry, and its error if it failed.", [TRANSFER_ID],
            result=TRANSFER_INFO, tags=["transfers"])
async def get_transfer(agent: Agent, transferId: str) -> dict[str, Any]:
    return agent.transfers.get(transferId).info()


@TABLE.verb("finalizeTransfer", "Close a transfer: requests under way end, the ticket closes, "
            "the volume's lease is released. An upload is checked first (qemu-img info under "
            "resource limits: format, backing file, size; qemu-img check) and its volume "
            "becomes LEGAL; if the check fails it stays ILLEGAL and the error says why.",
            [TRANSFER_ID], result=TRANSFER_INFO, tags=["transfers"])
async def finalize_transfer(agent: Agent, transferId: str) -> dict[str, Any]:
    return await agent.transfers.finalize(transferId)


@TABLE.verb("cancelTransfer", "Close a transfer at once; an upload's volume is removed.",
            [TRANSFER_ID], result=TRANSFER_INFO, tags=["transfers"])
async def cancel_transfer(agent: Agent, transferId: str) -> dict[str, Any]:
    return await agent.transfers.cancel(transferId)
