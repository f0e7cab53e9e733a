"""The sanlock backend against a fake daemon speaking the same protocol on a
UNIX socket in tmp_path (the real daemon is in tests/lab/test_sanlock_lab.py),
and the protocol's struct layouts against ctypes' idea of the C structs."""

from __future__ import annotations

import asyncio
import ctypes
import errno
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from storage.errors import AcquireHostIdFailure, AcquireLockFailure, LeaseLost
from storage.leases import FileDomainLeases, Geometry, LeaseManager, SanlockBackend
from storage.leases import sanlockproto as proto
from storage.leases.layout import MiB
from tests.polling import until

SD = "0f6b3c0e-8f0a-4d8e-9d55-2f9e0c1b7a11"


# ---- struct layouts ------------------------------------------------------------------------

class CDisk(ctypes.Structure):
    _fields_ = [("path", ctypes.c_char * 1024), ("offset", ctypes.c_uint64),
                ("pad1", ctypes.c_uint32), ("pad2", ctypes.c_uint32)]


class CLockspace(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char * 48), ("host_id", ctypes.c_uint64),
                ("flags", ctypes.c_uint32), ("host_id_disk", CDisk)]


class CResource(ctypes.Structure):
    _fields_ = [("lockspace_name", ctypes.c_char * 48), ("name", ctypes.c_char * 48),
                ("lver", ctypes.c_uint64), ("data64", ctypes.c_uint64),
                ("data32", ctypes.c_uint32), ("unused", ctypes.c_uint32),
                ("flags", ctypes.c_uint32), ("num_disks", ctypes.c_uint32)]


class COptions(ctypes.Structure):
    _fields_ = [("owner_name", ctypes.c_char * 48), ("flags", ctypes.c_uint32),
                ("len", ctypes.c_uint32)]


def test_struct_sizes_match_c_layout() -> None:
    assert proto.DISK.size == ctypes.sizeof(CDisk) == 1040
    assert proto.LOCKSPACE.size == ctypes.sizeof(CLockspace) == 1104
    assert proto.RESOURCE.size == ctypes.sizeof(CResource) == 128
    assert proto.OPTIONS.size == ctypes.sizeof(COptions) == 56
    assert proto.HEADER.size == 32


def test_lockspace_bytes_match_c_struct() -> None:
    raw = proto.lockspace(SD, 7, "/a/ids", 4096, 0x110)
    c = CLockspace.from_buffer_copy(raw)
    assert (c.name.decode(), c.host_id, c.flags) == (SD, 7, 0x110)
    assert (c.host_id_disk.path.decode(), c.host_id_disk.offset) == ("/a/ids", 4096)
    assert proto.parse_lockspace(raw) == (SD, 7, 0x110, "/a/ids", 4096)


def test_resource_bytes_match_c_struct() -> None:
    raw = proto.resource(SD, "SDM", [("/a/leases", 2 * MiB)], 0x220)
    c = CResource.from_buffer_copy(raw[:128])
    assert (c.lockspace_name.decode(), c.name.decode(), c.flags, c.num_disks) == (
        SD, "SDM", 0x220, 1)
    d = CDisk.from_buffer_copy(raw[128:])
    assert (d.path.decode(), d.offset) == ("/a/leases", 2 * MiB)
    assert len(proto.resource(SD, "SDM", [("/x", 0)], with_disks=False)) == 128


def test_geometry_flags() -> None:
    assert proto.geometry_flags(Geometry(512, MiB)) == 0x110
    assert proto.geometry_flags(Geometry(4096, 8 * MiB)) == 0x280


def test_header_result_is_signed() -> None:
    raw = proto.header(proto.ACQUIRE, 8, 10, data=-243, data2=proto.NO_PID)
    h = proto.parse_header(raw)
    assert (h.cmd, h.cmd_flags, h.length, h.result, h.data2) == (7, 8, 42, -243, 0xFFFFFFFF)
    with pytest.raises(ValueError, match="bad magic"):
        proto.parse_header(b"\0" * 32)
    assert proto.describe(-243) == "-243 (owner's host id is live)"
    assert proto.describe(-errno.EAGAIN) == "-11 (EAGAIN)"


def helper_argv(path: str, args: str) -> list[str]:
    """How sanlock's helper turns killpath + args into argv: split on
    whitespace, a backslash escapes the next space or backslash."""
    argv, cur, i = [path], "", 0
    while i < len(args):
        c = args[i]
        if c == "\\" and i + 1 < len(args):
            i += 1
            cur += args[i]
        elif c.isspace():
            if cur:
                argv.append(cur)
            cur = ""
        else:
            cur += c
        i += 1
    if cur:
        argv.append(cur)
    return argv


