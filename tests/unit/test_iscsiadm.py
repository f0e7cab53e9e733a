"""storage.iscsiadm: discovery parsing, argv building, exit codes, CHAP
redaction (with a fake runner and a real run() on a fake iscsiadm), and
sessions read from a fake sysfs tree. No root."""

from __future__ import annotations

import logging
import os
import stat
import sys
from pathlib import Path

import pytest

from storage import commands, iscsiadm
from storage.errors import (
    HostAgentError,
    InvalidParameter,
    ISCSIDiscoveryError,
    ISCSILoginAuthError,
    ISCSILogoutError,
    ISCSISetupError,
    ResourceTimeout,
    StorageServerConnectionError,
)
from storage.iscsiadm import Portal
from tests.unit.fakerun import FakeRunner, make_session, table

IQN = "iqn.2024-01.lab.local:disk1"
SECRET = "Chap-Secret-4711"


# ---- discovery ------------------------------------------------------------------

DISCOVERY = """\
127.0.0.1:3260,1 iqn.2024-01.lab.local:disk1
127.0.0.2:3260,1 iqn.2024-01.lab.local:disk1
[fe80::1:2]:3261,7 iqn.2024-01.lab.local:v6
10.0.0.5:3260,-1 iqn.2024-01.lab.local:notpgt
iscsiadm: some warning on stdout
127.0.0.1:3260,1 iqn.2024-01.lab.local:disk1

garbage line
"""


def test_parse_discovery() -> None:
    found = iscsiadm.parse_discovery(DISCOVERY)
    assert [(t.iqn, t.portal) for t in found] == [
        (IQN, Portal("127.0.0.1", 3260, 1)),
        (IQN, Portal("127.0.0.2", 3260, 1)),
        ("iqn.2024-01.lab.local:v6", Portal("fe80::1:2", 3261, 7)),
        ("iqn.2024-01.lab.local:notpgt", Portal("10.0.0.5", 3260, None)),
    ]
    assert found[2].portal.hostport == "[fe80::1:2]:3261"
    assert found[2].portal.arg() == "[fe80::1:2]:3261,7"
    assert iscsiadm.parse_discovery("") == []


async def test_discovery_argv_is_nonpersistent() -> None:
    fake = FakeRunner(table((["discovery"], (0, DISCOVERY, ""))))
    found = await iscsiadm.discover_sendtargets(Portal("127.0.0.1", 3260), timeout=5,
                                                runner=fake)
    assert len(found) == 4
    assert fake.argvs() == [["iscsiadm", "-m", "discovery", "-t", "sendtargets", "-p",
                             "127.0.0.1:3260", "-o", "nonpersistent"]]


async def test_discovery_failure_is_discovery_error() -> None:
    fake = FakeRunner(lambda argv: (11, "", "iscsiadm: cannot make connection to 127.0.0.1: "
                                           "Connection refused"))
    with pytest.raises(ISCSIDiscoveryError) as e:
        await iscsiadm.discover_sendtargets(Portal("127.0.0.1", 3261), timeout=5, runner=fake)
    assert e.value.code == 475 and "Connection refused" in e.value.message
    assert e.value.to_dict()["data"]["name"] == "iSCSIDiscoveryError"
    assert "127.0.0.1:3261" in e.value.message


