"""storage.domains.blockdomain on a multipath device in the lab guest: the
Domain flows on a real VG, with activation, qcow2 chains and crash leftovers."""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import replace
from pathlib import Path

import pytest

from storage import lvm, qemuimg
from storage.domains.base import VolumeSpec
from storage.domains.blockdomain import BlockDomain
from storage.errors import ImageDoesNotExistInSD
from storage.fileio import IOPool
from storage.metadata import (
    CREATING,
    ILLEGAL,
    INTERNAL,
    LEAF,
    LEGAL,
    DomainMetadata,
    VolumeMetadata,
)
from tests.lab import guestlib as g

MiB = 1 << 20
EXTENT = 8 * MiB
log = logging.getLogger("test")


def new_id() -> str:
    return str(uuid.uuid4())


async def test_block_domain(lvm_device: str, tmp_path: Path) -> None:
    t0 = time.monotonic()
    io = IOPool("lab-block", timeout=60)
    mgr = lvm.LVM(devices=[lvm_device], timeout=120)
    sd = new_id()
    md = DomainMetadata(uuid=sd, name="lab block", dom_type="iscsi", dom_class="data")
    dom = await BlockDomain.create([lvm_device], md, mgr, io, extent_size=EXTENT,
                                   metadata_size=EXTENT)
    try:
        t_create = time.monotonic() - t0
        assert await dom.read_domain_md() == dom.md
        assert dom.md.block_size in (512, 4096)
        await dom.health_check(5)
        vg = await mgr.vg(sd)
        assert "HOSTAGENT_SD" in vg.tags and "INITIALIZING" not in vg.tags
        assert {lv.name for lv in await mgr.lvs(sd)} == {"metadata", "ids", "leases"}

        # ---- volumes: raw preallocated, cow preallocated, a cow chain three deep
        img_raw, img_pre, img_chain = new_id(), new_id(), new_id()
        raw, pre, base, mid, top = (new_id() for _ in range(5))
        await dom.create_volume(VolumeSpec(img_raw, raw, 16 * MiB, "raw", "preallocated"))
        await dom.create_volume(VolumeSpec(img_pre, pre, 32 * MiB, "cow", "preallocated"))
        await dom.create_volume(VolumeSpec(img_chain, base, 64 * MiB, "cow", "sparse"))
        await dom.create_volume(VolumeSpec(img_chain, mid, 64 * MiB, "cow", "sparse",
                                           parent=base))
        await dom.create_volume(VolumeSpec(img_chain, top, 64 * MiB, "cow", "sparse",
                                           parent=mid, initial_size=16 * MiB))
        t_volumes = time.monotonic() - t0
        assert (await dom.volume(img_chain, mid)).voltype == INTERNAL
        assert (await dom.volume_sizes(img_raw, raw)) == (16 * MiB, 16 * MiB)
        assert (await dom.volume_sizes(img_pre, pre))[0] > 32 * MiB   # qcow2 overhead
        assert (await dom.volume_sizes(img_chain, top))[0] == 16 * MiB
        # sparse cow below a chunk: what its full capacity needs
        assert (await dom.volume_sizes(img_chain, base))[0] == await dom.full_size(64 * MiB)
        lvs = {lv.name: lv for lv in await mgr.lvs(sd)}
        # the domain's own LVs stay active (metadata; ids and leases: the
        # lease areas every host uses), its volumes only while in use
        assert not any(lv.active for name, lv in lvs.items()
                       if name not in ("metadata", "ids", "leases"))
        assert set(lvs[top].tags) == {f"IU_{img_chain}", f"PU_{mid}",
                                      next(t for t in lvs[top].tags if t.startswith("MD_"))}

        # ---- prepared: qemu-img sees the chain the metadata describes
        chain = await dom.chain(img_chain, top)
        assert [v.uuid for v in chain] == [base, mid, top]
        await dom.activate_volumes(chain)
        infos = await qemuimg.info(dom.volume_path(img_chain, top), backing_chain=True)
        assert [Path(i.filename).name for i in infos] == [top, mid, base]
        for info, vmd in zip(infos, reversed(chain), strict=True):
            assert info.format == "qcow2" and vmd.format == "COW"
            assert info.virtual_size == vmd.capacity
            assert (info.backing_filename or "") == ("" if not vmd.has_parent else vmd.parent)

        # data in the base shows through; data written through the top reads back
        g.run("qemu-io", "-f", "qcow2", "-c", "write -P 0xcd 0 1M",
              dom.volume_path(img_chain, base))
        g.run("qemu-io", "-f", "qcow2", "-c", "write -P 0xab 1M 1M",
              dom.volume_path(img_chain, top))
        out = tmp_path / "top.raw"
        await qemuimg.convert(dom.volume_path(img_chain, top), out, src_fmt="qcow2",
                              dst_fmt="raw", dst_cache="writeback")
        data = out.read_bytes()
        assert data[:MiB] == b"\xcd" * MiB and data[MiB:2 * MiB] == b"\xab" * MiB
        assert data[2 * MiB:] == bytes(len(data) - 2 * MiB)
        out.unlink()
        await dom.deactivate_volumes(chain)
        assert not any(Path(dom.volume_path(img_chain, v.uuid)).exists() for v in chain)

        [raw_md] = await dom.image_volumes(img_raw)
        await dom.activate_volumes([raw_md])
        [info] = await qemuimg.info(dom.volume_path(img_raw, raw), fmt="raw")
        assert info.virtual_size == raw_md.capacity == 16 * MiB
        await dom.deactivate_volumes([raw_md])

        # ---- extend
        done = await dom.extend_volume(img_raw, raw, 20 * MiB)
        assert done.capacity == 20 * MiB and done.generation == 2
        assert (await dom.volume_sizes(img_raw, raw))[0] == 24 * MiB   # whole extents
        done = await dom.extend_volume(img_chain, top, 128 * MiB)
        await dom.activate_volumes(chain)
        [info, *_] = await qemuimg.info(dom.volume_path(img_chain, top), backing_chain=True)
        assert info.virtual_size == done.capacity == 128 * MiB
        await dom.deactivate_volumes(chain)
        assert not Path(dom.volume_path(img_chain, base)).exists()

        # ---- delete a volume, an image
        await dom.delete_volume(img_chain, top)
        assert (await dom.volume(img_chain, mid)).voltype == LEAF
        await dom.delete_image(img_pre)
        with pytest.raises(ImageDoesNotExistInSD):
            await dom.image_volumes(img_pre)
        assert pre not in {lv.name for lv in await mgr.lvs(sd)}
        t_flows = time.monotonic() - t0

        # ---- crash leftovers: an LV still INITIALIZING, a volume still CREATING
        img_gc, init_vol, creating_vol = new_id(), new_id(), new_id()
        await mgr.lvcreate(sd, init_vol, EXTENT,
                           tags=[f"IU_{img_gc}", "MD_40", "INITIALIZING"])
        half = VolumeMetadata(domain=sd, image=img_gc, uuid=creating_vol, parent=mid,
                              format="COW", allocation="SPARSE", voltype=LEAF,
                              capacity=64 * MiB, legality=ILLEGAL, state=CREATING)
        await dom.write_volume_md(half)
        assert set(await dom.volume_ids(img_gc)) == {init_vol, creating_vol}
        report = await dom.collect_garbage()
        assert sorted(report["removed"]) == sorted([f"{img_gc}/{init_vol}",
                                                    f"{img_gc}/{creating_vol}"])
        assert report["damaged"] == []
        assert img_gc not in await dom.image_ids()
        names = {lv.name for lv in await mgr.lvs(sd)}
        assert init_vol not in names and creating_vol not in names

        # ---- re-open from storage alone
        before = sorted(await dom.all_volumes(), key=lambda v: v.uuid)
        assert {v.uuid for v in before} == {raw, base, mid}
        assert all(v.legality == LEGAL for v in before)
        await dom.close()
        mgr2 = lvm.LVM(devices=[lvm_device], timeout=120)
        dom2 = await BlockDomain.open(sd, mgr2, io)
        assert dom2.md == dom.md
        assert dom2.extent_size == EXTENT
        assert sorted(await dom2.all_volumes(), key=lambda v: v.uuid) == before
        assert await dom2.image_ids() == sorted([img_raw, img_chain])
        assert replace(await dom2.volume(img_chain, mid), ctime=0) == \
            replace(await dom.volume(img_chain, mid), ctime=0)
        space = await dom2.space()
        assert space["capacity"] == space["free"] + space["used"] and space["used"] > 0

        # ---- format
        await dom2.remove_all()
        assert sd not in {v.name for v in await mgr2.vgs()}
        assert await mgr2.pvs() == []
        log.warning("block domain lab timings: create %.1f s, 5 volumes %.1f s, "
                    "flows %.1f s, all %.1f s", t_create, t_volumes, t_flows,
                    time.monotonic() - t0)
    finally:
        io.close()
