"""Storage connection verbs and the one validator of connection params.

Every verb that takes a connection (connect, disconnect, update, test)
checks it with `validate_connection`: the fields of its type, present and
well formed, values that reach a command line free of leading '-', control
characters and unsafe mount options. A failure is -32602 naming the field
(`connectionParams[1].port`).
"""

from __future__ import annotations

from typing import Any

from agent.context import Agent
from rpc.schema import (
    UUID,
    Enum,
    Field,
    Int,
    InvalidParams,
    List,
    Object,
    Str,
    Type,
)
from rpc.table import TABLE
from storage import mount
from storage.connections import filebased
from storage.errors import InvalidParameter

DOM_TYPES = ("nfs", "posixfs", "localfs", "iscsi", "fcp")

_HOST = r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9][A-Za-z0-9._-]*)"
_IQN = (r"(iqn\.\d{4}-\d{2}\.[A-Za-z0-9.-]+(:[A-Za-z0-9._:-]+)?"
        r"|eui\.[0-9A-Fa-f]{16}|naa\.[0-9A-Fa-f]{16,32})")

ID = Field("id", UUID(), description="Connection id, chosen by the engine")
MNT_OPTIONS = Field("mnt_options", Str(min_len=0, max_len=1024, safe_arg=True),
                    required=False, description="Extra mount options, comma separated")

CONNECTION_TYPES: dict[str, Object] = {
    "nfs": Object([
        ID,
        Field("connection", Str(max_len=1024, safe_arg=True, pattern=_HOST + r":/\S*",
                                pattern_doc="must be server:/export"),
              description="server:/export"),
        Field("protocol_version", Enum(["3", "4", "4.1", "4.2", "auto"]), required=False,
              default="auto"),
        Field("timeout", Int(1, 6000), required=False,
              description="NFS timeo, deciseconds (default 600)"),
        Field("retrans", Int(0, 100), required=False, description="NFS retrans (default 6)"),
        MNT_OPTIONS,
    ]),
    "posixfs": Object([
        ID,
        Field("connection", Str(max_len=1024, safe_arg=True),
              description="Device or remote spec given to mount"),
        Field("vfs_type", Str(max_len=32, safe_arg=True, pattern=r"[a-z0-9][a-z0-9_]*",
                              pattern_doc="must be a file system type name like ext4")),
        MNT_OPTIONS,
    ]),
    "localfs": Object([
        ID,
        Field("connection", Str(max_len=1024, pattern=r"/\S.*|/",
                                pattern_doc="must be an absolute path"),
              description="An absolute local directory"),
    ]),
    "iscsi": Object([
        ID,
        Field("connection", Str(max_len=255, safe_arg=True, pattern=_HOST,
                                pattern_doc="must be a host name or an IP address"),
              description="Portal address"),
        Field("port", Int(1, 65535), required=False, default=3260),
        Field("iqn", Str(max_len=223, safe_arg=True, pattern=_IQN,
                         pattern_doc="must be an iSCSI name (iqn., eui. or naa.)")),
        Field("tpgt", Int(0, 65535), required=False),
        Field("user", Str(max_len=255, safe_arg=True), required=False),
        Field("password", Str(max_len=255, safe_arg=True), required=False, secret=True),
        Field("ifaceName", Str(max_len=64, safe_arg=True, pattern=r"[A-Za-z0-9._:-]+"),
              required=False),
        Field("initiatorName", Str(max_len=223, safe_arg=True, pattern=_IQN,
                                   pattern_doc="must be an iSCSI name"), required=False),
    ]),
    "fcp": Object([ID]),
}


def validate_connection(dom_type: str, value: Any, path: str) -> dict[str, Any]:
    """The central validator of one connection dict of type `dom_type`."""
    conn: dict[str, Any] = CONNECTION_TYPES[dom_type].validate(value, path)
    try:
        if conn.get("mnt_options"):
            if dom_type == "nfs":
                filebased.nfs_user_options(conn["mnt_options"])
            else:
                mount.split_options(conn["mnt_options"])
        if "vfs_type" in conn:
            mount.check_fstype(conn["vfs_type"])
    except InvalidParameter as e:
        raise InvalidParams(f"{path}.{e.fields['field']}", e.fields["reason"]) from None
    if dom_type == "iscsi" and bool(conn.get("user")) != bool(conn.get("password")):
        raise InvalidParams(f"{path}.{'password' if conn.get('user') else 'user'}",
                            "CHAP needs both user and password")
    return conn


