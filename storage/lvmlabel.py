"""What LVM last committed of a VG's metadata, read from a PV's own header.

LVM (format_text, lvm2's on-disk format since 2002) keeps a label in one of
a PV's first four sectors ("LABELONE": the offset of the PV header, whose
lists give the data area and the metadata areas); a metadata area starts
with a header (magic " LVM2 x[5A%r0N*>") whose first raw location is
(offset, size, checksum) of the VG metadata text committed last. Every
commit writes the new text elsewhere in the circular area (its seqno and
checksum change) and then this location: while it reads the same, no
command changed the VG, on this host or any other.

One O_DIRECT read of the first 4 KiB and one of the header's 4 KiB: a
block domain checks with it that its cached `lvs` report still holds
after taking the domain lease (issue 21: that lvs was one LVM command of
every createVolume, most of a second in the lab guest).

`read_metadata` reads the committed text itself (a circular area: it may
wrap to the area's start after its header; lvm2's checksum over both
pieces), `first_extent` finds in it where an LV's first extent lies on
which PV: a block domain writes a new, inactive volume's first bytes there
without activating it (issue 21).
"""

from __future__ import annotations

import mmap
import os
import re
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

LABEL_ID = b"LABELONE"
MDA_MAGIC = b" LVM2 x[5A%r0N*>"
SECTOR = 512
BLOCK = 4096                      # O_DIRECT reads, aligned for 512 and 4K devices
_LOCN = struct.Struct("<QQ")      # disk_locn: offset, size
_RAW_LOCN = struct.Struct("<QQII")  # raw_locn: offset, size, checksum, flags
RAW_LOCN_IGNORED = 0x1
_LABEL_OFFSET = 20                # label_header: id[8], sector u64, crc u32, offset u32
_PV_UUID_AND_SIZE = 32 + 8
_MDA_RAW_LOCN = 40                # mda_header: crc u32, magic[16], version u32, start, size
_MDA_AREA = 24                    # mda_header's start, size: the area on the device
MDA_HEADER_SIZE = 512             # a wrapped text goes on right after the header
_INITIAL_CRC = 0xF597A6CF         # lvm2's calc_crc: CRC-32 from this, no final inversion
MAX_TEXT = 64 << 20               # more is not a VG's metadata text

Reader = Callable[[int, int], bytes]
"""pread(offset, length) of a device: whole aligned blocks."""


def parse_label(block: bytes) -> int | None:
    """Offset of the first metadata area, from a PV's first 4 KiB; None when
    there is no label or no metadata area."""
    found = _label(block)
    return found[1] if found is not None else None


def label_uuid(block: bytes) -> str | None:
    """The PV's UUID (32 characters, no dashes) from its first 4 KiB."""
    found = _label(block)
    return found[0] if found is not None else None


def _label(block: bytes) -> tuple[str, int | None] | None:
    for sector in range(4):
        at = sector * SECTOR
        if block[at:at + 8] != LABEL_ID:
            continue
        header = at + struct.unpack_from("<I", block, at + _LABEL_OFFSET)[0]
        if header + _PV_UUID_AND_SIZE > len(block):
            return None
        uuid = block[header:header + 32].decode("ascii", "replace")
        pos = _after_list(block, header + _PV_UUID_AND_SIZE)  # data areas; mdas follow
        if pos is None or pos + _LOCN.size > len(block):
            return uuid, None
        return uuid, _LOCN.unpack_from(block, pos)[0] or None
    return None


def _after_list(block: bytes, pos: int | None) -> int | None:
    """Where a zero-terminated list of disk_locn at `pos` ends."""
    while pos is not None and pos + _LOCN.size <= len(block):
        offset, _size = _LOCN.unpack_from(block, pos)
        pos += _LOCN.size
        if offset == 0:
            return pos
    return None


def parse_mda_header(header: bytes) -> bytes | None:
    """The committed metadata's raw location (offset, size, checksum) from a
    metadata area header; None if it is not one or is ignored."""
    if header[4:4 + len(MDA_MAGIC)] != MDA_MAGIC:
        return None
    offset, size, checksum, flags = _RAW_LOCN.unpack_from(header, _MDA_RAW_LOCN)
    if flags & RAW_LOCN_IGNORED or size == 0:
        return None
    return struct.pack("<QQI", offset, size, checksum)


