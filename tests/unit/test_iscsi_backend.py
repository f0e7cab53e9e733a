"""IscsiBackend and FcpBackend against a fake host: a fake runner playing
iscsiadm and multipathd over a fake sysfs tree. What connect records before
it acts, what disconnect removes and refuses, and that CHAP secrets stay
out of errors and logs. No root."""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
from pathlib import Path
from typing import Any

import pytest

from storage.connections.base import Connection
from storage.connections.fcp import FcpBackend
from storage.connections.iscsi import IscsiBackend, iface_for, is_address
from storage.errors import (
    HostAgentError,
    ISCSILoginAuthError,
    StorageServerConnectionError,
    StorageServerDisconnectionError,
)
from tests.polling import until
from tests.unit.fakerun import Answer, FakeRunner, make_session

IQN = "iqn.2024-01.lab.local:t1"
SECRET = "Sekrit-Chap-99"
W1, W2 = "36000000000000000000000000000aaaa", "36000000000000000000000000000bbbb"


class FakeHost:
    """iscsiadm and multipathd as far as the backend uses them. A login makes
    a session (no LUNs: the udev side is the lab's); tests add sessions with
    disks and maps by hand."""

    def __init__(self, sysfs: Path, password: str = "") -> None:
        self.sysfs = sysfs
        self.password = password
        self.nodes: dict[tuple[str, str, str], dict[str, str]] = {}
        self.sessions: dict[str, int] = {}          # portal -> sid
        self.maps: dict[str, list[str]] = {}        # map name -> disks
        self.wwids: dict[str, str] = {}             # map name -> wwid
        self.flushed: list[str] = []
        self.events: list[str] = []
        self.next_sid = 1
        self.runner = FakeRunner(self.respond)

    def add_session(self, portal: str, disks: dict[str, str], *, iqn: str = IQN) -> int:
        """A logged-in session with LUN disks {lun: sdX}."""
        sid = self.next_sid
        self.next_sid += 1
        address, port = portal.split(":")
        make_session(self.sysfs, sid, sid + 10, iqn, address, int(port),
                     {lun: (0, disk) for lun, disk in disks.items()})
        for disk in disks.values():
            (self.sysfs / "block" / disk / "device").mkdir(parents=True, exist_ok=True)
            (self.sysfs / "block" / disk / "device" / "delete").write_text("")
        self.sessions[portal] = sid
        return sid

    def add_map(self, name: str, wwid: str, disks: list[str], dm: str) -> None:
        self.maps[name] = disks
        self.wwids[name] = wwid
        (self.sysfs / "block" / dm / "holders").mkdir(parents=True, exist_ok=True)

    def remove_session(self, portal: str) -> None:
        """Logout: the session, its disks and their paths go."""
        sid = self.sessions.pop(portal)
        link = self.sysfs / "class" / "iscsi_session" / f"session{sid}"
        sdev = link.resolve().parent.parent    # devices/platform/hostN/sessionN
        disks = {b.name for b in sdev.glob("target*/*/block/*")}
        link.unlink()
        shutil.rmtree(sdev)
        shutil.rmtree(self.sysfs / "class" / "iscsi_connection" / f"connection{sid}:0")
        for disk in disks:
            shutil.rmtree(self.sysfs / "block" / disk, ignore_errors=True)
        for paths in self.maps.values():
            paths[:] = [d for d in paths if d not in disks]

    def respond(self, argv: list[str]) -> Answer:
        prog = argv[0]
        if prog == "iscsiadm" and argv[1:3] == ["-m", "node"]:
            key = (argv[4], argv[6], argv[8])
            op = argv[9:]
            self.events.append(f"node {' '.join(op[:2]) or 'show'}")
            if not op:
                return (0, "", "") if key in self.nodes else (21, "", "No records found")
            if op[:2] == ["-o", "new"]:
                self.nodes[key] = {}
                return (0, "", "")
            if op[:2] == ["-o", "update"]:
                pairs = op[2:]
                self.nodes[key].update(zip(pairs[1::4], pairs[3::4], strict=True))
                return (0, "", "")
            if op[:2] == ["-o", "delete"]:
                return (0, "", "") if self.nodes.pop(key, None) is not None else (21, "", "")
            if op == ["--login"]:
                if key[1] in self.sessions:
                    return (15, "", "session already present")
                if self.nodes[key].get("node.session.auth.password", "") != self.password:
                    # a careless tool may echo what it was given
                    return (24, "", f"authorization failure for {' '.join(argv)}")
                self.add_session(key[1], {})
                return (0, "", "")
            if op == ["--logout"]:
                if key[1] not in self.sessions:
                    return (21, "", "No matching sessions found")
                self.remove_session(key[1])
                return (0, "", "")
        if prog == "iscsiadm" and argv[1:3] == ["-m", "session"]:
            self.events.append("rescan")
            return (0, "", "")
        if argv[:3] == ["multipathd", "show", "paths"]:
            lines = [f"{self.wwids[m]}|{d}|active|ready|running|0:0:0:1|{m}|8:0"
                     for m, disks in self.maps.items() for d in disks]
            return (0, "\n".join(lines), "")
        if argv[:3] == ["multipathd", "show", "maps"]:
            lines = [f"{m}|{self.wwids[m]}|dm-{i}|{len(d)}|active"
                     for i, (m, d) in enumerate(sorted(self.maps.items()))]
            return (0, "\n".join(lines), "")
        if argv[:2] == ["multipath", "-f"]:
            self.events.append(f"flush {argv[2]}")
            self.flushed.append(argv[2])
            self.maps.pop(argv[2], None)
            return (0, "", "")
        raise AssertionError(f"unexpected command {argv}")


