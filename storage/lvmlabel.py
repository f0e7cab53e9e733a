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
"""

from __future__ import annotations

import mmap
import os
import struct

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


def parse_label(block: bytes) -> int | None:
    """Offset of the first metadata area, from a PV's first 4 KiB; None when
    there is no label or no metadata area."""
    for sector in range(4):
        at = sector * SECTOR
        if block[at:at + 8] != LABEL_ID:
            continue
        pos: int | None = (at + struct.unpack_from("<I", block, at + _LABEL_OFFSET)[0]
                           + _PV_UUID_AND_SIZE)
        pos = _after_list(block, pos)       # the data areas; the metadata areas follow
        if pos is None or pos + _LOCN.size > len(block):
            return None
        return _LOCN.unpack_from(block, pos)[0] or None
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


def metadata_stamp(device: str) -> bytes | None:
    """Where and what LVM last committed of the VG's metadata on PV
    `device`; equal stamps mean an unchanged VG. None when it cannot tell
    (no label or metadata area: the caller asks LVM). Blocking I/O."""
    buf = mmap.mmap(-1, BLOCK)
    fd = os.open(device, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    try:
        if os.preadv(fd, [buf], 0) < BLOCK:
            return None
        mda = parse_label(bytes(buf))
        if mda is None or mda % SECTOR:
            return None
        base = mda - mda % BLOCK
        if os.preadv(fd, [buf], base) < BLOCK or mda - base + SECTOR > BLOCK:
            return None
        return parse_mda_header(bytes(buf[mda - base:mda - base + SECTOR]))
    finally:
        os.close(fd)
        buf.close()
