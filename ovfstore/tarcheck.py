"""Validate a tar stream as it passes, without holding it: headers are
checked on the fly, chunk by chunk, so a bad member fails the upload before
its bytes are kept.

Accepted: ustar/pax members that are regular files named `<uuid>.ovf`,
`info.json` or `metadata.json` at the top level, each within the member size
limit, the whole within the total limit; pax extended headers (`x`) that
only carry attributes tarfile writes (path, size, mtime, ...). Refused:
links, devices, directories, FIFOs, GNU long names, global pax headers,
absolute paths, `..`, names that are not of the accepted forms, bad header
checksums, a stream that ends before its end-of-archive marker, and
anything but zeros after it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field

BLOCK = 512
NAME_RE = re.compile(r"^([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\.ovf"
                     r"|info\.json|metadata\.json)$")
REGULAR = (b"0", b"\0")
PAX_LOCAL = b"x"
# pax keys tarfile may write for a regular file; anything else is refused
PAX_KEYS = {"path", "size", "mtime", "atime", "ctime", "uid", "gid", "uname", "gname",
            "comment", "charset", "hdrcharset"}


class TarRejected(Exception):
    """The stream is not an acceptable OVF tar; `reason` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class Member:
    name: str
    size: int


@dataclass
class TarChecker:
    member_limit: int
    total_limit: int
    members: list[Member] = field(default_factory=list)
    _names: set[str] = field(default_factory=set)   # duplicates found in O(1), not O(n)
    _buf: bytearray = field(default_factory=bytearray)
    _skip: int = 0            # payload bytes (plus padding) still to pass
    _pax: bytearray | None = None   # collecting a pax header's payload
    _pax_left: int = 0
    _pax_attrs: dict[str, str] = field(default_factory=dict)
    _zero_blocks: int = 0
    _ended: bool = False
    _total: int = 0
    # The first refusal: every later feed() or close() raises it again, so
    # the reason reported is the first one whichever buffer's check is
    # looked at first (the store checks its buffers in a thread).
    _error: TarRejected | None = None

    @property
    def ended(self) -> bool:
        return self._ended

    def feed(self, data: bytes | memoryview) -> None:
        """Check the next chunk; raises TarRejected at the first problem."""
        if self._error is not None:
            raise self._error
        try:
            self._feed(memoryview(data))
        except TarRejected as e:
            self._error = e
            raise

    def _feed(self, view: memoryview) -> None:
        while view:
            if self._ended:
                # bytes.strip runs in C: a GiB of zeros is not a Python loop
                if view.tobytes().strip(b"\0"):
                    raise TarRejected("data after the end of the archive")
                return
            if self._pax is not None:
                take = min(self._pax_left, len(view))
                self._pax += view[:take]
                self._pax_left -= take
                view = view[take:]
                if self._pax_left == 0:
                    self._finish_pax()
                continue
            if self._skip:
                take = min(self._skip, len(view))
                self._skip -= take
                view = view[take:]
                continue
            need = BLOCK - len(self._buf)
            self._buf += view[:need]
            view = view[need:]
            if len(self._buf) == BLOCK:
                header = bytes(self._buf)
                self._buf.clear()
                self._header(header)

    def close(self) -> list[Member]:
        """The stream ended: it must have ended as an archive."""
        if self._error is not None:
            raise self._error
        if not self._ended:
            raise TarRejected("truncated tar: no end-of-archive marker")
        if not self.members:
            raise TarRejected("the tar has no members")
        return self.members

    # ---- headers ---------------------------------------------------------------

    def _header(self, block: bytes) -> None:
        if not any(block):
            self._zero_blocks += 1
            if self._zero_blocks == 2:
                self._ended = True
            return
        if self._zero_blocks:
            raise TarRejected("a lone zero block inside the archive")
        if _checksum(block) != _octal(block[148:156], "checksum"):
            raise TarRejected("bad header checksum")
        if block[257:262] != b"ustar":
            raise TarRejected("not a ustar/pax archive")
        typeflag = block[156:157]
        size = _octal(block[124:136], "size")
        payload = (size + BLOCK - 1) // BLOCK * BLOCK
        if typeflag == PAX_LOCAL:
            if size > 64 * 1024:
                raise TarRejected("pax header too large")
            self._pax = bytearray()
            self._pax_left = payload
            self._pax_size = size
            return
        if typeflag not in REGULAR:
            kind = {b"1": "hard link", b"2": "symbolic link", b"3": "character device",
                    b"4": "block device", b"5": "directory", b"6": "FIFO",
                    b"L": "GNU long name", b"K": "GNU long link name",
                    b"g": "global pax header"}.get(typeflag, f"type {typeflag!r}")
            raise TarRejected(f"member of type {kind} is not allowed")
        name = _name(block)
        attrs, self._pax_attrs = self._pax_attrs, {}
        if "path" in attrs:
            name = attrs["path"]
        if "size" in attrs:
            try:
                size = int(attrs["size"])
            except ValueError:
                raise TarRejected("bad pax size") from None
            payload = (size + BLOCK - 1) // BLOCK * BLOCK
        _check_name(name)
        if size > self.member_limit:
            raise TarRejected(f"member {name} is {size} bytes, over the limit of "
                              f"{self.member_limit}")
        self._total += size
        if self._total > self.total_limit:
            raise TarRejected(f"the members add up to more than {self.total_limit} bytes")
        if name in self._names:
            raise TarRejected(f"member {name} appears twice")
        self._names.add(name)
        self.members.append(Member(name=name, size=size))
        self._skip = payload

    def _finish_pax(self) -> None:
        assert self._pax is not None
        data = bytes(self._pax[:self._pax_size])
        self._pax = None
        attrs: dict[str, str] = {}
        for key, value in _pax_records(data):
            if key not in PAX_KEYS:
                raise TarRejected(f"pax attribute {key!r} is not allowed")
            attrs[key] = value
        self._pax_attrs = attrs


