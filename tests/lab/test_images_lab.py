"""A VM's disks across domains with block domains among them: two block
domains (each an LVM VG on its own multipath iSCSI LUN) and an NFS v4.2
file domain. Copies file->block, block->file, block->block with format
conversion, a chain moved block->file->block, template clones, a snapshot
of three disks with one failing on a full VG, hibernation volumes."""

from __future__ import annotations

import hashlib
import json
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from rpc.client import Client
from tests.agentproc import AgentProcess
from tests.integration.test_images_file import Disk
from tests.lab import guestlib as g
from tests.lab.test_connections_lab import PORTAL1, PORTAL2, disconnect_all, iscsi_params

MiB = 1024**2
EXTENT = 8 * MiB


def new_id() -> str:
    return str(uuid.uuid4())


class Env:
    def __init__(self, c: Client, block: list[str], nfs: str) -> None:
        self.c, self.block, self.nfs = c, block, nfs
        self.sds = [*block, nfs]

    async def job(self, verb: str, **params: Any) -> dict[str, Any]:
        jid = new_id()
        await self.c.call(verb, jobUUID=jid, **params)
        return dict(await self.c.wait_job(jid, timeout=300))

    async def done(self, verb: str, **params: Any) -> Any:
        info = await self.job(verb, **params)
        assert info["status"] == "done", info
        return info.get("result")

    async def disk(self, sd: str, fmt: str = "raw", data: int | None = None,
                   size: int = 32 * MiB, parent: str | None = None,
                   img: str | None = None) -> Disk:
        d = Disk(sd, img or new_id(), new_id())
        params: dict[str, Any] = dict(**d.ref(), size=size, format=fmt, preallocate="sparse")
        if fmt == "cow" and sd in self.block:
            # nothing grows a cow LV as a VM fills it here: room for the data
            params["initialSize"] = size
        if parent:
            params["parentVolUUID"] = parent
        await self.done("createVolume", **params)
        if data is not None:
            await self.write(d, data)
        return d

    async def write(self, d: Disk, pattern: int, offset: int = 0,
                    length: int = 4 * MiB) -> None:
        p = await self.c.call("prepareImage", **d.ref(), purpose="vm")
        fmt = p["chain"][-1]["format"]
        subprocess.run(["qemu-io", "-f", "qcow2" if fmt == "cow" else "raw", "-c",
                        f"write -P {pattern} {offset} {length}", p["path"]],
                       check=True, capture_output=True)
        await self.c.call("teardownImage", sdUUID=d.sd, imgUUID=d.img, volUUID=d.vol)

    async def digest(self, d: Disk) -> str:
        p = await self.c.call("prepareImage", **d.ref(), purpose="read")
        try:
            fmt = p["chain"][-1]["format"]
            with tempfile.TemporaryDirectory() as tmp:
                raw = Path(tmp) / "raw"
                subprocess.run(["qemu-img", "convert", "-U", "-f",
                                "qcow2" if fmt == "cow" else "raw", "-O", "raw", p["path"],
                                str(raw)], check=True, capture_output=True)
                return hashlib.sha256(raw.read_bytes()).hexdigest()
        finally:
            await self.c.call("teardownImage", sdUUID=d.sd, imgUUID=d.img, volUUID=d.vol)

    async def volumes(self) -> dict[str, list[str]]:
        return {sd: sorted(await self.c.call("getVolumesList", sdUUID=sd)) for sd in self.sds}


def lvs(vg: str) -> list[str]:
    out = subprocess.run(["lvs", "--noheadings", "-o", "lv_name", vg], capture_output=True,
                         text=True, check=True).stdout
    return sorted(out.split())


def active_lvs(vg: str) -> list[str]:
    out = subprocess.run(["lvs", "--reportformat", "json", "-o", "lv_name,lv_active", vg],
                         capture_output=True, text=True, check=True).stdout
    return sorted(lv["lv_name"] for lv in json.loads(out)["report"][0]["lv"]
                  if lv["lv_active"] == "active")