def test_killpath_fits_and_splits(tmp_path: Path) -> None:
    from storage.leases.sanlock import _KillFifo
    fifo = _KillFifo(str(tmp_path))
    try:
        args = fifo.args(123)
        assert len(args) < proto.MAX_HELPER_LEN
        assert helper_argv("/bin/sh", args) == ["/bin/sh", "-c", f"echo 123 > {fifo.path}"]
        raw = proto.killpath("/bin/sh", args)
        assert len(raw) == 2 * proto.MAX_HELPER_LEN
    finally:
        fifo.close()
    with pytest.raises(ValueError, match="under 128 bytes"):
        proto.killpath("/bin/sh", "x" * 128)


# ---- a fake daemon -------------------------------------------------------------------------

@dataclass(eq=False)
class Client:
    writer: asyncio.StreamWriter
    registered: bool = False
    killpath: tuple[str, str] | None = None
    held: set[tuple[str, str]] = field(default_factory=set)


class FakeSanlock:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.spaces: dict[str, tuple[int, int]] = {}       # name -> (host_id, io_timeout)
        self.owners: dict[tuple[str, str], Client] = {}
        self.clients: set[Client] = set()
        self.server: asyncio.Server | None = None
        self.requests: list[tuple[int, int, int, int]] = []  # cmd, flags, data, data2
        self.released: list[tuple[str, str]] = []
        # resource name -> what its release answers once it is dropped (its
        # lease file gone: -ENOENT, as sanlock's release_token finds it)
        self.release_errors: dict[str, int] = {}

    async def start(self) -> None:
        self.server = await asyncio.start_unix_server(self._serve, str(self.path))

    async def stop(self) -> None:
        self.disconnect_all()
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    def disconnect_all(self) -> None:
        for client in list(self.clients):
            client.writer.close()

    async def fail_lockspace(self, name: str) -> None:
        """What the daemon does when a lockspace's renewal fails: run each
        holder's killpath."""
        for client in list(self.clients):
            if client.killpath and any(ls == name for ls, _ in client.held):
                argv = helper_argv(*client.killpath)
                proc = await asyncio.create_subprocess_exec(*argv)
                await proc.wait()

    def _reply(self, client: Client, h: proto.Header, result: int, data2: int = 0,
               body: bytes = b"") -> None:
        client.writer.write(proto.header(h.cmd, 0, len(body), result, data2) + body)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        client = Client(writer)
        self.clients.add(client)
        try:
            while True:
                try:
                    h = proto.parse_header(await reader.readexactly(32))
                    body = await reader.readexactly(h.length - 32)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                self.requests.append((h.cmd, h.cmd_flags, h.data, h.data2))
                self._handle(client, h, body)
                await writer.drain()
        finally:
            self.clients.discard(client)
            for key in client.held:
                self.owners.pop(key, None)
            writer.close()

    def _handle(self, client: Client, h: proto.Header, body: bytes) -> None:
        if h.cmd == proto.REGISTER:
            client.registered = True
        elif h.cmd == proto.KILLPATH:
            path, args = (body[i:i + 128].rstrip(b"\0").decode() for i in (0, 128))
            client.killpath = (path, args)
            self._reply(client, h, 0)
        elif h.cmd in (proto.ADD_LOCKSPACE, proto.INQ_LOCKSPACE, proto.REM_LOCKSPACE):
            name, host_id, _flags, _path, _off = proto.parse_lockspace(body)
            have = self.spaces.get(name)
            if h.cmd == proto.ADD_LOCKSPACE:
                if have and have[0] != host_id:
                    rv = proto.HOSTID_BUSY
                elif have:
                    rv = -errno.EEXIST
                else:
                    self.spaces[name] = (host_id, h.data)
                    rv = 0
            elif h.cmd == proto.INQ_LOCKSPACE:
                rv = 0 if have and have[0] == host_id else -errno.ENOENT
            else:
                rv = 0 if self.spaces.pop(name, None) else -errno.ENOENT
            self._reply(client, h, rv)
        elif h.cmd == proto.ACQUIRE:
            ls, name = (body[i:i + 48].rstrip(b"\0").decode() for i in (0, 48))
            if not client.registered:
                rv = -errno.EPERM
            elif ls not in self.spaces:
                rv = -errno.ENOSPC
            elif (ls, name) in self.owners:
                rv = proto.ACQUIRE_IDLIVE
            else:
                self.owners[(ls, name)] = client
                client.held.add((ls, name))
                rv = 0
            self._reply(client, h, rv)
        elif h.cmd == proto.RELEASE:
            key = (body[:48].rstrip(b"\0").decode(), body[48:96].rstrip(b"\0").decode())
            if self.owners.get(key) is client:
                del self.owners[key]
                client.held.discard(key)
                self.released.append(key)
                rv = self.release_errors.get(key[1], 0)
            else:
                rv = -errno.ENOENT
            self._reply(client, h, rv)
        else:
            self._reply(client, h, -errno.EINVAL)


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[FakeSanlock]:
    fake = FakeSanlock(tmp_path / "sanlock.sock")
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