def _checksum(block: bytes) -> int:
    return sum(block[:148]) + 8 * 32 + sum(block[156:])


def _octal(field: bytes, what: str) -> int:
    if field and field[0] & 0x80:
        raise TarRejected(f"binary {what} field is not allowed")
    text = field.rstrip(b"\0 ").lstrip(b" ")
    try:
        return int(text or b"0", 8)
    except ValueError:
        raise TarRejected(f"bad {what} field") from None


def _name(block: bytes) -> str:
    name = block[0:100].split(b"\0", 1)[0]
    prefix = block[345:500].split(b"\0", 1)[0]
    full = prefix + b"/" + name if prefix else name
    try:
        return full.decode("utf-8")
    except UnicodeDecodeError:
        raise TarRejected("member name is not UTF-8") from None


def _check_name(name: str) -> None:
    if name.startswith("/"):
        raise TarRejected(f"absolute member name {name!r}")
    if ".." in name.split("/"):
        raise TarRejected(f"member name {name!r} leaves the archive")
    if not NAME_RE.match(name):
        raise TarRejected(f"member name {name!r} is not <uuid>.ovf, info.json or "
                          "metadata.json")


def _pax_records(data: bytes) -> Iterator[tuple[str, str]]:
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            raise TarRejected("bad pax record")
        try:
            length = int(data[pos:space])
        except ValueError:
            raise TarRejected("bad pax record length") from None
        record = data[space + 1:pos + length]
        if length <= 0 or not record.endswith(b"\n") or b"=" not in record:
            raise TarRejected("bad pax record")
        key, _, value = record[:-1].partition(b"=")
        try:
            yield key.decode("utf-8"), value.decode("utf-8")
        except UnicodeDecodeError:
            raise TarRejected("pax record is not UTF-8") from None
        pos += length
