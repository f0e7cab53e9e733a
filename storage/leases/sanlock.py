"""The sanlock lock backend: the sanlock daemon, through its UNIX socket.

No Python binding: the agent speaks the daemon's protocol (sanlockproto)
with asyncio streams, so nothing blocks the loop. A lockspace per domain on
its `ids` area (add_lockspace with the domain's io_timeout); a lease is a
resource on the `leases` area, acquired on its own registered connection,
so the daemon frees it when that connection closes, and at the latest when
the agent dies.

Losing a lease: when a lockspace cannot be renewed (its storage failed),
the daemon must make every holder of that lockspace's leases let go. It
would SIGTERM the agent; instead each lease connection registers a killpath
program, which the daemon runs during its grace period (40 s by default,
`sanlock daemon -g`) : it writes the lease's number into a FIFO the agent
reads, the agent marks the lease lost (its work is cancelled), and releases
it when the work has stopped, or after `force_release_after` seconds by
closing the connection. A lease connection that the daemon closes (the
daemon died) loses the lease too. A monitor asks the daemon every
`check_interval` whether each joined lockspace still exists.

`init_lockspace`/`init_resource` format areas with `sanlock direct init`
(no daemon needed; only on areas no host uses).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import logging
import os
import re
import uuid
from dataclasses import dataclass, field

from storage import commands
from storage.errors import AcquireHostIdFailure, AcquireLockFailure, HostAgentError
from storage.leases import sanlockproto as proto
from storage.leases.base import LeaseBusy, LostCallback
from storage.leases.layout import Geometry, Lockspace, Resource

log = logging.getLogger("storage.leases.sanlock")

DEFAULT_SOCKET = "/run/sanlock/sanlock.sock"
DEFAULT_RUN_DIR = "/run/hostagent"
# The killpath program: a shell only to redirect `echo N` into our FIFO. The
# whole command line is built here from an int and a checked path.
KILL_SHELL = "/bin/sh"
_SAFE_PATH = re.compile(r"^/[A-Za-z0-9/._-]+$")


class SanlockError(HostAgentError):
    """Not raised to callers: turned into 651/661 by the backend."""

    template = "sanlock {op} failed: {reason}"


class _Conn:
    """One connection to the daemon; one request at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, path: str) -> _Conn:
        try:
            reader, writer = await asyncio.open_unix_connection(path)
        except OSError as e:
            raise SanlockError(op="connect", reason=f"{path}: {e.strerror or e}") from None
        return cls(reader, writer)

    def send(self, cmd: int, payload: bytes = b"", flags: int = 0, data: int = 0,
             data2: int = 0) -> None:
        self.writer.write(proto.header(cmd, flags, len(payload), data, data2) + payload)

    async def call(self, cmd: int, payload: bytes = b"", flags: int = 0, data: int = 0,
                   data2: int = 0) -> tuple[proto.Header, bytes]:
        self.send(cmd, payload, flags, data, data2)
        await self.writer.drain()
        try:
            raw = await self.reader.readexactly(proto.HEADER.size)
            h = proto.parse_header(raw)
            body = await self.reader.readexactly(h.length - proto.HEADER.size)
        except asyncio.IncompleteReadError:
            raise SanlockError(op=f"command {cmd}", reason="the daemon closed the "
                                                           "connection") from None
        except ValueError as e:
            raise SanlockError(op=f"command {cmd}", reason=str(e)) from None
        return h, body

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()

    async def closed(self) -> None:
        """Returns when the daemon closes the connection (nothing else is
        sent on a lease connection between requests)."""
        while await self.reader.read(4096):
            pass