def sanlock_manager(daemon: FakeSanlock, tmp_path: Path, name: str,
                    check_interval: float = 3600,
                    force_release_after: float = 20) -> LeaseManager:
    backend = SanlockBackend(socket_path=str(daemon.path), run_dir=str(tmp_path / f"run-{name}"),
                             check_interval=check_interval,
                             force_release_after=force_release_after)
    return LeaseManager({"sanlock": backend})


@pytest.fixture
def areas(tmp_path: Path) -> FileDomainLeases:
    return FileDomainLeases(SD, tmp_path / SD, Geometry(4096, MiB))


async def test_add_and_remove_lockspace(daemon: FakeSanlock, tmp_path: Path,
                                        areas: FileDomainLeases) -> None:
    m = sanlock_manager(daemon, tmp_path, "a")
    await m.add_lockspace(areas.lockspace(), 5, "sanlock", io_timeout=3)
    assert daemon.spaces == {SD: (5, 3)}
    assert m.host_id_status(SD)["state"] == "joined"
    add = next(r for r in daemon.requests if r[0] == proto.ADD_LOCKSPACE)
    assert add[2] == 3            # io_timeout travels in data
    backend = m.backends["sanlock"]
    assert isinstance(backend, SanlockBackend)
    assert [s["name"] for s in await backend.lockspaces()] == []   # fake has no GET
    await m.rem_lockspace(SD)
    assert daemon.spaces == {}
    rem = next(r for r in daemon.requests if r[0] == proto.REM_LOCKSPACE)
    assert rem[1] == proto.REM_UNUSED
    await m.close()


async def test_host_id_busy_is_661(daemon: FakeSanlock, tmp_path: Path,
                                   areas: FileDomainLeases) -> None:
    daemon.spaces[SD] = (9, 10)
    m = sanlock_manager(daemon, tmp_path, "a")
    with pytest.raises(AcquireHostIdFailure) as e:
        await m.add_lockspace(areas.lockspace(), 5, "sanlock")
    assert e.value.code == 661 and "-262" in e.value.message
    # already joined by the daemon with our host id (agent restart): fine
    await m.add_lockspace(areas.lockspace(), 9, "sanlock")
    assert m.host_id_status(SD)["hostId"] == 9
    await m.close()


async def test_no_daemon_is_661(tmp_path: Path, areas: FileDomainLeases) -> None:
    backend = SanlockBackend(socket_path=str(tmp_path / "none.sock"),
                             run_dir=str(tmp_path / "run"))
    m = LeaseManager({"sanlock": backend})
    with pytest.raises(AcquireHostIdFailure) as e:
        await m.add_lockspace(areas.lockspace(), 1, "sanlock")
    assert "connect" in e.value.message
    await m.close()


@pytest.mark.parametrize("rv, warned", [(-errno.ENOENT, False), (-errno.EIO, True)])
async def test_release_of_a_lease_whose_file_is_gone(
        daemon: FakeSanlock, tmp_path: Path, areas: FileDomainLeases,
        caplog: pytest.LogCaptureFixture, rv: int, warned: bool) -> None:
    """A file domain's deleteImage renames the image away, lease files and
    all, while it holds their leases: the release finds no file (ENOENT),
    which is no failure to warn of; another error is."""
    m = sanlock_manager(daemon, tmp_path, "a")
    await m.add_lockspace(areas.lockspace(), 1, "sanlock")
    daemon.release_errors["SDM"] = rv
    with caplog.at_level(logging.DEBUG, logger="storage.leases.sanlock"):
        async with m.acquire(areas.domain_resource()):
            pass
    assert daemon.released == [(SD, "SDM")]
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert bool(warnings) == warned, [r.getMessage() for r in caplog.records]
    await m.close()


