"""VDSM's conditions that only happen on real iSCSI, multipath and NFS (the
lab guest), through the real agent: each answers VDSM's code (and, for a
verb's error, VDSM's name in data.name), and leaves storage as it was.
The host-tier ones are in tests/integration/test_errors_host.py."""

from __future__ import annotations

import asyncio
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from rpc.client import Client, RpcError
from tests.agentproc import AgentProcess
from tests.integration.test_domains_file import Storage, create_volume, run_job
from tests.lab import guestlib as g
from tests.lab.test_connections_lab import (
    connect,
    disconnect,
    disconnect_all,
    iscsi_params,
    node_records,
    sessions,
    start_agent,
    stop_agent,
)

MiB = 1 << 20


def new_id() -> str:
    return str(uuid.uuid4())


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    a = start_agent(tmp_path_factory.mktemp("errors-agent") / "state")
    try:
        yield a
    finally:
        asyncio.run(stop_agent(a))


@pytest.fixture
async def client(agent: AgentProcess) -> AsyncIterator[Client]:
    """A client; every connection a test left is disconnected after it (ask
    for target fixtures before this one, so they are torn down after it)."""
    async with agent.client() as c:
        try:
            yield c
        finally:
            for st in await disconnect_all(c):
                assert st["status"] == 0, st


def expect(e: pytest.ExceptionInfo[RpcError], code: int, name: str) -> None:
    assert (e.value.code, e.value.data["name"]) == (code, name), e.value


def head(path: object, size: int = MiB) -> bytes:
    with open(str(path), "rb") as f:
        return f.read(size)


def vg_names() -> list[str]:
    return g.lvm("vgs", "--noheadings", "-o", "vg_name").split()


# ---- block sizes (517, 518) ---------------------------------------------------------------

async def test_block_domain_over_mixed_or_odd_block_sizes(
        make_target: Callable[..., g.Target], multipathd: g.Multipathd,
        client: Client) -> None:
    """LUNs of 512 and 4096-byte blocks in one domain: 517; a LUN of 2048-byte
    blocks (neither size VDSM supports): 518. Nothing is written to them."""
    target = make_target("blocksizes", (64 * MiB,) * 3, block_sizes=(512, 4096, 2048))
    params = iscsi_params(target)
    [st] = await connect(client, "iscsi", params)
    assert st["status"] == 0, st
    try:
        guids = [d["guid"] for d in await client.call("getDeviceList")
                 if {p["iqn"] for p in d["pathlist"]} == {target.iqn}]
        # {logical block size the host sees: guid}
        by_size = {int(g.run("blockdev", "--getss",
                             f"/dev/mapper/{g.Multipathd.map_name(guid)}")): guid
                   for guid in guids}
        assert sorted(by_size) == [512, 2048, 4096], by_size
        before = [head(lun.path) for lun in target.luns]
        cases = [([by_size[512], by_size[4096]], 517, "VolumeGroupBlockSizeError"),
                 ([by_size[2048]], 518, "DeviceBlockSizeError")]
        for devices, code, name in cases:
            sd = new_id()
            with pytest.raises(RpcError) as e:
                await client.call("createStorageDomain", sdUUID=sd, domType="iscsi",
                                  name="blocksize", devices=devices)
            expect(e, code, name)
            assert sd not in await client.call("getStorageDomainsList")
            assert sd not in vg_names()
        assert [head(lun.path) for lun in target.luns] == before
        assert all(d["status"] == "free"
                   for d in await client.call("getDeviceList", guids=guids))
    finally:
        [st] = await disconnect(client, "iscsi", params)
        assert st["status"] == 0, st


# ---- multipath (467) ---------------------------------------------------------------------

async def test_lun_listing_with_multipathd_stopped_is_467(
        make_target: Callable[..., g.Target], multipathd: g.Multipathd,
        client: Client) -> None:
    """multipathd stopped while its map of a connected LUN stays in
    device-mapper: getDeviceList and a domain on the LUN answer 467, not
    "no LUN" (an empty list, 606); once multipathd is back, the LUN is
    listed again, untouched."""
    target = make_target("mpathdown", (16 * MiB,))
    params = iscsi_params(target)
    [st] = await connect(client, "iscsi", params)
    assert st["status"] == 0, st
    [lun] = [d for d in await client.call("getDeviceList")
             if {p["iqn"] for p in d["pathlist"]} == {target.iqn}]
    name = g.Multipathd.map_name(lun["guid"])
    multipathd.daemon.stop()
    try:
        assert name in g.run("dmsetup", "ls", "--target", "multipath")
        with pytest.raises(RpcError) as e:
            await client.call("getDeviceList")
        expect(e, 467, "MultipathSetupError")
        sd = new_id()
        with pytest.raises(RpcError) as e:
            await client.call("createStorageDomain", sdUUID=sd, domType="iscsi",
                              name="mpathdown", devices=[lun["guid"]])
        expect(e, 467, "MultipathSetupError")
        assert sd not in vg_names()
    finally:
        multipathd.start()
    # a restarted multipathd checks its paths anew: until the first check is
    # done a path's checker reads "i/o pending", not the "ready" of before
    multipathd.wait_active_paths(lun["guid"], len(lun["pathstatus"]))
    assert await client.call("getDeviceList", guids=[lun["guid"]]) == [lun]


