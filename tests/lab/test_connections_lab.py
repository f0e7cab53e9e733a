"""Storage connections through the agent's JSON-RPC API, on real NFS, iSCSI
and multipath in the lab guest: NFS versions, iSCSI with and without CHAP,
one LUN over two portals, path loss, fail-over to a replica by editing the
connection, tests that change nothing, discovery, recovery after a crash."""

from __future__ import annotations

import asyncio
import os
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from rpc.client import Client, RpcError
from storage.connections.filebased import escape_spec
from tests.agentproc import AgentProcess
from tests.lab import guestlib as g

MiB = 1 << 20
CHAP_SECRET = "lab-chap-Secret-9f3"
WRONG_SECRET = "lab-wrong-Secret-77"
ADMIN_SECRET = "lab-admin-Secret-31"
PORTAL1, PORTAL2 = (p.split(":")[0] for p in g.PORTALS)


def new_id() -> str:
    return str(uuid.uuid4())


def start_agent(state_dir: Path) -> AgentProcess:
    agent = AgentProcess(state_dir)
    g.LOG_DIR.mkdir(parents=True, exist_ok=True)
    agent.log_path = g.LOG_DIR / f"agent-conn-{agent.port}.log"
    return agent.start(timeout=60)


async def disconnect_all(client: Client) -> list[dict[str, Any]]:
    statuses = []
    for conn in await client.call("getStorageConnections"):
        params = {"id": conn["id"], **conn["params"]}
        if "password" in params:
            params["password"] = "masked-but-unused"
        statuses += await client.call("disconnectStorageServer", domType=conn["type"],
                                      connectionParams=[params])
    return statuses


async def stop_agent(agent: AgentProcess) -> None:
    """Disconnect what the agent still holds, then stop it (status 0)."""
    if agent.proc is not None and agent.proc.poll() is None:
        async with agent.client() as c:
            await disconnect_all(c)
    rc = agent.stop()
    assert rc == 0, f"agent exit status {rc}; log:\n{agent.log()}"


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    a = start_agent(tmp_path_factory.mktemp("conn-agent") / "state")
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


async def connect(c: Client, dom_type: str, *params: dict[str, Any]) -> list[dict[str, Any]]:
    return list(await c.call("connectStorageServer", domType=dom_type,
                             connectionParams=list(params)))


async def disconnect(c: Client, dom_type: str, *params: dict[str, Any]) -> list[dict[str, Any]]:
    return list(await c.call("disconnectStorageServer", domType=dom_type,
                             connectionParams=list(params)))


def iscsi_params(target: g.Target, address: str = PORTAL1, **extra: Any) -> dict[str, Any]:
    return {"id": new_id(), "connection": address, "port": 3260, "iqn": target.iqn, **extra}


# ---- host state, seen with the tools -------------------------------------------------

def sessions(target: g.Target) -> list[g.Session]:
    return g.Initiator.sessions(target)


def node_records() -> list[str]:
    out = subprocess.run(["iscsiadm", "-m", "node"], capture_output=True, text=True,
                         stdin=subprocess.DEVNULL)
    assert out.returncode in (0, 21), out.stderr   # 21: no records
    return sorted(out.stdout.splitlines())


def iscsi_db() -> list[str]:
    return sorted(str(p) for p in Path("/etc/iscsi").rglob("*"))


def map_names() -> dict[str, str]:
    """{wwid: map name} from multipathd."""
    out = g.run("multipathd", "show", "maps", "raw", "format", "%w|%n")
    return dict(line.split("|", 1) for line in out.splitlines() if "|" in line)


def dm_names() -> list[str]:
    out = g.run("dmsetup", "ls")
    return [] if "No devices found" in out else [line.split()[0] for line in out.splitlines()]


def assert_gone(target: g.Target, wwid: str, disks: list[str]) -> None:
    """No session, node record, map or disk of target is left."""
    assert sessions(target) == []
    assert not [n for n in node_records() if target.iqn in n]
    assert wwid not in map_names()
    names = map_names()
    assert all(n in names.values() for n in dm_names() if n.startswith("mpath")), dm_names()
    assert [d for d in disks if Path("/sys/block", d).exists()] == []


