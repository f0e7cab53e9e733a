"""Block device verbs: iSCSI SendTargets discovery and the LUN list.

Portal fields are those of the iSCSI connection schema (rpc/verbs/connections.py),
so discovery accepts exactly the addresses and ports a connection would.
"""

from __future__ import annotations

from typing import Any

from agent.context import Agent
from rpc.schema import Bool, Field, InvalidParams, List, Str
from rpc.table import TABLE
from rpc.verbs.connections import CONNECTION_TYPES
from storage import devices
from storage.connections import iscsi

_ISCSI = {f.name: f for f in CONNECTION_TYPES["iscsi"].fields}

# multipath WWIDs as udev's scsi_id makes them: a type digit and hex (NAA,
# EUI-64), or a T10 vendor id with underscores
GUID = Str(max_len=128, safe_arg=True, pattern=r"[A-Za-z0-9][A-Za-z0-9_.:-]*",
           pattern_doc="must be a device WWID like 36001405...")


def _check_chap(values: dict[str, Any], path: str) -> None:
    if bool(values["user"]) != bool(values["password"]):
        raise InvalidParams("password" if values["user"] else "user",
                            "CHAP needs both user and password")


@TABLE.verb("discoverSendTargets", "iSCSI SendTargets discovery on a portal: the targets it "
            "offers, each with its portal and portal group tag; with user and password, "
            "CHAP authenticates the discovery session (refused: 475). Leaves no record on "
            "the host; the password is in no log, result or error.",
            [_ISCSI["connection"], _ISCSI["port"], _ISCSI["user"], _ISCSI["password"]],
            check=_check_chap,
            result={"type": "array", "items": {
                "type": "object", "required": ["iqn", "portal", "tpgt"],
                "properties": {"iqn": {"type": "string"}, "portal": {"type": "string"},
                               "tpgt": {"type": ["integer", "null"]},
                               "connection": {"type": "string"},
                               "port": {"type": "integer"}}}},
            tags=["devices", "connections"])
async def discover_send_targets(agent: Agent, connection: str, port: int, user: str | None,
                                password: str | None) -> list[dict[str, Any]]:
    return await iscsi.discover_send_targets(connection, port, user=user, password=password,
                                             timeout=agent.config.storage.io_timeout)


@TABLE.verb("getDeviceList", "The LUNs this host sees through multipath, with their paths "
            "and paths' states, the iSCSI sessions behind them, their LVM PV/VG and whether "
            "they are free. checkStatus also probes each LUN for data signatures and "
            "exclusive users (slower). refresh first rescans every iSCSI session and FC "
            "host and each multipath path, and resizes the maps whose LUN grew: new LUNs "
            "and new capacities are listed.",
            [Field("guids", List(GUID, max_items=4096), required=False,
                   description="Only these LUNs (multipath WWIDs)"),
             Field("checkStatus", Bool(), required=False, default=False),
             Field("refresh", Bool(), required=False, default=False,
                   description="Rescan iSCSI sessions, FC hosts and multipath maps first")],
            result={"type": "array", "items": {
                "type": "object",
                "required": ["guid", "capacity", "vendorID", "productID", "serial", "pathlist",
                             "pathstatus", "pvUUID", "vgUUID", "status"]}},
            tags=["devices"])
async def get_device_list(agent: Agent, guids: list[str] | None,
                          checkStatus: bool, refresh: bool) -> list[dict[str, Any]]:
    timeout = agent.config.storage.command_timeout
    if refresh:
        await devices.refresh(timeout=timeout)
    return await devices.device_list(guids, checkStatus, timeout=timeout)
