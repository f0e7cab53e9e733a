"""The host's storage connections: connect, disconnect, edit, test, list.

Each connection is handled on its own (one failing does not stop the
others), under two locks: its id and its target, so concurrent add, edit
and remove of the same connection or target never interleave. Records live
in the state dir; at start-up every recorded connection is checked and
re-established.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

from storage import commands
from storage.connections.base import (
    CONNECTED,
    FAILED,
    Backend,
    Connection,
    RecordStore,
)
from storage.connections.fcp import FcpBackend
from storage.connections.filebased import LocalfsBackend, NfsBackend, PosixfsBackend
from storage.connections.iscsi import IscsiBackend
from storage.errors import (
    DuplicateConnection,
    HostAgentError,
    InvalidParameter,
    ResourceInUse,
    StorageServerConnectionError,
    wire_error,
)
from storage.locks import LockManager, request

log = logging.getLogger("storage.connections")

# Called with a connection id: True if a domain on it has prepared volumes.
InUse = Callable[[str], bool]
# what the domain registry does when a connection goes or comes
OnConnection = Callable[[str], Awaitable[None]]


async def _nothing(conn_id: str) -> None:
    return None


def _status(params: dict[str, Any], error: Exception | None) -> dict[str, Any]:
    """One connection's entry in a connect or disconnect answer."""
    if error is None:
        return {"id": params.get("id"), "status": 0, "message": "OK"}
    wire = wire_error(error)
    return {"id": params.get("id"), "status": wire["code"], "message": wire["message"]}