def _mda(read: Reader) -> tuple[int, bytes] | None:
    """(offset of the first metadata area, its header's first sector)."""
    first = read(0, BLOCK)
    mda = parse_label(first) if len(first) == BLOCK else None
    if mda is None or mda % SECTOR:
        return None
    base = mda - mda % BLOCK
    block = read(base, BLOCK)
    if len(block) < mda - base + SECTOR:
        return None
    return mda, block[mda - base:mda - base + SECTOR]


def metadata_stamp(device: str) -> bytes | None:
    """Where and what LVM last committed of the VG's metadata on PV
    `device`; equal stamps mean an unchanged VG. None when it cannot tell
    (no label or metadata area: the caller asks LVM). Blocking I/O."""
    with _Device(device) as dev:
        found = _mda(dev.read)
        return parse_mda_header(found[1]) if found is not None else None


def calc_crc(data: bytes, crc: int = _INITIAL_CRC) -> int:
    """lvm2's checksum of its metadata text (and headers): zlib's CRC-32
    started from `crc`, without zlib's inversions on the way in and out."""
    return zlib.crc32(data, crc ^ 0xFFFFFFFF) ^ 0xFFFFFFFF


@dataclass(frozen=True)
class Metadata:
    text: str
    wrapped: bool       # it went on at the area's start (tests look for it)


def read_metadata(read: Reader) -> Metadata | None:
    """The VG metadata text LVM committed last on a PV (`read` its
    device), checked against its checksum; None when there is none or it
    does not check (the caller asks LVM)."""
    found = _mda(read)
    if found is None or found[1][4:4 + len(MDA_MAGIC)] != MDA_MAGIC:
        return None
    mda, header = found
    start, area = struct.unpack_from("<QQ", header, _MDA_AREA)
    offset, size, checksum, flags = _RAW_LOCN.unpack_from(header, _MDA_RAW_LOCN)
    if (flags & RAW_LOCN_IGNORED or start != mda or size == 0 or size > MAX_TEXT
            or not MDA_HEADER_SIZE <= offset < area or size > area - MDA_HEADER_SIZE):
        return None
    # a circular area: what does not fit before its end goes on after its header
    wrap = max(0, offset + size - area)
    pieces = [_read_span(read, start + offset, size - wrap)]
    if wrap:
        pieces.append(_read_span(read, start + MDA_HEADER_SIZE, wrap))
    crc = _INITIAL_CRC
    for piece in pieces:
        crc = calc_crc(piece, crc)
    if crc != checksum:
        return None
    text = b"".join(pieces).rstrip(b"\0")
    try:
        return Metadata(text.decode("utf-8"), wrapped=wrap > 0)
    except UnicodeDecodeError:
        return None