async def lun(c: Client, wwid: str | None = None, **kw: Any) -> dict[str, Any]:
    luns = await c.call("getDeviceList", **({"guids": [wwid]} if wwid else {}), **kw)
    assert len(luns) == 1, luns
    return dict(luns[0])


async def conn_details(c: Client, conn_id: str) -> dict[str, Any]:
    [conn] = [x for x in await c.call("getStorageConnections") if x["id"] == conn_id]
    return dict(conn)


# ---- NFS -----------------------------------------------------------------------------

@pytest.mark.parametrize("version, spec, negotiated", [
    ("3", "127.0.0.1:/srv/export", "3"),
    ("4.2", "127.0.0.1:/export", "4.2"),
    ("auto", "127.0.0.1:/export", "4.2"),
])
async def test_nfs_versions(nfs_server: g.NfsServer, agent: AgentProcess, client: Client,
                            version: str, spec: str, negotiated: str) -> None:
    cid = new_id()
    params = {"id": cid, "connection": spec, "protocol_version": version}
    assert await connect(client, "nfs", params) == [{"id": cid, "status": 0, "message": "OK"}]
    conn = await conn_details(client, cid)
    assert conn["state"] == "connected"
    assert conn["details"]["version"] == negotiated, conn["details"]
    mnt = agent.state_dir / "storage" / escape_spec(spec)
    assert os.path.ismount(mnt)
    name = f"agent-{version}-{cid[:8]}.txt"
    (mnt / name).write_text(f"written through NFS {version}\n")
    assert (nfs_server.exports[0] / name).read_text() == f"written through NFS {version}\n"
    assert await disconnect(client, "nfs", params) == [{"id": cid, "status": 0,
                                                        "message": "OK"}]
    assert not os.path.ismount(mnt)
    assert await client.call("getStorageConnections") == []
    (nfs_server.exports[0] / name).unlink()


# ---- iSCSI ---------------------------------------------------------------------------

async def test_iscsi_chap(make_target: Callable[..., g.Target], multipathd: g.Multipathd,
                          agent: AgentProcess, client: Client) -> None:
    target = make_target("agentchap", (64 * MiB,), chap=g.Chap("labuser", CHAP_SECRET))
    nodes_before = node_records()
    wrong = iscsi_params(target, user="labuser", password=WRONG_SECRET)
    [st] = await connect(client, "iscsi", wrong)
    assert st["status"] == 476, st   # iSCSILoginAuthError
    assert "CHAP authentication failed" in st["message"] and WRONG_SECRET not in str(st)
    # nothing half-made: no session, the node record the agent made is gone
    assert sessions(target) == [] and node_records() == nodes_before
    assert await client.call("getStorageConnections") == []

    good = iscsi_params(target, user="labuser", password=CHAP_SECRET)
    [st] = await connect(client, "iscsi", good)
    assert st["status"] == 0, st
    [session] = sessions(target)
    conn = await conn_details(client, good["id"])
    assert conn["params"]["password"] == "********" and conn["state"] == "connected"
    assert conn["details"]["disks"] == list(session.disks)
    wwid = conn["details"]["luns"][0]["guid"]
    got = await lun(client, wwid)
    assert got["capacity"] == 64 * MiB and got["pathlist"][0]["iqn"] == target.iqn
    assert got["status"] == "free" and got["vendorID"] == "IET"
    # data on the LUN: only the deep check (checkStatus) looks for signatures
    g.run("mkfs.ext4", "-q", "-F", got["path"])
    assert (await lun(client, wwid))["status"] == "free"
    deep = await lun(client, wwid, checkStatus=True)
    assert deep["status"] == "used" and "ext4" in deep["statusReason"], deep
    g.run("wipefs", "-q", "-a", got["path"])
    # an LVM PV in a VG: its ids, and used
    g.lvm("pvcreate", "-q", got["path"])
    g.lvm("vgcreate", "-q", "vgchap", got["path"])
    try:
        pv = await lun(client, wwid)
        uuids = g.lvm("pvs", "--noheadings", "-o", "pv_uuid,vg_uuid", got["path"]).split()
        assert [pv["pvUUID"], pv["vgUUID"]] == uuids and pv["status"] == "used"
    finally:
        g.lvm_wipe(got["path"])
    # same id and parameters again: idempotent; the same target under another id: refused
    assert (await connect(client, "iscsi", good))[0]["status"] == 0
    assert (await connect(client, "iscsi", {**good, "id": new_id()}))[0]["status"] == 2103

    [st] = await disconnect(client, "iscsi", good)
    assert st["status"] == 0, st
    assert_gone(target, wwid, list(session.disks))
    assert node_records() == nodes_before
    everything = [agent.log(), str(await client.call("getStorageConnections"))]
    for secret in (CHAP_SECRET, WRONG_SECRET):
        assert all(secret not in text for text in everything)