class SanlockLease:
    def __init__(self, backend: SanlockBackend, number: int, res: Resource, conn: _Conn,
                 on_lost: LostCallback, owner: set[SanlockLease]) -> None:
        self.backend = backend
        self.owner = owner
        self.number = number
        self.resource = res
        self.conn = conn
        self.on_lost = on_lost
        self.lost = False
        self.released = False
        self.watch: asyncio.Task[None] | None = None
        self.force: asyncio.TimerHandle | None = None

    def start_watch(self) -> None:
        self.watch = asyncio.create_task(self._watch(), name=f"sanlock-lease-{self.number}")

    async def _watch(self) -> None:
        with contextlib.suppress(OSError):
            await self.conn.closed()
        if not self.released:
            self.backend._lease_lost(self, "the sanlock daemon closed the lease's connection")

    async def release(self) -> None:
        if self.released:
            return
        self.released = True
        self.backend._leases.pop(self.number, None)
        self.owner.discard(self)
        if self.force is not None:
            self.force.cancel()
        if self.watch is not None:
            self.watch.cancel()
            await asyncio.gather(self.watch, return_exceptions=True)
        try:
            if not self.lost:
                payload = proto.resource(self.resource.lockspace, self.resource.name,
                                         [(self.resource.path, self.resource.offset)],
                                         proto.geometry_flags(self.resource.geometry),
                                         with_disks=False)
                async with asyncio.timeout(self.backend.call_timeout):
                    h, _ = await self.conn.call(proto.RELEASE, payload, data=1,
                                                data2=proto.NO_PID)
                if h.result == -errno.ENOENT:
                    # its lease file is gone: a file domain's deleteImage
                    # renames the image away, lease files and all, while
                    # their leases are held (closing the connection below lets
                    # the daemon drop it)
                    log.debug("sanlock release of %s: its lease file is gone", self.resource)
                elif h.result < 0:
                    log.warning("sanlock release of %s: %s (closing the connection "
                                "releases it)", self.resource, proto.describe(h.result))
        except (SanlockError, OSError, TimeoutError) as e:
            log.warning("sanlock release of %s failed: %s; closing its connection",
                        self.resource, e)
        finally:
            # closing also makes the daemon drop whatever this client still holds
            self.conn.close()

    def force_close(self) -> None:
        if not self.released:
            log.error("Lease %s still held %s s after it was lost: closing its sanlock "
                      "connection", self.resource, self.backend.force_release_after)
            self.released = True
            self.backend._leases.pop(self.number, None)
            self.owner.discard(self)
            if self.watch is not None:
                self.watch.cancel()
            self.conn.close()


@dataclass(eq=False)
class _Space:
    lockspace: Lockspace
    host_id: int
    io_timeout: int
    on_lost: LostCallback
    lost: bool = False
    leases: set[SanlockLease] = field(default_factory=set)