@pytest.fixture
async def env(make_target: Callable[..., g.Target], multipathd: g.Multipathd,
              nfs_server: g.NfsServer, tmp_path: Path) -> AsyncIterator[Env]:
    state = tmp_path / "agent"
    state.mkdir()
    (state / "hostagent.toml").write_text(
        f"[storage]\nblock_extent_size = {EXTENT}\nmonitor_interval = 2.0\n"
        # small LUNs: thin cow volumes start at 64 MiB, not VDSM's 2560 MiB
        f"[thin]\nchunk_size = {64 * MiB}\n")
    agent = AgentProcess(state)
    g.LOG_DIR.mkdir(parents=True, exist_ok=True)
    agent.log_path = g.LOG_DIR / f"agent-images-{agent.port}.log"
    agent.start(timeout=60)
    export = nfs_server.exports[0] / f"images-{new_id()[:8]}"
    export.mkdir()
    export.chmod(0o777)
    try:
        async with agent.client() as c:
            # one target with two LUNs: one login per portal
            target = make_target("images", (768 * MiB, 768 * MiB))
            statuses = await c.call("connectStorageServer", domType="iscsi",
                                    connectionParams=[iscsi_params(target, PORTAL1),
                                                      iscsi_params(target, PORTAL2)])
            assert [s["status"] for s in statuses] == [0, 0], statuses
            luns = sorted((d for d in await c.call("getDeviceList")
                           if {p["iqn"] for p in d["pathlist"]} == {target.iqn}),
                          key=lambda d: -int(d["capacity"]))
            assert len(luns) == 2, luns
            block = []
            for name, lun in zip(("imga", "imgb"), luns, strict=True):
                sd = new_id()
                await c.call("createStorageDomain", sdUUID=sd, domType="iscsi", name=name,
                             devices=[lun["guid"]], ovfStore=False)
                block.append(sd)
            cid, nfs = new_id(), new_id()
            nfs_conn = {"id": cid, "connection": f"127.0.0.1:/{nfs_server.exports[0].name}"
                        f"/{export.name}", "protocol_version": "4.2"}
            [st] = await c.call("connectStorageServer", domType="nfs",
                                connectionParams=[nfs_conn])
            assert st["status"] == 0, st
            await c.call("createStorageDomain", sdUUID=nfs, domType="nfs", name="nfs",
                         connectionId=cid, ovfStore=False)
            env = Env(c, block, nfs)
            try:
                yield env
            finally:
                for sd in env.sds:
                    for img in await c.call("getImagesList", sdUUID=sd):
                        await c.call("teardownImage", sdUUID=sd, imgUUID=img)
                    await c.call("formatStorageDomain", sdUUID=sd)
                for st in await disconnect_all(c):
                    assert st["status"] == 0, st
    finally:
        agent.stop()
        subprocess.run(["rm", "-rf", str(export)], check=False)