class ConnectionList(Type):
    """connectionParams: validated per item against the type named by domType
    (in the verb's check, which knows domType)."""

    def validate(self, value: Any, path: str) -> Any:
        return List(Object([], extra=True), min_items=1, max_items=256).validate(value, path)

    def json_schema(self) -> dict[str, Any]:
        return {"type": "array", "minItems": 1, "maxItems": 256,
                "items": {"oneOf": [s.json_schema() for s in CONNECTION_TYPES.values()]}}


class ConnectionDict(Type):
    def validate(self, value: Any, path: str) -> Any:
        return Object([], extra=True).validate(value, path)

    def json_schema(self) -> dict[str, Any]:
        return {"oneOf": [s.json_schema() for s in CONNECTION_TYPES.values()]}


def _check_list(values: dict[str, Any], path: str) -> None:
    dom_type = values["domType"]
    items = values["connectionParams"]
    values["connectionParams"] = [validate_connection(dom_type, item, f"connectionParams[{i}]")
                                  for i, item in enumerate(items)]
    ids = [c["id"] for c in values["connectionParams"]]
    if len(set(ids)) != len(ids):
        raise InvalidParams("connectionParams", "the same id appears twice")


def _check_one(values: dict[str, Any], path: str) -> None:
    values["connection"] = validate_connection(values["domType"], values["connection"],
                                               "connection")


DOM_TYPE = Field("domType", Enum(DOM_TYPES))
STATUS_LIST = {"type": "array", "items": {"type": "object", "required": ["id", "status",
                                                                         "message"]}}


@TABLE.verb("connectStorageServer", "Connect this host to storage; each connection is tried "
            "on its own and reported with status 0 or its error code.",
            [DOM_TYPE, Field("connectionParams", ConnectionList())], check=_check_list,
            result=STATUS_LIST, tags=["connections"])
async def connect_storage_server(agent: Agent, domType: str,
                                 connectionParams: list[dict[str, Any]]
                                 ) -> list[dict[str, Any]]:
    return await agent.connections.connect(domType, connectionParams)


@TABLE.verb("disconnectStorageServer", "Disconnect connections; refused for a connection "
            "whose domain has prepared volumes.",
            [DOM_TYPE, Field("connectionParams", ConnectionList())], check=_check_list,
            result=STATUS_LIST, tags=["connections"])
async def disconnect_storage_server(agent: Agent, domType: str,
                                    connectionParams: list[dict[str, Any]]
                                    ) -> list[dict[str, Any]]:
    return await agent.connections.disconnect(domType, connectionParams)


@TABLE.verb("getStorageConnections", "Every connection this host holds, with its type, "
            "parameters (passwords masked) and state.",
            result={"type": "array", "items": {"type": "object"}}, tags=["connections"])
async def get_storage_connections(agent: Agent) -> list[dict[str, Any]]:
    return agent.connections.list()


@TABLE.verb("updateStorageConnection", "Edit a connection in place (same id and type) and "
            "switch the host to the new target; on failure the old one is restored.",
            [DOM_TYPE, Field("connection", ConnectionDict())], check=_check_one,
            result={"type": "object"}, tags=["connections"])
async def update_storage_connection(agent: Agent, domType: str,
                                    connection: dict[str, Any]) -> dict[str, Any]:
    return await agent.connections.update(domType, connection)


@TABLE.verb("testStorageConnection", "Test reachability and access of a connection without "
            "changing anything on the host.",
            [DOM_TYPE, Field("connection", ConnectionDict())], check=_check_one,
            result={"type": "object", "required": ["reachable", "message", "details"]},
            tags=["connections"])
async def test_storage_connection(agent: Agent, domType: str,
                                  connection: dict[str, Any]) -> dict[str, Any]:
    return await agent.connections.test(domType, connection)