@pytest.mark.parametrize("rc", [0, 24])
async def test_discovery_with_chap_uses_a_record_it_deletes(rc: int) -> None:
    """CHAP for discovery goes through a discovery db record, made for the
    call and deleted after it whether discovery worked or not (24: CHAP
    refused, VDSM's 475); the password is in no error."""
    fake = FakeRunner(table((["--discover"], (rc, DISCOVERY if rc == 0 else "",
                                              "iscsiadm: Login failed to authenticate")),
                            (["discoverydb"], (0, "", ""))))
    p = Portal("127.0.0.1", 3260)
    if rc == 0:
        found = await iscsiadm.discover_sendtargets(p, timeout=5, user="joe",
                                                    password=SECRET, runner=fake)
        assert len(found) == 4
    else:
        with pytest.raises(ISCSIDiscoveryError) as e:
            await iscsiadm.discover_sendtargets(p, timeout=5, user="joe", password=SECRET,
                                                runner=fake)
        assert e.value.code == 475 and "authenticate" in e.value.message
        assert SECRET not in str(e.value) and SECRET not in repr(e.value.to_dict())
    record = ["iscsiadm", "-m", "discoverydb", "-t", "sendtargets", "-p", "127.0.0.1:3260"]
    assert fake.argvs() == [
        ["iscsiadm", "-m", "discoverydb"],      # the host has no record of the portal
        [*record, "-o", "new"],
        [*record, "-o", "update", "-n", "discovery.sendtargets.auth.authmethod", "-v", "CHAP",
         "-n", "discovery.sendtargets.auth.username", "-v", "joe",
         "-n", "discovery.sendtargets.auth.password", "-v", SECRET],
        [*record, "--discover", "-o", "nonpersistent"],
        [*record, "-o", "delete"]]
    assert [c.kwargs["redact"] for c in fake.calls[2:4]] == [[SECRET], [SECRET]]


ADMIN_RECORD = """\
# BEGIN RECORD 2.1.8
discovery.startup = manual
discovery.type = sendtargets
discovery.sendtargets.address = 127.0.0.1
discovery.sendtargets.port = 3260
discovery.sendtargets.auth.authmethod = CHAP
discovery.sendtargets.auth.username = admin
discovery.sendtargets.auth.password = Admin-Secret-99
discovery.sendtargets.auth.username_in = <empty>
discovery.sendtargets.timeo.login_timeout = 17
# END RECORD
"""


@pytest.mark.parametrize("rc", [0, 24])
async def test_discovery_with_chap_gives_back_the_hosts_own_record(rc: int) -> None:
    """The host already has a discovery record of the portal (an admin's):
    the call's credentials go into it for the discovery, then its own CHAP
    settings are put back as they were (never deleted, never left with the
    call's secret); neither secret in the logged argv."""
    fake = FakeRunner(table(
        (["--discover"], (rc, DISCOVERY if rc == 0 else "", "iscsiadm: Login failed")),
        (["show", "-S"], (0, ADMIN_RECORD, "")),
        (["iscsiadm", "-m", "discoverydb"], lambda argv: (
            (0, "127.0.0.1:3260 via sendtargets\n10.0.0.9:3260 via sendtargets\n", "")
            if len(argv) == 3 else (0, "", "")))))
    p = Portal("127.0.0.1", 3260)
    if rc == 0:
        await iscsiadm.discover_sendtargets(p, timeout=5, user="joe", password=SECRET,
                                            runner=fake)
    else:
        with pytest.raises(ISCSIDiscoveryError):
            await iscsiadm.discover_sendtargets(p, timeout=5, user="joe", password=SECRET,
                                                runner=fake)
    record = ["iscsiadm", "-m", "discoverydb", "-t", "sendtargets", "-p", "127.0.0.1:3260"]
    assert fake.argvs() == [
        ["iscsiadm", "-m", "discoverydb"],
        [*record, "-o", "show", "-S"],
        [*record, "-o", "update", "-n", "discovery.sendtargets.auth.authmethod", "-v", "CHAP",
         "-n", "discovery.sendtargets.auth.username", "-v", "joe",
         "-n", "discovery.sendtargets.auth.password", "-v", SECRET],
        [*record, "--discover", "-o", "nonpersistent"],
        [*record, "-o", "update", "-n", "discovery.sendtargets.auth.authmethod", "-v", "CHAP",
         "-n", "discovery.sendtargets.auth.username", "-v", "admin",
         "-n", "discovery.sendtargets.auth.password", "-v", "Admin-Secret-99"]]
    assert "Admin-Secret-99" in fake.calls[-1].kwargs["redact"]