async def test_acquire_conflict_release(daemon: FakeSanlock, tmp_path: Path,
                                        areas: FileDomainLeases) -> None:
    a = sanlock_manager(daemon, tmp_path, "a")
    b = sanlock_manager(daemon, tmp_path, "b")
    await a.add_lockspace(areas.lockspace(), 1, "sanlock")
    res = areas.domain_resource()
    async with a.acquire(res):
        assert daemon.owners.keys() == {(SD, "SDM")}
        acq = next(r for r in daemon.requests if r[0] == proto.ACQUIRE)
        assert acq[1:] == (proto.ACQUIRE_OWNER_NOWAIT, 1, proto.NO_PID)
        await b.add_lockspace(areas.lockspace(), 1, "sanlock")   # EEXIST: same daemon
        with pytest.raises(AcquireLockFailure) as e:
            async with b.acquire(res):
                pass
        assert e.value.code == 651 and "host id is live" in e.value.message
    assert daemon.released == [(SD, "SDM")]
    async with b.acquire(res):
        pass
    # every lease had its own registered connection, closed after release
    assert daemon.clients
    await until(lambda: not any(c.registered for c in daemon.clients),
                "every lease's connection closed")
    await a.close()
    await b.close()


async def test_killpath_makes_lease_lost(daemon: FakeSanlock, tmp_path: Path,
                                         areas: FileDomainLeases) -> None:
    m = sanlock_manager(daemon, tmp_path, "a")
    await m.add_lockspace(areas.lockspace(), 1, "sanlock")
    entered = asyncio.Event()

    async def job() -> None:
        async with m.acquire(areas.domain_resource()):
            entered.set()
            await asyncio.Event().wait()    # held until the lease is lost

    task = asyncio.create_task(job())
    await entered.wait()
    await daemon.fail_lockspace(SD)
    done, _ = await asyncio.wait([task], timeout=5)
    assert done, "the holder was not cancelled"
    with pytest.raises(LeaseLost) as e:
        await task
    assert "revoked" in e.value.message
    assert m.host_id_status(SD)["state"] == "failed"
    # the lost lease was let go: its connection closed, the fake freed it
    await until(lambda: daemon.owners == {}, "the fake daemon freed the lost lease")
    assert m.held() == []
    await m.close()


async def test_daemon_gone_makes_lease_lost(daemon: FakeSanlock, tmp_path: Path,
                                            areas: FileDomainLeases) -> None:
    m = sanlock_manager(daemon, tmp_path, "a")
    await m.add_lockspace(areas.lockspace(), 1, "sanlock")
    with pytest.raises(LeaseLost) as e:
        async with m.acquire(areas.domain_resource(), cancel_on_lost=False) as lease:
            daemon.disconnect_all()
            await asyncio.wait_for(lease.lost.wait(), 5)
    assert "closed the lease's connection" in e.value.message
    await m.close()


async def test_monitor_sees_lockspace_gone(daemon: FakeSanlock, tmp_path: Path,
                                           areas: FileDomainLeases) -> None:
    m = sanlock_manager(daemon, tmp_path, "a", check_interval=0.05)
    await m.add_lockspace(areas.lockspace(), 1, "sanlock")
    daemon.spaces.clear()
    await until(lambda: m.host_id_status(SD)["state"] == "failed", "the monitor saw it gone")
    assert m.host_id_status(SD)["state"] == "failed"
    with pytest.raises(AcquireLockFailure):
        async with m.acquire(areas.domain_resource()):
            pass
    await m.close()


async def test_lost_lease_force_closed_when_holder_hangs(daemon: FakeSanlock, tmp_path: Path,
                                                         areas: FileDomainLeases) -> None:
    m = sanlock_manager(daemon, tmp_path, "a", force_release_after=0.1)
    await m.add_lockspace(areas.lockspace(), 1, "sanlock")
    with pytest.raises(LeaseLost):
        async with m.acquire(areas.domain_resource(), cancel_on_lost=False) as lease:
            await daemon.fail_lockspace(SD)
            await asyncio.wait_for(lease.lost.wait(), 5)
            # the holder ignores it; the backend closes the connection itself
            await until(lambda: not daemon.owners, "the backend closed the connection")
            assert daemon.owners == {}
    await m.close()