async def test_one_lun_two_portals_one_map_and_path_loss(
        make_target: Callable[..., g.Target], multipathd: g.Multipathd,
        client: Client) -> None:
    target = make_target("twoportals", (128 * MiB,))
    p1, p2 = iscsi_params(target, PORTAL1), iscsi_params(target, PORTAL2)
    # both logins in one call: they run in parallel
    assert [s["status"] for s in await connect(client, "iscsi", p1, p2)] == [0, 0]
    assert sorted(s.portal for s in sessions(target)) == sorted(g.PORTALS)
    disks = [d for s in sessions(target) for d in s.disks]
    wwid = (await conn_details(client, p1["id"]))["details"]["luns"][0]["guid"]

    dev = await lun(client, wwid)
    assert len(await client.call("getDeviceList")) >= 1
    assert sorted(p["physdev"] for p in dev["pathstatus"]) == sorted(disks)
    assert [p["state"] for p in dev["pathstatus"]] == ["active", "active"]
    assert sorted(p["portal"] for p in dev["pathlist"]) == sorted(g.PORTALS)
    assert {p["iqn"] for p in dev["pathlist"]} == {target.iqn}
    assert dev["capacity"] == 128 * MiB and dev["pathstatus"][0]["lun"] == 1
    before = os.urandom(MiB)
    g.direct_write(dev["path"], before)

    # one portal's connection goes: its path leaves the map, I/O goes on
    [lost] = [s for s in sessions(target) if s.portal == g.PORTALS[1]]
    assert (await disconnect(client, "iscsi", p2))[0]["status"] == 0
    assert [s.portal for s in sessions(target)] == [g.PORTALS[0]]
    dev = await lun(client, wwid)
    states = {p["physdev"]: p["state"] for p in dev["pathstatus"]}
    assert all(states.get(d, "failed") == "failed" for d in lost.disks), states
    assert [s for s in states.values() if s == "active"] == ["active"]
    assert [p["portal"] for p in dev["pathlist"]] == [g.PORTALS[0]]
    after = os.urandom(MiB)
    g.direct_write(dev["path"], after, offset=4 * MiB)
    assert g.direct_read(dev["path"], MiB) == before
    assert g.direct_read(dev["path"], MiB, offset=4 * MiB) == after

    # the last path: refused while the map is open, then everything goes
    with open(dev["path"], "rb"):
        [st] = await disconnect(client, "iscsi", p1)
        assert st["status"] == 452 and "in use" in st["message"], st
        assert len(sessions(target)) == 1 and wwid in map_names()
    assert (await disconnect(client, "iscsi", p1))[0]["status"] == 0
    assert_gone(target, wwid, disks)


