"""The sanlock daemon's client protocol: messages on its UNIX stream socket.

Written from the protocol's public description (sanlock 3.8 headers); no
code taken. Every request is a 32-byte header (magic, version, command,
flags, total length, seq, data, data2; native byte order, the daemon runs
on this host) followed by the command's structs; a reply is a header whose
`data` is the result (0 or a negative errno or SANLK_* code).

A connection that sends REGISTER becomes a "client" of the daemon: the
leases it acquires belong to it, and the daemon releases them when the
connection closes (the agent exits or dies). A client holds at most 8
leases; the backend uses one registered connection per lease.
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass

from storage.leases.layout import NAME_LEN, PATH_LEN, Geometry, MiB

MAGIC = 0x04282010
PROTO = 0x00000001

# commands
REGISTER = 1
ADD_LOCKSPACE = 2
REM_LOCKSPACE = 3
STATUS = 5
ACQUIRE = 7
RELEASE = 8
INQUIRE = 9
INQ_LOCKSPACE = 16
KILLPATH = 17
GET_LOCKSPACES = 22
VERSION = 28

# flags
ACQUIRE_OWNER_NOWAIT = 0x8     # fail at once when the owner's host id is failing
REM_UNUSED = 0x2               # refuse rem_lockspace while leases are held
INQ_WAIT = 0x1
_ALIGN_FLAGS = {1 * MiB: 0x10, 2 * MiB: 0x20, 4 * MiB: 0x40, 8 * MiB: 0x80}
_SECTOR_FLAGS = {512: 0x100, 4096: 0x200}

MAX_HELPER_LEN = 128           # killpath path and args, each NUL padded
NO_PID = 0xFFFFFFFF            # data2 = -1: "the registered connection itself"

# sanlock's own result codes (negative), beside negative errnos
HOSTID_BUSY = -262
ACQUIRE_LOCKSPACE = -241
ACQUIRE_IDLIVE = -243
ACQUIRE_OWNED = -244
ACQUIRE_OTHER = -245
ACQUIRE_SHRETRY = -246
ACQUIRE_OWNED_RETRY = -247

NAMES = {
    -201: "general error", -202: "I/O timeout", -203: "watchdog error",
    -210: "delta block read", -211: "delta block write", -212: "delta lver",
    -213: "delta mbal", -214: "delta checksum", -220: "leader read",
    -221: "leader write", -222: "leader differs", -223: "leader magic (not formatted?)",
    -224: "leader version", -225: "leader sector size", -226: "leader lockspace mismatch",
    -227: "leader resource mismatch", -228: "leader num hosts", -229: "leader checksum",
    -230: "lockspace sizes", -231: "invalid host id",
    -240: "acquire lver", ACQUIRE_LOCKSPACE: "lockspace not joined",
    -242: "host id disk", ACQUIRE_IDLIVE: "owner's host id is live",
    ACQUIRE_OWNED: "owned by another host", ACQUIRE_OTHER: "owned by another host",
    ACQUIRE_SHRETRY: "shared owners, retry",
    ACQUIRE_OWNED_RETRY: "owner's host id not yet expired, retry",
    -250: "release lver", -251: "release owner", -260: "renew owner", -261: "renew differs",
    HOSTID_BUSY: "host id held by another host",
}

# results of ACQUIRE worth retrying: another holder, here or on another host
BUSY = frozenset({-errno.EAGAIN, -errno.EEXIST, -errno.EBUSY, ACQUIRE_IDLIVE, ACQUIRE_OWNED,
                  ACQUIRE_OTHER, ACQUIRE_SHRETRY, ACQUIRE_OWNED_RETRY})

HEADER = struct.Struct("=8I")
DISK = struct.Struct("=1024sQII")                  # sanlk_disk
LOCKSPACE = struct.Struct("=48sQI4x1024sQII")      # sanlk_lockspace (disk 8-aligned)
RESOURCE = struct.Struct("=48s48sQQIIII")          # sanlk_resource, disks follow
OPTIONS = struct.Struct("=48sII")                  # sanlk_options


def describe(rv: int) -> str:
    """A result code as text: `-243 (owner's host id is live)`."""
    if rv in NAMES:
        return f"{rv} ({NAMES[rv]})"
    if -200 < rv < 0:
        try:
            return f"{rv} ({errno.errorcode[-rv]})"
        except KeyError:
            pass
    return str(rv)


@dataclass(frozen=True, slots=True)
class Header:
    magic: int
    version: int
    cmd: int
    cmd_flags: int
    length: int
    seq: int
    data: int
    data2: int

    @property
    def result(self) -> int:
        """`data` as the signed result."""
        return self.data - (1 << 32) if self.data & 0x80000000 else self.data


def header(cmd: int, flags: int = 0, datalen: int = 0, data: int = 0,
           data2: int = 0) -> bytes:
    return HEADER.pack(MAGIC, PROTO, cmd, flags, HEADER.size + datalen, 0,
                       data & 0xFFFFFFFF, data2 & 0xFFFFFFFF)


def parse_header(raw: bytes) -> Header:
    h = Header(*HEADER.unpack(raw))
    if h.magic != MAGIC:
        raise ValueError(f"sanlock reply with bad magic {h.magic:#x}")
    if h.length < HEADER.size:
        raise ValueError(f"sanlock reply with bad length {h.length}")
    return h


def _name(value: str) -> bytes:
    raw = value.encode()
    if not raw or len(raw) > NAME_LEN:
        raise ValueError(f"sanlock name {value!r} must be 1 to {NAME_LEN} bytes")
    return raw


def _path(value: str) -> bytes:
    raw = value.encode()
    if len(raw) >= PATH_LEN:
        raise ValueError(f"sanlock path must be under {PATH_LEN} bytes")
    return raw


def geometry_flags(g: Geometry) -> int:
    """ALIGN and SECTOR flags (same bits for lockspaces and resources)."""
    return _ALIGN_FLAGS[g.alignment] | _SECTOR_FLAGS[g.sector_size]


def lockspace(name: str, host_id: int, path: str, offset: int, flags: int = 0) -> bytes:
    return LOCKSPACE.pack(_name(name), host_id, flags, _path(path), offset, 0, 0)


def resource(lockspace_name: str, name: str, disks: list[tuple[str, int]], flags: int = 0,
             *, with_disks: bool = True) -> bytes:
    """sanlk_resource plus its disks (RELEASE sends the struct alone)."""
    head = RESOURCE.pack(_name(lockspace_name), _name(name), 0, 0, 0, 0, flags, len(disks))
    if not with_disks:
        return head
    return head + b"".join(DISK.pack(_path(p), off, 0, 0) for p, off in disks)


def options(owner: str = "") -> bytes:
    return OPTIONS.pack(owner.encode()[:NAME_LEN], 0, 0)


def killpath(path: str, args: str) -> bytes:
    raw_path, raw_args = path.encode(), args.encode()
    if len(raw_path) >= MAX_HELPER_LEN or len(raw_args) >= MAX_HELPER_LEN:
        raise ValueError(f"killpath and its args must be under {MAX_HELPER_LEN} bytes")
    return raw_path.ljust(MAX_HELPER_LEN, b"\0") + raw_args.ljust(MAX_HELPER_LEN, b"\0")


def parse_lockspace(raw: bytes) -> tuple[str, int, int, str, int]:
    """(name, host_id, flags, path, offset) of a sanlk_lockspace."""
    name, host_id, flags, path, offset, _, _ = LOCKSPACE.unpack(raw)
    return (name.rstrip(b"\0").decode(errors="replace"), host_id, flags,
            path.split(b"\0", 1)[0].decode(errors="replace"), offset)
