"""storage.devices (getDeviceList) from tool output, and the device verbs'
parameter checks at the RPC edge. No root."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import rpc.verbs  # noqa: F401 - fills the verb table
from agent import config as cfg
from agent.context import Agent
from rpc.dispatch import Dispatcher
from rpc.table import TABLE
from storage import devices, iscsiadm, lvm, multipath, udev
from storage.errors import MultipathSetupError
from tests.unit.fakerun import FakeRunner

W1, W2 = "360000000000000000e00000000010001", "360000000000000000e00000000020001"


def disk(name: str, session: int | None, size: int = 64 << 20) -> udev.ScsiDisk:
    return udev.ScsiDisk(name=name, devnode=f"/dev/{name}", wwid=W1, vendor="IET",
                         model="VIRTUAL-DISK", serial="LAB00010001", size=size,
                         hctl=f"{session or 0}:0:0:1", transport="iSCSI", session=session,
                         initialized=True, physical_block_size=4096)


def session(sid: int, address: str) -> iscsiadm.Session:
    return iscsiadm.Session(sid=sid, iqn="iqn.2024-01.lab.local:t1",
                            portal=iscsiadm.Portal(address, 3260, 1), iface="default",
                            initiator_name="iqn.1993-08.org.debian:01:h", state="LOGGED_IN",
                            host=f"host{sid}")


def pv(name: str) -> lvm.PV:
    return lvm.PV(name=name, uuid="pv-uuid-1", vg_name="vg1", vg_uuid="vg-uuid-1", size=1,
                  free=0, pe_start=0, dev_size=1, pe_count=1, pe_alloc_count=0, mda_count=1,
                  mda_size=0, mda_free=0, tags=())


def test_assemble_one_lun_two_paths() -> None:
    maps = [multipath.Map("mpatha", W1, "dm-0", 2, "active"),
            multipath.Map("mpathb", W2, "dm-1", 1, "active")]
    paths = [multipath.MPath(W1, "sdc", "failed", "faulty", "running", "2:0:0:1", "mpatha",
                             "8:32"),
             multipath.MPath(W1, "sdb", "active", "ready", "running", "1:0:0:1", "mpatha",
                             "8:16"),
             multipath.MPath(W2, "sdd", "active", "ready", "running", "1:0:0:2", "mpathb",
                             "8:48"),
             multipath.MPath(W2, "sde", "undef", "undef", "running", "1:0:0:3", None, "8:64")]
    facts = {"mpatha": devices.MapFacts(64 << 20, [], []),
             "mpathb": devices.MapFacts(32 << 20, ["dm-4"], [])}
    luns = devices.assemble(maps, paths, [disk("sdb", 1), disk("sdc", 2)],
                            [session(1, "127.0.0.1"), session(2, "127.0.0.2")],
                            {"/dev/mapper/mpatha": pv("/dev/mapper/mpatha")}, facts,
                            {"mpathb": None}, mapper=Path("/dev/mapper"))
    a, b = luns
    assert a["guid"] == W1 and a["capacity"] == 64 << 20 and a["path"] == "/dev/mapper/mpatha"
    assert (a["vendorID"], a["productID"], a["serial"]) == ("IET", "VIRTUAL-DISK",
                                                            "LAB00010001")
    assert [(p["physdev"], p["state"], p["lun"]) for p in a["pathstatus"]] == [
        ("sdb", "active", 1), ("sdc", "failed", 1)]
    assert [(p["portal"], p["iqn"], p["tpgt"]) for p in a["pathlist"]] == [
        ("127.0.0.1:3260", "iqn.2024-01.lab.local:t1", 1),
        ("127.0.0.2:3260", "iqn.2024-01.lab.local:t1", 1)]
    assert (a["pvUUID"], a["vgUUID"], a["status"]) == ("pv-uuid-1", "vg-uuid-1", "used")
    assert a["physicalblocksize"] == 4096 and a["devtype"] == "iSCSI"
    # an LV on it: used, and by what; the orphan path is not one of its paths
    assert b["status"] == "used" and b["usedBy"] == ["dm-4"] and b["pvUUID"] == ""
    assert [p["physdev"] for p in b["pathstatus"]] == ["sdd"]
    assert b["vendorID"] == "" and b["pathlist"] == []


def test_assemble_free_and_deep_checked() -> None:
    maps = [multipath.Map("mpatha", W1, "dm-0", 0, "active")]
    facts = {"mpatha": devices.MapFacts(1 << 30, [], [])}
    [free] = devices.assemble(maps, [], [], [], {}, facts, {})
    assert free["status"] == "free" and free["pathstatus"] == []
    [used] = devices.assemble(maps, [], [], [], {}, facts, {"mpatha": "holds ext4"})
    assert used["status"] == "used" and used["statusReason"] == "holds ext4"


async def test_has_signature() -> None:
    fake = FakeRunner(lambda argv: (2, "", ""))
    assert await devices.has_signature("/dev/mapper/m", timeout=5, runner=fake) is None
    assert fake.argvs() == [["blkid", "-p", "-o", "export", "/dev/mapper/m"]]
    fake = FakeRunner(lambda argv: (0, "DEVNAME=/dev/mapper/m\nTYPE=LVM2_member\n", ""))
    assert await devices.has_signature("/dev/mapper/m", timeout=5, runner=fake) == "LVM2_member"
    fake = FakeRunner(lambda argv: (0, "PTUUID=x\nPTTYPE=gpt\n", ""))
    assert await devices.has_signature("/dev/mapper/m", timeout=5, runner=fake) == "gpt"


async def test_device_list_without_multipathd_is_empty(tmp_path: Path) -> None:
    fake = FakeRunner(lambda argv: (1, "", "can't connect to socket"))
    (tmp_path / "block" / "dm-0" / "dm").mkdir(parents=True)
    (tmp_path / "block" / "dm-0" / "dm" / "uuid").write_text("LVM-abc\n")   # not multipath
    assert await devices.device_list(timeout=5, runner=fake, sysfs=tmp_path) == []


async def test_device_list_with_maps_but_no_multipathd_is_467(tmp_path: Path) -> None:
    """multipathd stopped while device-mapper holds its maps: the LUNs are
    there, so an empty list would be wrong."""
    fake = FakeRunner(lambda argv: (1, "", "can't connect to socket"))
    dm = tmp_path / "block" / "dm-1" / "dm"
    dm.mkdir(parents=True)
    (dm / "uuid").write_text(f"mpath-{W1}\n")
    (dm / "name").write_text("mpatha\n")
    with pytest.raises(MultipathSetupError) as e:
        await devices.device_list(timeout=5, runner=fake, sysfs=tmp_path)
    wire = e.value.to_dict()
    assert (wire["code"], wire["data"]["name"]) == (467, "MultipathSetupError"), wire
    assert "mpatha" in e.value.message and "connect to socket" in e.value.message


async def test_device_list_asks_pvs_only_about_the_maps(tmp_path: Path) -> None:
    def respond(argv: list[str]) -> tuple[int, str, str]:
        if argv[:3] == ["multipathd", "show", "maps"]:
            return (0, f"mpatha|{W1}|dm-0|0|active\nmpathb|{W2}|dm-1|0|active\n", "")
        if argv[:3] == ["multipathd", "show", "paths"]:
            return (0, "", "")
        if argv[:2] == ["lvm", "pvs"]:
            return (0, json.dumps({"report": [{"pv": []}]}), "")
        raise AssertionError(argv)

    fake = FakeRunner(respond)
    luns = await devices.device_list([W2], timeout=5, runner=fake, sysfs=tmp_path)
    assert [lun["guid"] for lun in luns] == [W2]
    [pvs] = fake.argvs("lvm")
    config = pvs[pvs.index("--config") + 1]
    assert "/dev/mapper/mpathb" in config and "mpatha" not in config


# ---- the verbs' parameter checks -----------------------------------------------------

@pytest.fixture
async def dispatcher(tmp_path: Path) -> Any:
    config = cfg.load(tmp_path / "none.toml", cfg.dev_overrides(tmp_path, 1))
    agent = Agent.create(config)
    await agent.start()
    yield Dispatcher(agent, TABLE.enabled(config))
    await agent.stop()


async def call(d: Any, method: str, **params: Any) -> dict[str, Any]:
    body = {"jsonrpc": "2.0", "method": method, "params": params, "id": 1}
    return dict(json.loads(await d.dispatch(json.dumps(body))))


@pytest.mark.parametrize("method, params, field", [
    ("discoverSendTargets", {"connection": "-oops", "port": 3260}, "connection"),
    ("discoverSendTargets", {"connection": "10.0.0.1", "port": 0}, "port"),
    ("discoverSendTargets", {"connection": "10.0.0.1", "port": 70000}, "port"),
    ("discoverSendTargets", {"connection": "a b", "port": 3260}, "connection"),
    ("discoverSendTargets", {"connection": "10.0.0.1", "user": "joe"}, "password"),
    ("discoverSendTargets", {"connection": "10.0.0.1", "password": "pw"}, "user"),
    ("discoverSendTargets", {"connection": "10.0.0.1", "user": "joe", "password": "-pw"},
     "password"),
    ("getDeviceList", {"guids": ["-x"]}, "guids[0]"),
    ("getDeviceList", {"guids": "3600"}, "guids"),
    ("getDeviceList", {"checkStatus": "yes"}, "checkStatus"),
])
async def test_device_verbs_refuse_bad_params(dispatcher: Any, method: str,
                                              params: dict[str, Any], field: str) -> None:
    r = await call(dispatcher, method, **params)
    assert r["error"]["code"] == -32602, r
    assert r["error"]["data"]["field"] == field
