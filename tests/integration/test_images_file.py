"""A VM's disks across storage domains (the seed "Design for multiple storage
domains") through the real agent, on three file domains: posixfs on ext4
(512-byte sectors), posixfs on xfs (4096-byte sectors) and localfs."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from rpc.client import Client, RpcError
from tests.agentproc import AgentProcess
from tests.conftest import require_tools
from tests.integration.crashharness import digest, done, localfs_domains
from tests.integration.storagefixtures import FsMount, make_fs, wait_for
from tests.integration.test_domains_file import Storage, create_volume, new_id, qemu_info

MiB = 1024**2


@dataclass
class Disk:
    sd: str
    img: str
    vol: str

    def ref(self) -> dict[str, str]:
        return {"sdUUID": self.sd, "imgUUID": self.img, "volUUID": self.vol}


class Env:
    def __init__(self, c: Client, storages: list[Storage]) -> None:
        self.c = c
        self.storages = storages
        self.sds = [s.sd for s in storages]

    async def job(self, verb: str, **params: Any) -> dict[str, Any]:
        jid = new_id()
        await self.c.call(verb, jobUUID=jid, **params)
        return dict(await self.c.wait_job(jid, timeout=120))

    async def done(self, verb: str, **params: Any) -> Any:
        info = await self.job(verb, **params)
        assert info["status"] == "done", info
        return info.get("result")

    async def disk(self, sd: str, size: int = 64 * MiB, fmt: str = "raw",
                   data: int | None = None, **kw: Any) -> Disk:
        d = Disk(sd, new_id(), new_id())
        await create_volume(self.c, sd, d.img, d.vol, size=size, fmt=fmt, **kw)
        if data is not None:
            await self.write(d, data)
        return d

    async def path(self, d: Disk, purpose: str = "read") -> str:
        return str((await self.c.call("prepareImage", **d.ref(), purpose=purpose))["path"])

    async def teardown(self, d: Disk) -> None:
        await self.c.call("teardownImage", sdUUID=d.sd, imgUUID=d.img, volUUID=d.vol)

    async def write(self, d: Disk, pattern: int, offset: int = 0, length: int = 8 * MiB) -> None:
        path = await self.path(d, "vm")
        fmt = qemu_info(path)["format"]
        # in a thread: a long write must not stop this loop answering the
        # agent's WebSocket pings
        await asyncio.to_thread(subprocess.run, ["qemu-io", "-f", fmt, "-c",
                                f"write -P {pattern} {offset} {length}", path],
                                check=True, capture_output=True)
        await self.teardown(d)

    async def digest(self, d: Disk) -> str:
        """sha256 of what the guest sees (the whole chain, as raw)."""
        path = await self.path(d)
        try:
            return await asyncio.to_thread(digest, Path(path))
        finally:
            await self.teardown(d)

    async def volumes(self) -> dict[str, list[str]]:
        return {sd: sorted(await self.c.call("getVolumesList", sdUUID=sd)) for sd in self.sds}


def fill(mount: Path) -> list[Path]:
    """Fill a file system to the last block (files of shrinking sizes, as
    xfs and ext4 give back preallocated space after a close)."""
    made = []
    for i, bs in enumerate(("4M", "64k", "4k", "4k")):
        f = mount / f"filler{i}"
        subprocess.run(["dd", "if=/dev/zero", f"of={f}", f"bs={bs}", "status=none"],
                       capture_output=True)
        subprocess.run(["sync", "-f", str(mount)], check=True)
        made.append(f)
    st = os.statvfs(mount)
    assert st.f_bavail * st.f_frsize < 64 * 1024, st
    return made


async def three_domains(client: Client, loop_device: Callable[..., Path],
                        tmp_path: Path) -> list[Storage]:
    """Connected, each with a domain: posixfs on ext4 (512-byte sectors),
    posixfs on xfs (4096) and localfs."""
    storages = []
    for fstype, sector in (("ext4", 512), ("xfs", 4096)):
        dev = loop_device(size=512 * MiB, sector_size=sector)
        make_fs(dev, fstype)
        storages.append(Storage(client, "posixfs", {"connection": str(dev),
                                                    "vfs_type": fstype}))
    local = tmp_path / "localfs"
    local.mkdir()
    storages.append(Storage(client, "localfs", {"connection": str(local)}))
    for i, s in enumerate(storages):
        await s.connect()
        await s.create_domain(name=f"domain {i}")
    return storages


async def release(client: Client, storages: list[Storage]) -> None:
    for s in storages:
        for img in await client.call("getImagesList", sdUUID=s.sd):
            await client.call("teardownImage", sdUUID=s.sd, imgUUID=img)
        await s.disconnect()


@pytest.fixture
async def env(loop_device: Callable[..., Path], agent: Any, client: Client,
              tmp_path: Path) -> AsyncIterator[Env]:
    storages = await three_domains(client, loop_device, tmp_path)
    yield Env(client, storages)
    await release(client, storages)


async def test_three_disks_import_add_move_delete(env: Env) -> None:
    c = env.c
    # a VM's three disks, each on a different domain
    vm = [await env.disk(sd, data=i + 1) for i, sd in enumerate(env.sds)]
    for d, sd in zip(vm, env.sds, strict=True):
        assert (await c.call("getVolumeInfo", **d.ref()))["domain"] == sd

    # import: three disks on domain 0 copied onto the three domains
    src = [await env.disk(env.sds[0], data=0x10 + i, fmt=fmt)
           for i, fmt in enumerate(("raw", "cow", "raw"))]
    digests = [await env.digest(d) for d in src]
    imported = []
    for d, sd, dig in zip(src, env.sds, digests, strict=True):
        dst = Disk(sd, new_id(), new_id())
        info = await env.done("copyImage", src=d.ref(), dst=dst.ref())
        assert info["legality"] == "LEGAL" and info["domain"] == sd
        assert await env.digest(dst) == dig
        imported.append(dst)
    # converted as asked: raw -> cow preallocated
    conv = Disk(env.sds[1], new_id(), new_id())
    info = await env.done("copyImage", src=src[0].ref(), dst=conv.ref(), format="cow",
                          preallocate="preallocated")
    assert info["format"] == "cow" and info["type"] == "preallocated"
    path = await env.path(conv)
    assert qemu_info(path)["format"] == "qcow2"
    await env.teardown(conv)
    assert await env.digest(conv) == digests[0]

    # add a disk on a domain the VM does not use yet (domain 1 now, then domain 2)
    vm2 = [vm[0], await env.disk(env.sds[1], data=0x21)]
    extra = await env.disk(env.sds[2], data=0x22)
    vm2.append(extra)
    assert {d.sd for d in vm2} == set(env.sds)

    # move a disk with a snapshot chain from one domain to another: data equal,
    # parents preserved, the source gone
    d = vm[0]
    top = new_id()
    await create_volume(c, d.sd, d.img, top, size=64 * MiB, fmt="cow", parent=d.vol)
    d_top = Disk(d.sd, d.img, top)
    await env.write(d_top, 0x33, offset=16 * MiB, length=4 * MiB)
    before = await env.digest(d_top)
    await env.done("moveImage", sdUUID=d.sd, imgUUID=d.img, dstSdUUID=env.sds[1])
    moved = Disk(env.sds[1], d.img, top)
    assert await env.digest(moved) == before
    info = await c.call("getVolumeInfo", **moved.ref())
    assert info["parent"] == d.vol and info["domain"] == env.sds[1]
    base = await c.call("getVolumeInfo", sdUUID=env.sds[1], imgUUID=d.img, volUUID=d.vol)
    assert base["voltype"] == "INTERNAL" and base["legality"] == "LEGAL"
    # only the layer's own data was copied into the top: not the base's 8 MiB
    path = await env.path(moved)
    assert qemu_info(path)["actual-size"] < 8 * MiB
    await env.teardown(moved)
    assert d.img not in await c.call("getImagesList", sdUUID=d.sd)

    # delete a disk; delete a VM's disks
    info = await env.job("deleteImage", sdUUID=extra.sd, imgUUID=extra.img)
    assert info["status"] == "done", info
    for disk in [moved, *vm[1:], *imported]:
        assert (await env.job("deleteImage", sdUUID=disk.sd, imgUUID=disk.img))["status"] \
            == "done"
    left = await env.volumes()
    for disk in [moved, *vm[1:], *imported, extra]:
        assert disk.vol not in left[disk.sd]


async def test_bad_copies_change_nothing(env: Env) -> None:
    c = env.c
    d = await env.disk(env.sds[0], data=1)
    other = await env.disk(env.sds[1])
    before = await env.volumes()
    # unknown source volume, domain; target exists; same volume
    cases = [
        ({"src": {**d.ref(), "volUUID": new_id()}, "dst": Disk(env.sds[1], new_id(),
                                                              new_id()).ref()}, 201),
        ({"src": {**d.ref(), "sdUUID": new_id()}, "dst": Disk(env.sds[1], new_id(),
                                                             new_id()).ref()}, 358),
        ({"src": d.ref(), "dst": other.ref()}, 212),
        ({"src": d.ref(), "dst": {**d.ref(), "sdUUID": new_id()}}, 358),
    ]
    for params, code in cases:
        info = await env.job("copyImage", **params)
        assert info["status"] == "failed" and info["error"]["code"] == code, (params, info)
    # rejected before a job exists
    bad: list[tuple[dict[str, Any], str]] = [
        ({"src": d.ref(), "dst": d.ref()}, "dst"),
        ({"src": d.ref(), "dst": Disk(env.sds[1], new_id(), new_id()).ref(),
          "collapse": False, "format": "cow"}, "format"),
        ({"src": {**d.ref(), "volUUID": "nope"}, "dst": other.ref()}, "src.volUUID")]
    for params, name in bad:
        with pytest.raises(Exception) as e:
            await c.call("copyImage", jobUUID=new_id(), **params)
        assert getattr(e.value, "code", None) == -32602 and name in str(e.value), e.value
    # moving onto the same domain, or an image that is prepared
    with pytest.raises(Exception) as e:
        await c.call("moveImage", jobUUID=new_id(), sdUUID=d.sd, imgUUID=d.img,
                     dstSdUUID=d.sd)
    assert getattr(e.value, "code", None) == -32602
    await env.path(d)
    info = await env.job("moveImage", sdUUID=d.sd, imgUUID=d.img, dstSdUUID=env.sds[2])
    assert info["status"] == "failed" and info["error"]["code"] == 203, info
    await env.teardown(d)
    assert await env.volumes() == before


async def test_template_clones_thin_and_full(env: Env) -> None:
    c = env.c
    # a three-disk template on domain 0
    template = [await env.disk(env.sds[0], data=0x40 + i, fmt="raw") for i in range(3)]
    digests = [await env.digest(t) for t in template]
    # VM: disk 0 thin on the template's domain, disks 1 and 2 cloned elsewhere
    thin = Disk(env.sds[0], new_id(), new_id())
    await create_volume(c, thin.sd, thin.img, thin.vol, size=64 * MiB, fmt="cow",
                        parent=template[0].vol)
    clones = [Disk(env.sds[1], new_id(), new_id()), Disk(env.sds[2], new_id(), new_id())]
    for t, dst in zip(template[1:], clones, strict=True):
        await env.done("copyImage", src=t.ref(), dst=dst.ref(), format="cow")
    assert await env.digest(thin) == digests[0]
    for dst, dig in zip(clones, digests[1:], strict=True):
        assert await env.digest(dst) == dig
        assert (await c.call("getVolumeInfo", **dst.ref()))["parent"] == \
            "00000000-0000-0000-0000-000000000000"
    info = await c.call("getVolumeInfo", **thin.ref())
    assert info["parent"] == template[0].vol
    assert (await c.call("getVolumeInfo", **template[0].ref()))["voltype"] in ("SHARED",
                                                                                "INTERNAL")
    # the template is busy while a thin clone uses it
    info = await env.job("deleteImage", sdUUID=template[0].sd, imgUUID=template[0].img)
    assert info["status"] == "failed" and info["error"]["code"] == 204
    # a thin clone copied without collapse needs its template on the target
    keep = Disk(env.sds[1], new_id(), new_id())
    info = await env.job("copyImage", src=thin.ref(), dst=keep.ref(), collapse=False)
    assert info["status"] == "failed" and info["error"]["code"] == 201, info
    assert template[0].vol in info["error"]["message"]
    # copy the template there (same volume id), then the thin clone keeps its chain
    await env.done("copyImage", src=template[0].ref(),
                   dst={"sdUUID": env.sds[1], "imgUUID": template[0].img,
                        "volUUID": template[0].vol})
    await env.done("copyImage", src=thin.ref(), dst=keep.ref(), collapse=False)
    info = await c.call("getVolumeInfo", **keep.ref())
    assert info["parent"] == template[0].vol and info["format"] == "cow"
    assert await env.digest(keep) == digests[0]


async def test_snapshot_all_disks_all_or_nothing(env: Env, tmp_path: Path) -> None:
    c = env.c
    vm = [await env.disk(sd, data=i + 1) for i, sd in enumerate(env.sds)]
    layers = [new_id() for _ in vm]
    result = await env.done("snapshotImages", disks=[
        {**d.ref(), "newVolUUID": n} for d, n in zip(vm, layers, strict=True)])
    assert [r["uuid"] for r in result] == layers
    for d, n in zip(vm, layers, strict=True):
        info = await c.call("getVolumeInfo", sdUUID=d.sd, imgUUID=d.img, volUUID=n)
        assert info["parent"] == d.vol and info["legality"] == "LEGAL"
        assert (await c.call("getVolumeInfo", **d.ref()))["voltype"] == "INTERNAL"

    # the next snapshot fails on the third disk, whose domain is full: the
    # first two layers are rolled back
    tops = [Disk(d.sd, d.img, n) for d, n in zip(vm, layers, strict=True)]
    before = await env.volumes()
    full = Path((await c.call("getStorageDomainInfo", sdUUID=env.sds[1]))["path"])
    fillers = fill(full.parent)
    order = [tops[0], tops[2], tops[1]]
    info = await env.job("snapshotImages", disks=[{**d.ref(), "newVolUUID": new_id()}
                                                  for d in order])
    assert info["status"] == "failed" and info["error"]["code"] == 397, info
    assert await env.volumes() == before
    for d in tops:
        assert (await c.call("getVolumeInfo", **d.ref()))["voltype"] == "LEAF"
    for f in fillers:
        f.unlink(missing_ok=True)
    # bad input: a disk that is not the top volume, a missing one
    info = await env.job("snapshotImages", disks=[
        {**tops[0].ref(), "newVolUUID": new_id()},
        {**vm[1].ref(), "newVolUUID": new_id()}])
    assert info["status"] == "failed" and info["error"]["code"] == 1000, info
    assert "disks[1]" in info["error"]["message"]
    assert await env.volumes() == before


async def test_hibernation_refused_on_backup_domain(env: Env) -> None:
    c = env.c
    vm = [await env.disk(sd) for sd in env.sds]
    mem_sd = env.sds[0]

    def memory() -> dict[str, Any]:
        return {"sdUUID": mem_sd, "imgUUID": new_id(), "dumpVolUUID": new_id(),
                "metaVolUUID": new_id(), "size": 256 * MiB}

    await c.call("setStorageDomainBackup", sdUUID=env.sds[2], backup=True)
    before = await env.volumes()
    m = memory()
    info = await env.job("createHibernationVolumes", memory=m, disks=[d.ref() for d in vm])
    assert info["status"] == "failed" and info["error"]["code"] == 2104, info
    assert "disks[2]" in info["error"]["message"]
    assert await env.volumes() == before
    assert m["imgUUID"] not in await c.call("getImagesList", sdUUID=mem_sd)

    await c.call("setStorageDomainBackup", sdUUID=env.sds[2], backup=False)
    m = memory()
    result = await env.done("createHibernationVolumes", memory=m, disks=[d.ref() for d in vm])
    assert result["dump"]["capacity"] == 256 * MiB and result["dump"]["diskType"] == "MEMD"
    assert result["meta"]["diskType"] == "MEMM"
    assert sorted(await c.call("getVolumesList", sdUUID=mem_sd, imgUUID=m["imgUUID"])) == \
        sorted([m["dumpVolUUID"], m["metaVolUUID"]])
    # the dump is where a VM's memory can be written
    path = await c.call("prepareImage", sdUUID=mem_sd, imgUUID=m["imgUUID"],
                        volUUID=m["dumpVolUUID"], purpose="vm")
    assert qemu_info(path["path"])["virtual-size"] == 256 * MiB
    await c.call("teardownImage", sdUUID=mem_sd, imgUUID=m["imgUUID"])


async def test_abort_copy_removes_target(env: Env, tmp_path: Path) -> None:
    c = env.c
    # big enough to take a while: 2 GiB of data on localfs
    src = await env.disk(env.sds[2], size=2048 * MiB, data=0x5A)
    await env.write(src, 0x5B, offset=8 * MiB, length=2040 * MiB)
    before = await env.digest(src)
    dst = Disk(env.sds[2], new_id(), new_id())
    jid = new_id()
    await c.call("copyImage", jobUUID=jid, src=src.ref(), dst=dst.ref())
    for _ in range(100):
        job = (await c.call("getJobs", jobUUIDs=[jid]))[jid]
        if job["status"] == "running":
            break
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.3)
    await c.call("abortJob", jobUUID=jid)
    info = await c.wait_job(jid, timeout=60)
    assert info["status"] == "aborted", info
    assert dst.img not in await c.call("getImagesList", sdUUID=dst.sd)
    assert await env.digest(src) == before
    root = Path((await c.call("getStorageDomainInfo", sdUUID=dst.sd))["path"])
    assert not (root / "images" / dst.img).exists()


async def test_copy_to_a_full_domain_fails_cleanly(env: Env) -> None:
    c = env.c
    # 600 MiB of data does not fit the 512 MiB posixfs domain
    src = await env.disk(env.sds[2], size=600 * MiB, data=0x11)
    await env.write(src, 0x12, offset=8 * MiB, length=590 * MiB)
    dst = Disk(env.sds[0], new_id(), new_id())
    before = await env.volumes()
    info = await env.job("copyImage", src=src.ref(), dst=dst.ref())
    assert info["status"] == "failed" and info["error"]["code"] == 397, info
    assert await env.volumes() == before
    assert dst.img not in await c.call("getImagesList", sdUUID=dst.sd)


async def test_an_image_stays_one_chain(env: Env) -> None:
    """Issue 22 (9): every verb that adds to an image puts the volume on top
    of the image's one chain, or refuses with 262 before anything is made."""
    c = env.c
    d = await env.disk(env.sds[0], size=64 * MiB, data=0x41)
    top = Disk(d.sd, d.img, new_id())
    await create_volume(c, d.sd, d.img, top.vol, size=64 * MiB, fmt="cow", parent=d.vol)
    await env.write(top, 0x42, offset=8 * MiB, length=MiB)
    want = await env.digest(top)
    other = await env.disk(env.sds[1], size=64 * MiB, data=0x43)
    before = await env.volumes()

    async def refused(verb: str, code: int = 262, **params: Any) -> dict[str, Any]:
        info = await env.job(verb, **params)
        assert info["status"] == "failed" and info["error"]["code"] == code, (verb, info)
        assert await env.volumes() == before, verb
        return info

    # createVolume: a second base, or a second child of the base
    info = await refused("createVolume", sdUUID=d.sd, imgUUID=d.img, volUUID=new_id(),
                         size=64 * MiB, format="raw", preallocate="sparse")
    assert info["error"]["data"]["name"] == "ImageIsNotLegalChain", info
    await refused("createVolume", sdUUID=d.sd, imgUUID=d.img, volUUID=new_id(),
                  size=64 * MiB, format="cow", preallocate="sparse", parentVolUUID=d.vol)
    # copyImage into an image that holds a chain: collapsed, or layer by layer
    await refused("copyImage", src=other.ref(), dst=Disk(d.sd, d.img, new_id()).ref())
    await refused("copyImage", src=top.ref(), dst=Disk(other.sd, other.img, new_id()).ref(),
                  collapse=False)
    # moveImage onto a domain where that imgUUID holds another disk
    squatter = Disk(env.sds[2], d.img, new_id())
    await create_volume(c, squatter.sd, squatter.img, squatter.vol, size=64 * MiB)
    before = await env.volumes()
    await refused("moveImage", sdUUID=d.sd, imgUUID=d.img, dstSdUUID=squatter.sd)
    assert sorted(await c.call("getVolumesList", sdUUID=squatter.sd,
                               imgUUID=d.img)) == [squatter.vol]
    assert await env.digest(top) == want

    # on top of the chain is where a volume goes
    await create_volume(c, d.sd, d.img, new_id(), size=64 * MiB, fmt="cow", parent=top.vol)
    for disk in (d, other, squatter):
        await env.done("deleteImage", sdUUID=disk.sd, imgUUID=disk.img)


