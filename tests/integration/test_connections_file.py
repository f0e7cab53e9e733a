"""Storage connections of file types (localfs, posixfs on ext4 and xfs) on
real loop devices, through the real agent over mTLS."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from rpc.client import Client, RpcError
from storage.connections.filebased import escape_spec
from tests.agentproc import AgentProcess
from tests.integration.storagefixtures import cmd, make_fs

MiB = 1024**2


def new_id() -> str:
    return str(uuid.uuid4())


def mounted_at(path: Path) -> str | None:
    """The source mounted at `path`, from /proc/self/mountinfo."""
    found = None
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        if left.split()[4] == str(path):
            found = right.split()[1]
    return found


def mounts_under(path: Path) -> list[str]:
    return [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if line.split()[4].startswith(str(path))]


@pytest.fixture
def fs_device(loop_device: Callable[..., Path]) -> Callable[..., Path]:
    """Factory: a loop device holding a new, unmounted file system."""
    def make(fstype: str = "ext4", sector_size: int = 512) -> Path:
        dev = loop_device(size=512 * 1024**2, sector_size=sector_size)
        make_fs(dev, fstype)
        return dev
    return make


@pytest.fixture
async def conn_client(client: Client) -> AsyncIterator[Client]:
    """The client; at teardown every connection still on the agent is
    disconnected, so no mount outlives the test (ask for device fixtures
    before this one, so they are torn down after it)."""
    yield client
    for conn in await client.call("getStorageConnections"):
        await client.call("disconnectStorageServer", domType=conn["type"],
                          connectionParams=[{"id": conn["id"], **conn["params"]}])


def storage_root(agent: AgentProcess) -> Path:
    return (agent.state_dir / "storage").resolve()


async def connect(client: Client, dom_type: str, **params: Any) -> dict[str, Any]:
    [status] = await client.call("connectStorageServer", domType=dom_type,
                                 connectionParams=[params])
    return dict(status)


# ---- localfs --------------------------------------------------------------------

async def test_localfs_every_verb(agent, conn_client, tmp_path):
    c = conn_client
    data = tmp_path / "localdata"
    data.mkdir()
    (data / "keep.txt").write_text("kept")
    cid = new_id()
    assert await connect(c, "localfs", id=cid, connection=str(data)) == \
        {"id": cid, "status": 0, "message": "OK"}
    link = storage_root(agent) / escape_spec(str(data))
    assert link.is_symlink() and os.readlink(link) == str(data)
    [conn] = await c.call("getStorageConnections")
    assert conn["id"] == cid and conn["type"] == "localfs" and conn["state"] == "connected"
    assert conn["params"]["connection"] == str(data)

    # idempotent; duplicate target under another id; same id, other params
    assert (await connect(c, "localfs", id=cid, connection=str(data)))["status"] == 0
    dup = await connect(c, "localfs", id=new_id(), connection=str(data) + "/")
    assert dup["status"] == 2103 and cid in dup["message"]
    other = tmp_path / "other"
    other.mkdir()
    clash = await connect(c, "localfs", id=cid, connection=str(other))
    assert clash["status"] == 1000 and "updateStorageConnection" in clash["message"]

    # test changes nothing
    r = await c.call("testStorageConnection", domType="localfs",
                     connection={"id": new_id(), "connection": str(other)})
    assert r["reachable"] is True
    assert sorted(os.listdir(other)) == []
    r = await c.call("testStorageConnection", domType="localfs",
                     connection={"id": new_id(), "connection": str(tmp_path / "missing")})
    assert r["reachable"] is False and "missing" in r["message"]

    # edit in place while unused
    updated = await c.call("updateStorageConnection", domType="localfs",
                           connection={"id": cid, "connection": str(other)})
    assert updated["params"]["connection"] == str(other) and updated["id"] == cid
    assert not link.exists()
    assert os.readlink(storage_root(agent) / escape_spec(str(other))) == str(other)
    with pytest.raises(RpcError) as e:
        await c.call("updateStorageConnection", domType="nfs",
                     connection={"id": cid, "connection": "server:/export"})
    assert e.value.code == 1000 and e.value.data["field"] == "domType"

    # disconnect removes the link, never the data; twice is fine
    for _ in range(2):
        [st] = await c.call("disconnectStorageServer", domType="localfs",
                            connectionParams=[{"id": cid, "connection": str(other)}])
        assert st["status"] == 0
    assert await c.call("getStorageConnections") == []
    assert (data / "keep.txt").read_text() == "kept" and other.is_dir()
    assert list(storage_root(agent).iterdir()) == []


async def test_localfs_paths_named_alike_are_two_targets(agent, make_fs_mount, conn_client):
    """'/d/x_/y' and '/d/x/_y' had one name under the storage root (VDSM's
    escaping), so the second was refused as a duplicate (2003)."""
    c = conn_client
    fs = make_fs_mount("ext4")
    dirs = [fs.path / "d" / "x_" / "y", fs.path / "d" / "x" / "_y"]
    ids = [new_id(), new_id()]
    for d, cid in zip(dirs, ids, strict=True):
        d.mkdir(parents=True)
        assert await connect(c, "localfs", id=cid, connection=str(d)) == \
            {"id": cid, "status": 0, "message": "OK"}
    conns = {x["id"]: x for x in await c.call("getStorageConnections")}
    assert [conns[i]["state"] for i in ids] == ["connected", "connected"]
    links = [storage_root(agent) / escape_spec(str(d)) for d in dirs]
    assert links[0] != links[1]
    assert [os.readlink(link) for link in links] == [str(d) for d in dirs]

    sds = [new_id(), new_id()]
    for sd, cid in zip(sds, ids, strict=True):
        await c.call("createStorageDomain", sdUUID=sd, domType="localfs", name=sd[:8],
                     connectionId=cid, ovfStore=False)
    assert sorted(await c.call("getStorageDomainsList")) == sorted(sds)
    for sd, cid, d, other in zip(sds, ids, dirs, reversed(dirs), strict=True):
        info = await c.call("getStorageDomainInfo", sdUUID=sd)
        assert info["connectionId"] == cid
        assert Path(info["path"]).resolve() == d / sd
        assert (d / sd / "dom_md").is_dir() and not (other / sd).exists()
    for sd in sds:
        await c.call("deactivateStorageDomain", sdUUID=sd)


# ---- posixfs --------------------------------------------------------------------

@pytest.mark.parametrize("fstype, sector", [("ext4", 512), ("ext4", 4096), ("xfs", 512),
                                            ("xfs", 4096)])
async def test_posixfs_every_verb(fs_device, agent, conn_client, fstype, sector):
    c = conn_client
    dev1, dev2 = fs_device(fstype, sector), fs_device(fstype, sector)
    cid = new_id()
    assert (await connect(c, "posixfs", id=cid, connection=str(dev1),
                          vfs_type=fstype))["status"] == 0
    mnt = storage_root(agent) / escape_spec(str(dev1))
    assert mounted_at(mnt) == str(dev1)
    (mnt / "hello").write_text("on the device")
    [conn] = await c.call("getStorageConnections")
    assert conn["state"] == "connected" and conn["details"]["fstype"] == fstype

    assert (await connect(c, "posixfs", id=cid, connection=str(dev1),
                          vfs_type=fstype))["status"] == 0
    assert (await connect(c, "posixfs", id=new_id(), connection=str(dev1),
                          vfs_type=fstype))["status"] == 2103
    assert len(mounts_under(storage_root(agent))) == 1

    # test of an unmounted device: a trial mount that leaves nothing behind
    before = mounts_under(agent.state_dir.resolve())
    r = await c.call("testStorageConnection", domType="posixfs",
                     connection={"id": new_id(), "connection": str(dev2), "vfs_type": fstype})
    assert r["reachable"] is True and r["details"]["fstype"] == fstype
    assert mounts_under(agent.state_dir.resolve()) == before
    assert list((agent.state_dir / "tmp").iterdir()) == []
    r = await c.call("testStorageConnection", domType="posixfs",
                     connection={"id": new_id(), "connection": "/dev/nonexistent",
                                 "vfs_type": fstype})
    assert r["reachable"] is False and r["details"]["code"] == 477

    # edit to another device: unmount old, mount new
    await c.call("updateStorageConnection", domType="posixfs",
                 connection={"id": cid, "connection": str(dev2), "vfs_type": fstype})
    mnt2 = storage_root(agent) / escape_spec(str(dev2))
    assert mounted_at(mnt) is None and not mnt.exists()
    assert mounted_at(mnt2) == str(dev2)

    # edit to a target that fails: the old one is restored
    with pytest.raises(RpcError) as e:
        await c.call("updateStorageConnection", domType="posixfs",
                     connection={"id": cid, "connection": str(dev1), "vfs_type": "vfat"})
    assert e.value.code == 477
    assert mounted_at(mnt2) == str(dev2)
    [conn] = await c.call("getStorageConnections")
    assert conn["params"]["connection"] == str(dev2) and conn["state"] == "connected"

    [st] = await c.call("disconnectStorageServer", domType="posixfs",
                        connectionParams=[{"id": cid, "connection": str(dev2),
                                           "vfs_type": fstype}])
    assert st["status"] == 0
    assert mounted_at(mnt2) is None and not mnt2.exists()
    assert mounts_under(storage_root(agent)) == []


async def test_connections_are_independent(fs_device, agent, conn_client, tmp_path):
    good = fs_device("ext4")
    ids = [new_id(), new_id()]
    statuses = await conn_client.call("connectStorageServer", domType="posixfs",
                                      connectionParams=[
                                          {"id": ids[0], "connection": str(good),
                                           "vfs_type": "ext4"},
                                          {"id": ids[1], "connection": str(tmp_path / "nodev"),
                                           "vfs_type": "ext4"}])
    assert [s["status"] for s in statuses] == [0, 477]
    assert [x["id"] for x in await conn_client.call("getStorageConnections")] == [ids[0]]


async def test_foreign_mount_is_used_never_unmounted(fs_device, agent, conn_client):
    dev = fs_device("ext4")
    mnt = storage_root(agent) / escape_spec(str(dev))
    mnt.mkdir(parents=True)
    cmd("mount", dev, mnt)
    try:
        cid = new_id()
        assert (await connect(conn_client, "posixfs", id=cid, connection=str(dev),
                              vfs_type="ext4"))["status"] == 0
        [st] = await conn_client.call("disconnectStorageServer", domType="posixfs",
                                      connectionParams=[{"id": cid, "connection": str(dev),
                                                         "vfs_type": "ext4"}])
        assert st["status"] == 0
        assert mounted_at(mnt) == str(dev), "the agent unmounted a mount it did not make"
    finally:
        cmd("umount", mnt)
        mnt.rmdir()


async def test_restart_recovers_connections(agent_factory, fs_device, tmp_path):
    state = tmp_path / "state"
    agent = agent_factory(state)
    dev = fs_device("xfs")
    data = tmp_path / "local"
    data.mkdir()
    pid, lid = new_id(), new_id()
    async with agent.client() as c:
        assert (await connect(c, "posixfs", id=pid, connection=str(dev),
                              vfs_type="xfs"))["status"] == 0
        assert (await connect(c, "localfs", id=lid, connection=str(data)))["status"] == 0
    mnt = storage_root(agent) / escape_spec(str(dev))
    agent.kill()
    # as after a host reboot: the mount and the link are gone
    cmd("umount", mnt)
    (storage_root(agent) / escape_spec(str(data))).unlink()

    again = agent_factory(state, port=agent.port)
    async with again.client() as c:
        conns = {x["id"]: x for x in await c.call("getStorageConnections")}
        assert conns[pid]["state"] == "connected" and conns[lid]["state"] == "connected"
        assert mounted_at(mnt) == str(dev)
        assert (storage_root(again) / escape_spec(str(data))).is_symlink()
        # the remount is the agent's own: disconnect unmounts it
        await c.call("disconnectStorageServer", domType="posixfs",
                     connectionParams=[{"id": pid, "connection": str(dev), "vfs_type": "xfs"}])
        await c.call("disconnectStorageServer", domType="localfs",
                     connectionParams=[{"id": lid, "connection": str(data)}])
    assert mounted_at(mnt) is None


async def test_failed_recovery_is_reported(agent_factory, fs_device, tmp_path):
    state = tmp_path / "state"
    agent = agent_factory(state)
    data = tmp_path / "local"
    data.mkdir()
    lid = new_id()
    async with agent.client() as c:
        assert (await connect(c, "localfs", id=lid, connection=str(data)))["status"] == 0
    agent.kill()
    (storage_root(agent) / escape_spec(str(data))).unlink()
    data.rmdir()
    again = agent_factory(state, port=agent.port)
    async with again.client() as c:
        [conn] = await c.call("getStorageConnections")
        assert conn["state"] == "failed" and conn["message"]
        await c.call("disconnectStorageServer", domType="localfs",
                     connectionParams=[{"id": lid, "connection": str(data)}])
        assert await c.call("getStorageConnections") == []


def fill(directory: Path) -> Path:
    """Fill the file system of `directory` to the last block (as root: the
    reserved blocks too) with one file; return it."""
    filler = directory / "filler"
    with open(filler, "wb") as f:
        for chunk in (b"\0" * MiB, b"\0" * 4096):
            try:
                while True:
                    f.write(chunk)
                    f.flush()
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
        with contextlib.suppress(OSError):
            os.fsync(f.fileno())
    return filler


def write_error(directory: Path) -> int | None:
    """The errno of writing and syncing a new 4 KiB file in `directory` (as
    the connection check does), None if it worked."""
    probe = directory / "probe"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, b"x" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        return e.errno
    finally:
        probe.unlink(missing_ok=True)
    return None


async def test_localfs_on_full_file_system_connects(agent, make_fs_mount, conn_client):
    """A directory on a full file system is reachable: it connects, and the
    connection and the test say it is full."""
    c = conn_client
    fs = make_fs_mount("ext4", size=64 * MiB)
    data = fs.path / "data"
    data.mkdir()
    fill(fs.path)
    assert write_error(data) == errno.ENOSPC
    cid = new_id()
    assert (await connect(c, "localfs", id=cid, connection=str(data)))["status"] == 0
    [conn] = await c.call("getStorageConnections")
    assert conn["state"] == "connected" and conn["full"] is True, conn
    r = await c.call("testStorageConnection", domType="localfs",
                     connection={"id": new_id(), "connection": str(data)})
    assert r["reachable"] is True and r["details"]["full"] is True, r


async def test_full_domain_survives_restart(agent_factory, loop_device, tmp_path):
    """A full file system is full, not lost: after a restart its connection
    is up (and said to be full), its device still mounted, its domain and
    volumes still there; once space is freed, volumes can be made again."""
    state = tmp_path / "state"
    agent = agent_factory(state)
    dev = loop_device(size=64 * MiB)
    make_fs(dev, "ext4")
    params = {"id": new_id(), "connection": str(dev), "vfs_type": "ext4"}
    sd, img, vol = new_id(), new_id(), new_id()
    mnt = storage_root(agent) / escape_spec(str(dev))
    async with agent.client() as c:
        try:
            assert (await connect(c, "posixfs", **params))["status"] == 0
            await c.call("createStorageDomain", sdUUID=sd, domType="posixfs", name="full",
                         connectionId=params["id"], ovfStore=False)
            job = new_id()
            await c.call("createVolume", jobUUID=job, sdUUID=sd, imgUUID=img, volUUID=vol,
                         size=MiB, format="raw", preallocate="sparse")
            assert (await c.wait_job(job, timeout=60))["status"] == "done"
            filler = fill(mnt)
            assert write_error(mnt) == errno.ENOSPC
        except BaseException:
            await c.call("disconnectStorageServer", domType="posixfs",
                         connectionParams=[params])
            raise
    agent.stop()

    again = agent_factory(state, port=agent.port)
    async with again.client() as c:
        try:
            [conn] = await c.call("getStorageConnections")
            assert conn["state"] == "connected", conn
            assert conn["full"] is True and "no space" in conn["message"]
            assert mounted_at(mnt) == str(dev)
            info = await c.call("getStorageDomainInfo", sdUUID=sd)
            assert info["state"] == "active"
            assert await c.call("getVolumesList", sdUUID=sd, imgUUID=img) == [vol]
            stats = await c.call("getStorageDomainStats", sdUUID=sd)
            assert stats["free"] == 0 and stats["full"] is True, stats
            deadline = time.monotonic() + 30
            while (dom := (await c.call("getStats"))["domains"][sd])["monitoring"][
                    "lastCheck"] is None:
                assert time.monotonic() < deadline, "no monitoring check in 30 s"
                await asyncio.sleep(0.1)
            assert dom["monitoring"]["state"] == "ok" and dom["full"] is True, dom
            r = await c.call("testStorageConnection", domType="posixfs", connection=params)
            assert r["reachable"] is True and r["details"]["full"] is True, r

            filler.unlink()
            job, vol2 = new_id(), new_id()
            await c.call("createVolume", jobUUID=job, sdUUID=sd, imgUUID=new_id(),
                         volUUID=vol2, size=MiB, format="raw", preallocate="sparse")
            assert (await c.wait_job(job, timeout=60))["status"] == "done"
            r = await c.call("testStorageConnection", domType="posixfs", connection=params)
            assert r["reachable"] is True and r["details"]["full"] is False, r
        finally:
            await c.call("disconnectStorageServer", domType="posixfs",
                         connectionParams=[params])
    assert mounted_at(mnt) is None


# ---- validation: table of bad inputs ----------------------------------------------

U = "1b4e28ba-2fa1-4d3b-a3f5-ef19b5a7633b"

BAD = [
    ("nfs", {"id": U}, "connectionParams[0].connection", "missing"),
    ("nfs", {"id": U, "connection": ""}, "connectionParams[0].connection", "empty"),
    ("nfs", {"id": U, "connection": "/export"}, "connectionParams[0].connection",
     "server:/export"),
    ("nfs", {"id": U, "connection": "-oexec:/x"}, "connectionParams[0].connection", "'-'"),
    ("nfs", {"id": U, "connection": "srv:/x\n/y"}, "connectionParams[0].connection",
     "control"),
    ("nfs", {"id": U, "connection": "srv:/x", "protocol_version": "5"},
     "connectionParams[0].protocol_version", "one of"),
    ("nfs", {"id": U, "connection": "srv:/x", "timeout": 0}, "connectionParams[0].timeout",
     "at least"),
    ("nfs", {"id": U, "connection": "srv:/x", "mnt_options": "rw,bind"},
     "connectionParams[0].mnt_options", "not allowed"),
    ("nfs", {"id": U, "connection": "srv:/x", "mnt_options": "a b"},
     "connectionParams[0].mnt_options", "not allowed"),
    ("posixfs", {"id": U, "connection": "/dev/x"}, "connectionParams[0].vfs_type", "missing"),
    ("posixfs", {"id": U, "connection": "/dev/x", "vfs_type": ""},
     "connectionParams[0].vfs_type", "empty"),
    ("posixfs", {"id": U, "connection": "/dev/x", "vfs_type": "ext4 -o"},
     "connectionParams[0].vfs_type", "file system type"),
    ("posixfs", {"id": U, "connection": "--bind", "vfs_type": "ext4"},
     "connectionParams[0].connection", "'-'"),
    ("localfs", {"id": U, "connection": "relative/dir"}, "connectionParams[0].connection",
     "absolute"),
    ("localfs", {"id": U, "connection": "/a\x00b"}, "connectionParams[0].connection",
     "control"),
    ("localfs", {"id": "nope", "connection": "/x"}, "connectionParams[0].id", "UUID"),
    ("localfs", {"connection": "/x"}, "connectionParams[0].id", "missing"),
    ("localfs", {"id": U, "connection": "/x", "vfs_type": "ext4"},
     "connectionParams[0].vfs_type", "unknown"),
    ("iscsi", {"id": U, "connection": "127.0.0.1"}, "connectionParams[0].iqn", "missing"),
    ("iscsi", {"id": U, "connection": "127.0.0.1", "iqn": "iqn.2024-01.x:t", "port": 0},
     "connectionParams[0].port", "at least 1"),
    ("iscsi", {"id": U, "connection": "127.0.0.1", "iqn": "iqn.2024-01.x:t", "port": 70000},
     "connectionParams[0].port", "at most"),
    ("iscsi", {"id": U, "connection": "127.0.0.1", "iqn": "-iqn"}, "connectionParams[0].iqn",
     "'-'"),
    ("iscsi", {"id": U, "connection": "127.0.0.1", "iqn": "target1"},
     "connectionParams[0].iqn", "iSCSI name"),
    ("iscsi", {"id": U, "connection": "127.0.0.1", "iqn": "iqn.2024-01.x:t", "user": "u"},
     "connectionParams[0].password", "both"),
    ("iscsi", {"id": U, "connection": "host name", "iqn": "iqn.2024-01.x:t"},
     "connectionParams[0].connection", "host name"),
]


@pytest.mark.parametrize("dom_type, params, field, reason", BAD,
                         ids=[f"{b[0]}-{b[2].rsplit('.', 1)[-1]}-{i}" for i, b in
                              enumerate(BAD)])
async def test_bad_connection_params(agent, client, dom_type, params, field, reason):
    before = mounts_under(agent.state_dir.resolve())
    for verb in ("connectStorageServer", "disconnectStorageServer"):
        with pytest.raises(RpcError) as e:
            await client.call(verb, domType=dom_type, connectionParams=[params])
        assert e.value.code == -32602
        assert e.value.data["field"] == field, e.value.data
        assert reason in e.value.data["reason"], e.value.data
    for verb in ("testStorageConnection", "updateStorageConnection"):
        with pytest.raises(RpcError) as e:
            await client.call(verb, domType=dom_type, connection=params)
        assert e.value.code == -32602
        assert e.value.data["field"] == field.replace("connectionParams[0]", "connection")
    assert await client.call("getStorageConnections") == []
    assert mounts_under(agent.state_dir.resolve()) == before


async def test_bad_dom_type_and_shapes(client):
    cases = [
        ({"domType": "ceph", "connectionParams": [{"id": U}]}, "domType"),
        ({"domType": "nfs", "connectionParams": []}, "connectionParams"),
        ({"domType": "nfs", "connectionParams": {"id": U}}, "connectionParams"),
        ({"domType": "localfs", "connectionParams": [{"id": U, "connection": "/a"},
                                                     {"id": U, "connection": "/b"}]},
         "connectionParams"),
    ]
    for params, field in cases:
        with pytest.raises(RpcError) as e:
            await client.call("connectStorageServer", **params)
        assert e.value.code == -32602 and e.value.data["field"] == field
