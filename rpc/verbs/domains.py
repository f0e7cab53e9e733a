"""Storage domain verbs."""

from __future__ import annotations

from typing import Any

from agent.context import Agent
from rpc.schema import UUID, Bool, Enum, Field, Int, List, Str
from rpc.table import TABLE, one_of
from rpc.verbs.common import SD_UUID
from rpc.verbs.connections import DOM_TYPE
from rpc.verbs.devices import GUID

INFO = {"type": "object", "required": ["uuid", "name", "type", "class", "version", "backup",
                                       "state"]}


@TABLE.verb("createStorageDomain", "Create a file domain on a connected nfs/posixfs/localfs "
            "connection, or a block domain (an LVM volume group) on LUN devices. Everything "
            "about the domain is kept on the domain itself. The domain is active on this host "
            "afterwards.",
            [SD_UUID, DOM_TYPE,
             Field("name", Str(max_len=200), description="Human name of the domain"),
             Field("domClass", Enum(["data", "backup"]), required=False, default="data"),
             Field("connectionId", UUID(), required=False,
                   description="File domains: the connection holding the domain"),
             Field("devices", List(GUID, min_items=1, max_items=64),
                   required=False, description="Block domains: LUN GUIDs from getDeviceList"),
             Field("version", Int(5, 5), required=False, default=5),
             Field("ovfStore", Bool(), required=False, default=True,
                   description="Create the domain's OVF store volume")],
            check=one_of("connectionId", "devices"), result=INFO, tags=["domains"])
async def create_storage_domain(agent: Agent, sdUUID: str, domType: str, name: str,
                                domClass: str, connectionId: str | None,
                                devices: list[str] | None, version: int,
                                ovfStore: bool) -> dict[str, Any]:
    return await agent.domains.create(sdUUID, domType, name, domClass,
                                      connection_id=connectionId, devices=devices,
                                      version=version, ovf_store=ovfStore)


@TABLE.verb("getStorageDomainInfo", "A domain's identity, class, backup flag, state on this "
            "host and its monitoring.", [SD_UUID], result=INFO, tags=["domains"])
async def get_storage_domain_info(agent: Agent, sdUUID: str) -> dict[str, Any]:
    return await agent.domains.info(sdUUID)


@TABLE.verb("getStorageDomainStats", "Space and volume count of a domain.", [SD_UUID],
            result={"type": "object", "required": ["capacity", "free", "used", "volumes"]},
            tags=["domains"])
async def get_storage_domain_stats(agent: Agent, sdUUID: str) -> dict[str, Any]:
    return await agent.domains.stats(sdUUID)


@TABLE.verb("getStorageDomainsList", "Every domain found on the storage this host is "
            "connected to.", result={"type": "array", "items": {"type": "string"}},
            tags=["domains"])
async def get_storage_domains_list(agent: Agent) -> list[str]:
    return await agent.domains.list_domains()


@TABLE.verb("activateStorageDomain", "Activate a domain on this host: clean what a crash "
            "left, start monitoring.", [SD_UUID], result=INFO, tags=["domains"])
async def activate_storage_domain(agent: Agent, sdUUID: str) -> dict[str, Any]:
    return await agent.domains.activate(sdUUID)


@TABLE.verb("deactivateStorageDomain", "Put a domain in maintenance on this host; refused "
            "while volumes are prepared.", [SD_UUID], result=INFO, tags=["domains"])
async def deactivate_storage_domain(agent: Agent, sdUUID: str) -> dict[str, Any]:
    return await agent.domains.deactivate(sdUUID)


@TABLE.verb("setStorageDomainBackup", "Mark or unmark a backup domain (stored on the "
            "domain); refused while a volume is prepared for a running VM.",
            [SD_UUID, Field("backup", Bool())], result=INFO, tags=["domains"])
async def set_storage_domain_backup(agent: Agent, sdUUID: str,
                                    backup: bool) -> dict[str, Any]:
    return await agent.domains.set_backup(sdUUID, backup)


STATS = {"type": "object", "required": ["capacity", "free", "used", "volumes"]}


@TABLE.verb("extendStorageDomain", "Add LUNs (multipath WWIDs from getDeviceList, connected "
            "on this host) to an active block domain's volume group, under the domain lease; "
            "the domain metadata lists its PVs (PVS). A LUN already in the domain is skipped "
            "(idempotent); one in another volume group, holding data or in use is refused "
            "(601), one this host does not see is 606, one of another sector size 517. "
            "Returns the domain's space afterwards.",
            [SD_UUID, Field("devices", List(GUID, min_items=1, max_items=64),
                            description="LUN GUIDs from getDeviceList")],
            result=STATS, tags=["domains"])
async def extend_storage_domain(agent: Agent, sdUUID: str,
                                devices: list[str]) -> dict[str, Any]:
    stats = await agent.domains.extend_domain(sdUUID, devices)
    agent.volumes.space_freed(sdUUID)
    return stats


@TABLE.verb("resizePV", "Use the new size of a LUN of an active block domain that the "
            "storage grew: its paths are rescanned, its multipath map resized "
            "(multipathd resize map) and its PV resized (pvresize), online: prepared volumes "
            "go on. Returns the domain's space afterwards and the PV's new size (size). "
            "A LUN that is not a PV of the domain is 615.",
            [SD_UUID, Field("guid", GUID, description="The LUN's GUID (multipath WWID)")],
            result={**STATS, "required": [*STATS["required"], "size"]}, tags=["domains"])
async def resize_pv(agent: Agent, sdUUID: str, guid: str) -> dict[str, Any]:
    stats = await agent.domains.resize_pv(sdUUID, guid)
    agent.volumes.space_freed(sdUUID)
    return stats


@TABLE.verb("formatStorageDomain", "Remove a domain and everything on it; refused while "
            "volumes are prepared.", [SD_UUID], result={"type": "object"}, tags=["domains"])
async def format_storage_domain(agent: Agent, sdUUID: str) -> dict[str, Any]:
    await agent.domains.format(sdUUID)
    return {}