async def test_update_fails_over_to_replica(make_target: Any, multipathd: g.Multipathd,
                                            client: Client) -> None:
    primary = make_target("primary", (64 * MiB,))
    params = iscsi_params(primary)
    assert (await connect(client, "iscsi", params))[0]["status"] == 0
    wwid = (await conn_details(client, params["id"]))["details"]["luns"][0]["guid"]
    data = os.urandom(2 * MiB)
    g.direct_write((await lun(client, wwid))["path"], data, offset=MiB)

    # the array replicates the LUN to another target (same WWID, as LUN
    # replication keeps it); the primary fails; the admin edits the connection
    replica = make_target.replica(primary)
    moved = {**params, "iqn": replica.iqn}
    updated = await client.call("updateStorageConnection", domType="iscsi", connection=moved)
    assert updated["id"] == params["id"] and updated["params"]["iqn"] == replica.iqn
    assert sessions(primary) == [] and len(sessions(replica)) == 1
    dev = await lun(client, wwid)
    assert [p["iqn"] for p in dev["pathlist"]] == [replica.iqn]
    assert g.direct_read(dev["path"], len(data), offset=MiB) == data

    # an edit to a target that does not exist fails, and the replica stays in use
    with pytest.raises(RpcError) as failed:
        await client.call("updateStorageConnection", domType="iscsi",
                          connection={**moved, "iqn": f"{g.IQN_BASE}:no-such-target"})
    assert failed.value.code == 451, failed.value
    conn = await conn_details(client, params["id"])
    assert conn["params"]["iqn"] == replica.iqn and conn["state"] == "connected"
    assert len(sessions(replica)) == 1
    dev = await lun(client, wwid)
    assert g.direct_read(dev["path"], len(data), offset=MiB) == data

    assert (await disconnect(client, "iscsi", moved))[0]["status"] == 0
    assert_gone(replica, wwid, conn["details"]["disks"])


async def test_initiator_name_gets_an_iface_of_its_own(make_target: Callable[..., g.Target],
                                                      multipathd: g.Multipathd,
                                                      client: Client) -> None:
    target = make_target("initiator", (16 * MiB,))
    name = "iqn.2024-01.lab.local:host-under-test"
    params = iscsi_params(target, initiatorName=name)
    [st] = await connect(client, "iscsi", params)
    assert st["status"] == 0, st
    [session] = sessions(target)
    sysfs = Path(f"/sys/class/iscsi_session/session{session.sid}")
    iface = (sysfs / "ifacename").read_text().strip()
    assert iface.startswith("hostagent-")
    assert (sysfs / "initiatorname").read_text().strip() == name
    assert (await disconnect(client, "iscsi", params))[0]["status"] == 0
    assert sessions(target) == []
    out = subprocess.run(["iscsiadm", "-m", "iface", "-I", iface], capture_output=True,
                         text=True, stdin=subprocess.DEVNULL)
    assert out.returncode != 0, out.stdout   # the agent's iface is gone with its connection


async def test_test_and_discovery_change_nothing(make_target: Callable[..., g.Target],
                                                 client: Client) -> None:
    target = make_target("probe", (16 * MiB,))
    before = (iscsi_db(), node_records(), g.Initiator.sessions())
    for portal in g.PORTALS:
        address = portal.split(":")[0]
        found = await client.call("discoverSendTargets", connection=address, port=3260)
        assert {"iqn": target.iqn, "portal": portal, "tpgt": 1, "connection": address,
                "port": 3260} in found
    good = iscsi_params(target, PORTAL2)
    r = await client.call("testStorageConnection", domType="iscsi", connection=good)
    assert r["reachable"] is True and r["details"]["loggedIn"] is False, r
    for bad, why in (({"port": 3261}, "cannot connect"),
                     ({"iqn": f"{g.IQN_BASE}:not-there"}, "does not offer")):
        r = await client.call("testStorageConnection", domType="iscsi",
                              connection={**good, **bad})
        assert r["reachable"] is False and why in r["message"], r
    with pytest.raises(RpcError) as refused:
        await client.call("discoverSendTargets", connection=PORTAL1, port=3261)
    assert refused.value.code == 451
    with pytest.raises(RpcError) as invalid:
        await client.call("discoverSendTargets", connection="-oops", port=3260)
    assert invalid.value.code == -32602
    assert (iscsi_db(), node_records(), g.Initiator.sessions()) == before

    # fcp: nothing to log in to; this host has no FC HBA
    fc = {"id": new_id()}
    assert (await connect(client, "fcp", fc))[0]["status"] == 0
    r = await client.call("testStorageConnection", domType="fcp", connection=fc)
    assert r["reachable"] is False and "FC" in r["message"]
    assert (await disconnect(client, "fcp", fc))[0]["status"] == 0


