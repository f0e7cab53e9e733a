"""An upload's way into its slot: a few fixed page-aligned buffers that the
transport fills in turn; each full buffer is checked and hashed by one
thread (in tar order) and written by another at the same time, while the
next buffer fills. Memory stays at PIPELINE buffers whatever the tar size.

The two stages are daemon threads of the upload's own, fed by queues; a
buffer is free again once both are done with it. A transport that reads in
a thread of its own (the OVF data listener's connection) runs pump() there
and fills buffer after buffer with no event loop between them; one that
reads on the loop (aiohttp on the main port) runs `await fill()`.

Why not the loop between buffers, as before: every buffer then cost the
loop three thread hand-offs (an executor call each for the receive, the
hash and the write: futures, the self-pipe, the coroutine resumed), and
the receiving thread sat idle from the end of one buffer until the loop
thread had the CPU again to hand it the next. Without them a 1 GiB upload
on the data listener takes 5% less server CPU (1.41-1.43 against
1.48-1.51 CPU-s/GiB, `python -m tests.bench ovf`, in turns; BENCHMARKS.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import mmap
import os
import queue
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from ovfstore.tarcheck import TarChecker, TarRejected
from storage.errors import ResourceTimeout
from storage.fileio import IOPool

# 8 MiB buffers rather than 4: half the hand-offs between the transport and
# the stages per GiB; 3 of them: one filling while the one before is hashed
# and written, and one spare (24 MiB per upload).
BUFFER_SIZE = 8 << 20
PIPELINE = 3
ALIGN = 4096


class UploadError(Exception):
    """The upload is refused; the stored tar is unchanged."""

    def __init__(self, reason: str, errno: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        # the storage's error (ENOSPC: the domain is full)
        self.errno = errno


def aligned_buffer(size: int) -> mmap.mmap:
    """A page-aligned buffer, as O_DIRECT wants (the store's reads too)."""
    return mmap.mmap(-1, size)


def release_buffer(buf: mmap.mmap) -> None:
    """Unmap a buffer unless something still uses it: a slice handed to a
    storage call, or a thread still blocked in one after a deadline. Then
    the mapping goes when the last user lets it go."""
    gc.collect(0)
    with contextlib.suppress(BufferError):
        buf.close()


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        n = os.pwritev(fd, [data], offset)
        data = data[n:]
        offset += n


def _check_and_hash(checker: TarChecker, digest: Any, data: memoryview) -> None:
    checker.feed(data)
    digest.update(data)


# a stage's queue: (buffer, work, its arguments), None to stop
_Queue = queue.SimpleQueue[tuple["_Buffer", Callable[..., None], tuple[Any, ...]] | None]


class _Buffer:
    """One buffer and what its stages made of its last contents."""

    __slots__ = ("done", "errors", "left", "mem", "waiter")

    def __init__(self) -> None:
        self.mem = aligned_buffer(BUFFER_SIZE)
        self.left = 0                             # stages not done with it yet
        self.errors: list[BaseException] = []
        self.done = threading.Event()
        self.done.set()
        # the loop's future to complete when done (a coroutine waiting)
        self.waiter: tuple[asyncio.AbstractEventLoop, asyncio.Future[None]] | None = None


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class SlotWriter:
    """Write `fd` from `offset` on, checking the tar with `checker` and
    hashing it, with the deadline of the domain's I/O pool `io` for each
    storage call; `key`: the record it writes, held in `io` while a write
    runs on past its deadline (IOPool.hold)."""

    def __init__(self, fd: int, offset: int, io: IOPool, key: str,
                 checker: TarChecker) -> None:
        self.fd = fd
        self.offset = offset
        self.checker = checker
        self.digest = hashlib.sha256()
        self.io = io
        self.key = key
        self.name = io.name
        self.timeout = io.timeout
        self._bufs = [_Buffer() for _ in range(PIPELINE)]
        self._cur = 0
        self._lock = threading.Lock()
        self._dropping = False      # failed: the stages skip what is still queued
        # close() found a write past its deadline: the write stage, when it
        # ends, closes `fd` and lets the key go (nothing of this upload
        # reaches storage after it)
        self._returned: Callable[[], None] | None = None
        self._queues: list[_Queue] = []
        for stage in ("hash", "write"):
            q: _Queue = queue.SimpleQueue()
            self._queues.append(q)
            threading.Thread(target=self._stage, args=(q,), daemon=True,
                             name=f"ovf-{stage}-{self.name}").start()

    # ---- the stages' threads --------------------------------------------------------

    def _stage(self, q: _Queue) -> None:
        while (item := q.get()) is not None:
            buf, fn, args = item
            del item
            error: BaseException | None = None
            if not self._dropping:
                try:
                    fn(*args)
                except BaseException as e:
                    error = e
            del args      # the buffer's slices: unmapped buffers are not held
            self._done(buf, error)
        if q is self._queues[1] and self._returned is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self._returned()

    def _done(self, buf: _Buffer, error: BaseException | None) -> None:
        with self._lock:
            if error is not None:
                buf.errors.append(error)
            buf.left -= 1
            if buf.left:
                return
            buf.done.set()
            waiter, buf.waiter = buf.waiter, None
        if waiter is not None:
            loop, fut = waiter
            with contextlib.suppress(RuntimeError):     # the loop closed meanwhile
                loop.call_soon_threadsafe(_wake, fut)

    # ---- the transport's side -------------------------------------------------------

    def pump(self, read: Callable[[memoryview], int], size: int) -> int:
        """In the transport's thread: fill the buffers with `read` (a
        blocking readinto, fewer bytes only at the body's end) until `size`
        bytes came; the count (short only if the body ended). Raises what
        the stages found (UploadError, ResourceTimeout) and what `read`
        raises."""
        received = 0
        while received < size:
            want = min(BUFFER_SIZE, size - received)
            n = read(self._take(self._bufs[self._cur])[:want])
            received += n
            if not self._filled(n, want):
                break
        return received

    async def fill(self, readinto: Callable[[memoryview], Awaitable[int]], size: int) -> int:
        """On the loop: as pump(), with the transport's async readinto."""
        received = 0
        while received < size:
            buf = self._bufs[self._cur]
            await self._wait(buf)
            self._check(buf)
            want = min(BUFFER_SIZE, size - received)
            n = await readinto(memoryview(buf.mem)[:want])
            received += n
            if not self._filled(n, want):
                break
        return received

    def _filled(self, n: int, want: int) -> bool:
        """`n` of the `want` bytes asked came into the current buffer:
        they are submitted; whether the body goes on (it ended if short)."""
        if n:
            self.submit(n)
        return n == want

    def _take(self, buf: _Buffer) -> memoryview:
        if not buf.done.wait(self.timeout):
            raise self._timed_out()
        self._check(buf)
        return memoryview(buf.mem)

    def submit(self, length: int) -> None:
        """The current buffer holds `length` bytes: check, hash and write
        them. Only the last buffer of an upload may be short."""
        buf = self._bufs[self._cur]
        padded = (length + ALIGN - 1) // ALIGN * ALIGN
        if padded != length:
            # O_DIRECT wants whole blocks: pad the tail with zeros (the
            # header records the real size); only the real bytes are hashed.
            buf.mem[length:padded] = bytes(padded - length)
        data = memoryview(buf.mem)
        buf.done.clear()
        buf.left = 2
        self._queues[0].put((buf, _check_and_hash, (self.checker, self.digest, data[:length])))
        self._queues[1].put((buf, _pwrite_all, (self.fd, data[:padded], self.offset)))
        self.offset += padded
        self._cur = (self._cur + 1) % PIPELINE

    async def finish(self) -> str:
        """Every buffer checked, hashed and written: the sha256."""
        for k in range(PIPELINE):
            buf = self._bufs[(self._cur + k) % PIPELINE]     # oldest first
            await self._wait(buf)
            self._check(buf)
        return self.digest.hexdigest()

    async def close(self) -> bool:
        """Drop what is still queued, wait for what runs (each within the
        deadline), stop the threads, unmap the buffers. Whether the stages
        are done: if not, a write is still in a storage call past its
        deadline, and hung storage may yet answer and complete it. The key
        is then held in the pool (`io.late(key)`) and the write stage closes
        `fd` itself once that call returns (closed under it, the
        descriptor's number could go to another file before the rest of the
        write), then lets the key go; the caller must not close `fd`."""
        self._dropping = True
        for buf in self._bufs:
            with contextlib.suppress(Exception):
                await self._wait(buf)
        settled = all(buf.done.is_set() for buf in self._bufs)
        if not settled:     # before the stop below: the queue orders them
            self._returned = self.io.hold(self.key)
        for q in self._queues:
            q.put(None)
        for buf in self._bufs:
            release_buffer(buf.mem)
        return settled

    # ---- helpers ----------------------------------------------------------------

    async def _wait(self, buf: _Buffer) -> None:
        if buf.done.is_set():
            return
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        with self._lock:
            if buf.done.is_set():
                return
            buf.waiter = (loop, fut)
        try:
            async with asyncio.timeout(self.timeout):
                await fut
        except TimeoutError:
            raise self._timed_out() from None
        finally:
            with self._lock:
                buf.waiter = None

    def _timed_out(self) -> ResourceTimeout:
        return ResourceTimeout(
            reason=f"storage I/O on {self.name} did not finish in {self.timeout:g} s")

    @staticmethod
    def _check(buf: _Buffer) -> None:
        """Raise what the stages found in the buffer's last contents: the
        check's refusal first (it explains the rest), then the write's."""
        errors, buf.errors = buf.errors, []
        for e in errors:
            if isinstance(e, TarRejected):
                raise UploadError(e.reason)
        for e in errors:
            if isinstance(e, OSError):
                # not to be taken for the client going away (also an OSError)
                raise UploadError(f"writing the OVF store failed: {e}", e.errno)
        if errors:
            raise errors[0]
