"""A helper process that holds the local backend's file locks.

Why a process: a lock is an open file on the domain's storage, held as long
as the lease. When that storage is a FUSE file system and it hangs, every
close of such a file blocks, and a fork closes them all in the child before
it runs the new program (close-on-exec), while the parent waits in the
spawn call for that exec. An agent holding these files itself would block
its event loop on every command it starts (a monitoring read, qemu-img)
while the storage hangs. So the agent holds none: this helper, which never
starts anything, opens and locks them.

Protocol (one JSON object per line, both ways, over the helper's stdin and
stdout):

    {"id": 1, "op": "lock", "path": "/…/ids", "offset": 0}
        -> {"id": 1, "handle": 7}   or {"id": 1, "busy": true}
    {"id": 2, "op": "visible", "path": "/…/ids", "offset": 0}
        -> {"id": 2, "visible": true}
    {"id": 3, "op": "unlock", "handle": 7}   -> {"id": 3}
    {"id": 4, "op": "abandon", "of": 1}      (no reply: the agent gave up
        waiting for request 1; a lock it still takes is dropped at once)
    errors: {"id": n, "errno": 5, "error": "Input/output error"}

Each request runs in its own thread, so a request stuck on hung storage
never delays the others. When the agent goes (its end of the pipe closes,
or it dies: SIGKILL through PR_SET_PDEATHSIG), the helper exits and the
kernel drops every lock with its files.

Agent side: `LockHolder` (one helper per agent, started on first use) and
`HolderLocker`, the per-lockspace view the local backend uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import signal
import sys
import threading
from typing import Any

from storage import commands
from storage.errors import ResourceTimeout
from storage.leases.ofdlock import lock_visible, try_lock

log = logging.getLogger("storage.leases.lockholder")

PR_SET_PDEATHSIG = 1
# the checkout or install holding the `storage` package, for the helper's import path
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ---- the helper ----------------------------------------------------------------------------

class _Helper:
    def __init__(self, out: Any) -> None:
        self.out = out
        self.mutex = threading.Lock()
        self.handles: dict[int, int] = {}       # handle -> fd
        self.next_handle = 1
        self.abandoned: set[int] = set()
        self.running: set[int] = set()

    def reply(self, msg: dict[str, Any]) -> None:
        data = (json.dumps(msg) + "\n").encode()
        with self.mutex:
            self.out.write(data)
            self.out.flush()

    def handle(self, req: dict[str, Any]) -> None:
        rid = req.get("id")
        try:
            op = req["op"]
            if op == "lock":
                fd = try_lock(str(req["path"]), int(req["offset"]))
                if fd is None:
                    self.reply({"id": rid, "busy": True})
                    return
                with self.mutex:
                    self.running.discard(rid)
                    if rid in self.abandoned:
                        self.abandoned.discard(rid)
                        drop = True
                    else:
                        drop = False
                        handle = self.next_handle
                        self.next_handle += 1
                        self.handles[handle] = fd
                if drop:
                    os.close(fd)
                    return
                self.reply({"id": rid, "handle": handle})
            elif op == "visible":
                self.reply({"id": rid,
                            "visible": lock_visible(str(req["path"]), int(req["offset"]))})
            elif op == "unlock":
                with self.mutex:
                    fd = self.handles.pop(int(req["handle"]), -1)
                if fd >= 0:
                    os.close(fd)
                self.reply({"id": rid})
            else:
                self.reply({"id": rid, "errno": 22, "error": f"unknown op {op!r}"})
        except OSError as e:
            self.reply({"id": rid, "errno": e.errno or 5, "error": e.strerror or str(e)})
        except Exception as e:     # a malformed request: answer, never die
            self.reply({"id": rid, "errno": 22, "error": f"{type(e).__name__}: {e}"})
        finally:
            with self.mutex:
                self.running.discard(rid)
                self.abandoned.discard(rid)

    def serve(self, inp: Any) -> None:
        for line in inp:
            try:
                req = json.loads(line)
            except ValueError:
                continue
            if req.get("op") == "abandon":
                with self.mutex:
                    if req.get("of") in self.running:
                        self.abandoned.add(req["of"])
                continue
            with self.mutex:
                self.running.add(req.get("id"))
            threading.Thread(target=self.handle, args=(req,), daemon=True).start()


def main() -> None:
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    helper = _Helper(sys.stdout.buffer)
    helper.serve(sys.stdin.buffer)
    # the agent closed its end: exit without closing the lock files one by
    # one (a close can hang on dead storage; the kernel drops them all)
    os._exit(0)


# ---- the agent side ------------------------------------------------------------------------

class LockHolder:
    """The agent's helper process, started on first use and again if it died
    (every lock it held is then gone: callers find that by their checks)."""

    def __init__(self, spawner: commands.Spawner = commands.start) -> None:
        # started off the event loop (commands.py says why: this helper
        # exists because a fork can hang on hung FUSE storage)
        self._spawner = spawner
        self._proc: commands.Child | None = None
        self._reader: asyncio.Task[None] | None = None
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._ids = 0
        self._start_lock = asyncio.Lock()
        # bumped each time a helper starts: handles of an older one are void
        self.generation = 0

    async def _ensure(self) -> commands.Child:
        async with self._start_lock:
            if self._proc is not None:
                if self._proc.returncode is None:
                    return self._proc
                self._proc.close()      # a helper that died
            env = {"PYTHONPATH": _ROOT + os.pathsep + os.environ.get(
                "PYTHONPATH", "")}
            self._proc = await self._spawner(
                [sys.executable, "-c", "from storage.leases.lockholder import main; main()"],
                env=env, stdin=True, stdout=True, line_limit=1 << 20)
            self.generation += 1
            self._reader = asyncio.create_task(self._read(self._proc), name="lockholder")
            log.info("Lock holder started (pid %d)", self._proc.pid)
            return self._proc

    async def _read(self, proc: commands.Child) -> None:
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            fut = self._waiting.pop(msg.get("id"), None)
            if fut is not None and not fut.done():
                fut.set_result(msg)
        if self._proc is not None:
            log.error("Lock holder (pid %d) is gone: every local lock it held is released",
                      proc.pid)
        else:   # close() let it go: the agent is stopping
            log.info("Lock holder (pid %d) exited", proc.pid)
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(OSError(5, "the lock holder process exited"))
        self._waiting.clear()

    async def call(self, op: str, timeout: float, **params: Any) -> dict[str, Any]:
        proc = await self._ensure()
        assert proc.stdin is not None
        self._ids += 1
        rid = self._ids
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[rid] = fut
        proc.stdin.write((json.dumps({"id": rid, "op": op, **params}) + "\n").encode())
        try:
            async with asyncio.timeout(timeout):
                msg = await asyncio.shield(fut)
        except TimeoutError:
            self._waiting.pop(rid, None)
            if op == "lock":
                proc.stdin.write((json.dumps({"op": "abandon", "of": rid}) + "\n").encode())
            raise ResourceTimeout(reason=f"{op} of a lock on {params.get('path', 'storage')} "
                                         f"did not finish in {timeout:g} s") from None
        except BaseException:
            self._waiting.pop(rid, None)
            raise
        if "errno" in msg:
            raise OSError(int(msg["errno"]), str(msg.get("error", "")))
        return msg

    async def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            # it exits on EOF; not waited for long: closing files on hung
            # storage can keep it (it dies with the agent all the same)
            async with asyncio.timeout(1):
                await proc.wait()
        except TimeoutError:
            proc.kill()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        proc.close()


class HolderLocker:
    """One lockspace's view of the LockHolder, with that lockspace's deadline."""

    def __init__(self, holder: LockHolder, timeout: float) -> None:
        self.holder = holder
        self.timeout = timeout

    async def lock(self, path: str, offset: int) -> int | None:
        msg = await self.holder.call("lock", self.timeout, path=path, offset=offset)
        return None if msg.get("busy") else int(msg["handle"])

    async def visible(self, path: str, offset: int) -> bool:
        msg = await self.holder.call("visible", self.timeout, path=path, offset=offset)
        return bool(msg["visible"])

    async def unlock(self, handle: int) -> None:
        await self.holder.call("unlock", self.timeout, handle=handle)

    def close(self) -> None:
        return None


if __name__ == "__main__":
    main()