class ConnectionManager:
    def __init__(self, state_dir: Path, storage_root: Path, locks: LockManager, *,
                 mount_timeout: float = 120.0, io_timeout: float = 30.0,
                 start_wait: float = 30.0, backends: dict[str, Backend] | None = None,
                 runner: commands.Runner = commands.run) -> None:
        self.storage_root = storage_root
        self.locks = locks
        self.store = RecordStore(state_dir / "connections")
        self.conns: dict[str, Connection] = {}
        self.start_wait = start_wait
        # start-up recoveries going on (past start_wait, in the background),
        # and the lookups for the domains of connections back up
        self._background: set[asyncio.Task[None]] = set()
        self._started = False
        tmp = state_dir / "tmp"
        kw: dict[str, Any] = {"mount_timeout": mount_timeout, "io_timeout": io_timeout,
                              "runner": runner}
        self.backends: dict[str, Backend] = {
            "nfs": NfsBackend(storage_root, tmp, **kw),
            "posixfs": PosixfsBackend(storage_root, tmp, **kw),
            "localfs": LocalfsBackend(storage_root, tmp, **kw),
            # iSCSI asks for the other connections: a session or iface another
            # connection still uses is never logged out or deleted
            "iscsi": IscsiBackend(login_timeout=mount_timeout, command_timeout=io_timeout,
                                  device_timeout=io_timeout, runner=runner,
                                  connections=lambda: list(self.conns.values())),
            "fcp": FcpBackend(scan_timeout=mount_timeout, command_timeout=io_timeout,
                              runner=runner),
        }
        if backends:
            self.backends.update(backends)
        self.in_use: InUse = lambda conn_id: False
        # called before a connection goes (disconnect, update): what uses
        # its storage lets go (domains leave their lockspaces, close files)
        self.release: OnConnection = _nothing
        # called when a connection comes up after the start (its recovery
        # outlived start_wait, or connectStorageServer found it back): the
        # domains on it are looked for again
        self.came_up: OnConnection = _nothing

    # ---- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        """Load the records, then verify or re-establish every connection, all
        at once. Those still at it after start_wait seconds go on in the
        background, so that the agent answers meanwhile: a host starting
        while an NFS server is down would wait out a mount of up to
        mount_timeout, and systemd's start timeout with it, serving none of
        its other domains. One that comes up later has `came_up` called."""
        self.storage_root.mkdir(parents=True, exist_ok=True)
        for conn in self.store.load():
            self.conns[conn.id] = conn
        # (stop() cancels them, even if this start was cut short)
        tasks = {self._spawn(self._recover_at_start(c), f"connection-{c.id}"): c
                 for c in self.conns.values()}
        late: set[asyncio.Task[None]] = set()
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=self.start_wait)
        self._started = True
        for task in late:
            conn = tasks[task]
            conn.message = (f"being checked or re-established since the agent started "
                            f"(more than {self.start_wait:g} s)")
            log.warning("Connection %s (%s) not up after %g s: the agent starts without it, "
                        "and goes on trying", conn.id, conn.type, self.start_wait)

    def _spawn(self, work: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """A task of the manager's own, cancelled by stop()."""
        task = asyncio.create_task(work, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def stop(self) -> None:
        """Cancel the start-up recoveries and lookups still under way."""
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)

    async def _recover_at_start(self, conn: Connection) -> None:
        try:
            await self._recover(conn)
        except Exception:
            conn.state, conn.message = FAILED, "unexpected error, see the agent log"
            log.exception("Connection %s (%s) cannot be checked: unexpected error", conn.id,
                          conn.type)
            return
        if self._started and conn.state == CONNECTED:
            await self._came_up(conn)

    async def _came_up(self, conn: Connection) -> None:
        try:
            await self.came_up(conn.id)
        except Exception:
            log.exception("Connection %s (%s) is up; looking for its domains failed",
                          conn.id, conn.type)

    def _back_up(self, conn: Connection) -> None:
        """A connection that was down is up again (connectStorageServer): its
        domains are looked for in the background, as the engine is answered
        (an active one is activated: its monitor, its interrupted jobs'
        recoveries), as VDSM refreshes its domain cache on a connect."""
        self._spawn(self._came_up(conn), f"connection-up-{conn.id}")

    async def _recover(self, conn: Connection) -> None:
        backend = self._backend(conn.type)
        async with self._hold(conn.id, backend.target_key(conn.params)):
            try:
                await backend.check(conn)
                conn.state, conn.message = CONNECTED, ""
                log.info("Connection %s (%s) is up%s", conn.id, conn.type,
                         "; its file system is full" if conn.full else "")
                return
            except HostAgentError as e:
                log.info("Connection %s (%s) is down (%s); re-establishing", conn.id,
                         conn.type, e.message)
            try:
                await backend.connect(conn, lambda: self.store.save(conn))
                conn.state, conn.message = CONNECTED, ""
                self.store.save(conn)
                log.info("Connection %s (%s) re-established", conn.id, conn.type)
            except HostAgentError as e:
                conn.state, conn.message = FAILED, e.message
                log.error("Connection %s (%s) cannot be re-established: %s", conn.id,
                          conn.type, e.message)

    # ---- verbs -------------------------------------------------------------

    async def connect(self, dom_type: str, params_list: list[dict[str, Any]]
                      ) -> list[dict[str, Any]]:
        return await self._each(self._connect_one, dom_type, params_list)

    async def disconnect(self, dom_type: str, params_list: list[dict[str, Any]]
                         ) -> list[dict[str, Any]]:
        return await self._each(self._disconnect_one, dom_type, params_list)

    async def _each(self, fn: Callable[[str, dict[str, Any]], Any], dom_type: str,
                    params_list: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """fn on every connection at once, each answered on its own: an
        unexpected error is that connection's status 100 (its traceback
        logged), not the whole call's while the others go on unobserved."""
        results = await asyncio.gather(*(self._one(fn, dom_type, p) for p in params_list),
                                       return_exceptions=True)
        out: list[dict[str, Any]] = []
        for params, r in zip(params_list, results, strict=True):
            if isinstance(r, BaseException):
                if not isinstance(r, Exception):
                    raise r          # cancelled: every other one has ended too
                log.error("Connection %s: unexpected error", params.get("id"), exc_info=r)
                r = _status(params, r)
            out.append(r)
        return out

    def list(self) -> list[dict[str, Any]]:
        return [c.public() for c in sorted(self.conns.values(), key=lambda c: c.id)]

    def get(self, conn_id: str) -> Connection | None:
        return self.conns.get(conn_id)

    def local_path(self, conn_id: str) -> Path | None:
        conn = self.conns.get(conn_id)
        if conn is None:
            return None
        return self._backend(conn.type).local_path(conn)

    def mount_point(self, conn_id: str) -> Path | None:
        """local_path when the connection is a mount of its own (not localfs)."""
        conn = self.conns.get(conn_id)
        if conn is None or not getattr(self._backend(conn.type), "mounts", False):
            return None
        return self._backend(conn.type).local_path(conn)

    async def update(self, dom_type: str, params: dict[str, Any]) -> dict[str, Any]:
        """Switch a connection to new parameters, keeping its id; if the new
        target fails, the old one is restored."""
        conn_id = params["id"]
        backend = self._backend(dom_type)
        old = self.conns.get(conn_id)
        if old is None:
            raise StorageServerConnectionError(reason=f"no connection {conn_id} on this host")
        if old.type != dom_type:
            raise InvalidParameter(field="domType",
                                   reason=f"connection {conn_id} is {old.type}; the type "
                                          "cannot change")
        new = Connection(id=conn_id, type=dom_type, params=self._params(params))
        old_key = backend.target_key(old.params)
        new_key = backend.target_key(new.params)
        async with self._hold(conn_id, old_key, new_key):
            if self.in_use(conn_id):
                raise ResourceInUse(resource=f"connection {conn_id}",
                                    reason="a domain on it has prepared volumes")
            self._check_duplicate(new, new_key)
            if not (new.params == old.params and old.state == CONNECTED):
                await self.release(conn_id)
            if new.params == old.params and old.state == CONNECTED:
                return new.public()
            await backend.disconnect(old)
            try:
                await backend.connect(new, lambda: self.store.save(new))
            except BaseException:
                log.warning("Connection %s: new target failed, restoring the old one",
                            conn_id)
                try:
                    await backend.connect(old, lambda: self.store.save(old))
                    old.state, old.message = CONNECTED, ""
                except HostAgentError as e:
                    old.state, old.message = FAILED, e.message
                self.store.save(old)
                raise
            new.state = CONNECTED
            self.conns[conn_id] = new
            self.store.save(new)
            log.info("Connection %s updated", conn_id)
            return new.public()

    async def test(self, dom_type: str, params: dict[str, Any]) -> dict[str, Any]:
        return await self._backend(dom_type).test(self._params(params))

    # ---- internals ---------------------------------------------------------

    def _backend(self, dom_type: str) -> Backend:
        try:
            return self.backends[dom_type]
        except KeyError:
            raise InvalidParameter(field="domType",
                                   reason=f"{dom_type} connections are not supported "
                                          "on this host") from None

    @staticmethod
    def _params(params: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in params.items() if k != "id" and v is not None}

    def _hold(self, conn_id: str, *target_keys: str) -> Any:
        return self.locks.hold(request("connection", conn_id),
                               *(request("target", k) for k in target_keys))

    async def _one(self, fn: Callable[[str, dict[str, Any]], Any], dom_type: str,
                   params: dict[str, Any]) -> dict[str, Any]:
        try:
            await fn(dom_type, params)
        except HostAgentError as e:
            return _status(params, e)
        return _status(params, None)

    def _check_duplicate(self, conn: Connection, key: str) -> None:
        path = self._backend(conn.type).local_path(conn)
        for other in self.conns.values():
            if other.id == conn.id or other.type not in self.backends:
                continue
            other_backend = self._backend(other.type)
            if other_backend.target_key(other.params) == key:
                raise DuplicateConnection(id=conn.id, existing=other.id)
            if path is not None and other_backend.local_path(other) == path:
                # another target recorded under the same name (VDSM's naming,
                # used before, was not one to one)
                raise StorageServerConnectionError(
                    reason=f"{path} is used by connection {other.id}")

    async def _connect_one(self, dom_type: str, params: dict[str, Any]) -> None:
        backend = self._backend(dom_type)
        conn = Connection(id=params["id"], type=dom_type, params=self._params(params))
        key = backend.target_key(conn.params)
        async with self._hold(conn.id, key):
            existing = self.conns.get(conn.id)
            if existing is not None:
                if existing.type != conn.type or existing.params != conn.params:
                    raise InvalidParameter(
                        field="id", reason=f"connection {conn.id} exists with other "
                                           "parameters; use updateStorageConnection")
                try:
                    await backend.check(existing)
                except HostAgentError:
                    conn = existing
                else:
                    was, existing.state, existing.message = existing.state, CONNECTED, ""
                    if was != CONNECTED:
                        self._back_up(existing)
                    return
            self._check_duplicate(conn, key)
            try:
                # The backend saves the record before each step it takes: a
                # crash must not leave a mount or a session the agent no longer
                # knows it made.
                await backend.connect(conn, lambda: self.store.save(conn))
            except BaseException:
                if existing is None:
                    self.store.remove(conn.id)
                raise
            conn.state, conn.message = CONNECTED, ""
            self.conns[conn.id] = conn
            self.store.save(conn)
            log.info("Connected %s %s", dom_type, conn.id)
            if existing is not None:
                self._back_up(conn)

    async def _disconnect_one(self, dom_type: str, params: dict[str, Any]) -> None:
        conn_id = params["id"]
        conn = self.conns.get(conn_id)
        if conn is None:
            return  # nothing to do: disconnecting is idempotent
        backend = self._backend(conn.type)
        async with self._hold(conn_id, backend.target_key(conn.params)):
            if self.in_use(conn_id):
                raise ResourceInUse(resource=f"connection {conn_id}",
                                    reason="a domain on it has prepared volumes")
            await self.release(conn_id)
            await backend.disconnect(conn)
            del self.conns[conn_id]
            self.store.remove(conn_id)
            log.info("Disconnected %s %s", conn.type, conn_id)
