"""File storage domains and volumes on real file systems (ext4 and xfs, 512
and 4096-byte sectors; localfs and posixfs), through the real agent."""

from __future__ import annotations

import asyncio
import json
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from rpc.client import Client, RpcError
from tests.agentproc import AgentProcess
from tests.integration.storagefixtures import FsMount, make_fs

GiB = 1024**3
MiB = 1024**2


def new_id() -> str:
    return str(uuid.uuid4())


def qemu_info(path: str) -> dict[str, Any]:
    out = subprocess.run(["qemu-img", "info", "--output", "json", "-U", path],
                         capture_output=True, text=True, check=True).stdout
    return dict(json.loads(out))


async def run_job(c: Client, verb: str, **params: Any) -> dict[str, Any]:
    job = new_id()
    await c.call(verb, jobUUID=job, **params)
    info = await c.wait_job(job, timeout=120)
    return info


async def create_volume(c: Client, sd: str, img: str, vol: str, size: int = GiB,
                        fmt: str = "cow", prealloc: str = "sparse",
                        parent: str | None = None, **kw: Any) -> dict[str, Any]:
    params: dict[str, Any] = dict(sdUUID=sd, imgUUID=img, volUUID=vol, size=size, format=fmt,
                                  preallocate=prealloc, **kw)
    if parent:
        params["parentVolUUID"] = parent
    info = await run_job(c, "createVolume", **params)
    assert info["status"] == "done", info
    return dict(info["result"])


class Storage:
    """A connected connection and a domain on it, cleaned up at the end."""

    def __init__(self, client: Client, dom_type: str, params: dict[str, Any]) -> None:
        self.c = client
        self.dom_type = dom_type
        self.conn_id = new_id()
        self.params = {"id": self.conn_id, **params}
        self.sd = new_id()

    async def connect(self) -> None:
        [st] = await self.c.call("connectStorageServer", domType=self.dom_type,
                                 connectionParams=[self.params])
        assert st["status"] == 0, st

    async def create_domain(self, name: str = "test domain", **kw: Any) -> dict[str, Any]:
        # The OVF store volume is tested on its own (test_ovfstore.py).
        kw.setdefault("ovfStore", False)
        return dict(await self.c.call("createStorageDomain", sdUUID=self.sd,
                                      domType=self.dom_type, name=name,
                                      connectionId=self.conn_id, **kw))

    async def disconnect(self) -> None:
        await self.c.call("disconnectStorageServer", domType=self.dom_type,
                          connectionParams=[self.params])