@pytest.fixture
def host(tmp_path: Path) -> FakeHost:
    return FakeHost(tmp_path / "sys", password=SECRET)


def backend(host: FakeHost, **kw: Any) -> IscsiBackend:
    return IscsiBackend(runner=host.runner, sysfs=host.sysfs, login_timeout=5,
                        command_timeout=5, device_timeout=1, scan_grace=0.2, **kw)


def conn(portal: str = "127.0.0.1", **params: Any) -> Connection:
    return Connection(id="c1", type="iscsi",
                      params={"connection": portal, "port": 3260, "iqn": IQN, **params})


async def test_connect_records_each_step_before_taking_it(host: FakeHost) -> None:
    c = conn(user="joe", password=SECRET)
    saved: list[dict[str, Any]] = []
    seen_at: dict[str, dict[str, Any]] = {}   # command -> the record saved before it

    def respond(argv: list[str]) -> Answer:
        if argv[-1] in ("new", "--login"):
            seen_at[argv[-1]] = saved[-1] if saved else {}
        return host.respond(argv)

    host.runner.respond = respond
    await backend(host).connect(c, lambda: saved.append(dict(c.owned)))
    assert seen_at["new"]["node_created"] and not seen_at["new"]["logged_in"]
    assert seen_at["--login"]["node_created"] and seen_at["--login"]["logged_in"]
    assert c.owned["details"]["session"] == 1 and c.owned["logged_in"]
    node = host.nodes[(IQN, "127.0.0.1:3260", "default")]
    assert node == {"node.startup": "manual", "node.session.auth.authmethod": "CHAP",
                    "node.session.auth.username": "joe",
                    "node.session.auth.password": SECRET}
    update = next(call for call in host.runner.calls if "update" in call.argv)
    assert update.kwargs["redact"] == [SECRET]


async def test_wrong_password_leaves_nothing_and_no_secret(host: FakeHost,
                                                           caplog: pytest.LogCaptureFixture
                                                           ) -> None:
    caplog.set_level(logging.DEBUG)
    c = conn(user="joe", password="Wrong-Pass-123")
    with pytest.raises(ISCSILoginAuthError) as e:
        await backend(host).connect(c, lambda: None)
    assert e.value.code == 476 and "CHAP" in e.value.message
    assert e.value.to_dict()["data"]["name"] == "iSCSILoginAuthError"
    assert host.nodes == {} and host.sessions == {}
    assert not c.owned["node_created"] and not c.owned["logged_in"]
    text = caplog.text + str(e.value) + repr(e.value.to_dict()) + repr(c.public())
    assert "Wrong-Pass-123" not in text and SECRET not in text