# one environment for all (a block domain costs ~20 s to set up in the guest)
@pytest.mark.timeout(600)
async def test_disks_across_block_and_file_domains(env: Env) -> None:
    c = env.c
    a, b, nfs = env.sds
    # a VM's three disks, each on a different domain
    vm = [await env.disk(a, "raw", 1), await env.disk(b, "cow", 2),
          await env.disk(nfs, "raw", 3)]
    digests = [await env.digest(d) for d in vm]

    # import from the NFS domain onto both block domains and itself; block ->
    # file, block -> block with format conversion
    for s, dst_sd, fmt, dig in ((vm[2], a, "cow", digests[2]),
                                (vm[0], nfs, "cow", digests[0]),
                                (vm[1], a, "raw", digests[1])):
        dst = Disk(dst_sd, new_id(), new_id())
        await env.done("copyImage", src=s.ref(), dst=dst.ref(), format=fmt)
        assert await env.digest(dst) == dig
    # nothing left active by the copies
    assert [lv for lv in active_lvs(a) if len(lv) == 36] == []

    # a chain moved block -> file -> block, parents kept, data equal
    top = await env.disk(a, "cow", parent=vm[0].vol, img=vm[0].img)
    await env.write(top, 0x44, offset=16 * MiB)
    before = await env.digest(top)
    await env.done("moveImage", sdUUID=a, imgUUID=top.img, dstSdUUID=nfs)
    assert top.img not in await c.call("getImagesList", sdUUID=a)
    assert top.vol not in lvs(a) and vm[0].vol not in lvs(a)
    assert await env.digest(Disk(nfs, top.img, top.vol)) == before
    await env.done("moveImage", sdUUID=nfs, imgUUID=top.img, dstSdUUID=b)
    moved = Disk(b, top.img, top.vol)
    assert await env.digest(moved) == before
    info = await c.call("getVolumeInfo", **moved.ref())
    assert info["parent"] == vm[0].vol
    assert sorted([top.vol, vm[0].vol]) == sorted(
        v for v in lvs(b) if v in (top.vol, vm[0].vol))

    # template on block domain a: a thin clone there, full clones elsewhere
    template = await env.disk(a, "raw", 0x55)
    tdig = await env.digest(template)
    thin = await env.disk(a, "cow", parent=template.vol)
    clones = [Disk(b, new_id(), new_id())]
    for dst in clones:
        await env.done("copyImage", src=thin.ref(), dst=dst.ref(), format="cow")
    for d in (thin, *clones):
        assert await env.digest(d) == tdig
    # the template's LV stays active while a prepared clone uses it, even
    # after another user of it is torn down
    await c.call("prepareImage", **thin.ref(), purpose="vm")
    other = await env.disk(a, "cow", parent=template.vol)
    await c.call("prepareImage", **other.ref(), purpose="vm")
    await c.call("teardownImage", **other.ref())
    assert template.vol in active_lvs(a) and thin.vol in active_lvs(a)
    await c.call("teardownImage", **thin.ref())
    assert template.vol not in active_lvs(a)

    # snapshot of the VM's three disks, one failing; hibernation
    await snapshot_and_hibernation(env, [thin, vm[1], vm[2]])


async def snapshot_and_hibernation(env: Env, vm: list[Disk]) -> None:
    c = env.c
    a, b, nfs = env.sds
    layers = [new_id() for _ in vm]
    result = await env.done("snapshotImages", disks=[
        {**d.ref(), "newVolUUID": n} for d, n in zip(vm, layers, strict=True)])
    assert [r["uuid"] for r in result] == layers
    tops = [Disk(d.sd, d.img, n) for d, n in zip(vm, layers, strict=True)]

    # fill domain b's VG, then a snapshot of all three fails there and the
    # layers made on a and nfs are rolled back
    free = (await c.call("getStorageDomainStats", sdUUID=b))["free"]
    filler = await env.disk(b, "raw", size=free)
    assert (await c.call("getStorageDomainStats", sdUUID=b))["free"] < EXTENT
    before, lvs_a = await env.volumes(), lvs(a)
    info = await env.job("snapshotImages", disks=[
        {**d.ref(), "newVolUUID": new_id()} for d in (tops[0], tops[2], tops[1])])
    assert info["status"] == "failed" and info["error"]["code"] == 397, info
    assert await env.volumes() == before and lvs(a) == lvs_a
    for d in tops:
        assert (await c.call("getVolumeInfo", **d.ref()))["voltype"] == "LEAF"
    await env.done("deleteImage", sdUUID=b, imgUUID=filler.img)

    # hibernation: memory volumes on block domain a; refused while a disk is
    # on a backup domain, nothing made
    def memory() -> dict[str, Any]:
        return {"sdUUID": a, "imgUUID": new_id(), "dumpVolUUID": new_id(),
                "metaVolUUID": new_id(), "size": 64 * MiB}

    await c.call("setStorageDomainBackup", sdUUID=nfs, backup=True)
    before, lvs_a = await env.volumes(), lvs(a)
    info = await env.job("createHibernationVolumes", memory=memory(),
                         disks=[d.ref() for d in tops])
    assert info["status"] == "failed" and info["error"]["code"] == 2104, info
    assert await env.volumes() == before and lvs(a) == lvs_a
    await c.call("setStorageDomainBackup", sdUUID=nfs, backup=False)
    m = memory()
    result = await env.done("createHibernationVolumes", memory=m,
                            disks=[d.ref() for d in tops])
    assert result["dump"]["capacity"] == 64 * MiB
    assert {m["dumpVolUUID"], m["metaVolUUID"]} <= set(lvs(a))
