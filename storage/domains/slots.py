"""The metadata LV of a block domain, in slots: slot 0 holds the domain's
metadata, slot N a volume's. A slot is two copies of the metadata, written
one after the other with a flush between, so a crash tears at most one: a
reader takes copy A if it parses, else B. Blocking I/O (O_DIRECT), run by
the domain through its IOPool."""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

from storage.errors import InvalidParameter
from storage.metadata import MetadataError

MiB = 1 << 20
R = TypeVar("R")

# One slot: copy A in the first half, copy B in the second. 4 KiB copies are
# aligned for 512 and 4096 byte sectors alike.
SLOT_SIZE = 8192
COPY_SIZE = SLOT_SIZE // 2
DOMAIN_SLOT = 0

# Zeroing the metadata LV at creation, one executor call per chunk.
ZERO_CHUNK = 4 * MiB
# Reading slots: at most this much in one read.
_READ_CHUNK = MiB


def encode_copy(data: bytes) -> bytes:
    """One copy of a slot: the metadata padded with zeros to COPY_SIZE."""
    if len(data) > COPY_SIZE:
        raise InvalidParameter(field="metadata",
                               reason=f"{len(data)} bytes do not fit a {COPY_SIZE} byte slot")
    return data.ljust(COPY_SIZE, b"\0")


def decode_slot(slot: bytes, parse: Callable[[bytes], R]) -> R:
    """The metadata of a slot: copy A if it parses, else copy B (a crash tore
    A while it was written, so B still holds the previous metadata)."""
    errors = []
    for name, start in (("A", 0), ("B", COPY_SIZE)):
        try:
            return parse(slot[start:start + COPY_SIZE])
        except MetadataError as e:
            errors.append(f"copy {name}: {e}")
    raise MetadataError("; ".join(errors))


def slot_runs(slots: Iterable[int], max_gap: int = 16,
              max_len: int = _READ_CHUNK // SLOT_SIZE) -> list[tuple[int, int]]:
    """(first slot, count) of the reads that cover `slots`: neighbours less
    than `max_gap` slots apart share one read of at most `max_len` slots.
    Slots are taken lowest first, so a domain's are dense: 1,000 volumes
    are 8 reads of 1 MiB, not 1,000 round trips to the storage."""
    runs: list[tuple[int, int]] = []
    for slot in sorted(set(slots)):
        if runs:
            first, count = runs[-1]
            if slot - (first + count) < max_gap and slot - first < max_len:
                runs[-1] = (first, slot - first + 1)
                continue
        runs.append((slot, 1))
    return runs


def read_slots(path: str, slots: Sequence[int]) -> dict[int, bytes]:
    runs = slot_runs(slots)
    if not runs:
        return {}
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        # page aligned, as O_DIRECT wants
        buf = mmap.mmap(-1, max(count for _, count in runs) * SLOT_SIZE)
        try:
            out = {}
            for first, count in runs:
                with memoryview(buf) as view:
                    n = os.preadv(fd, [view[:count * SLOT_SIZE]], first * SLOT_SIZE)
                for slot in range(first, first + count):
                    at = (slot - first) * SLOT_SIZE
                    # a short read (the end of the LV) leaves the slot short
                    out[slot] = bytes(buf[at:max(at, min(n, at + SLOT_SIZE))])
            return {slot: out[slot] for slot in slots}
        finally:
            buf.close()
    finally:
        os.close(fd)


def write_slot(path: str, slot: int, copy: bytes) -> None:
    """Copy A, fsync, copy B, fsync: at most one copy is torn by a crash."""
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, COPY_SIZE)
        try:
            buf[:] = copy
            for offset in (slot * SLOT_SIZE, slot * SLOT_SIZE + COPY_SIZE):
                if os.pwritev(fd, [buf], offset) != COPY_SIZE:
                    raise OSError(f"short write to {path} at {offset}")
                os.fsync(fd)
        finally:
            buf.close()
    finally:
        os.close(fd)


def zero(path: str, offset: int, length: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, min(length, ZERO_CHUNK))
        try:
            end = offset + length
            while offset < end:
                n = os.pwritev(fd, [memoryview(buf)[:min(len(buf), end - offset)]], offset)
                offset += n
            os.fsync(fd)
        finally:
            buf.close()
    finally:
        os.close(fd)
