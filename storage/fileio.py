"""File I/O on storage that can hang, off the event loop, with deadlines.

Each connection (file domains) or domain (block) gets its own small thread
pool: a hung NFS or FUSE server can fill its pool and make its calls time out
(851), while other domains and the agent's loop go on. A call that times out
leaves its thread blocked in the kernel until the storage answers; the pool
bound keeps those few. A call still queued when its deadline passes never
runs: a write its caller was told had failed must not happen later.

The threads are daemon threads: a thread blocked forever on dead storage
must not keep the agent from exiting (ThreadPoolExecutor joins its threads
at interpreter exit, which would turn SIGTERM into a hang).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import os
import queue
import threading
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from storage.errors import ResourceTimeout

T = TypeVar("T")

_Work = tuple[concurrent.futures.Future[Any], Callable[..., Any], tuple[Any, ...]]


class IOPool:
    def __init__(self, name: str, workers: int = 4, timeout: float = 30.0) -> None:
        self.name = name
        self.timeout = timeout
        self.workers = workers
        self._queue: queue.SimpleQueue[_Work | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._closed = False
        # The threads hold the queue, not the pool: a pool dropped without
        # close() is collected and stops its idle threads all the same.
        self._stop = weakref.finalize(self, _stop_threads, self._queue, self._threads)

    async def call(self, fn: Callable[..., T], *args: Any, timeout: float | None = None) -> T:
        if self._closed:
            raise RuntimeError(f"I/O pool {self.name} is closed")
        deadline = self.timeout if timeout is None else timeout
        work: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._queue.put((work, fn, args))
        if len(self._threads) < self.workers:
            thread = threading.Thread(target=_worker, args=(self._queue,), daemon=True,
                                      name=f"io-{self.name}-{len(self._threads)}")
            self._threads.append(thread)
            thread.start()
        try:
            # wait_for cancels the wrapper on timeout, which cancels a queued
            # call (a running one cannot be stopped and goes on in its thread).
            return await asyncio.wait_for(asyncio.wrap_future(work), deadline)
        except TimeoutError:
            raise ResourceTimeout(reason=f"storage I/O on {self.name} did not finish in "
                                         f"{deadline:g} s") from None

    def close(self) -> None:
        """Stop the threads once their current call returns; never waits:
        threads blocked on dead storage cannot be joined. Queued calls are
        cancelled."""
        self._closed = True
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item[0].cancel()
        self._stop()


def _worker(work_queue: queue.SimpleQueue[_Work | None]) -> None:
    while (item := work_queue.get()) is not None:
        work, fn, args = item
        if not work.set_running_or_notify_cancel():
            continue
        try:
            work.set_result(fn(*args))
        except BaseException as e:
            work.set_exception(e)
        # No references kept while idle (results can be large buffers).
        del work, fn, args, item


def _stop_threads(work_queue: queue.SimpleQueue[_Work | None],
                  threads: list[threading.Thread]) -> None:
    for _ in threads:
        work_queue.put(None)


# ---- blocking helpers, run through IOPool.call -------------------------------------

def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write a temp file beside path, fsync it, rename it over path, fsync
    the directory: readers see the old content or the new, never a mix."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        # a failed write (ENOSPC) leaves no temp file behind: it would hold
        # space and keep its directory from being removed
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_file(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def read_direct(path: Path, size: int, block: int = 4096) -> bytes:
    """Read the first `size` bytes with O_DIRECT (page cache bypassed: another
    host's write is seen). Falls back to a buffered read where the file
    system refuses O_DIRECT."""
    length = (size + block - 1) // block * block
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        with open(path, "rb") as f:
            return f.read(size)
    try:
        import mmap
        buf = mmap.mmap(-1, length)  # page aligned, as O_DIRECT wants
        try:
            n = os.readv(fd, [buf])
            return bytes(buf[:min(n, size)])
        finally:
            buf.close()
    finally:
        os.close(fd)
