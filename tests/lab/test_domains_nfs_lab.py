"""File storage domains on NFS v3 and v4.2 through the agent's API, in the lab
guest: every volume kind, a chain three deep, getVolumeInfo against
`qemu-img info`, extend, delete, a second agent with a fresh state dir
finding it all on the export, format. What is on the export is checked on
the NFS server's side of it, not through the client's cache."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rpc.client import Client, RpcError
from storage.metadata import BLANK_UUID
from tests.agentproc import AgentProcess
from tests.integration.test_domains_file import (
    Storage,
    create_volume,
    new_id,
    qemu_info,
    run_job,
)
from tests.lab import guestlib as g

MiB = 1 << 20
GiB = 1 << 30
KINDS = [("raw", "sparse"), ("raw", "preallocated"), ("cow", "sparse"),
         ("cow", "preallocated")]
QEMU_FORMAT = {"raw": "raw", "cow": "qcow2"}

# (protocol_version, connection spec): v3 mounts the exported path, v4 the
# name under the server's pseudo-root (see guestlib.NfsServer).
VERSIONS = [("3", "127.0.0.1:/srv/export"), ("4.2", "127.0.0.1:/export")]


def start_agent(state_dir: Path) -> AgentProcess:
    agent = AgentProcess(state_dir)
    g.LOG_DIR.mkdir(parents=True, exist_ok=True)
    agent.log_path = g.LOG_DIR / f"agent-nfs-{agent.port}.log"
    return agent.start(timeout=60)


@pytest.fixture
def agents(tmp_path: Path) -> Iterator[list[AgentProcess]]:
    """Agents a test starts; each is stopped after it (and must exit 0)."""
    made: list[AgentProcess] = []
    yield made
    bad = []
    for agent in made:
        rc = agent.stop()
        if rc != 0:
            bad.append(f"agent exit status {rc}; log:\n{agent.log()}")
    assert not bad, bad


def assert_matches_qemu(info: dict[str, Any], path: str) -> dict[str, Any]:
    """getVolumeInfo agrees with qemu-img info and stat on the volume's file."""
    q = qemu_info(path)
    st = os.stat(path)
    assert q["format"] == QEMU_FORMAT[info["format"]], (info, q)
    assert q["virtual-size"] == info["capacity"], (info, q)
    assert info["apparentSize"] == st.st_size, info
    # both are the file's allocated blocks (st_blocks)
    assert info["trueSize"] == q["actual-size"] == st.st_blocks * 512, (info, q)
    if info["parent"] == BLANK_UUID:
        assert "backing-filename" not in q, q
    else:
        assert Path(q["backing-filename"]).name == info["parent"], q
    if info["type"] == "sparse":
        assert q["actual-size"] < 8 * MiB, q
    elif info["format"] == "raw":
        assert q["actual-size"] >= info["capacity"], q
    else:   # qcow2 preallocated: data clusters allocated beside the metadata
        assert q["actual-size"] >= info["capacity"], q
    return q


async def volume_info(c: Client, sd: str, img: str, vol: str) -> dict[str, Any]:
    return dict(await c.call("getVolumeInfo", sdUUID=sd, imgUUID=img, volUUID=vol))


def qemu_info_chain(path: str) -> list[dict[str, Any]]:
    out = subprocess.run(["qemu-img", "info", "--output", "json", "-U", "--backing-chain",
                          path], capture_output=True, text=True, check=True).stdout
    return list(json.loads(out))


def export_listing(export: Path, sd: str) -> set[str]:
    """What the domain holds, read on the server: images/<img>/<vol>[.meta]."""
    images = export / sd / "images"
    return {str(p.relative_to(images)) for p in images.rglob("*")}


