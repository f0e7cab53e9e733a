"""updateVolume and measureVolume (issue 17) on a real file domain, through
the real agent."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from rpc.client import RpcError
from tests.integration import test_domains_file
from tests.integration.test_domains_file import MiB, Storage, create_volume, new_id

# the file domain fixtures of test_domains_file
dom_type = test_domains_file.dom_type
backing = test_domains_file.backing
storage = test_domains_file.storage

pytestmark = [
    pytest.mark.parametrize("fs_mount", [("ext4", 512)], indirect=True, ids=["ext4-512"]),
    pytest.mark.parametrize("dom_type", ["localfs"], indirect=True),
]


def volume_files(storage: Storage, img: str) -> dict[str, bytes]:
    """Every file of the image's directory, by name, with its content
    (metadata files) or its size (data)."""
    d = next(Path(storage.params["connection"]).rglob(img))
    return {p.name: p.read_bytes() if p.stat().st_size < 4096 else str(p.stat().st_size)
            .encode() for p in sorted(d.iterdir())}


async def test_update_volume(storage: Storage) -> None:
    c = storage.c
    await storage.create_domain()
    img, vol = new_id(), new_id()
    v = await create_volume(c, storage.sd, img, vol, size=64 * MiB, description="old")
    assert v["generation"] == 1
    ids = dict(sdUUID=storage.sd, imgUUID=img, volUUID=vol)

    v = await c.call("updateVolume", **ids, description="new \u00e9", generation=1)
    assert v["description"] == "new \u00e9" and v["generation"] == 2
    assert v["legality"] == "LEGAL"
    v = await c.call("updateVolume", **ids, legality="ILLEGAL")
    assert v["legality"] == "ILLEGAL" and v["generation"] == 3
    assert v["description"] == "new \u00e9"
    # what another agent reads from storage
    assert await c.call("getVolumeInfo", **ids) == v
    with pytest.raises(RpcError) as e:
        await c.call("prepareImage", **ids, purpose="read")
    assert e.value.code == 227          # PrepareIllegalVolumeError
    v = await c.call("updateVolume", **ids, legality="LEGAL", description="")
    assert v["legality"] == "LEGAL" and v["description"] == "" and v["generation"] == 4
    # the same values again: nothing written, no new generation
    v = await c.call("updateVolume", **ids, legality="LEGAL")
    assert v["generation"] == 4

    before = volume_files(storage, img)
    # a stale generation: 911, nothing changed
    with pytest.raises(RpcError) as e:
        await c.call("updateVolume", **ids, legality="ILLEGAL", description="x", generation=3)
    assert e.value.code == 911, e.value
    # bad values name their field
    for params, field in [
            (dict(legality="legal"), "legality"),
            (dict(description="x" * 211), "description"),
            (dict(description="\u00e9" * 106), "description"),     # 212 bytes
            (dict(description="a\nLEGALITY=ILLEGAL"), "description"),
            (dict(), "description"),
            (dict(legality="ILLEGAL", generation=-1), "generation")]:
        with pytest.raises(RpcError) as e:
            await c.call("updateVolume", **ids, **params)
        assert e.value.code == -32602 and e.value.data["field"] == field, (params, e.value)
    assert volume_files(storage, img) == before
    assert (await c.call("getVolumeInfo", **ids))["generation"] == 4
    # the limit itself is accepted (210 bytes)
    v = await c.call("updateVolume", **ids, description="\u00e9" * 105)
    assert v["description"] == "\u00e9" * 105 and v["generation"] == 5


async def test_update_volume_refuses_ovf_store(storage: Storage) -> None:
    c = storage.c
    await storage.create_domain(ovfStore=True)
    # a new domain's only volume is its OVF store
    [img] = await c.call("getImagesList", sdUUID=storage.sd)
    [vol] = await c.call("getVolumesList", sdUUID=storage.sd, imgUUID=img)
    ids = dict(sdUUID=storage.sd, imgUUID=img, volUUID=vol)
    before = await c.call("getVolumeInfo", **ids)
    with pytest.raises(RpcError) as e:
        await c.call("updateVolume", **ids, legality="ILLEGAL")
    assert e.value.code == 2102, e.value     # ResourceInUse
    assert await c.call("getVolumeInfo", **ids) == before


def qemu_measure(fmt: str, *args: str) -> dict[str, Any]:
    """qemu-img measure run directly, as the agent's wrapper asks it."""
    opts = ["-o", "compat=1.1"] if fmt == "qcow2" else []
    out = subprocess.run(["qemu-img", "measure", "--output", "json", "-O", fmt, *opts, *args],
                         capture_output=True, text=True, check=True).stdout
    return dict(json.loads(out))