async def test_a_parent_is_not_prepared_for_a_vm(env: Env) -> None:
    """Issue 22: a VM writing a volume with children corrupts every one of
    them: prepareImage for `vm` refuses it (213), for read or copy not; a
    template's volume (children in other images) likewise."""
    c = env.c
    d = await env.disk(env.sds[0], size=64 * MiB, data=0x51)
    top = Disk(d.sd, d.img, new_id())
    await create_volume(c, d.sd, d.img, top.vol, size=64 * MiB, fmt="cow", parent=d.vol)
    clone = Disk(d.sd, new_id(), new_id())
    await create_volume(c, clone.sd, clone.img, clone.vol, size=64 * MiB, fmt="cow",
                        parent=top.vol)
    # the base has a child: read and copy may prepare it, a VM may not
    with pytest.raises(RpcError) as e:
        await c.call("prepareImage", **d.ref(), purpose="vm")
    assert e.value.code == 213 and e.value.name == "VolumeNonWritable", e.value
    for purpose in ("read", "copy"):
        await env.path(d, purpose)
        await env.teardown(d)
    with pytest.raises(RpcError) as e:
        await c.call("prepareImage", **top.ref(), purpose="vm")
    assert e.value.code == 213, e.value
    await env.path(clone, "vm")
    await env.teardown(clone)
    # the refused prepares left nothing prepared: deleteImage would refuse it
    for disk in (clone, d):
        await env.done("deleteImage", sdUUID=disk.sd, imgUUID=disk.img)