@pytest.mark.parametrize("address, port, tpgt, arg", [
    ("10.1.2.3", 3260, None, "10.1.2.3:3260"),
    ("Storage.Example.COM", 3261, 2, "storage.example.com:3261,2"),
    ("[fe80::1]", 3260, None, "[fe80::1]:3260"),
    ("fe80::1", 3260, 1, "[fe80::1]:3260,1"),
])
def test_portal(address: str, port: int, tpgt: int | None, arg: str) -> None:
    assert iscsiadm.portal(address, port, tpgt).arg() == arg


@pytest.mark.parametrize("address, code", [
    ("-p", 1000), ("a\nb", 1000),                            # never on a command line
    ("", 1000), ("a b", 472), ("host,1", 472), ("[]", 472),  # 472 InvalidIpAddress
])
def test_portal_refuses_unsafe_values(address: str, code: int) -> None:
    with pytest.raises(HostAgentError) as e:
        iscsiadm.portal(address, 3260)
    assert e.value.code == code, e.value


# ---- node records and login ----------------------------------------------------------

P = Portal("127.0.0.1", 3260)
NODE = ["iscsiadm", "-m", "node", "-T", IQN, "-p", "127.0.0.1:3260", "-I", "default"]


async def test_node_exists_by_exit_code() -> None:
    fake = FakeRunner(lambda argv: (21, "", "iscsiadm: No records found"))
    assert await iscsiadm.node_exists(IQN, P, timeout=5, runner=fake) is False
    fake = FakeRunner()
    assert await iscsiadm.node_exists(IQN, P, timeout=5, runner=fake) is True
    assert fake.argvs() == [NODE]


async def test_node_update_sets_every_key_in_one_call_and_redacts() -> None:
    fake = FakeRunner()
    settings = {"node.startup": "manual", **iscsiadm.chap_settings("joe", SECRET)}
    await iscsiadm.node_update(IQN, P, "default", settings, timeout=5, secrets=[SECRET],
                               runner=fake)
    [call] = fake.calls
    assert call.argv == [*NODE, "-o", "update", "-n", "node.startup", "-v", "manual",
                         "-n", "node.session.auth.authmethod", "-v", "CHAP",
                         "-n", "node.session.auth.username", "-v", "joe",
                         "-n", "node.session.auth.password", "-v", SECRET]
    assert call.kwargs["redact"] == [SECRET]
    assert iscsiadm.chap_settings(None, None) == {"node.session.auth.authmethod": "None"}


async def test_record_database_busy_is_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(iscsiadm, "DB_RETRY_DELAY", 0.001)
    answers = iter([(6, "", "encountered iSCSI database failure"), (0, "", "")])
    fake = FakeRunner(lambda argv: next(answers))
    await iscsiadm.node_new(IQN, P, timeout=5, runner=fake)
    assert len(fake.calls) == 2
    fake = FakeRunner(lambda argv: (6, "", "encountered iSCSI database failure"))
    with pytest.raises(ISCSISetupError):
        await iscsiadm.node_new(IQN, P, timeout=5, runner=fake)
    assert len(fake.calls) == iscsiadm.DB_RETRIES


async def test_login_exit_codes() -> None:
    fake = FakeRunner()
    assert await iscsiadm.login(IQN, P, timeout=5, runner=fake) is True
    assert fake.argvs() == [[*NODE, "--login"]]
    fake = FakeRunner(lambda argv: (15, "", "session already present"))
    assert await iscsiadm.login(IQN, P, timeout=5, runner=fake) is False
    fake = FakeRunner(lambda argv: (24, "", "iSCSI login failed due to authorization failure"))
    with pytest.raises(ISCSILoginAuthError) as denied:
        await iscsiadm.login(IQN, P, timeout=5, runner=fake)
    assert denied.value.code == 476 and "CHAP authentication failed" in denied.value.message
    fake = FakeRunner(lambda argv: (19, "", "encountered non-retryable iSCSI login failure"))
    with pytest.raises(StorageServerConnectionError) as failed:
        await iscsiadm.login(IQN, P, timeout=5, runner=fake)
    assert failed.value.code == 451 and "non-retryable" in failed.value.message