# ---- iSCSI logout (474) ------------------------------------------------------------------

async def test_logout_without_iscsid_is_474(make_target: Callable[..., g.Target],
                                            multipathd: g.Multipathd,
                                            iscsi_initiator: g.Initiator,
                                            client: Client) -> None:
    """iscsiadm logs out through iscsid: with iscsid gone the logout fails,
    the disconnect answers 474 and the connection stays known, so a second
    disconnect once iscsid is back finishes the job."""
    target = make_target("logout", (16 * MiB,))
    params = iscsi_params(target)
    [st] = await connect(client, "iscsi", params)
    assert st["status"] == 0, st
    assert len(sessions(target)) == 1
    iscsi_initiator.daemon.stop()
    try:
        [st] = await disconnect(client, "iscsi", params)
        assert st["status"] == 474, st
        assert target.iqn in st["message"], st
        assert len(sessions(target)) == 1
        assert params["id"] in {c["id"] for c in await client.call("getStorageConnections")}
    finally:
        iscsi_initiator.start()
    [session] = sessions(target)
    seen: list[str] = []

    def synced() -> bool:
        # a restarted iscsid takes over running sessions in the background; a
        # logout before it has is refused (32, "target likely not connected")
        out = g.run("iscsiadm", "-m", "session", "-r", str(session.sid), "-P", "1")
        seen[:] = [out]
        return "iscsid Session State: NO CHANGE" in out

    try:
        g.wait_until(synced, f"iscsid to take over session {session.sid}", 30)
    except TimeoutError:
        raise AssertionError(seen) from None
    [st] = await disconnect(client, "iscsi", params)
    assert st["status"] == 0, st
    assert sessions(target) == []
    assert not [n for n in node_records() if target.iqn in n]
    assert params["id"] not in {c["id"] for c in await client.call("getStorageConnections")}


# ---- stale NFS handle (384) --------------------------------------------------------------

async def test_nfs_domain_with_stale_handles_is_384(nfs_server: g.NfsServer,
                                                    client: Client) -> None:
    """The server exports the domain's directory under another fsid (what an
    export moved to another file system or re-created looks like to a
    client): every file handle the host holds, the mount's root too, is
    stale (ESTALE). The verbs answer 384, and nothing is lost: once the
    export is back, the volume is as it was."""
    sub = nfs_server.exports[0] / f"stale-{uuid.uuid4().hex[:6]}"
    sub.mkdir()
    fsid = 30000 + os.getpid() % 10000

    def export(fsid: int) -> None:
        g.run("exportfs", "-o", f"{g.NfsServer.OPTIONS},fsid={fsid}", f"127.0.0.1:{sub}")

    steps = g.Cleanup()
    steps.push(f"remove {sub}", lambda: shutil.rmtree(sub))
    steps.push("unexport", lambda: g.run("exportfs", "-u", f"127.0.0.1:{sub}"))
    export(fsid)
    s = Storage(client, "nfs", {"connection": f"127.0.0.1:{sub}", "protocol_version": "3"})
    try:
        await s.connect()
        await s.create_domain(name="stale")
        img, vol = new_id(), new_id()
        await create_volume(client, s.sd, img, vol, size=MiB, fmt="raw")
        before = await client.call("getVolumeInfo", sdUUID=s.sd, imgUUID=img, volUUID=vol)

        g.run("exportfs", "-u", f"127.0.0.1:{sub}")
        export(fsid + 1)
        calls: list[tuple[str, dict[str, Any]]] = [
            ("getImagesList", {}),
            ("getVolumesList", dict(imgUUID=img)),
            ("getVolumeInfo", dict(imgUUID=img, volUUID=vol)),
        ]
        for verb, params in calls:
            with pytest.raises(RpcError) as e:
                await client.call(verb, sdUUID=s.sd, **params)
            assert (verb, e.value.code, e.value.data["name"]) == \
                (verb, 384, "FileStorageDomainStaleNFSHandle"), e.value
        info = await run_job(client, "createVolume", sdUUID=s.sd, imgUUID=new_id(),
                             volUUID=new_id(), size=MiB, format="raw", preallocate="sparse")
        assert (info["status"], info["error"]["code"], info["error"]["data"]["name"]) == \
            ("failed", 384, "FileStorageDomainStaleNFSHandle"), info

        g.run("exportfs", "-u", f"127.0.0.1:{sub}")
        export(fsid)
        assert await client.call("getVolumeInfo", sdUUID=s.sd, imgUUID=img,
                                 volUUID=vol) == before
        assert await client.call("getVolumesList", sdUUID=s.sd, imgUUID=img) == [vol]
        assert await client.call("getImagesList", sdUUID=s.sd) == [img]
    finally:
        # the first export back (a no-op when it is), so the mount can go
        g.run_ok("exportfs", "-u", f"127.0.0.1:{sub}")
        export(fsid)
        try:
            await s.disconnect()
        finally:
            steps.run()
