"""The error table against VDSM's: codes and names an engine reads unchanged."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from storage import errors
from storage.errors import HostAgentError

# VDSM's (code, name) pairs, with the commit they were read from.
VDSM = json.loads((Path(__file__).parent.parent / "data" / "vdsm_errors.json").read_text())
VDSM_CODES: dict[str, set[int]] = {}
for _e in VDSM["errors"]:
    VDSM_CODES.setdefault(_e["name"], set()).add(_e["code"])
VDSM_BY_CODE = {e["code"]: e["name"] for e in VDSM["errors"]}
AGENT_RANGE = range(2100, 2200)
TABLE = errors.error_table()


def test_vdsm_data_is_what_the_source_says() -> None:
    assert VDSM["source"]["repo"] == "https://github.com/oVirt/vdsm"
    assert len(VDSM["source"]["commit"]) == 40
    # a few anchors read by hand in both files
    for name, code in [("InvalidParameterException", 1000), ("InvalidParameter", 91),
                       ("JobExists", 69), ("ActionStopped", 443), ("GenerationMismatch", 911),
                       ("iSCSILoginAuthError", 476), ("MiscDirCleanupFailure", 2008)]:
        assert VDSM_CODES[name] == {code}, name


def test_table_is_not_empty_and_codes_are_unique() -> None:
    assert len(TABLE) > 30
    codes = [e["code"] for e in TABLE]
    names = [e["name"] for e in TABLE]
    assert len(set(codes)) == len(codes), sorted(c for c in codes if codes.count(c) > 1)
    assert len(set(names)) == len(names), sorted(n for n in names if names.count(n) > 1)


@pytest.mark.parametrize("entry", TABLE, ids=lambda e: e["name"])
def test_each_code_is_vdsms_or_in_the_agents_own_range(entry: dict[str, Any]) -> None:
    if entry["name"] in VDSM_CODES:
        # a VDSM name has VDSM's code
        assert entry["code"] in VDSM_CODES[entry["name"]], entry
    else:
        # an agent-only condition never falls on a code VDSM uses for another
        assert entry["code"] not in VDSM_BY_CODE, (entry, VDSM_BY_CODE.get(entry["code"]))
        assert entry["code"] in AGENT_RANGE, entry


def test_agent_range_is_free_in_vdsm() -> None:
    assert not [c for c in VDSM_BY_CODE if c in AGENT_RANGE]
    # and below VDSM's "DO NOT USE CODES GREATER THAN 5000" (the engine's)
    assert max(AGENT_RANGE) < 5000


@pytest.mark.parametrize("cls", errors.ALL_ERRORS, ids=lambda c: c.__name__)
def test_every_class_sends_a_table_name(cls: type[HostAgentError]) -> None:
    """data.name of any error, subclasses included, is a name of the table
    with that code (a subclass that keeps its parent's code is that condition)."""
    by_name = {e["name"]: e["code"] for e in TABLE}
    wire = cls().to_dict()
    assert by_name.get(wire["data"]["name"]) == wire["code"], wire


@pytest.mark.parametrize("cls, name", [
    (errors.InvalidParameter, "InvalidParameterException"),
    (errors.ISCSISetupError, "iSCSISetupError"),
    (errors.LeaseHeld, "AcquireLockFailure"),
    (errors.PrepareIllegalVolumeError, "prepareIllegalVolumeError"),
    (errors.CreateIllegalVolumeSnapshotError, "createIllegalVolumeSnapshotError"),
])
def test_vdsm_spellings(cls: type[HostAgentError], name: str) -> None:
    assert cls().to_dict()["data"]["name"] == name


def test_commands_and_tool_errors_are_general_exceptions() -> None:
    from storage.commands import CommandError
    e = CommandError(["false"], 1, b"", b"boom")
    assert (e.to_dict()["code"], e.to_dict()["data"]["name"]) == (100, "GeneralException")


def test_stale_nfs_handle_is_384() -> None:
    import errno

    from storage.domains.base import os_error
    e = os_error(OSError(errno.ESTALE, "Stale file handle", "/rhev/x/images/a"), "sd")
    wire = e.to_dict()
    assert (wire["code"], wire["data"]["name"]) == (384, "FileStorageDomainStaleNFSHandle")
    assert wire["data"]["path"] == "/rhev/x/images/a"


async def test_iscsi_logout_failure_is_474() -> None:
    from storage import iscsiadm
    from tests.unit.fakerun import FakeRunner
    fake = FakeRunner(lambda argv: (8, "", "iscsiadm: Could not logout of [sid: 1]"))
    with pytest.raises(HostAgentError) as e:
        await iscsiadm.logout("iqn.2003-01.org.example:t", iscsiadm.Portal("127.0.0.1", 3260),
                              timeout=5, runner=fake)
    wire = e.value.to_dict()
    assert (wire["code"], wire["data"]["name"]) == (474, "iSCSILogoutError"), wire


def test_one_translator_to_the_wire() -> None:
    from storage.errors import (
        InvalidParameter,
        NoSpaceLeftOnDomain,
        OvfTicketError,
        TransferDoesNotExist,
        TransferTicketError,
        VolumeDoesNotExist,
        http_status,
        wire_error,
    )
    e = VolumeDoesNotExist(volUUID="v")
    assert wire_error(e) == e.to_dict()
    # a bug shows nothing of itself
    bug = wire_error(RuntimeError("password=hunter2"))
    assert bug["code"] == 100 and bug["data"]["name"] == "GeneralException"
    assert "hunter2" not in str(bug) and "RuntimeError" not in str(bug)
    assert [http_status(x) for x in (OvfTicketError(), e, NoSpaceLeftOnDomain(sdUUID="s"),
                                     RuntimeError())] == [403, 404, 507, 500]
    # the disk transfers' data path (rpc/transferdata.py) as imageio's clients expect
    assert [http_status(x) for x in (TransferTicketError(reason="r"),
                                     TransferDoesNotExist(transferId="t"),
                                     InvalidParameter(field="f", reason="r"))] == [403, 404, 400]


@pytest.mark.parametrize(("error", "full"), [
    (OSError(28, "No space left on device"), True),
    (OSError(122, "Disk quota exceeded"), True),
    (OSError(5, "Input/output error"), False),
    (HostAgentError(), False),
    ("qemu-img: error while writing at byte 0: No space left on device", True),
    ("sanlock direct init failed: -28", True),
    ("lvcreate: Volume group has insufficient free space", False),
    ("exit status -280", False),
])
def test_out_of_space_by_errno(error: BaseException | str, full: bool) -> None:
    from storage.commands import CommandError
    from storage.errors import out_of_space
    if isinstance(error, str):
        error = CommandError(["tool"], 1, b"", error.encode())
    assert out_of_space(error) is full
