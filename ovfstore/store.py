"""The OVF store volume: two slots and a header that says which is current.

    offset 0         header, copy A (4 KiB)
    offset 4 KiB     header, copy B
    offset 1 MiB     slot 0
    1 MiB + S        slot 1                    (S = slot size)

An upload streams into the slot that is not current, through a few fixed
buffers (never the whole tar in memory) that the transport fills directly
(ovfstore.pipeline), checking the tar as it passes; once the data is durable
(fsync), the header switch is one small write of copy A and then of copy B.
A reader takes the first copy with a valid checksum, so at any crash point
it sees the old tar or the new one, never a mix. Data is read and written
with O_DIRECT where the storage allows, so another host's update is not
hidden by this host's page cache.

The slot size S is fixed by the first upload and recorded in every header:
the slots stay where they are if the volume's capacity changes later (a
store written before the record takes S from its capacity). A failed upload
gives back the space it took in its slot (a hole punched where it wrote);
one whose write (of the slot, or the header switch) hung past its deadline
holds the store until that write returns: storage that answers at last
completes it, in the slot the next upload writes (IOPool's late keys).
"""

from __future__ import annotations

import ctypes
import errno as errnos
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from ovfstore.pipeline import (
    ALIGN,
    BUFFER_SIZE,
    SlotWriter,
    UploadError,
    aligned_buffer,
    release_buffer,
)
from ovfstore.tarcheck import Member, TarChecker, TarRejected
from storage.errors import HostAgentError, ResourceTimeout
from storage.fileio import IOPool
from storage.metadata import MetadataError, decode, encode

log = logging.getLogger("ovfstore")

HEADER_SIZE = 4096
DATA_OFFSET = 1 << 20

@dataclass(frozen=True)
class Header:
    generation: int = 0
    slot: int = 0
    size: int = 0
    sha256: str = ""
    updated: float = 0.0
    entries: int = 0
    slot_size: int = 0      # 0: not recorded (a header written before the record)

    def encode(self) -> bytes:
        data = encode({"GEN": self.generation, "SLOT": self.slot, "SIZE": self.size,
                       "SHA256": self.sha256, "UPDATED": f"{self.updated:.3f}",
                       "ENTRIES": self.entries, "SLOTSIZE": self.slot_size})
        return data + b"\0" * (HEADER_SIZE - len(data))

    @classmethod
    def decode(cls, data: bytes) -> Header:
        v = decode(data)
        try:
            return cls(generation=int(v["GEN"]), slot=int(v["SLOT"]), size=int(v["SIZE"]),
                       sha256=v["SHA256"], updated=float(v["UPDATED"]),
                       entries=int(v["ENTRIES"]), slot_size=int(v.get("SLOTSIZE", 0)))
        except (KeyError, ValueError) as e:
            raise MetadataError(f"bad OVF store header: {e}") from None


def volume_size(slot_size: int) -> int:
    return DATA_OFFSET + 2 * slot_size


def slot_size(capacity: int) -> int:
    """The slot size a store volume of `capacity` bytes is made for."""
    return (capacity - DATA_OFFSET) // 2


_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def _punch_hole(fd: int, offset: int, length: int) -> None:
    """Free the blocks of [offset, offset + length) (they then read as
    zeros), keeping the file's size. A file system or device without it
    (NFS before v4.2) raises OSError(EOPNOTSUPP)."""
    if length > 0 and _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE,
                                      offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def _allocated(fd: int, start: int, end: int) -> int:
    """Bytes of [start, end) that hold data (not holes); a device or a file
    system that cannot tell counts all of it."""
    total = 0
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errnos.ENXIO:      # no data after pos
                break
            return end - start
        if data >= end:
            break
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        total += hole - data
        pos = hole
    return total


def _open(path: Path, flags: int) -> int:
    try:
        return os.open(path, flags | os.O_DIRECT)
    except OSError:
        return os.open(path, flags)


class Body(Protocol):
    """The bytes of an upload as a transport delivers them."""

    async def readinto(self, buf: memoryview) -> int:
        """Fill `buf` with the next bytes of the body and return how many;
        fewer than len(buf) only when the body ended."""
        ...


@runtime_checkable
class ThreadedBody(Body, Protocol):
    """A Body whose transport reads in a thread of its own (blocking)."""

    async def pump(self, fill: Callable[[Callable[[memoryview], int]], int]) -> int:
        """fill(readinto) in the transport's thread, `readinto` the blocking
        form of Body.readinto; what fill returns. Raises what readinto
        would."""
        ...


