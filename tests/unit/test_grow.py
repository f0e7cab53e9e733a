"""Growing block domains and wiping, without root (issue 17): which LUNs
extendStorageDomain takes and refuses before anything changes, the order of
a wipe (tagged before REMOVING, zeroed before lvremove, also by garbage
collection), the rescan and map resize of getDeviceList(refresh)/resizePV
against a fake sysfs, and the verbs' parameter checks."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from storage import commands, devices, lvm, multipath
from storage.domains import blockdomain as bd
from storage.domains import slots
from storage.domains import vgdevices as vgd
from storage.errors import HostAgentError, PhysDevInitializationError
from storage.metadata import REMOVING, DomainMetadata
from tests.unit.fakerun import FakeRunner
from tests.unit.test_blockdomain import IMG, SD, V1, FakeLVM, FileBlockDomain, vol
from tests.unit.test_blockdomain import domain as domain
from tests.unit.test_devices import call
from tests.unit.test_devices import dispatcher as dispatcher

MiB = 1 << 20
OLD, NEW, OTHER = "/dev/mapper/3600a", "/dev/mapper/3600b", "/dev/mapper/3600c"


def pv(name: str, vg: str, uuid: str = "") -> lvm.PV:
    return lvm.PV(name=name, uuid=uuid or f"uuid-{name[-1]}", vg_name=vg, vg_uuid="",
                  size=MiB, free=0, pe_start=0, dev_size=MiB, pe_count=1, pe_alloc_count=0,
                  mda_count=1, mda_size=32 * MiB, mda_free=0, tags=())


# ---- which devices extendStorageDomain adds ---------------------------------------------

def test_new_devices_skip_own_pvs_and_keep_orphans() -> None:
    seen = [pv(OLD, SD), pv(OTHER, "")]
    add, orphans = vgd.new_devices(SD, [OLD, NEW, OTHER, NEW], seen)
    assert (add, orphans) == ([NEW, OTHER], [OTHER])
    assert vgd.new_devices(SD, [OLD], seen) == ([], [])


def test_new_devices_refuse_a_pv_of_another_vg() -> None:
    with pytest.raises(PhysDevInitializationError) as e:
        vgd.new_devices(SD, [NEW, OTHER], [pv(OTHER, "vg-of-someone")])
    assert e.value.code == 601
    assert e.value.fields["devices"] == OTHER and "vg-of-someone" in e.value.message


def test_pv_list_names_luns_by_wwid() -> None:
    listed = vgd.pv_list([pv(NEW, SD, "u2"), pv(OLD, SD, "u1")],
                        {NEW: "36001405b", OLD: "36001405a"})
    assert listed == "36001405a:u1,36001405b:u2"
    assert vgd.pvs_ids(listed) == ["36001405a", "36001405b"]
    assert vgd.pvs_ids("") == []


def test_lun_id_of_a_multipath_map(tmp_path: Path) -> None:
    (tmp_path / "block" / "dm-3" / "dm").mkdir(parents=True)
    (tmp_path / "block" / "dm-3" / "dm" / "uuid").write_text("mpath-36001405abc\n")
    (tmp_path / "block" / "dm-4" / "dm").mkdir(parents=True)
    (tmp_path / "block" / "dm-4" / "dm" / "uuid").write_text("LVM-xyz\n")
    link = tmp_path / "mpatha"
    link.symlink_to("/dev/dm-3")
    assert vgd.lun_id(str(link), sysfs=str(tmp_path)) == "36001405abc"
    other = tmp_path / "lv"
    other.symlink_to("/dev/dm-4")
    assert vgd.lun_id(str(other), sysfs=str(tmp_path)) == "lv"


class GrowLVM(FakeLVM):
    """FakeLVM plus the PV side: pvs, pvcreate, vgextend, pvresize, blockdev,
    blkid; `pvs` maps a device to its VG ("" an orphan PV)."""

    def __init__(self) -> None:
        super().__init__()
        self.pvs: dict[str, str] = {OLD: SD}
        self.sector = {OLD: 512, NEW: 512, OTHER: 4096}
        self.signature: dict[str, str] = {}

    async def __call__(self, argv: Sequence[str], *, timeout: float,
                       check: bool = True, **kwargs: Any) -> commands.CommandResult:
        argv = list(argv)
        out = ""
        if argv[0] == "blockdev":
            self.ops.append("blockdev")
            out = f"{self.sector[argv[-1]]}\n"
        elif argv[0] == "blkid":
            self.ops.append("blkid")
            sig = self.signature.get(argv[-1])
            if sig is None:
                return commands.CommandResult(tuple(argv), 2, b"", b"")
            out = f"DEVNAME={argv[-1]}\nTYPE={sig}\n"
        elif argv[:3] == ["multipathd", "show", "maps"]:
            self.ops.append("maps")
            out = "".join(f"{d.rsplit('/', 1)[1]}|{d.rsplit('/', 1)[1]}|dm-0|2|active\n"
                          for d in self.pvs)
        elif argv[0] == "lvm" and argv[1] == "vgs":
            vg = {"vg_name": SD, "vg_uuid": "", "vg_attr": "wz--n-", "vg_size": "100",
                  "vg_free": "10", "vg_extent_size": "1", "vg_extent_count": "100",
                  "vg_free_count": "10", "vg_tags": "", "pv_count": str(len(self.pvs)),
                  "lv_count": "0", "vg_mda_size": "1", "vg_mda_free": "1"}
            out = json.dumps({"report": [{"vg": [vg]}]})
        elif argv[0] == "lvm" and argv[1] in ("pvs", "pvcreate", "vgextend", "pvresize"):
            op, args = argv[1], argv[4:]
            self.ops.append(op)
            if op == self.fail:
                raise commands.CommandError(argv, 5, b"", b"boom")
            if op == "pvs":
                rows = [{"pv_name": d, "pv_uuid": f"uuid-{d[-1]}", "vg_name": vg,
                         "vg_uuid": "", "pv_size": "1048576", "pv_free": "0", "pe_start": "0",
                         "dev_size": "1048576", "pv_pe_count": "1", "pv_pe_alloc_count": "0",
                         "pv_mda_count": "1", "pv_mda_size": str(32 * MiB), "pv_mda_free": "0",
                         "pv_tags": ""} for d, vg in self.pvs.items()]
                out = json.dumps({"report": [{"pv": rows}]})
            elif op == "pvcreate":
                for d in args:
                    if d.startswith("/dev/"):
                        self.pvs[d] = ""
            elif op == "vgextend":
                for d in args[1:]:
                    self.pvs[d] = args[0]
        else:
            return await super().__call__(argv, timeout=timeout, check=check, **kwargs)
        return commands.CommandResult(tuple(argv), 0, out.encode(), b"")


async def luns(guids: list[str]) -> list[str]:
    """The LUN paths of the tests: their maps are named by WWID."""
    return [f"/dev/mapper/{g}" for g in guids]


def wwid(path: str) -> str:
    return path.rsplit("/", 1)[1]


@pytest.fixture
def grow(domain: FileBlockDomain) -> FileBlockDomain:
    fake = GrowLVM()
    domain.runner = fake
    domain.lvm = lvm.LVM(fake, devices=[OLD])
    slots.write_slot(domain.md_path, bd.DOMAIN_SLOT, bd.encode_copy(domain.md.encode()))
    return domain


async def test_add_devices_then_again_changes_nothing(grow: FileBlockDomain) -> None:
    fake: GrowLVM = grow.runner   # type: ignore[assignment]
    await grow.add_devices([wwid(NEW)], luns, timeout=10)
    assert fake.pvs == {OLD: SD, NEW: SD}
    assert [o for o in fake.ops if o in ("pvcreate", "vgextend")] == ["pvcreate", "vgextend"]
    # the domain metadata on storage lists both PVs; this host's filter has both
    # (not multipath maps here: named by their device names)
    assert (await grow.read_domain_md()).pvs == "3600a:uuid-a,3600b:uuid-b"
    assert grow.lvm.devices == (OLD, NEW)
    fake.ops.clear()
    await grow.add_devices([wwid(NEW), wwid(OLD)], luns, timeout=10)
    assert not [o for o in fake.ops if o in ("pvcreate", "vgextend", "blkid")], fake.ops


async def test_space_follows_luns_another_host_added(grow: FileBlockDomain) -> None:
    """Host B's domain object sees only the first LUN; host A added a second
    (PVS names it): B's space check adds it to B's filter."""
    fake: GrowLVM = grow.runner   # type: ignore[assignment]
    fake.pvs[NEW] = SD
    md = replace(grow.md, pvs="3600a:uuid-a,3600b:uuid-b")
    slots.write_slot(grow.md_path, bd.DOMAIN_SLOT, bd.encode_copy(md.encode()))
    assert grow.lvm.devices == (OLD,)
    await grow.space()
    assert grow.lvm.devices == (OLD, NEW)
    assert grow.md.pvs == md.pvs and "maps" in fake.ops
    # in step now: no map listing
    fake.ops.clear()
    await grow.space()
    assert grow.lvm.devices == (OLD, NEW) and "maps" not in fake.ops, fake.ops


async def test_add_devices_takes_an_orphan_pv_without_pvcreate(grow: FileBlockDomain) -> None:
    fake: GrowLVM = grow.runner   # type: ignore[assignment]
    fake.pvs[NEW] = ""          # an extend cut short between pvcreate and vgextend
    await grow.add_devices([wwid(NEW)], luns, timeout=10)
    assert fake.pvs[NEW] == SD
    assert "pvcreate" not in fake.ops and "vgextend" in fake.ops


@pytest.mark.parametrize("setup, device, code", [
    (lambda f: f.pvs.update({NEW: "another-vg"}), NEW, 601),
    (lambda f: f.signature.update({NEW: "xfs"}), NEW, 601),
    (lambda f: None, OTHER, 517),             # 4096-byte sectors in a 512 domain
])
async def test_add_devices_refused_before_anything_changes(grow: FileBlockDomain, setup: Any,
                                                           device: str, code: int) -> None:
    fake: GrowLVM = grow.runner   # type: ignore[assignment]
    setup(fake)
    before = dict(fake.pvs)
    with pytest.raises(HostAgentError) as e:
        await grow.add_devices([wwid(device)], luns, timeout=10)
    assert e.value.code == code, e.value
    assert fake.pvs == before
    assert not [o for o in fake.ops if o in ("pvcreate", "vgextend")], fake.ops
    assert grow.lvm.devices == (OLD,)
    assert (await grow.read_domain_md()).pvs == ""


async def test_failed_vgextend_is_503_and_restores_the_filter(grow: FileBlockDomain) -> None:
    fake: GrowLVM = grow.runner   # type: ignore[assignment]
    fake.fail = "vgextend"
    with pytest.raises(HostAgentError) as e:
        await grow.add_devices([wwid(NEW)], luns, timeout=10)
    assert (e.value.code, e.value.name) == (503, "VolumeGroupExtendError")
    assert grow.lvm.devices == (OLD,)


async def test_resize_device_refuses_a_lun_not_in_the_domain(grow: FileBlockDomain) -> None:
    fake: GrowLVM = grow.runner   # type: ignore[assignment]
    with pytest.raises(HostAgentError) as e:
        await grow.resize_device(wwid(NEW), luns, timeout=10)
    assert (e.value.code, e.value.name) == (615, "CouldNotResizePhysicalVolume")
    assert "pvresize" not in fake.ops
    assert await grow.resize_device(wwid(OLD), luns, timeout=10) == MiB
    assert "pvresize" in fake.ops


# ---- wipe ---------------------------------------------------------------------------

def wipe_order(ops: list[str]) -> list[str]:
    return [o for o in ops if o in ("lvchange --addtag", "blkdiscard", "lvremove")]


class WipeLVM(FakeLVM):
    async def __call__(self, argv: Sequence[str], *, timeout: float,
                       check: bool = True, **kwargs: Any) -> commands.CommandResult:
        if argv[0] == "blkdiscard":
            self.ops.append("blkdiscard")
            self.wiped = list(argv)
            return commands.CommandResult(tuple(argv), 0, b"", b"")
        return await super().__call__(argv, timeout=timeout, check=check, **kwargs)


@pytest.fixture
def wiping(domain: FileBlockDomain) -> FileBlockDomain:
    fake = WipeLVM()
    domain.runner = fake
    domain.lvm = lvm.LVM(fake, devices=[OLD])
    slots.write_slot(domain.md_path, bd.DOMAIN_SLOT, bd.encode_copy(domain.md.encode()))
    return domain


async def test_delete_with_wipe_tags_then_zeroes_then_removes(
        wiping: FileBlockDomain) -> None:
    fake: WipeLVM = wiping.runner   # type: ignore[assignment]
    await wiping.write_volume_md(replace(vol(V1), legality="LEGAL"))
    fake.ops.clear()
    await wiping.delete_volume(IMG, V1, wipe=True)
    assert wipe_order(fake.ops) == ["lvchange --addtag", "blkdiscard", "lvremove"]
    assert fake.wiped == ["blkdiscard", "--zeroout", f"/dev/{SD}/{V1}"]
    assert V1 not in fake.lvs


async def test_wipe_also_discards_where_the_lun_takes_discards(wiping: FileBlockDomain,
                                                               tmp_path: Path) -> None:
    fake: WipeLVM = wiping.runner   # type: ignore[assignment]
    # the LV's device-mapper node (here: its path's last part, no such node)
    queue = tmp_path / "sys" / "block" / V1 / "queue"
    queue.mkdir(parents=True)
    (queue / "discard_max_bytes").write_text("4294966784\n")
    wiping.sysfs = str(tmp_path / "sys")
    await wiping.write_volume_md(replace(vol(V1), legality="LEGAL"))
    fake.ops.clear()
    await wiping.delete_volume(IMG, V1, wipe=True)
    assert wipe_order(fake.ops) == ["lvchange --addtag", "blkdiscard", "blkdiscard",
                                    "lvremove"]
    assert fake.wiped == ["blkdiscard", f"/dev/{SD}/{V1}"]     # the discard, last
    (queue / "discard_max_bytes").write_text("0\n")
    assert not vgd.discards(V1, str(tmp_path / "sys"))


async def test_delete_without_wipe_zeroes_nothing(wiping: FileBlockDomain) -> None:
    fake: WipeLVM = wiping.runner   # type: ignore[assignment]
    await wiping.write_volume_md(replace(vol(V1), legality="LEGAL"))
    await wiping.delete_volume(IMG, V1)
    assert "blkdiscard" not in fake.ops and V1 not in fake.lvs


async def test_gc_wipes_a_volume_left_removing_with_wipe(wiping: FileBlockDomain) -> None:
    """A crash after the mark: REMOVING and tagged WIPE; garbage collection
    zeroes it before it removes it."""
    fake: WipeLVM = wiping.runner   # type: ignore[assignment]
    md = replace(vol(V1), legality="LEGAL")
    await wiping.write_volume_md(md)
    await wiping.mark_wipe([md])
    await wiping.write_volume_md(replace(md, state=REMOVING, legality="ILLEGAL"))
    assert "WIPE" in fake.lvs[V1]["tags"]
    fake.ops.clear()
    report = await wiping.collect_garbage()
    assert report["removed"] == [f"{IMG}/{V1}"]
    assert wipe_order(fake.ops) == ["blkdiscard", "lvremove"]


def test_wipe_timeout_grows_with_the_lv() -> None:
    assert vgd.wipe_timeout(0) == 60
    assert vgd.wipe_timeout(1024 * MiB) == 60 + 1024


# ---- rescans ------------------------------------------------------------------------

W1 = "3600a"


def fake_sysfs(root: Path, map_size: int, disk_sizes: dict[str, int]) -> Path:
    (root / "block" / "dm-0").mkdir(parents=True)
    (root / "block" / "dm-0" / "size").write_text(f"{map_size // 512}\n")
    for name, size in disk_sizes.items():
        (root / "block" / name / "device").mkdir(parents=True)
        (root / "block" / name / "size").write_text(f"{size // 512}\n")
        (root / "block" / name / "device" / "rescan").write_text("")
    return root


def mpaths(*disks: str) -> list[multipath.MPath]:
    return [multipath.MPath(W1, d, "active", "ready", "running", f"1:0:0:{i}", "mpatha",
                            "8:0") for i, d in enumerate(disks)]


@pytest.mark.parametrize("disk_sizes, resized", [
    ({"sda": 2048 * MiB, "sdb": 2048 * MiB}, True),
    ({"sda": 1024 * MiB, "sdb": 1024 * MiB}, False),      # nothing grew
    ({"sda": 2048 * MiB, "sdb": 1024 * MiB}, False),      # paths disagree
])
async def test_resize_map_after_rescanning_its_paths(tmp_path: Path, disk_sizes: dict[str, int],
                                                     resized: bool) -> None:
    sysfs = fake_sysfs(tmp_path, 1024 * MiB, disk_sizes)
    fake = FakeRunner()
    m = multipath.Map("mpatha", W1, "dm-0", 2, "active")
    got = await devices.resize_map(m, mpaths("sda", "sdb"), timeout=5, runner=fake,
                                   sysfs=sysfs)
    assert got is resized
    for d in disk_sizes:
        assert (sysfs / "block" / d / "device" / "rescan").read_text() == "1"
    assert fake.argvs("multipathd") == ([["multipathd", "resize", "map", "mpatha"]]
                                        if resized else [])


async def test_refresh_rescans_sessions_then_resizes_maps(tmp_path: Path) -> None:
    sysfs = fake_sysfs(tmp_path, 1024 * MiB, {"sda": 2048 * MiB})

    def respond(argv: list[str]) -> tuple[int, str, str]:
        if argv[:3] == ["multipathd", "show", "maps"]:
            return 0, f"mpatha|{W1}|dm-0|1|active\n", ""
        if argv[:3] == ["multipathd", "show", "paths"]:
            return 0, f"{W1}|sda|active|ready|running|1:0:0:1|mpatha|8:0\n", ""
        return 0, "", ""

    fake = FakeRunner(respond)
    assert await devices.refresh(timeout=5, runner=fake, sysfs=sysfs) == ["mpatha"]
    ran = fake.argvs()
    assert ran[0] == ["iscsiadm", "-m", "session", "-R"]
    assert ran[-1] == ["multipathd", "resize", "map", "mpatha"]


async def test_refresh_scans_fc_hosts(tmp_path: Path) -> None:
    (tmp_path / "class" / "fc_host" / "host3").mkdir(parents=True)
    (tmp_path / "class" / "scsi_host" / "host3").mkdir(parents=True)
    (tmp_path / "class" / "scsi_host" / "host3" / "scan").write_text("")
    (tmp_path / "class" / "scsi_host" / "host4").mkdir(parents=True)   # iSCSI: not scanned
    (tmp_path / "class" / "scsi_host" / "host4" / "scan").write_text("")
    await devices.refresh(timeout=5, runner=FakeRunner(), sysfs=tmp_path)
    assert (tmp_path / "class" / "scsi_host" / "host3" / "scan").read_text() == "- - -"
    assert (tmp_path / "class" / "scsi_host" / "host4" / "scan").read_text() == ""


async def test_refresh_without_iscsi_sessions_goes_on(tmp_path: Path) -> None:
    def respond(argv: list[str]) -> tuple[int, str, str]:
        if argv[0] == "iscsiadm":
            return 21, "", "iscsiadm: No session found.\n"
        return 0, "", ""

    fake = FakeRunner(respond)
    assert await devices.refresh(timeout=5, runner=fake, sysfs=tmp_path) == []
    assert ["multipathd", "show", "maps", "raw", "format", multipath.MAP_FORMAT] in \
        fake.argvs()


# ---- the verbs' parameters ------------------------------------------------------------

@pytest.mark.parametrize("method, params, field", [
    ("extendStorageDomain", {"sdUUID": SD, "devices": []}, "devices"),
    ("extendStorageDomain", {"sdUUID": SD, "devices": ["-x"]}, "devices[0]"),
    ("extendStorageDomain", {"sdUUID": "nope", "devices": ["3600a"]}, "sdUUID"),
    ("resizePV", {"sdUUID": SD, "guid": "a b"}, "guid"),
    ("resizePV", {"sdUUID": SD}, "guid"),
    ("getDeviceList", {"refresh": "yes"}, "refresh"),
    ("deleteVolume", {"sdUUID": SD, "imgUUID": IMG, "volUUID": V1, "wipe": 1}, "wipe"),
])
async def test_grow_verbs_refuse_bad_params(dispatcher: Any, method: str,
                                            params: dict[str, Any], field: str) -> None:
    r = await call(dispatcher, method, **params)
    assert r["error"]["code"] == -32602, r
    assert r["error"]["data"]["field"] == field


async def test_extend_unknown_domain_is_358(dispatcher: Any) -> None:
    r = await call(dispatcher, "extendStorageDomain", sdUUID=SD, devices=["3600a"])
    assert r["error"]["code"] == 358, r


def test_domain_metadata_pvs_round_trip() -> None:
    md = DomainMetadata(uuid=SD, name="d", dom_type="iscsi", dom_class="data",
                        pvs="3600a:u1,3600b:u2")
    assert DomainMetadata.decode(md.encode()).pvs == "3600a:u1,3600b:u2"
