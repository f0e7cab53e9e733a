"""storage.udev on a fake sysfs tree: disk facts, scan and delete writes,
holders, partitions. No root, no udev needed."""

from __future__ import annotations

from pathlib import Path

import pytest

from storage import udev
from storage.errors import InvalidParameter

SESSION_DISK = "/sys/devices/platform/host0/session1/target0:0:0/0:0:0:1/block/sda"


@pytest.mark.parametrize("text, wwid", [
    ("naa.60000000000000000E00000000010001\n", "360000000000000000e00000000010001"),
    ("eui.0025385b71b07e2f", "20025385b71b07e2f"),
    ("t10.ATA     QEMU HARDDISK", "1ATA_____QEMU_HARDDISK"),
    ("", ""),
    ("weird", ""),
])
def test_wwid_from_sysfs(text: str, wwid: str) -> None:
    assert udev.wwid_from_sysfs(text) == wwid


def test_transport() -> None:
    assert udev.transport_of(SESSION_DISK) == "iSCSI"
    assert udev.transport_of("/sys/devices/pci0000:00/0000:00:03.0/host1/rport-1:0-2/"
                             "target1:0:0/1:0:0:3/block/sdc") == "FCP"
    assert udev.transport_of("/sys/devices/pci0000:00/ata1/host0/target0:0:0/0:0:0:0/"
                             "block/sda") == "SCSI"


def test_disk_from_udev_properties_and_sysfs(tmp_path: Path) -> None:
    sysdir = tmp_path / "platform" / "host0" / "session4" / "target0:0:0" / "0:0:0:2" / \
        "block" / "sdb"
    (sysdir / "queue").mkdir(parents=True)
    (sysdir / "device").mkdir()
    (sysdir / "size").write_text("131072\n")
    (sysdir / "queue" / "logical_block_size").write_text("512\n")
    (sysdir / "queue" / "physical_block_size").write_text("4096\n")
    (sysdir / "device" / "wwid").write_text("naa.60000000000000000e00000000010002\n")
    props = {"ID_VENDOR": "IET", "ID_MODEL": "VIRTUAL-DISK", "ID_SCSI_SERIAL": "LAB00010002"}
    disk = udev.disk_from("sdb", str(sysdir), "/nonexistent/sdb", props, "0:0:0:2", True)
    assert disk.wwid == "360000000000000000e00000000010002"   # from sysfs: no ID_SERIAL
    assert (disk.vendor, disk.model, disk.serial) == ("IET", "VIRTUAL-DISK", "LAB00010002")
    assert (disk.size, disk.physical_block_size, disk.lun) == (64 << 20, 4096, 2)
    assert (disk.transport, disk.session) == ("iSCSI", 4)
    assert disk.devnode == "" and not disk.ready   # no /dev node yet
    with_serial = udev.disk_from("sdb", str(sysdir), "/dev/null",
                                 {**props, "ID_SERIAL": "3600x"}, "0:0:0:2", True)
    assert with_serial.wwid == "3600x" and with_serial.ready


async def test_scan_and_delete_write_sysfs(tmp_path: Path) -> None:
    scan = tmp_path / "class" / "scsi_host" / "host3" / "scan"
    scan.parent.mkdir(parents=True)
    scan.write_text("")
    await udev.scan_host("host3", timeout=5, sysfs=tmp_path)
    assert scan.read_text() == "- - -"
    delete = tmp_path / "block" / "sdc" / "device" / "delete"
    delete.parent.mkdir(parents=True)
    delete.write_text("")
    await udev.delete_disk("sdc", timeout=5, sysfs=tmp_path)
    assert delete.read_text() == "1"
    await udev.delete_disk("sdz", timeout=5, sysfs=tmp_path)   # gone already: fine
    for bad in ("../sda", "sda/../../x", "-f"):
        with pytest.raises(InvalidParameter):
            await udev.delete_disk(bad, timeout=5, sysfs=tmp_path)
    with pytest.raises(InvalidParameter):
        await udev.scan_host("host3/../../x", timeout=5, sysfs=tmp_path)


async def test_wait_gone(tmp_path: Path) -> None:
    (tmp_path / "block" / "sda").mkdir(parents=True)
    assert await udev.wait_gone(["sda", "sdb"], timeout=0.1, sysfs=tmp_path) == ["sda"]
    (tmp_path / "block" / "sda").rmdir()
    assert await udev.wait_gone(["sda"], timeout=1, sysfs=tmp_path) == []


def test_holders_partitions_hosts(tmp_path: Path) -> None:
    dm = tmp_path / "block" / "dm-2"
    (dm / "holders" / "dm-5").mkdir(parents=True)
    (dm / "dm-2p1").mkdir()
    (dm / "dm-2p1" / "partition").write_text("1\n")
    (dm / "queue").mkdir()
    (dm / "size").write_text("2048\n")
    assert udev.holders("dm-2", tmp_path) == ["dm-5"]
    assert udev.partitions("dm-2", tmp_path) == ["dm-2p1"]
    assert udev.size_bytes("dm-2", tmp_path) == 2048 * 512
    assert udev.holders("dm-9", tmp_path) == [] and udev.size_bytes("dm-9", tmp_path) == 0
    for h in ("host0", "host12", "notahost"):
        (tmp_path / "class" / "fc_host" / h).mkdir(parents=True)
    assert udev.scsi_hosts(tmp_path, kind="fc_host") == ["host0", "host12"]
    assert udev.scsi_hosts(tmp_path) == []


def test_dm_node(tmp_path: Path) -> None:
    """/dev/dm-N of a device-mapper device, by its name in sysfs."""
    for n, name in ((0, "mpatha"), (3, "vg--a-lv--1")):
        d = tmp_path / "block" / f"dm-{n}" / "dm"
        d.mkdir(parents=True)
        (d / "name").write_text(name + "\n")
    assert udev.dm_node("vg--a-lv--1", sysfs=tmp_path) == "/dev/dm-3"
    assert udev.dm_node("vg--a-lv--2", sysfs=tmp_path) is None