class _KillFifo:
    """The FIFO the killpath program writes lease numbers into."""

    def __init__(self, run_dir: str) -> None:
        os.makedirs(run_dir, mode=0o700, exist_ok=True)
        self.path = os.path.join(run_dir, f"leases-{os.getpid()}-{uuid.uuid4().hex[:8]}.fifo")
        if not _SAFE_PATH.match(self.path):
            raise ValueError(f"run directory {run_dir!r}: only [A-Za-z0-9/._-] in the path")
        os.mkfifo(self.path, 0o600)
        # O_RDWR: the FIFO always has a writer (never EOF) and a reader (the
        # killpath's open never blocks while the agent lives)
        self.fd = os.open(self.path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        self._buf = b""

    def args(self, number: int) -> str:
        # split by sanlock's helper on unescaped spaces: ["-c", "echo N > FIFO"]
        return f"-c echo\\ {number}\\ >\\ {self.path}"

    def read_numbers(self) -> list[int]:
        try:
            self._buf += os.read(self.fd, 4096)
        except BlockingIOError:
            return []
        *lines, self._buf = self._buf.split(b"\n")
        return [int(line) for line in lines if line.strip().isdigit()]

    def close(self) -> None:
        os.close(self.fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


class SanlockBackend:
    """Backend "sanlock". `socket_path`: the daemon's socket (SANLOCK_RUN_DIR
    of the daemon + /sanlock.sock); `run_dir`: where the killpath FIFO lives."""

    name = "sanlock"
    # the daemon keeps the host ids when the agent stops: a restarted agent
    # takes them over at once instead of joining again (2 io_timeouts and more)
    keeps_lockspaces = True

    def __init__(self, *, socket_path: str = DEFAULT_SOCKET, run_dir: str = DEFAULT_RUN_DIR,
                 call_timeout: float = 30.0, check_interval: float = 10.0,
                 force_release_after: float = 20.0) -> None:
        self.socket_path = socket_path
        self.run_dir = run_dir
        self.call_timeout = call_timeout
        self.check_interval = check_interval
        self.force_release_after = force_release_after
        self._spaces: dict[str, _Space] = {}
        self._leases: dict[int, SanlockLease] = {}
        self._numbers = itertools.count(1)
        self._fifo: _KillFifo | None = None
        self._monitor: asyncio.Task[None] | None = None
        self._closing = False

    # ---- plumbing ----------------------------------------------------------------------

    async def _admin(self, cmd: int, payload: bytes, *, flags: int = 0, data: int = 0,
                     timeout: float | None = None) -> int:
        """One request on a fresh (unregistered) connection: its result."""
        # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation
        async with asyncio.timeout(timeout or self.call_timeout):
            conn = await _Conn.open(self.socket_path)
            try:
                h, _ = await conn.call(cmd, payload, flags=flags, data=data)
            finally:
                conn.close()
        return h.result

    def _ensure_started(self) -> None:
        self._closing = False
        if self._fifo is None:
            self._fifo = _KillFifo(self.run_dir)
            asyncio.get_running_loop().add_reader(self._fifo.fd, self._on_fifo)
        if self._monitor is None or self._monitor.done():
            self._monitor = asyncio.create_task(self._monitor_loop(), name="sanlock-monitor")

    def _on_fifo(self) -> None:
        assert self._fifo is not None
        for number in self._fifo.read_numbers():
            lease = self._leases.get(number)
            if lease is None:
                continue
            # sanlock runs a killpath only when the lease's lockspace failed
            # (or was removed under it): every lease there goes
            self._lease_lost(lease, "sanlock revoked the lease: its lockspace failed")
            space = self._spaces.get(lease.resource.lockspace)
            if space is not None:
                self._space_lost(space, "sanlock gave up the lockspace (renewal failed)")

    def _lease_lost(self, lease: SanlockLease, reason: str) -> None:
        if lease.lost or lease.released:
            return
        lease.lost = True
        log.error("sanlock lease %s lost: %s", lease.resource, reason)
        lease.force = asyncio.get_running_loop().call_later(self.force_release_after,
                                                            lease.force_close)
        lease.on_lost(reason)

    def _space_lost(self, space: _Space, reason: str) -> None:
        if space.lost:
            return
        space.lost = True
        log.error("sanlock lockspace %s lost: %s", space.lockspace.name, reason)
        space.on_lost(reason)

    async def _monitor_loop(self) -> None:
        while not self._closing:
            await asyncio.sleep(self.check_interval)
            await self.check_all()

    async def check_all(self) -> None:
        """Ask the daemon about each joined lockspace (the monitor's step)."""
        for space in list(self._spaces.values()):
            if space.lost:
                continue
            ls = space.lockspace
            try:
                rv = await self._admin(proto.INQ_LOCKSPACE, proto.lockspace(
                    ls.name, space.host_id, ls.path, ls.offset))
            except (SanlockError, OSError, TimeoutError) as e:
                log.warning("sanlock inq_lockspace %s: %s", ls.name, e)
                continue
            if rv == -errno.ENOENT and self._spaces.get(ls.name) is space:
                self._space_lost(space, "the sanlock daemon no longer has the lockspace")

    # ---- Backend -----------------------------------------------------------------------

    async def add_lockspace(self, ls: Lockspace, host_id: int, io_timeout: int,
                            on_lost: LostCallback) -> None:
        try:
            self._ensure_started()
        except (OSError, ValueError) as e:
            raise AcquireHostIdFailure(sdUUID=ls.name, reason=f"killpath FIFO: {e}") from None
        payload = proto.lockspace(ls.name, host_id, ls.path, ls.offset,
                                  proto.geometry_flags(ls.geometry))
        # joining takes 2 io_timeouts + 1 s on a free host id, and up to about
        # 8 io_timeouts + 60 s more when this host's id must first expire
        timeout = 20.0 * io_timeout + 80.0
        try:
            rv = await self._admin(proto.ADD_LOCKSPACE, payload, data=io_timeout,
                                   timeout=timeout)
            if rv == -errno.EINPROGRESS:
                rv = await self._admin(proto.INQ_LOCKSPACE, payload, flags=proto.INQ_WAIT,
                                       timeout=timeout)
        except (SanlockError, OSError, TimeoutError) as e:
            raise AcquireHostIdFailure(sdUUID=ls.name, reason=f"sanlock: {e}") from None
        if rv == -errno.EEXIST:
            # already joined in the daemon (the agent restarted): check it is
            # this host id, then take it over
            rv = await self._admin(proto.INQ_LOCKSPACE, proto.lockspace(
                ls.name, host_id, ls.path, ls.offset))
            if rv != 0:
                raise AcquireHostIdFailure(
                    sdUUID=ls.name, reason="sanlock has the lockspace with another host id "
                                           "or area")
        elif rv < 0:
            raise AcquireHostIdFailure(sdUUID=ls.name,
                                       reason=f"sanlock add_lockspace: {proto.describe(rv)}")
        self._spaces[ls.name] = _Space(ls, host_id, io_timeout, on_lost)

    async def rem_lockspace(self, ls: Lockspace, host_id: int) -> None:
        space = self._spaces.get(ls.name)
        for lease in list(space.leases if space else ()):
            await lease.release()
        payload = proto.lockspace(ls.name, host_id, ls.path, ls.offset,
                                  proto.geometry_flags(ls.geometry))
        rv = await self._admin(proto.REM_LOCKSPACE, payload, flags=proto.REM_UNUSED,
                               timeout=20.0 * (space.io_timeout if space else 10) + 30.0)
        if rv < 0 and rv != -errno.ENOENT:
            raise SanlockError(op="rem_lockspace", reason=proto.describe(rv))
        self._spaces.pop(ls.name, None)

    async def acquire(self, res: Resource, on_lost: LostCallback) -> SanlockLease:
        self._ensure_started()
        assert self._fifo is not None
        space = self._spaces.get(res.lockspace)
        if space is None or space.lost:
            raise AcquireLockFailure(resource=str(res), reason="lockspace not joined")
        number = next(self._numbers)
        try:
            async with asyncio.timeout(self.call_timeout):
                conn = await _Conn.open(self.socket_path)
        except (SanlockError, TimeoutError) as e:
            raise AcquireLockFailure(resource=str(res), reason=f"sanlock: {e}") from None
        ok = False
        try:
            conn.send(proto.REGISTER)
            h, _ = await self._call(conn, proto.KILLPATH,
                                    proto.killpath(KILL_SHELL, self._fifo.args(number)))
            if h.result < 0:
                raise AcquireLockFailure(resource=str(res),
                                         reason=f"sanlock killpath: {proto.describe(h.result)}")
            payload = (proto.resource(res.lockspace, res.name, [(res.path, res.offset)],
                                      proto.geometry_flags(res.geometry))
                       + proto.options())
            h, _ = await self._call(conn, proto.ACQUIRE, payload,
                                    flags=proto.ACQUIRE_OWNER_NOWAIT, data=1)
            rv = h.result
            if rv in proto.BUSY:
                raise LeaseBusy(f"sanlock: {proto.describe(rv)}")
            if rv < 0:
                raise AcquireLockFailure(resource=str(res),
                                         reason=f"sanlock acquire: {proto.describe(rv)}")
            ok = True
        except SanlockError as e:
            raise AcquireLockFailure(resource=str(res), reason=e.message) from None
        except OSError as e:
            raise AcquireLockFailure(resource=str(res), reason=f"sanlock: {e}") from None
        finally:
            if not ok:
                conn.close()
        lease = SanlockLease(self, number, res, conn, on_lost, space.leases)
        self._leases[number] = lease
        space.leases.add(lease)
        lease.start_watch()
        return lease

    async def _call(self, conn: _Conn, cmd: int, payload: bytes, flags: int = 0,
                    data: int = 0) -> tuple[proto.Header, bytes]:
        try:
            async with asyncio.timeout(self.call_timeout):
                return await conn.call(cmd, payload, flags=flags, data=data,
                                       data2=proto.NO_PID)
        except TimeoutError:
            raise SanlockError(op=f"command {cmd}",
                               reason=f"no reply in {self.call_timeout:g} s") from None

    async def close(self) -> None:
        self._closing = True
        if self._monitor is not None:
            self._monitor.cancel()
            await asyncio.gather(self._monitor, return_exceptions=True)
            self._monitor = None
        for lease in list(self._leases.values()):
            await lease.release()
        if self._fifo is not None:
            asyncio.get_running_loop().remove_reader(self._fifo.fd)
            self._fifo.close()
            self._fifo = None

    async def lockspaces(self) -> list[dict[str, object]]:
        """Every lockspace the daemon has (for status and tests)."""
        conn = await _Conn.open(self.socket_path)
        try:
            conn.send(proto.GET_LOCKSPACES)
            await conn.writer.drain()
            h = proto.parse_header(await conn.reader.readexactly(proto.HEADER.size))
            out = []
            for _ in range(h.data2):
                name, host_id, flags, path, offset = proto.parse_lockspace(
                    await conn.reader.readexactly(proto.LOCKSPACE.size))
                out.append({"name": name, "host_id": host_id, "flags": flags,
                            "path": path, "offset": offset})
            return out
        finally:
            conn.close()


# ---- formatting areas: sanlock direct init -------------------------------------------

def cli_path(path: str) -> str:
    """A path in a `sanlock direct` NAME:ID:PATH:OFFSET argument: its ':'
    escaped with a backslash, as sanlock's parser wants."""
    return path.replace(":", "\\:")


def _geometry_args(g: Geometry) -> list[str]:
    return ["-Z", str(g.sector_size), "-A", f"{g.alignment >> 20}M"]


async def init_lockspace(ls: Lockspace, io_timeout: int = 10, *,
                         runner: commands.Runner = commands.run,
                         timeout: float = 120.0) -> None:
    """Format a lockspace area (every host id free). Destroys a live one."""
    spec = f"{ls.name}:0:{cli_path(ls.path)}:{ls.offset}"
    await runner(["sanlock", "direct", "init", "-s", spec, "-o", str(io_timeout),
                  *_geometry_args(ls.geometry)], timeout=timeout)


async def init_resource(res: Resource, io_timeout: int = 10, *,
                        runner: commands.Runner = commands.run,
                        timeout: float = 120.0) -> None:
    """Format one resource lease area (free). Destroys a held one."""
    spec = f"{res.lockspace}:{res.name}:{cli_path(res.path)}:{res.offset}"
    await runner(["sanlock", "direct", "init", "-r", spec, "-o", str(io_timeout),
                  *_geometry_args(res.geometry)], timeout=timeout)