async def test_existing_session_is_used_never_logged_out(host: FakeHost) -> None:
    host.nodes[(IQN, "127.0.0.1:3260", "default")] = {}
    host.add_session("127.0.0.1:3260", {})
    c = conn()
    b = backend(host)
    await b.connect(c, lambda: None)
    assert c.owned["logged_in"] is False and c.owned["node_created"] is False
    assert "rescan" in host.events   # a session that was there: its LUNs are rescanned
    await b.disconnect(c)
    assert host.sessions == {"127.0.0.1:3260": 1}
    assert (IQN, "127.0.0.1:3260", "default") in host.nodes


def owned_conn(portal: str) -> Connection:
    c = conn(portal)
    c.owned = {"portal": f"{portal}:3260", "iface": "default", "node_created": True,
               "logged_in": True, "iface_created": False}
    return c


async def test_disconnect_flushes_only_maps_wholly_on_its_session(host: FakeHost) -> None:
    for portal in ("127.0.0.1:3260", "127.0.0.2:3260"):
        host.nodes[(IQN, portal, "default")] = {}
    host.add_session("127.0.0.1:3260", {"1": "sdb", "2": "sdd"})
    host.add_session("127.0.0.2:3260", {"1": "sdc"})
    host.add_map("mpatha", W1, ["sdb", "sdc"], "dm-0")   # two portals
    host.add_map("mpathb", W2, ["sdd"], "dm-1")          # only on the first
    await backend(host).disconnect(owned_conn("127.0.0.1"))
    assert host.flushed == ["mpathb"]
    delete = host.sysfs / "block"
    assert not (delete / "sdb").exists() and not (delete / "sdd").exists()
    assert host.maps == {"mpatha": ["sdc"]}
    assert list(host.sessions) == ["127.0.0.2:3260"]
    assert (IQN, "127.0.0.1:3260", "default") not in host.nodes
    # order: flush, then logout, then the node record
    assert host.events.index("flush mpathb") < host.events.index("node --logout") < \
        host.events.index("node -o delete")


async def test_disconnect_refuses_a_map_in_use(host: FakeHost) -> None:
    host.nodes[(IQN, "127.0.0.1:3260", "default")] = {}
    host.add_session("127.0.0.1:3260", {"1": "sdb"})
    host.add_map("mpatha", W1, ["sdb"], "dm-0")
    (host.sysfs / "block" / "dm-0" / "holders" / "dm-7").mkdir()
    c = owned_conn("127.0.0.1")
    with pytest.raises(StorageServerDisconnectionError) as e:
        await backend(host).disconnect(c)
    assert e.value.code == 452 and "dm-7" in e.value.message
    assert host.flushed == [] and "127.0.0.1:3260" in host.sessions
    assert (host.sysfs / "block" / "sdb").exists() and c.owned["logged_in"]


async def test_disconnect_keeps_a_session_another_connection_uses(host: FakeHost) -> None:
    host.nodes[(IQN, "127.0.0.1:3260", "default")] = {}
    host.add_session("127.0.0.1:3260", {})
    other = owned_conn("127.0.0.1")
    other.id = "c2"
    b = backend(host, connections=lambda: [other])
    await b.disconnect(owned_conn("127.0.0.1"))
    assert "127.0.0.1:3260" in host.sessions


async def test_check(host: FakeHost) -> None:
    b = backend(host)
    with pytest.raises(StorageServerConnectionError):
        await b.check(conn())
    host.add_session("127.0.0.1:3260", {})
    await b.check(conn())
    state = next((host.sysfs / "devices").rglob("session1/iscsi_session/session1/state"))
    state.write_text("FAILED\n")
    with pytest.raises(StorageServerConnectionError) as e:
        await b.check(conn())
    assert "FAILED" in e.value.message


