"""A new LV's first extent found in the VG metadata on its PV, and its first
bytes written there without activating it (storage/domains/firstextent.py,
issue 21), host tier: real LVM on two loop devices of 512 and 4096-byte
sectors (activation=0: the host has no device-mapper), free space
fragmented so the LV starts on the second PV and not at PE 0, the metadata
text wrapped around its circular area. What LVM itself reports
(`lvs -o seg_pe_ranges`, `pvs -o pe_start`) is the reference; the
"activated LV" is its segment read from the PV, as dm-linear maps it."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from storage import lvm, lvmlabel, qcow2
from storage.domains import firstextent
from tests.conftest import require_tools
from tests.integration.storagefixtures import cmd

pytestmark = pytest.mark.root

MiB = 1 << 20
ENV = {"LVM_SUPPRESS_FD_WARNINGS": "1"}
PARENT = "0d3c8d7e-1111-4c3d-9e8f-0a1b2c3d4e5f"


class TwoPVs:
    """Two loop devices, a VG over both (1 MiB metadata areas, 1 MiB
    extents) and the plain lvm CLI to shape it."""

    def __init__(self, devices: list[str]) -> None:
        self.devices = devices
        self.vg = f"vg-{uuid.uuid4().hex[:8]}"
        accept = ",".join(f'"a|^{d}$|"' for d in devices)
        self.config = (f'devices {{ filter=[{accept},"r|.*|"] use_devicesfile=0 }} '
                       "global { activation=0 }")
        self.lvm = lvm.LVM(devices=devices, activation=False, timeout=60)

    def run(self, *args: str) -> str:
        return cmd("lvm", args[0], "--config", self.config, *args[1:], env=ENV).stdout

    def wipe(self) -> None:
        cmd("lvm", "vgremove", "--config", self.config, "-f", self.vg, check=False, env=ENV)
        for d in self.devices:
            cmd("lvm", "pvremove", "--config", self.config, "-ff", "-y", d, check=False,
                env=ENV)

    def reported(self, lv: str) -> tuple[str, int, int]:
        """(device, byte offset, length) of `lv`'s first segment, by LVM."""
        out = json.loads(self.run("lvs", "--reportformat", "json", "--units", "b",
                                  "--nosuffix", "-o", "seg_pe_ranges,seg_size",
                                  f"{self.vg}/{lv}"))
        seg = out["report"][0]["lv"][0]
        device, pes = seg["seg_pe_ranges"].rsplit(":", 1)
        first = int(pes.split("-")[0])
        pvs = json.loads(self.run("pvs", "--reportformat", "json", "--units", "b", "--nosuffix",
                                  "-o", "pv_name,pe_start", *self.devices))
        pe_start = next(int(p["pe_start"]) for p in pvs["report"][0]["pv"]
                        if p["pv_name"] == device)
        return device, pe_start + first * MiB, int(seg["seg_size"])


@pytest.fixture(params=[512, 4096], ids=["512", "4096"])
def two_pvs(request: pytest.FixtureRequest,
            loop_device: Callable[..., Path]) -> Iterator[TwoPVs]:
    require_tools("lvm", "qemu-img")
    devs = [str(loop_device(size=64 * MiB, sector_size=request.param)) for _ in range(2)]
    pvs = TwoPVs(devs)
    try:
        yield pvs
    finally:
        pvs.wipe()      # before loop_device detaches the devices


async def shaped_vg(pvs: TwoPVs) -> None:
    """pv0 full (LV `two`'s first segment at PE 0-2, `fill` after it); on
    pv1 `two`'s second segment at PE 0-3, a hole at PE 4-6, `c` at 7-8;
    `c` carries 100 KB of tags, so every commit writes 100 KB of text."""
    await pvs.lvm.pvcreate(pvs.devices, metadata_size=MiB, data_alignment=MiB)
    await pvs.lvm.vgcreate(pvs.vg, pvs.devices, extent_size=MiB)
    d0, d1 = pvs.devices
    pvs.run("lvcreate", "-an", "--zero", "n", "-l", "3", "-n", "two", pvs.vg, d0)
    pvs.run("lvcreate", "-an", "--zero", "n", "-l", "100%FREE", "-n", "fill", pvs.vg, d0)
    pvs.run("lvextend", "-l", "+4", f"{pvs.vg}/two", d1)
    pvs.run("lvcreate", "-an", "--zero", "n", "-l", "3", "-n", "hole", pvs.vg, d1)
    pvs.run("lvcreate", "-an", "--zero", "n", "-l", "2", "-n", "c", pvs.vg, d1)
    pvs.run("lvremove", "-f", f"{pvs.vg}/hole")
    tags = [a for i in range(100) for a in ("--addtag", f"T{i}_{'x' * 1000}")]
    pvs.run("lvchange", *tags, f"{pvs.vg}/c")


