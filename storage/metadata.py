"""On-storage metadata of domains and volumes.

Both are KEY=VALUE lines, as VDSM writes them, ending with a CHECKSUM line
(sha256 of the lines before it) and EOF, so a torn or foreign block is told
apart from valid metadata. Values are single lines: newlines are refused
before they get here (descriptions come from requests) and `=` is allowed
in values (the first `=` splits).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import MISSING, dataclass, field, fields
from enum import StrEnum
from typing import Any, ClassVar, TypeVar

BLANK_UUID = "00000000-0000-0000-0000-000000000000"



class VolumeFormat(StrEnum):
    """A volume's format as stored (VDSM's spelling, the value), as the API
    spells it (`wire`) and as qemu names it (`qemu`). Equal to its stored
    string, so metadata keeps plain strings."""

    RAW = "RAW"
    COW = "COW"

    @classmethod
    def of(cls, name: str) -> VolumeFormat:
        """The format of a stored ("COW") or API ("cow") name."""
        return cls(name.upper())

    @property
    def wire(self) -> str:
        return self.value.lower()

    @property
    def qemu(self) -> str:
        return "qcow2" if self is VolumeFormat.COW else "raw"


# Volume enums as stored (VDSM's spelling) and as the API spells them.
FORMATS = {f.wire: f.value for f in VolumeFormat}
ALLOCATIONS = {"sparse": "SPARSE", "preallocated": "PREALLOCATED"}
LEGAL, ILLEGAL = "LEGAL", "ILLEGAL"
LEAF, INTERNAL, SHARED = "LEAF", "INTERNAL", "SHARED"
# Life cycle of a volume on storage: an agent that crashed mid-way finds
# CREATING or REMOVING volumes at start-up and removes them.
CREATING, READY, REMOVING = "CREATING", "READY", "REMOVING"


R = TypeVar("R", bound="_Record")


class MetadataError(Exception):
    """The bytes are not valid metadata (torn write, foreign data, bad checksum)."""


def encode(values: dict[str, Any]) -> bytes:
    lines = []
    for key in sorted(values):
        value = "" if values[key] is None else str(values[key])
        if "\n" in value or "\r" in value or "\0" in value:
            raise ValueError(f"metadata value of {key} has a line break or NUL")
        if "=" in key or not key:
            raise ValueError(f"bad metadata key {key!r}")
        lines.append(f"{key}={value}")
    body = "\n".join(lines) + "\n"
    digest = hashlib.sha256(body.encode()).hexdigest()
    return (body + f"CHECKSUM={digest}\nEOF\n").encode()


def decode(data: bytes) -> dict[str, str]:
    text = data.rstrip(b"\0").decode("utf-8", "replace")
    end = text.find("\nEOF\n")
    if end < 0:
        raise MetadataError("no EOF marker")
    text = text[:end + 1]
    body, sep, last = text.rpartition("CHECKSUM=")
    if not sep or (body and not body.endswith("\n")):
        raise MetadataError("no checksum")
    if hashlib.sha256(body.encode()).hexdigest() != last.strip():
        raise MetadataError("checksum mismatch")
    values = {}
    for line in body.splitlines():
        key, eq, value = line.partition("=")
        if not eq:
            raise MetadataError(f"bad line {line!r}")
        values[key] = value
    return values


@dataclass
class _Record:
    """A dataclass stored as KEY=VALUE: each field names its key in metadata."""

    KEYS: ClassVar[dict[str, str]] = {}
    # set per class by _spec()
    _SPEC: ClassVar[list[tuple[str, str, bool, str]] | None] = None

    def to_values(self) -> dict[str, Any]:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool):
                value = "true" if value else "false"
            out[self.KEYS[f.name]] = value
        return out

    def encode(self) -> bytes:
        return encode(self.to_values())

    @classmethod
    def _spec(cls) -> list[tuple[str, str, bool, str]]:
        """(field, key, optional, kind) per field, worked out once per class:
        dataclasses.fields() and the type checks per decode were most of a
        large domain's listing time (issue 21)."""
        spec = cls.__dict__.get("_SPEC")
        if spec is None:
            spec = [(f.name, cls.KEYS[f.name],
                     f.default is not MISSING or f.default_factory is not MISSING,
                     "int" if f.type in ("int", int) else
                     "bool" if f.type in ("bool", bool) else "str")
                    for f in fields(cls)]
            cls._SPEC = spec
        return spec

    @classmethod
    def from_values(cls: type[R], values: dict[str, str]) -> R:
        kwargs: dict[str, Any] = {}
        for name, key, optional, kind in cls._spec():
            if key not in values:
                if optional:
                    continue     # a key added later: records written before lack it
                raise MetadataError(f"missing {key}")
            raw = values[key]
            if kind == "int":
                kwargs[name] = int(raw)
            elif kind == "bool":
                kwargs[name] = raw == "true"
            else:
                kwargs[name] = raw
        return cls(**kwargs)

    @classmethod
    def decode(cls: type[R], data: bytes) -> R:
        try:
            return cls.from_values(decode(data))
        except ValueError as e:
            raise MetadataError(str(e)) from None


@dataclass
class DomainMetadata(_Record):
    uuid: str
    name: str
    dom_type: str           # nfs, posixfs, localfs, iscsi, fcp
    dom_class: str          # data, backup
    version: int = 5
    backup: bool = False
    lock_policy: str = "local"   # local, sanlock
    block_size: int = 512
    alignment: int = 1048576
    created: int = field(default_factory=lambda: int(time.time()))
    # The domain's OVF store volume ("": none recorded). The record, not a
    # volume's disk type (anyone may set that), says which volume it is.
    ovf_image: str = ""
    ovf_volume: str = ""
    # Block domains: the VG's PVs, "<device>:<pv uuid>" comma separated
    # (VDSM's PV mapping): which LUNs a host must see to have the whole domain.
    pvs: str = ""

    KEYS: ClassVar[dict[str, str]] = {
        "uuid": "SDUUID", "name": "DESCRIPTION", "dom_type": "TYPE", "dom_class": "CLASS",
        "version": "VERSION", "backup": "BACKUP", "lock_policy": "LOCKPOLICY",
        "block_size": "BLOCK_SIZE", "alignment": "ALIGNMENT", "created": "CTIME",
        "ovf_image": "OVF_IMAGE", "ovf_volume": "OVF_VOLUME", "pvs": "PVS",
    }


@dataclass
class VolumeMetadata(_Record):
    domain: str
    image: str
    uuid: str
    parent: str             # BLANK_UUID for a base volume
    format: str             # RAW, COW
    allocation: str         # SPARSE, PREALLOCATED
    voltype: str            # LEAF, INTERNAL, SHARED
    capacity: int
    legality: str           # LEGAL, ILLEGAL
    generation: int = 0
    description: str = ""
    disk_type: str = "DATA"
    ctime: int = field(default_factory=lambda: int(time.time()))
    state: str = READY

    KEYS: ClassVar[dict[str, str]] = {
        "domain": "DOMAIN", "image": "IMAGE", "uuid": "VOLUME", "parent": "PUUID",
        "format": "FORMAT", "allocation": "TYPE", "voltype": "VOLTYPE", "capacity": "CAP",
        "legality": "LEGALITY", "generation": "GEN", "description": "DESCRIPTION",
        "disk_type": "DISKTYPE", "ctime": "CTIME", "state": "STATE",
    }

    @property
    def has_parent(self) -> bool:
        return self.parent != BLANK_UUID
