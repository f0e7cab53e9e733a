"""File I/O on storage that can hang, off the event loop, with deadlines.

Each connection (file domains) or domain (block) gets its own small thread
pool: a hung NFS or FUSE server can fill its pool and make its calls time out
(851), while other domains and the agent's loop go on. A call that times out
leaves its thread blocked in the kernel until the storage answers; the pool
bound keeps those few. A call still queued when its deadline passes never
runs: a write its caller was told had failed must not happen later.

A write that timed out while running may still happen later: storage that
answers at last completes it. Writes of one record (a volume's metadata, a
metadata slot) name it as their `key`: while a write of a key is late, the
pool refuses further writes of it (851), so a newer write never lands
before an older one that then undoes it; once the late write returned (and
its caller was told it failed), writes of the key are taken again.

The threads are daemon threads: a thread blocked forever on dead storage
must not keep the agent from exiting (ThreadPoolExecutor joins its threads
at interpreter exit, which would turn SIGTERM into a hang).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import errno
import json
import os
import queue
import threading
import weakref
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any, TypeVar

from storage.errors import HostStateError, ResourceTimeout

T = TypeVar("T")

# The context of loop callbacks that set no context variable (this pool's
# deliveries and timer; rpc.server's WebSocket callbacks and notification
# sender): one shared, not a copy of the current context each, so one
# object less per call in flight for the garbage collector (issue 21).
CALLBACK_CONTEXT = contextvars.Context()

# A queued call: (claim, loop, future, fn, args, keyed). `claim` is a
# one-item list popped exactly once (list.pop is atomic under the GIL): by
# the worker that runs the call, or by the caller that gave up on it
# (deadline, cancel, close): a call still queued when its caller gave up
# never runs. `keyed`: a keyed call's state, else None.
_Work = tuple[list[None], asyncio.AbstractEventLoop, "asyncio.Future[Any]",
              Callable[..., Any], tuple[Any, ...], "_Keyed | None"]


class _Late:
    """The late calls of one key: how many, and who waits for them."""

    __slots__ = ("count", "waiters")

    def __init__(self) -> None:
        self.count = 0
        self.waiters: list[asyncio.Future[None]] = []


class _Keyed:
    """A keyed call's state, kept on the loop: its caller marks it late when
    it gives up while the call runs; its delivery, when it returned."""

    __slots__ = ("key", "late", "ran", "table")

    def __init__(self, table: dict[Hashable, _Late], key: Hashable) -> None:
        self.table = table          # the pool's, not the pool (see IOPool._stop)
        self.key = key
        self.late = False
        self.ran = False

    def gave_up(self) -> None:
        if not self.ran:
            self.late = True
            self.table.setdefault(self.key, _Late()).count += 1

    def returned(self) -> None:
        self.ran = True
        if not self.late:
            return
        entry = self.table[self.key]
        entry.count -= 1
        if not entry.count:
            del self.table[self.key]
            for fut in entry.waiters:
                if not fut.done():
                    fut.set_result(None)


class IOPool:
    def __init__(self, name: str, workers: int = 4, timeout: float = 30.0) -> None:
        self.name = name
        self.timeout = timeout
        self.workers = workers
        self._queue: queue.SimpleQueue[_Work | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._closed = False
        # calls in flight: their deadline (loop time) and timeout; the
        # timer set for the nearest deadline, and its loop
        self._calls: dict[asyncio.Future[Any], tuple[float, float]] = {}
        self._watch: asyncio.TimerHandle | None = None
        self._watch_loop: asyncio.AbstractEventLoop | None = None
        # keys with a call still running past its caller's deadline
        self._late: dict[Hashable, _Late] = {}
        # The threads hold the queue, not the pool: a pool dropped without
        # close() is collected and stops its idle threads all the same.
        self._stop = weakref.finalize(self, _stop_threads, self._queue, self._threads)

    async def call(self, fn: Callable[..., T], *args: Any, timeout: float | None = None,
                   key: Hashable | None = None) -> T:
        """fn(*args) in a thread of the pool, within `timeout` (the pool's
        by default). `key`: the record the call writes (see the module)."""
        if self._closed:
            raise RuntimeError(f"I/O pool {self.name} is closed")
        keyed = None
        if key is not None:
            if key in self._late:
                raise ResourceTimeout(reason=f"storage I/O on {self.name}: an earlier write "
                                             f"of {key} has not returned; none until it does")
            keyed = _Keyed(self._late, key)
        deadline = self.timeout if timeout is None else timeout
        loop = asyncio.get_running_loop()
        done: asyncio.Future[T] = loop.create_future()
        claim: list[None] = [None]
        self._queue.put((claim, loop, done, fn, args, keyed))
        if len(self._threads) < self.workers:
            thread = threading.Thread(target=_worker, args=(self._queue,), daemon=True,
                                      name=f"io-{self.name}-{len(self._threads)}")
            self._threads.append(thread)
            thread.start()
        expires = loop.time() + deadline
        self._calls[done] = (expires, deadline)
        watch = self._watch
        if watch is None or self._watch_loop is not loop or expires < watch.when():
            self._arm(loop, expires)
        # One loop future the worker completes, and one timer per pool for
        # the deadlines, not wait_for(wrap_future(concurrent Future)) with
        # its timer per call: that was ~30 objects the garbage collector
        # walks per call in flight (a Condition and its RLock's bound
        # methods, the chaining closures, wait_for's task, waiter and timer,
        # and the cancelled timers left in the loop's heap), here about 6.
        # Under the load benchmark the calls in flight are most of what a
        # young collection walks, so its pause (issue 21).
        try:
            return await done
        except TimeoutError:    # the storage's own (ETIMEDOUT): a timeout all the same
            raise ResourceTimeout(reason=f"storage I/O on {self.name} timed out") from None
        finally:
            del self._calls[done]
            try:
                claim.pop()         # still queued: it never runs
            except IndexError:
                # it ran, or runs on in its thread: a running call cannot be
                # stopped
                if keyed is not None:
                    keyed.gave_up()

    def hold(self, key: Hashable) -> Callable[[], None]:
        """Mark `key` late for a write that runs on outside the pool (a
        thread of its own, past its caller's deadline); the function
        returned, called from any thread once that write returned, lets the
        key go."""
        keyed = _Keyed(self._late, key)
        keyed.gave_up()
        loop = asyncio.get_running_loop()

        def returned() -> None:
            with contextlib.suppress(RuntimeError):     # the loop is closed
                loop.call_soon_threadsafe(keyed.returned, context=CALLBACK_CONTEXT)
        return returned

    def late(self, key: Hashable) -> bool:
        """Whether a call of `key` runs on past its caller's deadline."""
        return key in self._late

    async def settled(self, key: Hashable) -> None:
        """Wait until no call of `key` is late (every one returned)."""
        entry = self._late.get(key)
        if entry is None:
            return
        fut = asyncio.get_running_loop().create_future()
        entry.waiters.append(fut)
        await fut

    def _arm(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        if self._watch is not None:
            self._watch.cancel()
        self._watch_loop = loop
        # a weak reference: a pending timer must not keep a dropped pool
        # (and so its threads) alive
        self._watch = loop.call_at(when, _expire, weakref.ref(self), loop,
                                   context=CALLBACK_CONTEXT)

    def _expire(self, loop: asyncio.AbstractEventLoop) -> None:
        """The pool's timer: the calls past their deadline fail with 851
        (their callers' `finally` drops the queued ones); the timer is set
        again for the nearest deadline left."""
        self._watch = None
        now = loop.time()
        nearest: float | None = None
        for done, (expires, deadline) in self._calls.items():
            if done.get_loop() is not loop or done.done():
                continue
            if expires <= now:
                done.set_exception(ResourceTimeout(
                    reason=f"storage I/O on {self.name} did not finish in {deadline:g} s"))
            elif nearest is None or expires < nearest:
                nearest = expires
        if nearest is not None:
            self._arm(loop, nearest)

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
                claim, loop, done = item[:3]
                with contextlib.suppress(IndexError):
                    claim.pop()
                    _deliver_soon(loop, done, None, None, None, cancel=True)
        self._stop()


def _expire(pool: weakref.ref[IOPool], loop: asyncio.AbstractEventLoop) -> None:
    if (p := pool()) is not None:
        p._expire(loop)


def _worker(work_queue: queue.SimpleQueue[_Work | None]) -> None:
    while (item := work_queue.get()) is not None:
        claim, loop, done, fn, args, keyed = item
        del item
        try:
            claim.pop()
        except IndexError:
            pass            # its caller gave up while it was queued
        else:
            try:
                result, error = fn(*args), None
            except BaseException as e:
                result, error = None, e
            _deliver_soon(loop, done, result, error, keyed)
            del result, error
        # No references kept while idle (results can be large buffers).
        del claim, loop, done, fn, args, keyed


def _deliver_soon(loop: asyncio.AbstractEventLoop, done: asyncio.Future[Any],
                  result: Any, error: BaseException | None, keyed: _Keyed | None,
                  cancel: bool = False) -> None:
    with contextlib.suppress(RuntimeError):     # the loop is closed: nobody waits
        loop.call_soon_threadsafe(_deliver, done, result, error, keyed, cancel,
                                  context=CALLBACK_CONTEXT)


def _deliver(done: asyncio.Future[Any], result: Any, error: BaseException | None,
             keyed: _Keyed | None, cancel: bool) -> None:
    if keyed is not None:
        keyed.returned()
    if done.done():         # its caller gave up (deadline, cancel)
        return
    if cancel:
        done.cancel()
    elif isinstance(error, StopIteration):     # a future refuses it
        done.set_exception(RuntimeError(f"storage I/O raised {error!r}"))
    elif error is not None:
        done.set_exception(error)
    else:
        done.set_result(result)


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


def record_state(path: Path, data: bytes, what: str, mode: int = 0o644) -> None:
    """atomic_write of a record in the agent's state directory; a failure
    (its file system full, read-only) is HostStateError naming `what`, so
    that the verb changing it answers a clear error and leaves it as it was."""
    try:
        atomic_write(path, data, mode)
    except OSError as e:
        raise HostStateError.of(what, path.parent, e) from None


class StateDamaged(Exception):
    """A record of the host's own state that cannot be read as what it
    records. The agent does not start on it: what it records guards
    running VMs' volumes and the domains and connections in use, and
    starting as if it were empty could undo them. An admin restores it, or
    moves it aside to start without it."""

    def __init__(self, path: Path, what: str, reason: str) -> None:
        super().__init__(f"the record of {what} {path} is damaged ({reason}): restore it, "
                         "or move it aside to start without it")


def read_state(path: Path, what: str, shape: Callable[[Any], bool], missing: Any) -> Any:
    """The JSON record at `path` (one record_state wrote), `missing` if
    there is none; StateDamaged if it cannot be read or parsed, or if
    shape(record) is false."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return missing
    except OSError as e:
        raise StateDamaged(path, what, e.strerror or str(e)) from None
    try:
        record = json.loads(data)
    except ValueError as e:        # not JSON, or not UTF-8
        raise StateDamaged(path, what, str(e)) from None
    if not shape(record):
        raise StateDamaged(path, what, "not the shape of its record")
    return record


def str_map(record: Any, value: Callable[[Any], bool]) -> bool:
    """Whether `record` is a JSON object of string keys whose values
    satisfy `value` (a shape for read_state)."""
    return isinstance(record, dict) and all(
        isinstance(k, str) and value(v) for k, v in record.items())


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