@pytest.fixture
def discovery_chap(target_server: g.TargetServer) -> Iterator[g.Chap]:
    """CHAP for every SendTargets discovery on tgtd (an account bound with no
    target id is tgtd's discovery account), removed after the test."""
    chap = g.Chap("labdisco", CHAP_SECRET)
    target_server.tgtadm("--op", "new", "--mode", "account", "--user", chap.username,
                         "--password", chap.password)
    try:
        target_server.tgtadm("--op", "bind", "--mode", "account", "--user", chap.username)
        yield chap
    finally:
        target_server.tgtadm("--op", "delete", "--mode", "account", "--user", chap.username)


async def test_discovery_with_chap(make_target: Callable[..., g.Target],
                                   discovery_chap: g.Chap, agent: AgentProcess,
                                   client: Client) -> None:
    target = make_target("discochap", (16 * MiB,))
    before = (iscsi_db(), node_records(), g.Initiator.sessions())
    db = Path("/etc/iscsi/send_targets")
    rec = ["iscsiadm", "-m", "discoverydb", "-t", "st", "-p", f"{PORTAL1}:3260"]
    # first with no discovery record of the portal on the host (another
    # test's discovery may have left one): the one made for the call goes
    subprocess.run([*rec, "-o", "delete"], capture_output=True, check=False)
    before = (iscsi_db(), node_records(), g.Initiator.sessions())
    db_before = sorted(db.iterdir()) if db.exists() else []
    portal = g.PORTALS[0]
    # the portal now wants CHAP for discovery: without it, or with a wrong
    # secret, discovery fails as VDSM's does (475 iSCSIDiscoveryError)
    for creds in ({}, {"user": discovery_chap.username, "password": WRONG_SECRET}):
        with pytest.raises(RpcError) as e:
            await client.call("discoverSendTargets", connection=PORTAL1, port=3260, **creds)
        assert (e.value.code, e.value.name) == (475, "iSCSIDiscoveryError"), e.value
        assert WRONG_SECRET not in str(e.value) + str(e.value.data)
    found = await client.call("discoverSendTargets", connection=PORTAL1, port=3260,
                              user=discovery_chap.username, password=CHAP_SECRET)
    assert {"iqn": target.iqn, "portal": portal, "tpgt": 1, "connection": PORTAL1,
            "port": 3260} in found
    assert CHAP_SECRET not in str(found)
    with pytest.raises(RpcError) as e:
        await client.call("discoverSendTargets", connection=PORTAL1, port=3260,
                          user=discovery_chap.username)
    assert e.value.code == -32602 and e.value.data["field"] == "password", e.value
    # no record left on the host (the discovery db one held the secret);
    # iscsiadm keeps the directory of its discovery db (with what other
    # tests' discoveries left there), no record of this one
    assert (sorted(db.iterdir()) if db.exists() else []) == db_before
    assert ([p for p in iscsi_db() if p != str(db)], node_records(),
            g.Initiator.sessions()) == ([p for p in before[0] if p != str(db)], *before[1:])
    for secret in (CHAP_SECRET, WRONG_SECRET):
        assert secret not in agent.log()
        assert not any(secret.encode() in p.read_bytes()
                       for p in Path("/etc/iscsi").rglob("*") if p.is_file())
    # then with the host's own record of the portal (an admin's discovery,
    # with CHAP settings of its own): used for the call and given back as it
    # was, neither deleted nor left with the call's secret
    g.run(*rec, "-o", "new")
    try:
        g.run(*rec, "-o", "update", "-n", "discovery.sendtargets.auth.authmethod", "-v", "CHAP",
              "-n", "discovery.sendtargets.auth.username", "-v", "admin",
              "-n", "discovery.sendtargets.auth.password", "-v", ADMIN_SECRET,
              "-n", "discovery.sendtargets.timeo.login_timeout", "-v", "17")
        shown = g.run(*rec, "-o", "show", "-S")
        assert found == await client.call("discoverSendTargets", connection=PORTAL1, port=3260,
                                          user=discovery_chap.username, password=CHAP_SECRET)
        assert g.run(*rec, "-o", "show", "-S") == shown
        assert not any(CHAP_SECRET.encode() in p.read_bytes()
                       for p in Path("/etc/iscsi").rglob("*") if p.is_file())
        assert ADMIN_SECRET not in agent.log()
    finally:
        g.run(*rec, "-o", "delete")


