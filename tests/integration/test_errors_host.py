"""VDSM's conditions that happen on the host, through the real agent: each
answers VDSM's code and name (data.name), and changes nothing on storage."""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from rpc.client import Client, RpcError
from storage import metadata
from tests.agentproc import AgentProcess
from tests.integration.storagefixtures import FsMount, make_fs, mounted
from tests.integration.test_domains_file import MiB, Storage, create_volume, new_id, run_job


@pytest.fixture
def ext4(make_fs_mount: Callable[..., FsMount]) -> FsMount:
    return make_fs_mount("ext4")


@pytest.fixture
async def localfs(ext4: FsMount, agent: AgentProcess,
                  client: Client) -> AsyncIterator[Storage]:
    d = ext4.path / "localfs"
    d.mkdir()
    s = Storage(client, "localfs", {"connection": str(d)})
    await s.connect()
    await s.create_domain()
    yield s
    for img in await client.call("getImagesList", sdUUID=s.sd):
        await client.call("teardownImage", sdUUID=s.sd, imgUUID=img)
    await s.disconnect()


def vol_path(s: Storage, img: str, vol: str) -> Path:
    return Path(s.params["connection"]) / s.sd / "images" / img / vol


def snapshot(s: Storage, img: str, vol: str) -> tuple[str, bytes]:
    """(sha256 of the volume's data, its metadata bytes)."""
    path = vol_path(s, img, vol)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest(), path.with_name(vol + ".meta").read_bytes()


def rewrite_md(s: Storage, img: str, vol: str, **changes: Any) -> None:
    """Change a volume's metadata on storage (as another host would)."""
    meta = vol_path(s, img, vol).with_name(vol + ".meta")
    md = metadata.VolumeMetadata.decode(meta.read_bytes())
    for k, v in changes.items():
        setattr(md, k, v)
    meta.write_bytes(md.encode())


def expect(e: pytest.ExceptionInfo[RpcError], code: int, name: str) -> None:
    assert (e.value.code, e.value.data["name"]) == (code, name), e.value


# ---- generation fencing (911) ---------------------------------------------------------

async def test_stale_generation_changes_nothing(localfs: Storage) -> None:
    c, sd = localfs.c, localfs.sd
    img, vol = new_id(), new_id()
    await create_volume(c, sd, img, vol, size=8 * MiB, fmt="raw")
    with open(vol_path(localfs, img, vol), "r+b") as f:
        f.write(b"\xa5" * MiB)
    # extend bumps the generation; the generation read before is now stale
    gen0 = (await c.call("getVolumeInfo", sdUUID=sd, imgUUID=img, volUUID=vol))["generation"]
    info = await c.call("extendVolumeSize", sdUUID=sd, imgUUID=img, volUUID=vol,
                        newSize=16 * MiB, generation=gen0)
    assert info["generation"] == gen0 + 1 and info["capacity"] == 16 * MiB
    before = snapshot(localfs, img, vol)
    info_before = await c.call("getVolumeInfo", sdUUID=sd, imgUUID=img, volUUID=vol)
    fencing: list[tuple[str, dict[str, Any]]] = [
        ("extendVolumeSize", dict(newSize=32 * MiB)),
        ("deleteVolume", {}),
    ]
    for verb, extra in fencing:
        for stale in (gen0, gen0 + 2):
            with pytest.raises(RpcError) as e:
                await c.call(verb, sdUUID=sd, imgUUID=img, volUUID=vol, generation=stale,
                             **extra)
            expect(e, 911, "GenerationMismatch")
            assert e.value.data["actual"] == gen0 + 1, e.value.data
            assert snapshot(localfs, img, vol) == before, verb
            assert await c.call("getVolumeInfo", sdUUID=sd, imgUUID=img,
                                volUUID=vol) == info_before, verb
    # the current generation goes through
    await c.call("deleteVolume", sdUUID=sd, imgUUID=img, volUUID=vol, generation=gen0 + 1)
    assert not vol_path(localfs, img, vol).exists()


# ---- volumes ----------------------------------------------------------------------------

async def test_damaged_metadata_is_207_not_201(localfs: Storage) -> None:
    c, sd = localfs.c, localfs.sd
    img, vol = new_id(), new_id()
    await create_volume(c, sd, img, vol, size=MiB, fmt="raw")
    meta = vol_path(localfs, img, vol).with_name(vol + ".meta")
    meta.write_bytes(meta.read_bytes().replace(b"LEGALITY=LEGAL", b"LEGALITY=LEGAX"))
    for verb in ("getVolumeInfo", "prepareImage", "deleteVolume"):
        extra = {"purpose": "read"} if verb == "prepareImage" else {}
        with pytest.raises(RpcError) as e:
            await c.call(verb, sdUUID=sd, imgUUID=img, volUUID=vol, **extra)
        expect(e, 207, "VolumeMetadataReadError")
    assert vol_path(localfs, img, vol).exists()


async def test_shrink_is_232(localfs: Storage) -> None:
    c, sd = localfs.c, localfs.sd
    img, vol = new_id(), new_id()
    await create_volume(c, sd, img, vol, size=8 * MiB)
    with pytest.raises(RpcError) as e:
        await c.call("extendVolumeSize", sdUUID=sd, imgUUID=img, volUUID=vol,
                     newSize=4 * MiB)
    expect(e, 232, "VolumeResizeValueError")
    info = await c.call("getVolumeInfo", sdUUID=sd, imgUUID=img, volUUID=vol)
    assert info["capacity"] == 8 * MiB