@pytest.fixture(params=["localfs", "posixfs"])
def dom_type(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def backing(dom_type: str, fs_mount: FsMount, loop_device: Callable[..., Path]
            ) -> dict[str, Any]:
    """Connection params of `dom_type` on the fs_mount's kind of file system."""
    if dom_type == "localfs":
        d = fs_mount.path / "localfs"
        d.mkdir()
        return {"connection": str(d)}
    dev = loop_device(size=512 * MiB, sector_size=fs_mount.sector_size)
    make_fs(dev, fs_mount.fstype)
    return {"connection": str(dev), "vfs_type": fs_mount.fstype}


@pytest.fixture
async def storage(backing: dict[str, Any], dom_type: str, agent: AgentProcess,
                  client: Client) -> AsyncIterator[Storage]:
    s = Storage(client, dom_type, backing)
    await s.connect()
    yield s
    for sd in await client.call("getStorageDomainsList"):
        info = await client.call("getStorageDomainInfo", sdUUID=sd)
        if info["state"] == "active":
            for img in await client.call("getImagesList", sdUUID=sd):
                await client.call("teardownImage", sdUUID=sd, imgUUID=img)
    await s.disconnect()


async def test_domain_volumes_chain_extend_delete_format(storage: Storage, fs_mount: FsMount):
    c = storage.c
    info = await storage.create_domain(name="my data")
    assert info["uuid"] == storage.sd and info["type"] == storage.dom_type
    assert info["class"] == "data" and info["backup"] is False and info["state"] == "active"
    assert info["blockSize"] == fs_mount.sector_size
    assert storage.sd in await c.call("getStorageDomainsList")

    img = new_id()
    kinds = [("raw", "sparse"), ("raw", "preallocated"), ("cow", "sparse"),
             ("cow", "preallocated")]
    images = {}
    for fmt, prealloc in kinds:
        image, vol = new_id(), new_id()
        v = await create_volume(c, storage.sd, image, vol, size=64 * MiB, fmt=fmt,
                                prealloc=prealloc, description=f"{fmt} {prealloc}")
        assert v["legality"] == "LEGAL" and v["format"] == fmt and v["type"] == prealloc
        assert v["capacity"] == 64 * MiB and v["generation"] == 1
        prepared = await c.call("prepareImage", sdUUID=storage.sd, imgUUID=image,
                                volUUID=vol, purpose="read")
        q = qemu_info(prepared["path"])
        assert q["format"] == ("qcow2" if fmt == "cow" else "raw")
        assert q["virtual-size"] == 64 * MiB
        if fmt == "raw" and prealloc == "preallocated":
            assert q["actual-size"] >= 64 * MiB
        if prealloc == "sparse":
            assert q["actual-size"] < 8 * MiB
        images[image] = vol

    # a chain three deep
    base, mid, top = new_id(), new_id(), new_id()
    await create_volume(c, storage.sd, img, base, size=GiB)
    await create_volume(c, storage.sd, img, mid, size=GiB, parent=base)
    await create_volume(c, storage.sd, img, top, size=2 * GiB, parent=mid)
    vols = {v: await c.call("getVolumeInfo", sdUUID=storage.sd, imgUUID=img, volUUID=v)
            for v in (base, mid, top)}
    assert [vols[v]["voltype"] for v in (base, mid, top)] == ["INTERNAL", "INTERNAL", "LEAF"]
    assert vols[top]["parent"] == mid and vols[mid]["parent"] == base
    assert vols[base]["parent"] == "00000000-0000-0000-0000-000000000000"
    prepared = await c.call("prepareImage", sdUUID=storage.sd, imgUUID=img, volUUID=top,
                            purpose="vm")
    assert [x["volUUID"] for x in prepared["chain"]] == [base, mid, top]
    chain = json.loads(subprocess.run(
        ["qemu-img", "info", "--output", "json", "-U", "--backing-chain", prepared["path"]],
        capture_output=True, text=True, check=True).stdout)
    assert len(chain) == 3 and chain[0]["virtual-size"] == 2 * GiB
    assert Path(chain[1]["filename"]).name == mid and Path(chain[2]["filename"]).name == base
    info = vols[top]
    assert info["apparentSize"] == Path(prepared["path"]).stat().st_size
    assert sorted(await c.call("getVolumesList", sdUUID=storage.sd, imgUUID=img)) == \
        sorted([base, mid, top])
    assert sorted(await c.call("getImagesList", sdUUID=storage.sd)) == \
        sorted([img, *images])

    # prepared: cannot delete; internal volumes cannot be deleted
    with pytest.raises(RpcError) as e:
        await c.call("deleteVolume", sdUUID=storage.sd, imgUUID=img, volUUID=top)
    assert e.value.code == 203 and e.value.data["name"] == "VolumeIsBusy"
    await c.call("teardownImage", sdUUID=storage.sd, imgUUID=img, volUUID=top)
    with pytest.raises(RpcError) as e:
        await c.call("deleteVolume", sdUUID=storage.sd, imgUUID=img, volUUID=mid)
    assert e.value.code == 204 and "child" in e.value.message

    # extend
    ext = await c.call("extendVolumeSize", sdUUID=storage.sd, imgUUID=img, volUUID=top,
                       newSize=3 * GiB)
    assert ext["capacity"] == 3 * GiB and ext["generation"] == 2
    p = await c.call("prepareImage", sdUUID=storage.sd, imgUUID=img, volUUID=top,
                     purpose="read")
    assert qemu_info(p["path"])["virtual-size"] == 3 * GiB
    await c.call("teardownImage", sdUUID=storage.sd, imgUUID=img)
    raw_img = next(i for i in images)
    await c.call("teardownImage", sdUUID=storage.sd, imgUUID=raw_img)

    # delete the leaf: its parent is a leaf again
    await c.call("deleteVolume", sdUUID=storage.sd, imgUUID=img, volUUID=top)
    info = await c.call("getVolumeInfo", sdUUID=storage.sd, imgUUID=img, volUUID=mid)
    assert info["voltype"] == "LEAF"
    job = await run_job(c, "deleteImage", sdUUID=storage.sd, imgUUID=img)
    assert job["status"] == "done"
    assert img not in await c.call("getImagesList", sdUUID=storage.sd)

    stats = await c.call("getStorageDomainStats", sdUUID=storage.sd)
    assert stats["volumes"] == 4 and stats["capacity"] > stats["free"] > 0

    for image in images:
        await c.call("teardownImage", sdUUID=storage.sd, imgUUID=image)
    await c.call("formatStorageDomain", sdUUID=storage.sd)
    assert storage.sd not in await c.call("getStorageDomainsList")
    with pytest.raises(RpcError) as e:
        await c.call("getStorageDomainInfo", sdUUID=storage.sd)
    assert e.value.code == 358


@pytest.mark.parametrize("fs_mount", [("xfs", 4096)], indirect=True,
                         ids=["xfs-4096"])
async def test_second_agent_reads_domain_from_storage(storage: Storage, agent_factory,
                                                      tmp_path: Path):
    c = storage.c
    await storage.create_domain(name="shared")
    img, base, top = new_id(), new_id(), new_id()
    await create_volume(c, storage.sd, img, base, size=GiB, fmt="raw", description="base")
    await create_volume(c, storage.sd, img, top, size=GiB, parent=base, description="top")
    first = {v: await c.call("getVolumeInfo", sdUUID=storage.sd, imgUUID=img, volUUID=v)
             for v in (base, top)}
    # another agent, fresh state dir, same storage: connects and finds it all
    other = agent_factory(tmp_path / "other-host")
    async with other.client() as c2:
        params = dict(storage.params)
        [st] = await c2.call("connectStorageServer", domType=storage.dom_type,
                             connectionParams=[params])
        try:
            assert st["status"] == 0, st
            assert await c2.call("getStorageDomainsList") == [storage.sd]
            info = await c2.call("getStorageDomainInfo", sdUUID=storage.sd)
            assert info["name"] == "shared" and info["state"] == "inactive"
            assert await c2.call("getImagesList", sdUUID=storage.sd) == [img]
            for v in (base, top):
                mine = await c2.call("getVolumeInfo", sdUUID=storage.sd, imgUUID=img,
                                     volUUID=v)
                assert mine == first[v]
            # writes need the domain active on that host
            with pytest.raises(RpcError) as e:
                await c2.call("deleteVolume", sdUUID=storage.sd, imgUUID=img, volUUID=top)
            assert e.value.code == 369
        finally:
            await c2.call("disconnectStorageServer", domType=storage.dom_type,
                          connectionParams=[params])


@pytest.mark.parametrize("fs_mount", [("ext4", 512)], indirect=True, ids=["ext4-512"])
@pytest.mark.parametrize("dom_type", ["localfs"], indirect=True)
async def test_bad_input_changes_nothing(storage: Storage):
    c = storage.c
    await storage.create_domain()
    img, vol = new_id(), new_id()
    await create_volume(c, storage.sd, img, vol, size=GiB)
    other = Storage(c, "localfs", {"connection": str(Path(storage.params["connection"]))
                                   + "-2"})
    Path(other.params["connection"]).mkdir()
    await other.connect()
    await other.create_domain(name="other")
    other_img, other_vol = new_id(), new_id()
    await create_volume(c, other.sd, other_img, other_vol, size=GiB)

    def listing() -> list[str]:
        root = Path(storage.params["connection"])
        return sorted(str(p.relative_to(root)) for p in root.rglob("*"))

    before = listing()
    unknown = new_id()
    cases: list[tuple[str, dict[str, Any], int, str | None]] = [
        ("getVolumeInfo", dict(sdUUID=unknown, imgUUID=img, volUUID=vol), 358, None),
        ("getVolumeInfo", dict(sdUUID=storage.sd, imgUUID=img, volUUID=unknown), 201, None),
        ("getVolumesList", dict(sdUUID=storage.sd, imgUUID=unknown), 268, None),
        ("deleteVolume", dict(sdUUID=storage.sd, imgUUID=img, volUUID=unknown), 201, None),
        ("prepareImage", dict(sdUUID=storage.sd, imgUUID=img, volUUID=unknown,
                              purpose="vm"), 201, None),
        ("extendVolumeSize", dict(sdUUID=storage.sd, imgUUID=img, volUUID=vol,
                                  newSize=1024 * MiB - 512), 232, None),  # shrink
        ("getStorageDomainInfo", dict(sdUUID=unknown), 358, None),
        ("formatStorageDomain", dict(sdUUID=unknown), 358, None),
    ]
    for verb, params, code, field in cases:
        with pytest.raises(RpcError) as e:
            await c.call(verb, **params)
        assert e.value.code == code, (verb, e.value)
        if field:
            assert e.value.data["field"] == field
    # createVolume: params refused before a job exists
    base = dict(sdUUID=storage.sd, imgUUID=new_id(), volUUID=new_id(), format="cow",
                preallocate="sparse")
    for params, field in [(dict(base, size=0), "size"), (dict(base, size=1000), "size"),
                          (dict(base, size=GiB, format="qcow2"), "format"),
                          (dict(base, size=GiB, preallocate="thin"), "preallocate"),
                          (dict(base, size=GiB, format="raw", parentVolUUID=vol), "format"),
                          (dict(base, size=GiB, sdUUID="X"), "sdUUID")]:
        with pytest.raises(RpcError) as e:
            await c.call("createVolume", jobUUID=new_id(), **params)
        assert e.value.code == -32602 and e.value.data["field"] == field, e.value.data
    # createVolume failures inside the job
    failing = [
        (dict(base, size=GiB, parentVolUUID=other_vol), 201),      # parent on another domain
        (dict(base, size=GiB, parentVolUUID=new_id()), 201),       # parent missing
        (dict(base, imgUUID=img, volUUID=vol, size=GiB), 212),     # already exists
        (dict(base, sdUUID=unknown, size=GiB), 358),
        (dict(base, size=GiB // 2, parentVolUUID=vol), 1000),     # smaller than parent
    ]
    for params, code in failing:
        info = await run_job(c, "createVolume", **params)
        assert info["status"] == "failed" and info["error"]["code"] == code, (params, info)
    assert listing() == before
    assert await c.call("getVolumesList", sdUUID=storage.sd) == [vol]
    await c.call("formatStorageDomain", sdUUID=other.sd)
    await other.disconnect()


@pytest.mark.parametrize("fs_mount", [("ext4", 512)], indirect=True, ids=["ext4-512"])
@pytest.mark.parametrize("dom_type", ["localfs"], indirect=True)
async def test_deactivate_activate_and_prepare_rules(storage: Storage):
    c = storage.c
    await storage.create_domain()
    img, vol = new_id(), new_id()
    await create_volume(c, storage.sd, img, vol, size=GiB)
    await c.call("prepareImage", sdUUID=storage.sd, imgUUID=img, volUUID=vol, purpose="vm")
    with pytest.raises(RpcError) as e:
        await c.call("deactivateStorageDomain", sdUUID=storage.sd)
    assert e.value.code == 2102
    # the connection cannot go while a volume is prepared
    [st] = await c.call("disconnectStorageServer", domType="localfs",
                        connectionParams=[storage.params])
    assert st["status"] == 2102
    # nor be edited to another target
    other = Path(storage.params["connection"] + "-moved")
    other.mkdir()
    with pytest.raises(RpcError) as e:
        await c.call("updateStorageConnection", domType="localfs",
                     connection={"id": storage.conn_id, "connection": str(other)})
    assert e.value.code == 2102
    [conn] = await c.call("getStorageConnections")
    assert conn["params"]["connection"] == storage.params["connection"]
    await c.call("teardownImage", sdUUID=storage.sd, imgUUID=img, volUUID=vol)
    info = await c.call("deactivateStorageDomain", sdUUID=storage.sd)
    assert info["state"] == "inactive"
    with pytest.raises(RpcError) as e:
        await c.call("prepareImage", sdUUID=storage.sd, imgUUID=img, volUUID=vol,
                     purpose="read")
    assert e.value.code == 369
    info = await c.call("activateStorageDomain", sdUUID=storage.sd)
    assert info["state"] == "active"
    # monitoring reads the metadata back; getStats shows it without storage I/O
    stats = await c.call("getStorageDomainStats", sdUUID=storage.sd)
    assert stats["monitoring"]["state"] in ("ok", "unknown")
    for _ in range(50):
        host = await c.call("getStats")
        if host["domains"][storage.sd]["monitoring"]["state"] == "ok":
            break
        await asyncio.sleep(0.1)
    dom = host["domains"][storage.sd]
    assert dom["state"] == "active" and dom["monitoring"]["state"] == "ok"
    assert dom["capacity"] > dom["free"] > 0 and dom["monitoring"]["lastCheck"]
    # an ILLEGAL volume cannot be prepared: damage the legality on storage
    root = Path(info["path"])
    meta = root / "images" / img / f"{vol}.meta"
    from storage.metadata import VolumeMetadata
    md = VolumeMetadata.decode(meta.read_bytes())
    md.legality = "ILLEGAL"
    meta.write_bytes(md.encode())
    with pytest.raises(RpcError) as e:
        await c.call("prepareImage", sdUUID=storage.sd, imgUUID=img, volUUID=vol,
                     purpose="read")
    assert e.value.code == 227