async def test_restart_reestablishes_a_lost_session(
        make_target: Callable[..., g.Target], multipathd: g.Multipathd,
        tmp_path: Path) -> None:
    target = make_target("recover", (32 * MiB,))
    agent = start_agent(tmp_path / "state")
    params = iscsi_params(target)
    try:
        async with agent.client() as c:
            assert (await connect(c, "iscsi", params))[0]["status"] == 0
            wwid = (await conn_details(c, params["id"]))["details"]["luns"][0]["guid"]
        agent.kill()
        g.run("iscsiadm", "-m", "node", "-T", target.iqn, "-p", g.PORTALS[0], "--logout")
        assert sessions(target) == []
        g.wait_until(lambda: wwid not in map_names(), "the map to go", 10)
        agent = start_agent(tmp_path / "state")
        [session] = sessions(target)
        async with agent.client() as c:
            conn = await conn_details(c, params["id"])
            assert conn["state"] == "connected", conn
            dev = await lun(c, wwid)
            assert [p["state"] for p in dev["pathstatus"]] == ["active"]
            assert (await disconnect(c, "iscsi", params))[0]["status"] == 0
        assert_gone(target, wwid, list(session.disks))
    finally:
        await stop_agent(agent)


# ---- VDSM's iSCSI error codes ----------------------------------------------------------

@pytest.fixture
async def not_iscsi() -> AsyncIterator[int]:
    """A TCP port that accepts and closes at once: reachable, but no iSCSI."""
    async def close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(close, PORTAL1, 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def test_iscsi_errors_have_vdsm_codes(make_target: Callable[..., g.Target],
                                            multipathd: g.Multipathd, not_iscsi: int,
                                            client: Client) -> None:
    before = (iscsi_db(), node_records(), g.Initiator.sessions())
    # a portal that answers TCP but fails discovery: 475 iSCSIDiscoveryError
    with pytest.raises(RpcError) as e:
        await client.call("discoverSendTargets", connection=PORTAL1, port=not_iscsi)
    assert (e.value.code, e.value.name) == (475, "iSCSIDiscoveryError"), e.value
    # a portal address that is no address (not IPv4, and no host name since
    # it is all numbers): 472 InvalidIpAddress, for discovery and connect
    with pytest.raises(RpcError) as e:
        await client.call("discoverSendTargets", connection="300.1.1.1", port=3260)
    assert (e.value.code, e.value.name) == (472, "InvalidIpAddress"), e.value
    target = make_target("vdsmcodes", (16 * MiB,))
    [st] = await connect(client, "iscsi", iscsi_params(target, "300.1.1.1"))
    assert st["status"] == 472, st
    assert (iscsi_db(), node_records(), g.Initiator.sessions()) == before

    # a LUN this host no longer sees (its session gone): 606 InaccessiblePhysDev
    params = iscsi_params(target)
    [st] = await connect(client, "iscsi", params)
    assert st["status"] == 0, st
    [guid] = [d["guid"] for d in await client.call("getDeviceList")
              if {p["iqn"] for p in d["pathlist"]} == {target.iqn}]
    [st] = await disconnect(client, "iscsi", params)
    assert st["status"] == 0, st
    assert await client.call("getDeviceList", guids=[guid]) == []
    sd = new_id()
    with pytest.raises(RpcError) as e:
        await client.call("createStorageDomain", sdUUID=sd, domType="iscsi", name="gone",
                          devices=[guid])
    assert (e.value.code, e.value.name) == (606, "InaccessiblePhysDev"), e.value
    assert sd not in await client.call("getStorageDomainsList")
    assert sd not in g.lvm("vgs", "--noheadings", "-o", "vg_name")