async def test_snapshot_of_illegal_volume_is_226(localfs: Storage) -> None:
    c, sd = localfs.c, localfs.sd
    img, vol = new_id(), new_id()
    await create_volume(c, sd, img, vol, size=8 * MiB)
    rewrite_md(localfs, img, vol, legality=metadata.ILLEGAL)
    top = new_id()
    info = await run_job(c, "createVolume", sdUUID=sd, imgUUID=img, volUUID=top,
                         size=8 * MiB, format="cow", preallocate="sparse", parentVolUUID=vol)
    assert info["status"] == "failed", info
    assert (info["error"]["code"], info["error"]["data"]["name"]) == \
        (226, "createIllegalVolumeSnapshotError"), info
    info = await run_job(c, "snapshotImages", disks=[dict(sdUUID=sd, imgUUID=img, volUUID=vol,
                                                          newVolUUID=top)])
    assert info["status"] == "failed", info
    assert (info["error"]["code"], info["error"]["data"]["name"]) == \
        (226, "createIllegalVolumeSnapshotError"), info
    assert await c.call("getVolumesList", sdUUID=sd, imgUUID=img) == [vol]


async def test_recreating_a_snapshot_layer_is_212_before_parent_checks(
        localfs: Storage) -> None:
    c, sd = localfs.c, localfs.sd
    img, base, top = new_id(), new_id(), new_id()
    await create_volume(c, sd, img, base, size=8 * MiB)
    await create_volume(c, sd, img, top, size=8 * MiB, parent=base)
    before = snapshot(localfs, img, top)
    # the same create again (an engine retrying): the parent has a child now
    # (this very volume), but the answer is that the volume exists
    info = await run_job(c, "createVolume", sdUUID=sd, imgUUID=img, volUUID=top,
                         size=8 * MiB, format="cow", preallocate="sparse",
                         parentVolUUID=base)
    assert info["status"] == "failed", info
    assert (info["error"]["code"], info["error"]["data"]["name"]) == \
        (212, "VolumeAlreadyExists"), info
    assert snapshot(localfs, img, top) == before


# ---- a file domain whose mount is gone (360) ---------------------------------------------

async def test_unmounted_file_domain_is_360(loop_device: Callable[..., Path],
                                            agent: AgentProcess, client: Client) -> None:
    dev = loop_device(size=512 * MiB)
    make_fs(dev, "ext4")
    s = Storage(client, "posixfs", {"connection": str(dev), "vfs_type": "ext4"})
    await s.connect()
    await s.create_domain()
    img, vol = new_id(), new_id()
    await create_volume(client, s.sd, img, vol, size=8 * MiB)
    await client.call("prepareImage", sdUUID=s.sd, imgUUID=img, volUUID=vol, purpose="read")
    [target] = [t for src, t, _ in mounted() if src == str(dev)]
    # the mount goes away under the agent (an admin, a crashed helper); lazily:
    # the agent's lease helper keeps the domain's lease files open
    subprocess.run(["umount", "-l", target], check=True)
    try:
        calls: list[tuple[str, dict[str, Any]]] = [
            ("getVolumeInfo", dict(imgUUID=img, volUUID=vol)),
            ("getVolumesList", dict(imgUUID=img)),
            ("prepareImage", dict(imgUUID=img, volUUID=vol, purpose="read")),
            ("deleteVolume", dict(imgUUID=img, volUUID=vol)),
            ("getStorageDomainStats", {}),
            ("activateStorageDomain", {}),
        ]
        for verb, params in calls:
            with pytest.raises(RpcError) as e:
                await client.call(verb, sdUUID=s.sd, **params)
            expect(e, 360, "StorageDomainFSNotMounted")
            assert e.value.data["path"] == target
        # nothing is written into the bare mount point either
        for verb, params in [
                ("createVolume", dict(sdUUID=s.sd, imgUUID=img, volUUID=new_id(),
                                      size=MiB, format="raw", preallocate="sparse")),
                ("copyImage", dict(src=dict(sdUUID=s.sd, imgUUID=img, volUUID=vol),
                                   dst=dict(sdUUID=s.sd, imgUUID=new_id(),
                                            volUUID=new_id())))]:
            info = await run_job(client, verb, **params)
            assert (info["error"]["code"], info["error"]["data"]["name"]) == \
                (360, "StorageDomainFSNotMounted"), info
        assert os.listdir(target) == []
        # what was prepared can still be torn down (then the connection can go)
        await client.call("teardownImage", sdUUID=s.sd, imgUUID=img, volUUID=vol)
    finally:
        [st] = await client.call("disconnectStorageServer", domType="posixfs",
                                 connectionParams=[s.params])
    assert st["status"] == 0, st
    # nothing was removed from the file system while it was away
    Path(target).mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", str(dev), target], check=True)
    try:
        assert (Path(target) / s.sd / "images" / img / vol).exists()
    finally:
        subprocess.run(["umount", target], check=True)
        Path(target).rmdir()


# ---- an iSCSI portal that is no address (472) ---------------------------------------------

async def test_unresolvable_portal_is_472(agent: AgentProcess, client: Client) -> None:
    """RFC 6761: a .invalid name never resolves. Refused before iscsiadm runs:
    nothing is recorded and no connection is kept."""
    with pytest.raises(RpcError) as e:
        await client.call("discoverSendTargets", connection="portal.invalid", port=3260)
    expect(e, 472, "InvalidIpAddress")
    conn = {"id": new_id(), "connection": "portal.invalid", "port": 3260,
            "iqn": "iqn.2003-01.org.example:none"}
    [st] = await client.call("connectStorageServer", domType="iscsi", connectionParams=[conn])
    assert st["status"] == 472, st
    assert await client.call("getStorageConnections") == []
