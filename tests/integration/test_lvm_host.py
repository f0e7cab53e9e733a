"""storage.lvm on loop devices, host tier: metadata only (activation=0, the
host has no device-mapper), 512 and 4096-byte sectors."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from storage import lvm
from storage.errors import CannotCreateLogicalVolume, InvalidParameter, LVMCommandError
from tests.conftest import require_tools
from tests.integration.storagefixtures import CleanupError, cmd

pytestmark = pytest.mark.root

MiB = 1 << 20
SECTOR_SIZES = [512, 4096]
ENV = {"LVM_SUPPRESS_FD_WARNINGS": "1"}


def _config(device: str) -> str:
    return (f'devices {{ filter=["a|^{device}$|","r|.*|"] use_devicesfile=0 }} '
            "global { activation=0 }")


def wipe_lvm(device: str) -> None:
    """Remove whatever VG and PV label the test left on `device` (plain lvm CLI,
    so a broken wrapper cannot break the cleanup)."""
    config = _config(device)
    out = cmd("lvm", "pvs", "--config", config, "--noheadings", "-o", "vg_name", device,
              check=False, env=ENV)
    vg = out.stdout.strip()
    if out.returncode == 0 and vg:
        cmd("lvm", "vgremove", "--config", config, "-f", vg, env=ENV)
    if cmd("lvm", "pvs", "--config", config, device, check=False, env=ENV).returncode == 0:
        cmd("lvm", "pvremove", "--config", config, "-ff", "-y", device, env=ENV)


@pytest.fixture
def lvm_device(loop_device: Callable[..., Path]) -> Iterator[Callable[..., str]]:
    """Factory: `lvm_device(sector_size=512)` -> a loop device path whose LVM
    metadata is wiped at teardown, before the loop device is detached."""
    require_tools("lvm")
    made: list[str] = []

    def make(sector_size: int = 512, size: int = 512 * MiB) -> str:
        device = str(loop_device(size=size, sector_size=sector_size))
        made.append(device)
        return device

    try:
        yield make
    finally:
        errors = []
        for device in made:
            try:
                wipe_lvm(device)
            except Exception as e:
                errors.append(f"{device}: {e}")
        if errors:
            raise CleanupError("; ".join(errors))


def name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def host_lvm(*devices: str) -> lvm.LVM:
    return lvm.LVM(devices=list(devices), activation=False, timeout=60)


async def make_vg(mgr: lvm.LVM, device: str, vg: str, tags: tuple[str, ...] = ()) -> None:
    await mgr.pvcreate([device], metadata_size=16 * MiB, data_alignment=MiB)
    await mgr.vgcreate(vg, [device], extent_size=4 * MiB, tags=tags)


@pytest.mark.parametrize("sector_size", SECTOR_SIZES)
async def test_lifecycle(lvm_device: Callable[..., str], sector_size: int) -> None:
    device = lvm_device(sector_size)
    mgr = host_lvm(device)
    vg = name("vg")

    await mgr.pvcreate([device], metadata_size=16 * MiB, data_alignment=MiB)
    [pv] = await mgr.pvs()
    assert (pv.name, pv.vg_name) == (device, "")
    assert pv.pe_start % MiB == 0 and pv.pe_start >= 16 * MiB
    assert pv.dev_size == 512 * MiB

    await mgr.vgcreate(vg, [device], extent_size=4 * MiB,
                       tags=["RHAT_storage_domain", "MDT_SDUUID=abc", "x/y:z"])
    info = await mgr.vg(vg)
    assert info.extent_size == 4 * MiB
    assert info.size == info.extent_count * 4 * MiB
    assert info.free_count == info.extent_count
    assert info.pv_count == 1 and info.lv_count == 0
    assert set(info.tags) == {"RHAT_storage_domain", "MDT_SDUUID=abc", "x/y:z"}
    [pv] = await mgr.pvs(vg)
    assert (pv.vg_name, pv.vg_uuid) == (vg, info.uuid)

    await mgr.lvcreate(vg, "metadata", 10 * MiB, tags=["IU_img", "PU_none", "ILLEGAL"])
    await mgr.lvcreate(vg, "ids", 8 * MiB, contiguous=True)
    lv = await mgr.lv(vg, "metadata")
    assert lv.size == 12 * MiB   # rounded up to extents
    assert set(lv.tags) == {"IU_img", "PU_none", "ILLEGAL"}
    assert lv.active is None     # activation=0: LVM cannot tell
    assert lv.path == f"/dev/{vg}/metadata"
    assert (await mgr.vg(vg)).free_count == info.extent_count - 5

    # one lvchange: both tags change in one metadata write
    seqno = _seqno(device, vg)
    await mgr.lvchange_tags(vg, "metadata", add=["LEGAL", "MD_7"], remove=["ILLEGAL"])
    assert set((await mgr.lv(vg, "metadata")).tags) == {"IU_img", "PU_none", "LEGAL", "MD_7"}
    assert _seqno(device, vg) == seqno + 1

    await mgr.lvextend(vg, "metadata", 40 * MiB)
    assert (await mgr.lv(vg, "metadata")).size == 40 * MiB
    await mgr.lvextend(vg, "metadata", 40 * MiB)   # already that size: fine

    await mgr.lvrename(vg, "metadata", "renamed")
    assert {lv.name for lv in await mgr.lvs(vg)} == {"renamed", "ids"}

    await mgr.vgchange_tags(vg, add=["MDT_SDUUID=def"], remove=["MDT_SDUUID=abc"])
    assert set((await mgr.vg(vg)).tags) == {"RHAT_storage_domain", "MDT_SDUUID=def", "x/y:z"}

    await mgr.vgck(vg)

    await mgr.lvremove(vg, ["renamed", "ids"])
    assert await mgr.lvs(vg) == []
    assert (await mgr.vg(vg)).free_count == info.extent_count

    await mgr.vgremove(vg)
    with pytest.raises(lvm.LVMNotFound):
        await mgr.vgs(vg)
    await mgr.pvremove([device])
    assert await mgr.pvs() == []


def _seqno(device: str, vg: str) -> int:
    out = cmd("lvm", "vgs", "--config", _config(device), "--noheadings", "-o", "vg_seqno", vg,
              env=ENV).stdout
    return int(out)


async def test_filter_hides_other_vgs(lvm_device: Callable[..., str]) -> None:
    dev_a, dev_b = lvm_device(512), lvm_device(4096)
    mgr_a, mgr_b, both = host_lvm(dev_a), host_lvm(dev_b), host_lvm(dev_a, dev_b)
    vg_a, vg_b = name("vga"), name("vgb")
    await make_vg(mgr_a, dev_a, vg_a)
    await make_vg(mgr_b, dev_b, vg_b)
    await mgr_b.lvcreate(vg_b, "lv", 4 * MiB)

    assert [v.name for v in await mgr_a.vgs()] == [vg_a]
    assert [p.name for p in await mgr_a.pvs()] == [dev_a]
    assert await mgr_a.lvs() == []
    with pytest.raises(lvm.LVMNotFound):
        await mgr_a.vgs(vg_b)
    with pytest.raises(lvm.LVMNotFound):
        await mgr_a.lvremove(vg_b, ["lv"])
    # not even a PV command reaches the other device
    with pytest.raises(InvalidParameter):
        await mgr_a.pvremove([dev_b])

    assert {v.name for v in await both.vgs()} == {vg_a, vg_b}
    assert [(lv.vg_name, lv.name) for lv in await both.lvs()] == [(vg_b, "lv")]
    # still there: nothing above touched it
    assert [lv.name for lv in await mgr_b.lvs(vg_b)] == ["lv"]


async def test_errors(lvm_device: Callable[..., str]) -> None:
    device = lvm_device()
    mgr = host_lvm(device)
    vg = name("vg")
    await make_vg(mgr, device, vg)
    await mgr.lvcreate(vg, "lv", 8 * MiB)

    with pytest.raises(CannotCreateLogicalVolume, match="insufficient free space") as e:
        await mgr.lvcreate(vg, "big", 4096 * MiB)
    assert e.value.code == 550
    with pytest.raises(CannotCreateLogicalVolume, match="already exists"):
        await mgr.lvcreate(vg, "lv", 4 * MiB)
    with pytest.raises(lvm.LVMNotFound, match="not found") as e2:
        await mgr.lvrename(vg, "nosuch", "other")
    assert e2.value.code == 621
    assert "WARNING" not in str(e2.value)
    with pytest.raises(LVMCommandError, match="not larger than existing size"):
        await mgr.lvextend(vg, "lv", 4 * MiB)
    await mgr.lvextend(vg, "lv", 7 * MiB)   # rounds up to the 8 MiB it has: no-op
    with pytest.raises(LVMCommandError, match="activation is disabled"):
        await mgr.activate(vg, ["lv"])


async def test_cache_and_outside_changes(lvm_device: Callable[..., str]) -> None:
    device = lvm_device()
    mgr = host_lvm(device)
    vg = name("vg")
    await make_vg(mgr, device, vg)
    await mgr.lvcreate(vg, "lv", 4 * MiB)
    assert (await mgr.lv(vg, "lv")).tags == ()

    # another host (here: the lvm CLI) changes the VG: the cache still has the old report
    cmd("lvm", "lvchange", "--config", _config(device), "--addtag", "OUTSIDE", f"{vg}/lv",
        env=ENV)
    assert (await mgr.lv(vg, "lv")).tags == ()
    mgr.invalidate(vg)
    assert (await mgr.lv(vg, "lv")).tags == ("OUTSIDE",)

    # our own change is seen at once
    await mgr.lvchange_tags(vg, "lv", add=["OURS"])
    assert set((await mgr.lv(vg, "lv")).tags) == {"OUTSIDE", "OURS"}


async def test_concurrent_changes_to_one_vg(lvm_device: Callable[..., str]) -> None:
    device = lvm_device()
    mgr = host_lvm(device)
    vg = name("vg")
    await make_vg(mgr, device, vg)
    names = [f"lv{i}" for i in range(6)]
    await asyncio.gather(*(mgr.lvcreate(vg, lv, 4 * MiB, tags=[f"N_{lv}"]) for lv in names))
    await asyncio.gather(*(mgr.lvchange_tags(vg, lv, add=["DONE"], remove=[f"N_{lv}"])
                           for lv in names))
    lvs = await mgr.lvs(vg)
    assert sorted(lv.name for lv in lvs) == names
    assert all(lv.tags == ("DONE",) for lv in lvs)
    await mgr.vgck(vg)


@pytest.mark.parametrize("sector_size", SECTOR_SIZES)
async def test_metadata_stamp_follows_commits(lvm_device: Callable[..., str],
                                              sector_size: int) -> None:
    """lvmlabel.metadata_stamp read from the PV's header: the same while no
    command changes the VG (reports included), new after every change, by
    this LVM object or by another (another host); a cached LV report that
    `suspect` kept is used again only while it holds."""
    from storage import lvmlabel

    device = lvm_device(sector_size=sector_size)
    assert await asyncio.to_thread(lvmlabel.metadata_stamp, device) is None   # no label
    mgr, other = host_lvm(device), host_lvm(device)
    vg = name("vg")
    await make_vg(mgr, device, vg)

    def stamp() -> bytes | None:
        return lvmlabel.metadata_stamp(device)

    async def read() -> bytes | None:
        return await asyncio.to_thread(stamp)

    first = await read()
    assert first is not None
    await mgr.lvs(vg)
    await mgr.vgs(vg)
    assert await read() == first
    seen = [first]
    for change in (lambda: mgr.lvcreate(vg, "lv1", 8 * MiB),
                   lambda: mgr.lvchange_tags(vg, "lv1", add=["T1"]),
                   lambda: other.lvcreate(vg, "lv2", 8 * MiB)):
        await change()
        now = await read()
        assert now is not None and now not in seen
        seen.append(now)

    mgr.watch_metadata(vg, read)
    assert {lv.name for lv in await mgr.lvs(vg)} >= {"lv1", "lv2"}
    mgr.suspect(vg)
    assert {lv.name for lv in await mgr.lvs(vg)} >= {"lv1", "lv2"}   # kept: stamp holds
    await other.lvcreate(vg, "lv3", 8 * MiB)                        # another host
    mgr.suspect(vg)
    assert "lv3" in {lv.name for lv in await mgr.lvs(vg)}
