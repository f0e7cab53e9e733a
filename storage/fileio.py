"""File I/O on storage that can hang, off the event loop, with deadlines.

Each domain gets its own small thread pool: a hung NFS server can fill its
domain's pool and make its calls time out (851), while other domains and
the agent's loop go on. A call that times out leaves its thread blocked in
the kernel until the storage answers; the pool bound keeps those few.
"""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from storage.errors import ResourceTimeout

T = TypeVar("T")


class IOPool:
    def __init__(self, name: str, workers: int = 4, timeout: float = 30.0) -> None:
        self.name = name
        self.timeout = timeout
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"io-{name}")

    async def call(self, fn: Callable[..., T], *args: Any, timeout: float | None = None) -> T:
        loop = asyncio.get_running_loop()
        deadline = self.timeout if timeout is None else timeout
        future = loop.run_in_executor(self._pool, fn, *args)
        try:
            return await asyncio.wait_for(future, deadline)
        except TimeoutError:
            raise ResourceTimeout(reason=f"storage I/O on {self.name} did not finish in "
                                         f"{deadline:g} s") from None

    def close(self) -> None:
        # Threads blocked on dead storage cannot be joined: do not wait.
        self._pool.shutdown(wait=False, cancel_futures=True)


# ---- blocking helpers, run through IOPool.call -------------------------------------

def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write a temp file beside path, fsync it, rename it over path, fsync
    the directory: readers see the old content or the new, never a mix."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
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
