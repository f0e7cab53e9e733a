"""A storage connection, its on-host record, and what each type implements."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from storage.fileio import read_state, record_state

# Parameters never shown in results, logs or errors.
SECRET_PARAMS = frozenset({"password"})
MASK = "********"

CONNECTED, DISCONNECTED, FAILED = "connected", "disconnected", "failed"
FULL_MESSAGE = ("no space left on the file system at the last check: reads work, new data "
                "cannot be written")


@dataclass
class Connection:
    id: str
    type: str
    params: dict[str, Any]
    state: str = DISCONNECTED
    message: str = ""
    # What this agent did to establish it, so that disconnect undoes exactly
    # that and nothing it did not do (e.g. a mount the admin made).
    owned: dict[str, Any] = field(default_factory=dict)
    # File types, as of the last check: the file system answers but has no
    # room (ENOSPC, EDQUOT). Full is not lost: the connection stays up.
    full: bool | None = None

    @property
    def secrets(self) -> list[str]:
        return [str(v) for k, v in self.params.items() if k in SECRET_PARAMS and v]

    def public(self) -> dict[str, Any]:
        params = {k: (MASK if k in SECRET_PARAMS and v else v) for k, v in self.params.items()
                  if v is not None}
        message = self.message
        if not message and self.state == CONNECTED and self.full:
            message = FULL_MESSAGE
        return {"id": self.id, "type": self.type, "params": params, "state": self.state,
                "message": message,
                **({"full": self.full} if self.full is not None else {}),
                **({"details": self.owned.get("details")}
                   if self.owned.get("details") else {})}

    def record(self) -> dict[str, Any]:
        return {"id": self.id, "type": self.type, "params": self.params, "owned": self.owned}

    @classmethod
    def from_record(cls, r: dict[str, Any]) -> Connection:
        return cls(id=r["id"], type=r["type"], params=r["params"], owned=r.get("owned") or {})


def _connection_shape(r: object) -> bool:
    """Whether a record is what Connection.record() writes."""
    return (isinstance(r, dict) and isinstance(r.get("id"), str)
            and isinstance(r.get("type"), str) and isinstance(r.get("params"), dict)
            and isinstance(r.get("owned") or {}, dict))


class Backend(Protocol):
    """What a connection type implements. Each method gets its own timeout
    budget from the manager and raises storage errors (451, 477, ...)."""

    def target_key(self, params: dict[str, Any]) -> str:
        """Identity of the storage target: two connections with the same key
        are duplicates."""

    async def connect(self, conn: Connection, save: Callable[[], None]) -> None:
        """Establish the connection. Before each step that changes the host,
        record the intent in conn.owned and call save(), so that after a
        crash the agent knows what it did (and undoes only that)."""

    async def disconnect(self, conn: Connection) -> None:
        """Undo what connect did (only that)."""

    async def check(self, conn: Connection) -> None:
        """Raise if an established connection no longer works."""

    async def test(self, params: dict[str, Any]) -> dict[str, Any]:
        """Reachability and access, changing nothing on the host:
        {reachable, message, details}."""

    def local_path(self, conn: Connection) -> Path | None:
        """Where the storage appears on this host (file types), else None."""


class RecordStore:
    """One JSON file per connection in the state dir, written atomically,
    readable by root only (it holds CHAP passwords)."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory

    def load(self) -> list[Connection]:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        conns = []
        for path in sorted(self.dir.glob("*.json")):
            record = read_state(path, "a storage connection", _connection_shape, None)
            if record is not None:      # gone since the listing
                conns.append(Connection.from_record(record))
        return conns

    def save(self, conn: Connection) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        record_state(self.dir / f"{conn.id}.json", json.dumps(conn.record()).encode(),
                     f"connection {conn.id}", 0o600)

    def remove(self, conn_id: str) -> None:
        (self.dir / f"{conn_id}.json").unlink(missing_ok=True)
