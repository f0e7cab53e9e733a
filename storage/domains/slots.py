"""The metadata LV of a block domain, in slots: slot 0 holds the domain's
metadata, slot N a volume's. A slot is two copies of the metadata, written
one after the other with a flush between, so a crash tears at most one: a
reader takes copy A if it parses, else B. Blocking I/O (O_DIRECT), run by
the domain through its IOPool."""

from __future__ import annotations

import mmap
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

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


def _key(slot: bytes) -> tuple[bytes, bytes]:
    """A slot's content without the zero padding of its two copies: what a
    cache compares and keeps (about 0.5 KiB of 8)."""
    return slot[:COPY_SIZE].rstrip(b"\0"), slot[COPY_SIZE:].rstrip(b"\0")


@dataclass
class _Cached(Generic[R]):
    key: tuple[bytes, bytes]
    # what decode_slot made of it (its MetadataError if it did not parse)
    value: R | MetadataError | None
    stamp: bytes | None
    time: float


class SlotCache(Generic[R]):
    """What this host last read or wrote of each slot, parsed once, and the
    VG metadata stamp (storage/lvmlabel.py) current when it was read (issue
    21: a block listing read and parsed every slot on each call, 430 us per
    volume at 2,000).

    A slot read again with the same bytes is not parsed again. A slot is
    not even read again (`to_read`) while the VG's stamp is the one it was
    read under and for at most `ttl` seconds: another host changes slots
    together with the VG (a new volume's slot, then its lvcreate; a
    removal's mark, then its lvremove), so a new stamp re-reads them all.
    A slot write of another host with no VG change after it (an update of
    a volume's metadata; a removal whose lvremove failed) is seen within
    `ttl`. This host's own writes go through `wrote`."""

    def __init__(self, parse: Callable[[bytes], R], ttl: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._parse = parse
        self.ttl = ttl
        self._clock = clock
        self._slots: dict[int, _Cached[R]] = {}
        # bumped by each write of this host: a read that ran across one is
        # not kept (it may hold the slot from before the write)
        self.generation = 0

    def to_read(self, slots: Iterable[int], stamp: bytes | None,
                always: Iterable[int] = ()) -> list[int]:
        """The slots among `slots` that must be read: those not read (or
        written) under `stamp` in the last `ttl` seconds, and `always`.
        None (no stamp to check against): every one."""
        now = self._clock()
        out = set(always)
        for slot in slots:
            c = self._slots.get(slot)
            if stamp is None or c is None or c.stamp != stamp or now - c.time > self.ttl:
                out.add(slot)
        return sorted(out)

    def store(self, read: Mapping[int, bytes], stamp: bytes | None, generation: int) -> None:
        """Keep what a read started at `generation` found under `stamp`."""
        if generation != self.generation:
            return
        now = self._clock()
        for slot, data in read.items():
            self._keep(slot, data, stamp, now)

    def wrote(self, slot: int, data: bytes | None, stamp: bytes | None) -> None:
        """This host wrote `data` into `slot` (None: the write failed, what
        the slot holds is unknown)."""
        self.generation += 1
        if data is None:
            self._slots.pop(slot, None)
        else:
            self._keep(slot, data, stamp, self._clock())

    def advance(self, before: bytes, after: bytes) -> None:
        """This host changed the VG as its sole writer (under the domain
        lease) from stamp `before` to `after`: slots read under `before`
        hold under `after` too."""
        for c in self._slots.values():
            if c.stamp == before:
                c.stamp = after

    def _keep(self, slot: int, data: bytes, stamp: bytes | None, now: float) -> None:
        key = _key(data)
        c = self._slots.get(slot)
        if c is not None and c.key == key:
            c.stamp, c.time = stamp, now
        else:
            self._slots[slot] = _Cached(key, None, stamp, now)

    def decode(self, slot: int, data: bytes | None) -> R:
        """The metadata of `slot`: from `data` just read (None: the cached
        read), parsed only if its bytes differ from the cached ones."""
        c = self._slots.get(slot)
        if data is not None and (c is None or c.key != _key(data)):
            return decode_slot(data, self._parse)
        if c is None:
            raise MetadataError(f"slot {slot} was not read")
        if c.value is None:
            try:
                c.value = decode_slot(c.key[0].ljust(COPY_SIZE, b"\0")
                                      + c.key[1].ljust(COPY_SIZE, b"\0"), self._parse)
            except MetadataError as e:
                c.value = e
        if isinstance(c.value, MetadataError):
            raise c.value
        return c.value