async def test_logout_and_delete_of_nothing_are_fine() -> None:
    fake = FakeRunner(lambda argv: (21, "", "No matching sessions found"))
    assert await iscsiadm.logout(IQN, P, timeout=5, runner=fake) is False
    assert await iscsiadm.node_delete(IQN, P, timeout=5, runner=fake) is False
    assert fake.argvs() == [[*NODE, "--logout"], [*NODE, "-o", "delete"]]


async def test_failed_logout_with_rc_21_is_474() -> None:
    """iscsiadm's own words with iscsid gone (lab guest, open-iscsi 2.1): it
    found the session, could not log out, and still exits 21."""
    err = ("iscsiadm: can not connect to iSCSI daemon (111)!\n"
           f"iscsiadm: Could not logout of [sid: 1, target: {IQN}, portal: 127.0.0.1,3260].\n"
           "iscsiadm: initiator reported error (20 - could not connect to iscsid)\n"
           "iscsiadm: No matching sessions found\n")
    fake = FakeRunner(lambda argv: (21, "Logging out of session [sid: 1]\n", err))
    with pytest.raises(ISCSILogoutError) as e:
        await iscsiadm.logout(IQN, P, timeout=5, runner=fake)
    wire = e.value.to_dict()
    assert (wire["code"], wire["data"]["name"]) == (474, "iSCSILogoutError"), wire
    assert "could not connect to iscsid" in e.value.message
    assert "No matching" not in e.value.message


async def test_rescan_argv() -> None:
    fake = FakeRunner()
    await iscsiadm.rescan_session(7, timeout=5, runner=fake)
    assert fake.argvs() == [["iscsiadm", "-m", "session", "-r", "7", "-R"]]


async def test_unsafe_iqn_never_reaches_the_command_line() -> None:
    fake = FakeRunner()
    with pytest.raises(InvalidParameter):
        await iscsiadm.login("-o delete", P, timeout=5, runner=fake)
    assert fake.calls == []


# ---- CHAP secrets: never in an error, a log line or a result ---------------------------