async def test_measure_volume(storage: Storage) -> None:
    c = storage.c
    await storage.create_domain()
    img, base, top = new_id(), new_id(), new_id()
    await create_volume(c, storage.sd, img, base, size=64 * MiB, fmt="cow")
    await create_volume(c, storage.sd, img, top, size=64 * MiB, fmt="cow", parent=base)
    p = await c.call("prepareImage", sdUUID=storage.sd, imgUUID=img, volUUID=top,
                     purpose="read")
    base_path, top_path = p["chain"][0]["path"], p["path"]
    # 8 MiB in the base, 4 MiB in the top: the layers measure differently
    for path, cmd in [(base_path, "write -P 1 0 8M"), (top_path, "write -P 2 16M 4M")]:
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", cmd, path], check=True,
                       capture_output=True)
    await c.call("teardownImage", sdUUID=storage.sd, imgUUID=img)
    ids = dict(sdUUID=storage.sd, imgUUID=img, volUUID=top)
    one_layer = ('json:{"driver": "qcow2", "backing": null, '
                 f'"file": {{"driver": "file", "filename": "{top_path}"}}}}')
    seen = {}
    for fmt, qfmt in [("cow", "qcow2"), ("raw", "raw")]:
        for collapse, args in [(True, ["-f", "qcow2", top_path]), (False, [one_layer])]:
            want = qemu_measure(qfmt, *args)
            got = await c.call("measureVolume", **ids, format=fmt, collapse=collapse)
            assert got["required"] == want["required"], (fmt, collapse, got, want)
            assert got["fullyAllocated"] == want["fully-allocated"], (fmt, collapse, got)
            if fmt == "cow":
                assert got["bitmaps"] == want["bitmaps"]
            seen[fmt, collapse] = got["required"]
    # the default collapses the chain; the top alone holds less than the chain
    assert await c.call("measureVolume", **ids, format="cow") == \
        await c.call("measureVolume", **ids, format="cow", collapse=True)
    assert seen["cow", False] < seen["cow", True]
    # read-only: no new generation
    assert (await c.call("getVolumeInfo", **ids))["generation"] == 1
    with pytest.raises(RpcError) as e:
        await c.call("measureVolume", **ids, format="qcow2")
    assert e.value.code == -32602 and e.value.data["field"] == "format"
    await c.call("updateVolume", sdUUID=storage.sd, imgUUID=img, volUUID=base,
                 legality="ILLEGAL")
    with pytest.raises(RpcError) as e:
        await c.call("measureVolume", **ids, format="raw")
    assert e.value.code == 227, e.value      # PrepareIllegalVolumeError


async def test_wipe_on_a_file_domain_is_ignored(storage: Storage) -> None:
    """As VDSM ("won't be zeroed"): deleteVolume / deleteImage with wipe on a
    file domain delete as without it; the LUN verbs refuse a file domain."""
    c = storage.c
    await storage.create_domain()
    img, vol, img2, vol2 = new_id(), new_id(), new_id(), new_id()
    await create_volume(c, storage.sd, img, vol, size=16 * MiB, fmt="raw")
    await create_volume(c, storage.sd, img2, vol2, size=16 * MiB, fmt="raw")
    assert await c.call("deleteVolume", sdUUID=storage.sd, imgUUID=img, volUUID=vol,
                        wipe=True) == {}
    job = new_id()
    await c.call("deleteImage", jobUUID=job, sdUUID=storage.sd, imgUUID=img2, wipe=True)
    info = await c.wait_job(job, timeout=60)
    assert info["status"] == "done", info
    assert await c.call("getImagesList", sdUUID=storage.sd) == []
    for verb, params in (("extendStorageDomain", {"devices": ["36001405aa"]}),
                         ("resizePV", {"guid": "36001405aa"})):
        with pytest.raises(RpcError) as e:
            await c.call(verb, sdUUID=storage.sd, **params)
        assert e.value.code == 1000, (verb, e.value)