async def create_wrapped(pvs: TwoPVs, lv: str, size: int) -> lvmlabel.Metadata:
    """lvcreate -an `lv` as the agent does, made again until the text that
    commits it wraps around the metadata area (about 20 commits)."""
    for _ in range(60):
        await pvs.lvm.lvcreate(pvs.vg, lv, size)
        md = await asyncio.to_thread(lvmlabel.read_device_metadata, pvs.devices[0])
        assert md is not None
        if md.wrapped:
            return md
        await pvs.lvm.lvremove(pvs.vg, [lv])
    pytest.fail("the metadata text never wrapped around")


async def located(pvs: TwoPVs, lv: str) -> firstextent.Placement:
    place = await asyncio.to_thread(firstextent.locate, pvs.vg, lv,
                                    await pvs.lvm.pvs(pvs.vg))
    assert place is not None
    device, offset, length = pvs.reported(lv)
    assert (place.device, place.offset, place.length) == (device, offset, length)
    assert device == pvs.devices[1] and offset > 4 * MiB     # pv1, not at PE 0
    return place


def as_qcow2(place: firstextent.Placement) -> str:
    """The LV as dm-linear maps it (its segment of the PV) opened as qcow2
    (its backing file not opened: not there)."""
    lv = {"driver": "raw", "offset": place.offset, "size": place.length,
          "file": {"driver": "host_device", "filename": place.device}}
    return "json:" + json.dumps({"driver": "qcow2", "file": lv, "backing": None})


def qemu_img(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True)


async def test_cow_header_at_first_extent(two_pvs: TwoPVs, tmp_path: Path) -> None:
    """The offset found (text wrapped) is LVM's own; the qcow2 image written
    there is qemu-img create's, byte for byte, and checks clean as the LV."""
    await shaped_vg(two_pvs)
    md = await create_wrapped(two_pvs, "new", 3 * MiB)
    assert md.wrapped
    place = await located(two_pvs, "new")
    with open(place.device, "r+b") as f:           # a reused extent: old bytes
        f.seek(place.offset)
        f.write(os.urandom(place.length))
    await asyncio.to_thread(firstextent.write_first, place.device, place.offset, "COW",
                            1 << 30, PARENT, "qcow2")
    theirs = tmp_path / "theirs.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=1.1",
                    "-b", PARENT, "-F", "qcow2", "-u", str(theirs), str(1 << 30)], check=True)
    written = qcow2.written(1 << 30, PARENT, "qcow2")
    assert written == firstextent.first_bytes("COW", 1 << 30, PARENT, "qcow2")
    with open(place.device, "rb") as f:
        f.seek(place.offset)
        ours = f.read(written)
    assert ours == theirs.read_bytes()[:written].ljust(written, b"\0")
    info = json.loads(qemu_img("info", "--output", "json", as_qcow2(place)).stdout)
    assert (info["format"], info["virtual-size"]) == ("qcow2", 1 << 30), info
    assert info.get("backing-filename") == PARENT
    check = qemu_img("check", "--output", "json", as_qcow2(place))
    assert check.returncode == 0, check.stderr
    assert json.loads(check.stdout)["check-errors"] == 0


async def test_raw_first_mib_zeroed_at_first_extent(two_pvs: TwoPVs) -> None:
    """A raw volume's first MiB zero over old random bytes, at the LV's
    first extent on pv1; nothing around it touched."""
    await shaped_vg(two_pvs)
    await create_wrapped(two_pvs, "new", 3 * MiB)
    place = await located(two_pvs, "new")
    old = os.urandom(place.length + 2 * MiB)
    with open(place.device, "r+b") as f:
        f.seek(place.offset - MiB)
        f.write(old)
    await asyncio.to_thread(firstextent.write_first, place.device, place.offset, "RAW",
                            10 * MiB)
    with open(place.device, "rb") as f:
        f.seek(place.offset - MiB)
        now = f.read(len(old))
    assert now[:MiB] == old[:MiB]                             # the extent before it
    assert now[MiB:2 * MiB] == bytes(MiB)                     # its first MiB
    assert now[2 * MiB:] == old[2 * MiB:]                     # the rest of it, and after
    check = qemu_img("info", as_qcow2(place))
    assert check.returncode != 0 and "qcow2" in check.stderr    # no header shows through


async def test_locate_falls_back(two_pvs: TwoPVs) -> None:
    """An LV not in the text, a PV list without the LV's PV, a device that
    is not the PV the text names: None or UnknownPV, never a wrong place."""
    await shaped_vg(two_pvs)
    pvs = await two_pvs.lvm.pvs(two_pvs.vg)
    assert await asyncio.to_thread(firstextent.locate, two_pvs.vg, "nope", pvs) is None
    with pytest.raises(firstextent.UnknownPV):
        await asyncio.to_thread(firstextent.locate, two_pvs.vg, "c", pvs[:1])
    swapped = [pvs[0], lvm.PV(**{**_fields(pvs[1]), "name": pvs[0].name})]
    assert await asyncio.to_thread(firstextent.locate, two_pvs.vg, "c", swapped) is None
    place = await asyncio.to_thread(firstextent.locate, two_pvs.vg, "c", pvs)
    assert place is not None and place.device == pvs[1].name


def _fields(pv: lvm.PV) -> dict[str, object]:
    return {name: getattr(pv, name) for name in pv.__slots__}