@pytest.mark.timeout(240)
@pytest.mark.parametrize("version, spec", VERSIONS, ids=["v3", "v4.2"])
async def test_nfs_domain_volumes(nfs_server: g.NfsServer, agents: list[AgentProcess],
                                  tmp_path: Path, version: str, spec: str) -> None:
    export = nfs_server.exports[0]
    agent = start_agent(tmp_path / "a1")
    agents.append(agent)
    async with agent.client() as c:
        s = Storage(c, "nfs", {"connection": spec, "protocol_version": version})
        await s.connect()
        [conn] = await c.call("getStorageConnections")
        assert conn["details"]["version"] == version, conn
        info = await s.create_domain(name=f"nfs {version}")
        sd = s.sd
        assert info["type"] == "nfs" and info["state"] == "active", info
        assert info["blockSize"] in (512, 4096)
        assert (export / sd / "dom_md" / "metadata").is_file()

        # ---- every kind
        made: dict[str, tuple[str, str]] = {}    # vol -> (img, kind)
        for fmt, prealloc in KINDS:
            img, vol = new_id(), new_id()
            v = await create_volume(c, sd, img, vol, size=64 * MiB, fmt=fmt,
                                    prealloc=prealloc, description=f"{fmt} {prealloc}")
            assert (v["legality"], v["format"], v["type"]) == ("LEGAL", fmt, prealloc), v
            assert v["generation"] == 1 and v["voltype"] == "LEAF"
            p = await c.call("prepareImage", sdUUID=sd, imgUUID=img, volUUID=vol,
                             purpose="read")
            info = await volume_info(c, sd, img, vol)
            assert info == {**v, "trueSize": info["trueSize"]}, (info, v)
            assert_matches_qemu(info, p["path"])
            await c.call("teardownImage", sdUUID=sd, imgUUID=img, volUUID=vol)
            made[vol] = (img, f"{fmt}/{prealloc}")

        # ---- a chain three deep on a preallocated raw base
        img, base, mid, top = new_id(), new_id(), new_id(), new_id()
        await create_volume(c, sd, img, base, size=128 * MiB, fmt="raw",
                            prealloc="preallocated")
        await create_volume(c, sd, img, mid, size=128 * MiB, parent=base)
        await create_volume(c, sd, img, top, size=256 * MiB, parent=mid)
        infos = {v: await volume_info(c, sd, img, v) for v in (base, mid, top)}
        assert [infos[v]["voltype"] for v in (base, mid, top)] == \
            ["INTERNAL", "INTERNAL", "LEAF"]
        assert (infos[top]["parent"], infos[mid]["parent"], infos[base]["parent"]) == \
            (mid, base, BLANK_UUID)
        p = await c.call("prepareImage", sdUUID=sd, imgUUID=img, volUUID=top, purpose="vm")
        assert [x["volUUID"] for x in p["chain"]] == [base, mid, top]
        for link in p["chain"]:
            assert_matches_qemu(infos[link["volUUID"]], link["path"])
        chain = qemu_info_chain(p["path"])
        assert [Path(x["filename"]).name for x in chain] == [top, mid, base]
        assert [x["format"] for x in chain] == ["qcow2", "qcow2", "raw"]

        # a volume with children or a prepared one cannot go
        for vol, code in ((top, 203), (mid, 204)):  # VolumeIsBusy, VolumeImageHasChildren
            with pytest.raises(RpcError) as e:
                await c.call("deleteVolume", sdUUID=sd, imgUUID=img, volUUID=vol)
            assert e.value.code == code, e.value
        await c.call("teardownImage", sdUUID=sd, imgUUID=img, volUUID=top)

        # ---- extend a cow leaf and a raw volume
        ext = await c.call("extendVolumeSize", sdUUID=sd, imgUUID=img, volUUID=top,
                           newSize=512 * MiB)
        assert ext["capacity"] == 512 * MiB and ext["generation"] == 2
        raw_vol = next(v for v, (_, k) in made.items() if k == "raw/preallocated")
        raw_img = made[raw_vol][0]
        ext = await c.call("extendVolumeSize", sdUUID=sd, imgUUID=raw_img, volUUID=raw_vol,
                           newSize=96 * MiB)
        assert ext["capacity"] == 96 * MiB and ext["generation"] == 2
        for i, vol in ((img, top), (raw_img, raw_vol)):
            p = await c.call("prepareImage", sdUUID=sd, imgUUID=i, volUUID=vol, purpose="read")
            assert_matches_qemu(await volume_info(c, sd, i, vol), p["path"])
            await c.call("teardownImage", sdUUID=sd, imgUUID=i, volUUID=vol)

        # ---- delete the leaf: its parent is a leaf again, its files are gone
        await c.call("deleteVolume", sdUUID=sd, imgUUID=img, volUUID=top)
        assert (await volume_info(c, sd, img, mid))["voltype"] == "LEAF"
        with pytest.raises(RpcError) as e:
            await volume_info(c, sd, img, top)
        assert e.value.code == 201
        listing = export_listing(export, sd)
        assert not {f"{img}/{top}", f"{img}/{top}.meta"} & listing, listing
        assert {f"{img}/{mid}", f"{img}/{mid}.meta"} <= listing

        # ---- a second agent, fresh state dir: the domain from the export alone
        first = {v: await volume_info(c, sd, i, v)
                 for v, i in [(base, img), (mid, img)] + [(v, i) for v, (i, _) in made.items()]}
        other = start_agent(tmp_path / "a2")
        agents.append(other)
        async with other.client() as c2:
            params = dict(s.params)
            [st] = await c2.call("connectStorageServer", domType="nfs",
                                 connectionParams=[params])
            try:
                assert st["status"] == 0, st
                assert sd in await c2.call("getStorageDomainsList")
                dom = await c2.call("getStorageDomainInfo", sdUUID=sd)
                assert dom["name"] == f"nfs {version}" and dom["type"] == "nfs", dom
                assert sorted(await c2.call("getImagesList", sdUUID=sd)) == \
                    sorted({img, *(i for i, _ in made.values())})
                assert sorted(await c2.call("getVolumesList", sdUUID=sd, imgUUID=img)) == \
                    sorted([base, mid])
                for vol, info in first.items():
                    assert await volume_info(c2, sd, info["image"], vol) == info
            finally:
                await c2.call("disconnectStorageServer", domType="nfs",
                              connectionParams=[params])

        # ---- delete the image, then format
        job = await run_job(c, "deleteImage", sdUUID=sd, imgUUID=img)
        assert job["status"] == "done", job
        assert img not in await c.call("getImagesList", sdUUID=sd)
        assert not (export / sd / "images" / img).exists()
        assert not [n for n in os.listdir(export / sd / "images") if img in n]
        stats = await c.call("getStorageDomainStats", sdUUID=sd)
        assert stats["volumes"] == len(made), stats
        await c.call("formatStorageDomain", sdUUID=sd)
        assert sd not in await c.call("getStorageDomainsList")
        assert not [n for n in os.listdir(export) if sd in n], os.listdir(export)
        with pytest.raises(RpcError) as e:
            await c.call("getStorageDomainInfo", sdUUID=sd)
        assert e.value.code == 358
        await s.disconnect()
        assert await c.call("getStorageConnections") == []