def test_target_keys_and_ifaces(host: FakeHost) -> None:
    b = backend(host)
    k1 = b.target_key(conn("127.0.0.1").params)
    assert k1 == f"iscsi:default:127.0.0.1:3260:{IQN}"
    assert k1 != b.target_key(conn("127.0.0.2").params)
    assert k1 == b.target_key({**conn("127.0.0.1").params, "password": "x", "tpgt": 1})
    named = {**conn().params, "initiatorName": "iqn.2024-01.lab.local:host7"}
    assert iface_for(named).startswith("hostagent-") and iface_for(named) == iface_for(named)
    assert iface_for({**named, "ifaceName": "eth1"}) == "eth1"
    with pytest.raises(HostAgentError):
        b.target_key({**conn().params, "iqn": "-o"})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_test_changes_nothing(host: FakeHost) -> None:
    b = backend(host)
    closed = await b.test({**conn().params, "port": free_port()})
    assert closed["reachable"] is False and "cannot connect" in closed["message"]
    assert host.runner.calls == []   # refused before any tool ran

    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        host.runner.respond = lambda argv: (0, f"127.0.0.1:{port},1 {IQN}\n", "")
        ok = await b.test({**conn().params, "port": port})
        assert ok["reachable"] is True and ok["details"]["targets"] == [IQN]
        other = await b.test({**conn().params, "port": port, "iqn": IQN + "x"})
        assert other["reachable"] is False and "does not offer" in other["message"]
    finally:
        server.close()
        await server.wait_closed()
    assert all(c.argv[-2:] == ["-o", "nonpersistent"] for c in host.runner.calls)


async def test_fcp_scans_fc_hosts_only(tmp_path: Path) -> None:
    for h in ("host0", "host1"):
        (tmp_path / "class" / "scsi_host" / h).mkdir(parents=True)
        (tmp_path / "class" / "scsi_host" / h / "scan").write_text("")
    (tmp_path / "class" / "fc_host" / "host1").mkdir(parents=True)
    fake = FakeRunner(lambda argv: (0, "pid 1 idle" if argv[0] == "multipathd" else "", ""))
    b = FcpBackend(runner=fake, sysfs=tmp_path, scan_timeout=5, command_timeout=5)
    c = Connection(id="f", type="fcp", params={})
    await b.connect(c, lambda: None)
    assert (tmp_path / "class" / "scsi_host" / "host1" / "scan").read_text() == "- - -"
    assert (tmp_path / "class" / "scsi_host" / "host0" / "scan").read_text() == ""
    assert fake.argvs() == [["multipathd", "show", "daemon"], ["multipath"]]
    assert b.target_key({}) == "fcp" and (await b.test({}))["reachable"] is True
    await b.disconnect(c)
    await b.check(c)


async def test_shared_poll_coalesces_and_is_never_stale() -> None:
    from storage.connections.iscsi import SharedPoll

    calls = 0
    gate = asyncio.Event()

    async def fetch() -> int:
        nonlocal calls
        calls += 1
        n = calls
        await gate.wait()
        return n

    asked = 0

    async def ask() -> int:
        nonlocal asked
        asked += 1      # poll() runs on from here to its first wait in this same step
        return await poll()

    poll = SharedPoll(fetch, interval=0.0)
    first = asyncio.ensure_future(poll())
    await until(lambda: calls == 1, "the first fetch is running")
    late = [asyncio.ensure_future(ask()) for _ in range(5)]
    await until(lambda: asked == 5, "five more callers wait")
    assert calls == 1
    gate.set()
    assert await first == 1
    # those who asked while fetch 1 ran get fetch 2, which they all share
    assert await asyncio.gather(*late) == [2] * 5 and calls == 2


@pytest.mark.parametrize(("text", "ok"), [
    ("127.0.0.1", True), ("::1", True), ("[fe80::1]", True), ("san-1.example.com", True),
    ("host.", True), ("300.1.1.1", False), ("1.2.3", False), ("-bad.example", False),
    ("bad-.example", False), ("a..b", False), ("a b", False), ("under_score", False),
    ("", False), ("x" * 64, False),
])
def test_portal_address_syntax(text: str, ok: bool) -> None:
    """Addresses that can never name a portal are refused (472) before any
    resolver is asked: a guest or host without DNS answers EAI_AGAIN for them."""
    assert is_address(text) is ok