def _read_span(read: Reader, offset: int, length: int) -> bytes:
    base = offset - offset % BLOCK
    data = read(base, -(-(offset + length - base) // BLOCK) * BLOCK)
    return data[offset - base:offset - base + length]


class _Device:
    """A device opened for O_DIRECT reads (aligned 4 KiB buffers)."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)

    def __enter__(self) -> _Device:
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)

    def read(self, offset: int, length: int) -> bytes:
        buf = mmap.mmap(-1, length)
        try:
            n = os.preadv(self.fd, [buf], offset)
            return bytes(buf[:n])
        finally:
            buf.close()


def read_device_metadata(device: str) -> Metadata | None:
    """`read_metadata` of PV `device`. Blocking I/O."""
    with _Device(device) as dev:
        return read_metadata(dev.read)


def read_device_uuid(device: str) -> str | None:
    """The PV UUID in `device`'s label (no dashes). Blocking I/O."""
    with _Device(device) as dev:
        return label_uuid(dev.read(0, BLOCK))


# ---- the metadata text ------------------------------------------------------------------

@dataclass(frozen=True)
class Extent:
    """Where an LV's first segment lies: on the PV of UUID `pv_uuid` (no
    dashes), `length` bytes from byte `offset` of its device."""
    pv_uuid: str
    offset: int
    length: int


class Unexpected(ValueError):
    """The text is not as `first_extent` expects (the caller falls back)."""


_TOKEN = re.compile(r'\s+|#[^\n]*|"(?:[^"\\]|\\.)*"|[{}\[\],=]|[^\s{}\[\],="#]+')
_EXTENT_SIZE = re.compile(r"(?m)^[ \t]*extent_size[ \t]*=[ \t]*(\d+)[ \t]*$")
Value = int | str | list["Value"] | dict[str, "Value"]
V = TypeVar("V")


def parse_text(text: str) -> dict[str, Value]:
    """LVM's metadata text (its config format: sections, `key = value`,
    strings, integers, lists) as nested dicts. Raises Unexpected."""
    tokens = [t for t in _TOKEN.findall(text) if not t.isspace() and not t.startswith("#")]
    return _section(tokens, 0, top=True)[1]


def _section(tokens: list[str], pos: int, top: bool = False) -> tuple[int, dict[str, Value]]:
    out: dict[str, Value] = {}
    while pos < len(tokens):
        key = tokens[pos]
        if key == "}" and not top:
            return pos + 1, out
        nxt = tokens[pos + 1] if pos + 1 < len(tokens) else ""
        if nxt == "{":
            pos, out[key] = _section(tokens, pos + 2)
        elif nxt == "=":
            pos, out[key] = _value(tokens, pos + 2)
        else:
            raise Unexpected(f"{key!r} followed by {nxt!r}")
    if not top:
        raise Unexpected("section not closed")
    return pos, out


def _value(tokens: list[str], pos: int) -> tuple[int, Value]:
    if pos >= len(tokens):
        raise Unexpected("no value")
    word = tokens[pos]
    if word == "[":
        items: list[Value] = []
        pos += 1
        while pos < len(tokens) and tokens[pos] != "]":
            if tokens[pos] != ",":
                pos, item = _value(tokens, pos)
                items.append(item)
            else:
                pos += 1
        return pos + 1, items
    if word.startswith('"'):
        return pos + 1, re.sub(r"\\(.)", r"\1", word[1:-1])
    try:
        return pos + 1, int(word)
    except ValueError:
        return pos + 1, word      # a float or a bare word: not used here


def first_extent(text: str, vg: str, lv: str) -> Extent | None:
    """Where LV `lv` of VG `vg` starts on its PV, from the metadata text;
    None if the text has no such LV. Raises Unexpected when its first
    segment is not one plain stripe from its first extent, or a field is
    missing or of the wrong type. Parses only the VG's extent size, its
    PVs and that LV's section: a domain of 2,000 volumes has about 0.8 MB
    of text (its whole parse: 78 ms on the host, more in the lab guest)."""
    head = re.match(r"\s*(\S+)\s*\{", text)
    pvs_at = re.search(r"(?m)^\s*physical_volumes\s*\{", text)
    lvs_at = re.search(r"(?m)^\s*logical_volumes\s*\{", text)
    if head is None or head.group(1) != vg or pvs_at is None or lvs_at is None:
        raise Unexpected(f"not the metadata of VG {vg} with PVs and LVs")
    size = _EXTENT_SIZE.search(text, 0, pvs_at.start())
    if size is None:
        raise Unexpected("no extent_size")
    # an LV's section: its name at the start of a line (a tag or a
    # segment's PV is a quoted string); LV names are unique in a VG
    at = re.compile(rf"(?m)^[ \t]*{re.escape(lv)}[ \t]*\{{").search(text, lvs_at.end())
    if at is None:
        return None
    seg = _get(_section_from(text, at.end()), "segment1", dict)
    if (_get(seg, "start_extent", int) != 0 or _get(seg, "type", str) != "striped"
            or _get(seg, "stripe_count", int) != 1):
        raise Unexpected(f"first segment of {lv} is not one stripe from extent 0")
    stripes = _get(seg, "stripes", list)
    if len(stripes) != 2 or not isinstance(stripes[0], str) or not isinstance(stripes[1], int):
        raise Unexpected(f"stripes of {lv}: {stripes!r}")
    pv = _get(_section_from(text, pvs_at.end()), stripes[0], dict)
    extent = int(size.group(1)) * SECTOR
    return Extent(pv_uuid=_get(pv, "id", str).replace("-", ""),
                  offset=_get(pv, "pe_start", int) * SECTOR + stripes[1] * extent,
                  length=_get(seg, "extent_count", int) * extent)


def _section_from(text: str, pos: int) -> dict[str, Value]:
    """The section whose opening brace ends at `pos`, parsed."""
    depth, tokens = 1, list[str]()
    for m in _TOKEN.finditer(text, pos):
        word = m.group()
        if word.isspace() or word.startswith("#"):
            continue
        depth += (word == "{") - (word == "}")
        if depth == 0:
            return _section(tokens, 0, top=True)[1]
        tokens.append(word)
    raise Unexpected("section not closed")


def _get(section: dict[str, Value], key: str, kind: type[V]) -> V:
    value = section.get(key)
    if not isinstance(value, kind):
        raise Unexpected(f"{key}: {value!r} is not a {kind.__name__}")
    return value
