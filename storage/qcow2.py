"""A new, empty qcow2 image written without qemu-img (issue 21: on a block
domain a `qemu-img create` process was 0.3-0.9 s of every cow createVolume
in the lab guest; these are four small writes).

What `qemu-img create -f qcow2 -o compat=1.1 [-b NAME -F FMT -u] PATH SIZE`
(qemu 7.2) writes, byte for byte, for the agent's options only (64 KiB
clusters, 16-bit refcounts, no encryption, no extended L2, no data file, no
preallocation): cluster 0 the header, its extensions (the backing format,
the feature name table) and the backing file name; cluster 1 the refcount
table (one entry: cluster 2); cluster 2 the refcount block (refcount 1 for
clusters 0-2 and each cluster of the L1 table); cluster 3 on the L1 table,
all zero. Nothing past the L1 table is read by qemu, so what an LV held
before stays unreferenced there. tests/integration/test_qcow2_host.py checks
it against qemu-img create on a device full of random bytes.
"""

from __future__ import annotations

import mmap
import os
import struct

CLUSTER_BITS = 16
CLUSTER = 1 << CLUSTER_BITS
REFCOUNT_ORDER = 4                  # 16-bit refcounts
HEADER_LENGTH = 112                 # version 3 with the compression type byte
L1_CLUSTER = 3
# entries of the one refcount block: clusters it can count
_REFBLOCK_ENTRIES = CLUSTER * 8 >> REFCOUNT_ORDER
_L2_COVERS = CLUSTER * (CLUSTER // 8)  # bytes one L1 entry maps

_EXT_BACKING_FORMAT = 0xE2792ACA
_EXT_FEATURE_TABLE = 0x6803F857
_EXT_BITMAPS = 0x23852875
MAGIC = b"QFI\xfb"
# qemu 7.2's feature name table: (type, bit, name); type 0 incompatible,
# 1 compatible, 2 autoclear
FEATURES = ((0, 0, "dirty bit"), (0, 1, "corrupt bit"), (0, 2, "external data file"),
            (0, 3, "compression type"), (0, 4, "extended L2 entries"),
            (1, 0, "lazy refcounts"), (2, 0, "bitmaps"), (2, 1, "raw external data"))
# the most this writer makes: L1 and refcount block in the first refcount block
MAX_SIZE = (_REFBLOCK_ENTRIES - L1_CLUSTER) * (CLUSTER // 8) * _L2_COVERS


def _extension(kind: int, data: bytes) -> bytes:
    return struct.pack(">II", kind, len(data)) + data + bytes(-len(data) % 8)


def layout(size: int, backing: str | None = None,
           backing_fmt: str | None = None) -> list[tuple[int, bytes]]:
    """(offset, bytes) of each write that makes an empty qcow2 image of
    `size` bytes (a multiple of 512) over `backing` (a name, not checked)."""
    if size <= 0 or size % 512 or size > MAX_SIZE:
        raise ValueError(f"size {size}: not a positive multiple of 512 up to {MAX_SIZE}")
    l1_size = -(-size // _L2_COVERS)
    l1_clusters = max(1, -(-l1_size * 8 // CLUSTER))
    table = b"".join(struct.pack(">BB46s", t, b, n.encode()) for t, b, n in FEATURES)
    ext = b""
    if backing is not None:
        ext += _extension(_EXT_BACKING_FORMAT, (backing_fmt or "qcow2").encode())
    ext += _extension(_EXT_FEATURE_TABLE, table) + struct.pack(">II", 0, 0)
    name = (backing or "").encode()
    name_at = HEADER_LENGTH + len(ext) if backing is not None else 0
    if name_at + len(name) > CLUSTER:
        raise ValueError("backing file name too long")
    header = struct.pack(
        ">4sIQIIQIIQQIIQQQQII", b"QFI\xfb", 3, name_at, len(name), CLUSTER_BITS, size, 0,
        l1_size, L1_CLUSTER * CLUSTER, CLUSTER, 1, 0, 0, 0, 0, 0, REFCOUNT_ORDER,
        HEADER_LENGTH) + bytes(8)      # compression type zlib, padding
    used = L1_CLUSTER + l1_clusters
    return [(0, (header + ext + name).ljust(CLUSTER, b"\0")),
            (CLUSTER, struct.pack(">Q", 2 * CLUSTER).ljust(CLUSTER, b"\0")),
            (2 * CLUSTER, struct.pack(f">{used}H", *[1] * used).ljust(CLUSTER, b"\0")),
            (L1_CLUSTER * CLUSTER, bytes(l1_size * 8))]


def written(size: int, backing: str | None = None, backing_fmt: str | None = None) -> int:
    """How many bytes from its start `write_image` writes (whole 4 KiB blocks)."""
    offset, data = layout(size, backing, backing_fmt)[-1]
    return offset + -(-len(data) // 4096) * 4096


def write_image(path: str, size: int, backing: str | None = None,
                backing_fmt: str | None = None, *, offset: int = 0) -> None:
    """Write the empty image of `layout` at byte `offset` of `path` (an LV:
    the device's own size is the room; or its PV at its first extent) with
    O_DIRECT, then fsync. Blocking I/O. The L1 table is written in whole
    4 KiB blocks (its zeros and a few more: nothing reads past its end)."""
    writes = layout(size, backing, backing_fmt)
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
    try:
        for at, data in writes:
            length = -(-len(data) // 4096) * 4096
            buf = mmap.mmap(-1, length)
            try:
                buf[:len(data)] = data
                if os.pwritev(fd, [buf], offset + at) != length:
                    raise OSError(f"short write to {path} at {offset + at}")
            finally:
                buf.close()
        os.fsync(fd)
    finally:
        os.close(fd)


def extensions(head: bytes) -> set[int] | None:
    """The header extension types of the qcow2 image whose first bytes are
    `head`; None when `head` is no version 2 or 3 qcow2 header, or ends
    before the extensions do (the caller asks qemu-img then)."""
    if len(head) < 104 or head[:4] != MAGIC:
        return None
    version = struct.unpack_from(">I", head, 4)[0]
    if version == 2:
        offset = 72
    elif version == 3:
        offset = struct.unpack_from(">I", head, 100)[0]
    else:
        return None
    kinds: set[int] = set()
    while offset + 8 <= len(head):
        kind, length = struct.unpack_from(">II", head, offset)
        if kind == 0:
            return kinds
        kinds.add(kind)
        offset += 8 + length + (-length % 8)
    return None


# what has_bitmaps reads: the header and its extensions (they end before
# the backing file name, in the first cluster)
HEAD_READ = CLUSTER


def has_bitmaps(head: bytes) -> bool | None:
    """Whether the qcow2 image whose first HEAD_READ bytes are `head` may
    hold persistent bitmaps (it has the bitmaps extension, valid or not);
    None if its header cannot tell (ask qemu-img)."""
    kinds = extensions(head)
    return None if kinds is None else _EXT_BITMAPS in kinds