@pytest.fixture
def fake_iscsiadm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An `iscsiadm` on PATH that prints its whole argv to stdout and stderr
    (as a careless tool might) and exits with $FAKE_RC."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    script = bindir / "iscsiadm"
    script.write_text(f"#!{sys.executable}\n"
                      "import os, sys\n"
                      "print('argv:', *sys.argv[1:])\n"
                      "print('iscsiadm: error with', *sys.argv[1:], file=sys.stderr)\n"
                      "sys.exit(int(os.environ.get('FAKE_RC', '0')))\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    return script


@pytest.mark.parametrize("rc", [7, 24])
async def test_chap_password_never_in_errors_or_logs(fake_iscsiadm: Path, rc: int,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("FAKE_RC", str(rc))
    caplog.set_level(logging.DEBUG)
    settings = iscsiadm.chap_settings("joe", SECRET)
    errors: list[BaseException] = []
    try:
        await iscsiadm.node_update(IQN, P, "default", settings, timeout=10, secrets=[SECRET])
    except ISCSISetupError as e:
        errors.append(e)
    try:
        await iscsiadm.login(IQN, P, timeout=10, secrets=[SECRET])
    except (ISCSILoginAuthError, StorageServerConnectionError) as e:
        errors.append(e)
    assert len(errors) == 2
    for e in errors:
        assert SECRET not in str(e)
        assert SECRET not in repr(e.to_dict())  # type: ignore[attr-defined]
        cause = e.__cause__ or e.__context__
        assert cause is None or SECRET not in str(cause)
    assert SECRET not in caplog.text
    assert "****" in caplog.text   # the redacted argv was logged


async def test_chap_password_redacted_in_command_error(fake_iscsiadm: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_RC", "1")
    with pytest.raises(commands.CommandError) as e:
        await commands.run(["iscsiadm", "-v", SECRET], timeout=10, redact=[SECRET])
    assert SECRET not in str(e.value) and SECRET.encode() not in e.value.err
    assert SECRET.encode() not in e.value.out and SECRET not in " ".join(e.value.argv)


# ---- sessions from sysfs -----------------------------------------------------------------

def test_read_sessions(tmp_path: Path) -> None:
    make_session(tmp_path, 3, 2, IQN, "127.0.0.1", 3260, {"0": (12, None), "1": (0, "sdb"),
                                                         "2": (0, "sda")})
    make_session(tmp_path, 4, 5, IQN, "127.0.0.2", 3260, {"1": (0, None)}, iface="eth1",
                 state="FAILED", target_state="ALLOCATED")
    # a session half gone: no connection directory
    (tmp_path / "class" / "iscsi_session" / "session9").mkdir()
    s3, s4 = iscsiadm.read_sessions(tmp_path)
    assert (s3.sid, s3.iqn, s3.portal, s3.iface, s3.host) == (3, IQN, Portal("127.0.0.1", 3260, 1),
                                                            "default", "host2")
    assert s3.logged_in and s3.disks == ("sda", "sdb") and s3.pending == ()
    assert [d.lun for d in s3.devices] == [0, 1, 2] and s3.target_state == "SCANNED"
    assert not s4.logged_in and s4.pending == ("5:0:0:1",) and s4.iface == "eth1"
    assert s3.matches(IQN, Portal("127.0.0.1", 3260), "default")
    assert s3.matches(IQN, Portal("127.0.0.1", 3260, 1), "default")
    assert not s3.matches(IQN, Portal("127.0.0.1", 3260, 2), "default")
    assert not s3.matches(IQN, Portal("127.0.0.2", 3260), "default")
    assert iscsiadm.read_sessions(tmp_path / "missing") == []


async def test_find_session_and_wait_disks_made(tmp_path: Path) -> None:
    make_session(tmp_path, 1, 0, IQN, "127.0.0.1", 3260, {"1": (0, None)})
    s = await iscsiadm.find_session(IQN, Portal("127.0.0.1", 3260), sysfs=tmp_path)
    assert s is not None and s.pending == ("0:0:0:1",)
    with pytest.raises(ResourceTimeout) as timed_out:
        await iscsiadm.wait_disks_made(1, timeout=0.2, sysfs=tmp_path)
    assert timed_out.value.code == 851
    (tmp_path / "devices" / "platform" / "host0" / "session1" / "target0:0:0" / "0:0:0:1"
     / "block" / "sdc").mkdir(parents=True)
    done = await iscsiadm.wait_disks_made(1, timeout=2, sysfs=tmp_path)
    assert done is not None and done.disks == ("sdc",)
    assert await iscsiadm.wait_disks_made(42, timeout=1, sysfs=tmp_path) is None


async def test_iface_initiator_name_from_the_iface_list() -> None:
    listing = ("hostagent-x tcp,<empty>,<empty>,<empty>,iqn.2024-01.lab.local:h\n"
               "default tcp,<empty>,<empty>,<empty>,<empty>\n")
    fake = FakeRunner(lambda argv: (0, listing, ""))
    assert await iscsiadm.iface_initiator_name("hostagent-x", timeout=5, runner=fake) == \
        "iqn.2024-01.lab.local:h"
    assert await iscsiadm.iface_initiator_name("default", timeout=5, runner=fake) == ""
    assert await iscsiadm.iface_initiator_name("eth9", timeout=5, runner=fake) is None
    assert fake.argvs()[0] == ["iscsiadm", "-m", "iface"]