class ChunkBody:
    """A Body over an async iterator of chunks that must end after exactly
    `size` bytes (an aiohttp request's stream): each chunk is copied into
    the store's buffers."""

    def __init__(self, chunks: AsyncIterator[bytes], size: int) -> None:
        self._chunks = aiter(chunks)
        self._size = size
        self._received = 0
        self._pending = memoryview(b"")

    async def _next(self) -> bool:
        try:
            chunk = await anext(self._chunks)
        except StopAsyncIteration:
            return False
        self._received += len(chunk)
        if self._received > self._size:
            raise UploadError(f"body longer than Content-Length {self._size}")
        self._pending = memoryview(chunk)
        return True

    async def readinto(self, buf: memoryview) -> int:
        n = 0
        while n < len(buf):
            if not self._pending and not await self._next():
                break
            take = min(len(self._pending), len(buf) - n)
            buf[n:n + take] = self._pending[:take]
            self._pending = self._pending[take:]
            n += take
        if self._received == self._size and not self._pending:
            # all of it taken: the stream must end here (_next refuses more)
            while await self._next():
                pass
        return n


class OvfStore:
    def __init__(self, path: Path, slot_size: int, io: IOPool) -> None:
        """`slot_size`: that of a store whose headers do not record it yet
        (empty, or written before the record)."""
        self.path = path
        self.slot_size = slot_size
        self.io = io

    def layout(self, header: Header) -> int:
        """The slot size of the store whose current header is `header`."""
        return header.slot_size or self.slot_size

    def _free_slot(self, current: Header) -> tuple[int, int]:
        """(number, offset) of the slot the next upload writes."""
        slot = 1 - current.slot if current.generation else 0
        return slot, DATA_OFFSET + slot * self.layout(current)

    async def space_needed(self, size: int) -> int:
        """Bytes of free space an upload of `size` bytes takes from the
        domain: what of its slot is not allocated yet (nothing on a block
        device, a thick LV)."""
        _, base = self._free_slot(await self.header())
        padded = (size + ALIGN - 1) // ALIGN * ALIGN

        def count() -> int:
            fd = os.open(self.path, os.O_RDONLY)
            try:
                return _allocated(fd, base, base + padded)
            finally:
                os.close(fd)

        return padded - await self.io.call(count)

    # ---- header ---------------------------------------------------------------

    def _read_header_sync(self) -> Header:
        fd = _open(self.path, os.O_RDONLY)
        buf = aligned_buffer(2 * HEADER_SIZE)
        try:
            n = os.preadv(fd, [buf], 0)
            for copy in (0, 1):
                chunk = bytes(buf[copy * HEADER_SIZE:(copy + 1) * HEADER_SIZE])
                if n >= (copy + 1) * HEADER_SIZE and any(chunk):
                    try:
                        return Header.decode(chunk)
                    except MetadataError:
                        continue
            return Header()
        finally:
            buf.close()
            os.close(fd)

    @property
    def _key(self) -> str:
        """The store's writes (its slots and its header) in the I/O pool."""
        return f"the OVF store {self.path}"

    def _write_header_sync(self, header: Header) -> None:
        fd = _open(self.path, os.O_WRONLY)
        buf = aligned_buffer(HEADER_SIZE)
        try:
            buf.write(header.encode())
            for copy in (0, 1):
                os.pwritev(fd, [buf], copy * HEADER_SIZE)
                os.fsync(fd)
        finally:
            buf.close()
            os.close(fd)

    async def header(self) -> Header:
        return await self.io.call(self._read_header_sync)

    # ---- write ----------------------------------------------------------------

    async def write(self, chunks: AsyncIterator[bytes], size: int, *, member_limit: int,
                    sha256: str | None = None) -> tuple[Header, list[Member]]:
        """receive() from an async iterator of chunks."""
        return await self.receive(ChunkBody(chunks, size), size, member_limit=member_limit,
                                  sha256=sha256)

    def refuse_if_late(self) -> None:
        """851 while a write of an earlier upload runs on past its deadline
        (of its slot, or its header switch: that names the slot the next
        upload would write). Without I/O: on hung storage a read of the
        store may wait behind that write."""
        if self.io.late(self._key):
            raise ResourceTimeout(reason=(
                f"a write of an earlier upload to the OVF store {self.path} has not "
                f"returned from storage ({self.io.name}): no upload until it does"))

    async def receive(self, body: Body, size: int, *, member_limit: int,
                      sha256: str | None = None) -> tuple[Header, list[Member]]:
        """Stream `size` bytes of tar from `body` into the free slot and make
        it current. Raises UploadError (stored tar unchanged) if the body is
        short or long, the tar is refused, or the checksum differs; the
        body's own errors (the client went away) pass through."""
        current = await self.header()
        layout = self.layout(current)
        if size > layout:
            raise UploadError(f"{size} bytes do not fit the store ({layout} max)")
        slot, base = self._free_slot(current)
        self.refuse_if_late()
        checker = TarChecker(member_limit=member_limit, total_limit=layout)
        fd = await self.io.call(_open, self.path, os.O_WRONLY)
        sink = SlotWriter(fd, base, self.io, self._key, checker)
        done = False
        try:
            if isinstance(body, ThreadedBody):
                received = await body.pump(lambda readinto: sink.pump(readinto, size))
            else:
                received = await sink.fill(body.readinto, size)
            if received < size:
                raise UploadError(f"body ended after {received} of {size} bytes")
            digest = await sink.finish()
            try:
                members = checker.close()
            except TarRejected as e:
                raise UploadError(e.reason) from None
            if sha256 is not None and digest != sha256.lower():
                raise UploadError("sha256 of the body does not match")
            try:
                await self.io.call(os.fsync, fd)
            except OSError as e:
                raise UploadError(f"writing the OVF store failed: {e}", e.errno) from None
            done = True
        finally:
            if await sink.close():
                await self._end(fd, base, size, done)
            else:
                # failed (a stage is still in its storage call): the writer
                # closes fd when the call returns; nothing to give back yet
                log.warning("OVF store %s: a write of a failed upload is still in a "
                            "storage call past its deadline: no upload until it returns",
                            self.path)
        header = Header(generation=current.generation + 1, slot=slot, size=size,
                        sha256=digest, updated=time.time(), entries=len(members),
                        slot_size=layout)
        await self.io.call(self._write_header_sync, header, key=self._key)
        return header, members

    async def _end(self, fd: int, base: int, size: int, done: bool) -> None:
        try:
            if not done:
                # not current: what this upload wrote there is garbage;
                # on a full domain it is the space the domain lacks now.
                # All it may have touched, `size` bytes: a write cut short
                # by ENOSPC can leave blocks past the offset it reached.
                await self._give_back(fd, base, size)
        finally:
            await self.io.call(os.close, fd)

    async def _give_back(self, fd: int, offset: int, length: int) -> None:
        try:
            await self.io.call(_punch_hole, fd, offset, length)
        except (OSError, HostAgentError) as e:
            log.warning("OVF store %s: the space of a failed upload stays taken: %s",
                        self.path, e)

    # ---- read -------------------------------------------------------------------

    async def read(self, start: int = 0, end: int | None = None,
                   header: Header | None = None) -> AsyncIterator[bytes]:
        """The current tar's bytes [start, end), in chunks of up to 1 MiB."""
        header = header or await self.header()
        end = header.size if end is None else min(end, header.size)
        base = DATA_OFFSET + header.slot * self.layout(header)
        fd = await self.io.call(_open, self.path, os.O_RDONLY)
        buf = aligned_buffer(BUFFER_SIZE)
        try:
            pos = start
            while pos < end:
                aligned = pos // ALIGN * ALIGN
                length = min(BUFFER_SIZE, (end - aligned + ALIGN - 1) // ALIGN * ALIGN)
                n = await self.io.call(os.preadv, fd, [memoryview(buf)[:length]],
                                       base + aligned)
                if n <= pos - aligned:
                    raise OSError(f"short read of {self.path}")
                stop = min(n, end - aligned)
                yield bytes(buf[pos - aligned:stop])
                pos = aligned + stop
        finally:
            release_buffer(buf)
            await self.io.call(os.close, fd)


class _SlotReader:
    """A read-only file object over the current tar (blocking; for a thread),
    reading aligned 1 MiB blocks with O_DIRECT."""

    def __init__(self, path: Path, base: int, size: int) -> None:
        self.fd = _open(path, os.O_RDONLY)
        self.base = base
        self.size = size
        self.pos = 0
        self.buf = aligned_buffer(BUFFER_SIZE)
        self.buf_start = -1
        self.buf_len = 0

    def read(self, n: int = -1) -> bytes:
        if n < 0:
            n = self.size - self.pos
        n = min(n, self.size - self.pos)
        out = bytearray()
        while n > 0:
            if not self.buf_start <= self.pos < self.buf_start + self.buf_len:
                aligned = self.pos // ALIGN * ALIGN
                self.buf_len = os.preadv(self.fd, [self.buf], self.base + aligned)
                self.buf_start = aligned
                if self.buf_len <= self.pos - aligned:
                    raise OSError("short read of the OVF store")
            off = self.pos - self.buf_start
            take = min(n, self.buf_len - off)
            out += self.buf[off:off + take]
            self.pos += take
            n -= take
        return bytes(out)

    def close(self) -> None:
        os.close(self.fd)
        release_buffer(self.buf)


def read_members(path: Path, slot_size: int, header: Header, member_limit: int,
                 suffix: str = ".ovf") -> list[tuple[str, bytes]]:
    """(name, data) of each member whose name ends with `suffix` (blocking).
    The tar was validated when it was stored; sizes are checked again."""
    import tarfile

    if not header.generation:
        return []
    reader = _SlotReader(path, DATA_OFFSET + header.slot * (header.slot_size or slot_size),
                         header.size)
    out = []
    try:
        with tarfile.open(fileobj=reader, mode="r|") as tar:  # type: ignore[call-overload]
            for info in tar:
                if not info.isreg() or not info.name.endswith(suffix):
                    continue
                if info.size > member_limit:
                    raise OSError(f"member {info.name} is over the limit")
                f = tar.extractfile(info)
                if f is not None:
                    out.append((info.name, f.read()))
    finally:
        reader.close()
    return out
