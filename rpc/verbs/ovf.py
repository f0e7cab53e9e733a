"""OVF store verbs: uploadOvfTar, getOvfStoreInfo, listOvfEntities."""

from __future__ import annotations

import socket
from typing import Any

from agent.context import Agent
from rpc.schema import Field, Int, Str
from rpc.table import TABLE
from rpc.verbs.common import SD_UUID


def _public_host(agent: Agent) -> str:
    server = agent.config.server
    if server.public_host:
        return server.public_host
    if server.host in ("0.0.0.0", "::"):  # noqa: S104 - naming the wildcard, not binding
        return socket.getfqdn()
    return server.host


@TABLE.verb("uploadOvfTar", "Get a single-use ticket to upload the domain's OVF tar: "
            "PUT the tar to `url` (Content-Length required). The store keeps the previous "
            "tar until the new one is complete and durable.",
            [SD_UUID, Field("size", Int(1024, 1 << 40), description="Tar size in bytes"),
             Field("sha256", Str(pattern=r"[0-9a-fA-F]{64}", pattern_doc="64 hex digits"),
                   required=False)],
            result={"type": "object", "required": ["ticket", "url", "expires"]},
            tags=["ovfstore"])
async def upload_ovf_tar(agent: Agent, sdUUID: str, size: int,
                         sha256: str | None) -> dict[str, Any]:
    ticket = await agent.ovf.issue(sdUUID, size, sha256)
    scheme = "https" if agent.config.server.tls else "http"
    # the OVF data listener when it runs (uploads off the event loop);
    # `path` works on the main port too
    port = agent.ovf.data_port or agent.config.server.port
    path = f"/ovfstore/{ticket.id}"
    return {"ticket": ticket.id, "path": path, "expires": ticket.expires,
            "url": f"{scheme}://{_public_host(agent)}:{port}{path}"}


@TABLE.verb("getOvfStoreInfo", "Generation, size, sha256, update time and member count of "
            "the domain's current OVF tar.", [SD_UUID],
            result={"type": "object",
                    "required": ["generation", "size", "sha256", "updated", "entries"]},
            tags=["ovfstore"])
async def get_ovf_store_info(agent: Agent, sdUUID: str) -> dict[str, Any]:
    return await agent.ovf.info(sdUUID)


@TABLE.verb("listOvfEntities", "VMs and templates described by the domain's stored OVFs, "
            "with their disks and the connected domain holding each disk (or null).",
            [SD_UUID], result={"type": "array", "items": {"type": "object"}},
            tags=["ovfstore"])
async def list_ovf_entities(agent: Agent, sdUUID: str) -> list[dict[str, Any]]:
    return await agent.ovf.entities(sdUUID)