@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_a_failed_copy_leaves_no_target_on_a_full_domain(
        make_fs_mount: Callable[..., FsMount], agent_factory: Callable[..., AgentProcess],
        tmp_path: Path) -> None:
    """Issue 22 (3): two copies that together overfill a 128 MiB file
    system: a copy that fails with 397 leaves no target, also when removing
    it hits ENOSPC itself: never listed or shown as a volume, and gone from
    storage once space returns."""
    state = tmp_path / "state"
    state.mkdir()
    (state / "hostagent.toml").write_text("[storage]\nmonitor_interval = 0.5\n")
    agent = agent_factory(state)
    big = make_fs_mount("xfs", 4096)
    small = make_fs_mount("ext4", 512, size=128 * MiB)
    async with agent.client() as c:
        src = await localfs_domains(c, big.path, ["src"])
        dst = await localfs_domains(c, small.path, ["dst"])
        sd, root = dst.sds[0], dst.roots[0]
        sources = []
        for i in range(2):
            img, vol = new_id(), new_id()
            await done(c, "createVolume", sdUUID=src.sds[0], imgUUID=img, volUUID=vol,
                       size=72 * MiB, format="raw", preallocate="sparse")
            subprocess.run(["qemu-io", "-f", "raw", "-c", f"write -P {0x61 + i} 0 72M",
                            str(src.roots[0] / "images" / img / vol)],
                           check=True, capture_output=True)
            sources.append({"sdUUID": src.sds[0], "imgUUID": img, "volUUID": vol})
        targets = [{"sdUUID": sd, "imgUUID": new_id(), "volUUID": new_id()} for _ in sources]
        jobs = [new_id() for _ in sources]
        for job, s, t in zip(jobs, sources, targets, strict=True):
            await c.call("copyImage", jobUUID=job, src=s, dst=t)
        infos = [await c.wait_job(job, timeout=120) for job in jobs]
        failed = [t for t, info in zip(targets, infos, strict=True)
                  if info["status"] == "failed"]
        assert failed, infos
        for info in infos:
            assert info["status"] == "done" or info["error"]["code"] == 397, info
        made = [t for t in targets if t not in failed]
        # what the engine sees at once: the copies that were made, nothing else
        assert sorted(await c.call("getVolumesList", sdUUID=sd)) == sorted(
            t["volUUID"] for t in made)
        assert sorted(await c.call("getImagesList", sdUUID=sd)) == sorted(
            t["imgUUID"] for t in made)
        for t in failed:
            with pytest.raises(RpcError) as e:
                await c.call("getVolumeInfo", **t)
            assert e.value.code == 201, e.value
        # space returns: the half-made targets go from storage too
        for t in made:
            await done(c, "deleteImage", sdUUID=sd, imgUUID=t["imgUUID"])
        wait_for("the failed copies' targets removed from storage",
                 lambda: not any((root / "images" / t["imgUUID"]).exists() for t in failed),
                 timeout=30)
        assert await c.call("getImagesList", sdUUID=sd) == []
        await src.release(c)
        await dst.release(c)


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_a_half_made_volume_whose_removal_fails_is_removed_later(
        make_fs_mount: Callable[..., FsMount], agent_factory: Callable[..., AgentProcess],
        tmp_path: Path) -> None:
    """Issue 22 (3): the removal of an aborted copy's target fails (its
    metadata file made immutable under it): the target is not listed nor
    shown meanwhile, and the domain monitor removes it once it can."""
    require_tools("chattr")
    state = tmp_path / "state"
    state.mkdir()
    (state / "hostagent.toml").write_text("[storage]\nmonitor_interval = 0.5\n")
    agent = agent_factory(state)
    fs = make_fs_mount("ext4", 512, size=2048 * MiB)
    async with agent.client() as c:
        doms = await localfs_domains(c, fs.path, ["sd"])
        sd, root = doms.sds[0], doms.roots[0]
        src = {"sdUUID": sd, "imgUUID": new_id(), "volUUID": new_id()}
        await done(c, "createVolume", **src, size=768 * MiB, format="raw",
                   preallocate="sparse")
        subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x71 0 768M",
                        str(root / "images" / src["imgUUID"] / src["volUUID"])],
                       check=True, capture_output=True)
        dst = {"sdUUID": sd, "imgUUID": new_id(), "volUUID": new_id()}
        meta = root / "images" / dst["imgUUID"] / f"{dst['volUUID']}.meta"
        job = new_id()
        await c.call("copyImage", jobUUID=job, src=src, dst=dst)
        data = meta.with_suffix("")
        # abort while the data is copied (the job then removes the target)
        wait_for("the copy writing its target",
                 lambda: data.exists() and data.stat().st_blocks > 0, timeout=30,
                 interval=0.005)
        subprocess.run(["chattr", "+i", str(meta)], check=True)
        try:
            await c.call("abortJob", jobUUID=job)
            info = await c.wait_job(job, timeout=60)
            assert info["status"] == "aborted", info
            assert meta.exists()        # its removal failed
            assert await c.call("getVolumesList", sdUUID=sd) == [src["volUUID"]]
            assert await c.call("getImagesList", sdUUID=sd) == [src["imgUUID"]]
            with pytest.raises(RpcError) as e:
                await c.call("getVolumeInfo", **dst)
            assert e.value.code == 201, e.value
        finally:
            subprocess.run(["chattr", "-i", str(meta)], check=True)
        wait_for("the aborted copy's target removed",
                 lambda: not (root / "images" / dst["imgUUID"]).exists(), timeout=30)
        assert await c.call("getVolumesList", sdUUID=sd) == [src["volUUID"]]
        await doms.release(c)
