"""mergeSnapshots (issue 17: cold merge) on a block domain (multipath iSCSI
LUN) in the lab guest: a chain of three thin cow LVs, the middle layer then
the top merged; the base's LV grows to hold what it takes in before the
commit and is reduced after; the disk reads as before, qemu's chain and the
metadata agree, `qemu-img check` is clean."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from rpc.client import Client
from tests.integration.test_domains_file import create_volume, new_id, run_job
from tests.lab import guestlib as g
from tests.lab.test_domains_block_lab import lvs
from tests.lab.test_thin_lab import block_domain

MiB = 1 << 20
GiB = 1 << 30
SIZE = 256 * MiB
EXTENT = 8 * MiB


async def chain_agrees(c: Client, sd: str, img: str, leaf: str) -> list[str]:
    """The image's chain as the metadata says, base first; with the leaf
    prepared, qemu's backing chain says the same and each layer checks."""
    infos = {v: await c.call("getVolumeInfo", sdUUID=sd, imgUUID=img, volUUID=v)
             for v in await c.call("getVolumesList", sdUUID=sd, imgUUID=img)}
    chain = [leaf]
    while infos[chain[0]]["parent"] in infos:
        chain.insert(0, infos[chain[0]]["parent"])
    assert sorted(chain) == sorted(infos), infos
    for v in chain:
        assert infos[v]["legality"] == "LEGAL", infos[v]
        assert infos[v]["voltype"] == ("LEAF" if v == leaf else "INTERNAL"), infos[v]
    await c.call("prepareImage", sdUUID=sd, imgUUID=img, volUUID=leaf, purpose="read")
    try:
        q = json.loads(g.run("qemu-img", "info", "--output", "json", "--backing-chain", "-U",
                             f"/dev/{sd}/{leaf}"))
        assert [Path(i["filename"]).name for i in q] == list(reversed(chain)), q
        for v in chain:
            if infos[v]["format"] == "cow":
                g.run("qemu-img", "check", "-U", "-f", "qcow2", f"/dev/{sd}/{v}")
    finally:
        await c.call("teardownImage", sdUUID=sd, imgUUID=img)
    return chain


@pytest.mark.timeout(400)
async def test_merge_on_block_domain(make_target: Callable[..., g.Target],
                                     multipathd: g.Multipathd, tmp_path: Path,
                                     host_scratch: Path) -> None:
    async with block_domain(make_target, tmp_path, GiB, host_scratch,
                            chunk_size=64 * MiB) as (c, sd, _):
        img, base, mid, top = new_id(), new_id(), new_id(), new_id()

        async def write(vol: str, offset: int, length: int, pattern: int) -> None:
            await c.call("prepareImage", sdUUID=sd, imgUUID=img, volUUID=vol, purpose="read")
            try:
                g.run("qemu-io", "-f", "qcow2", "-c",
                      f"write -P {pattern} {offset}M {length}M", f"/dev/{sd}/{vol}")
            finally:
                await c.call("teardownImage", sdUUID=sd, imgUUID=img)

        async def copy(vol: str, name: str) -> Path:
            await c.call("prepareImage", sdUUID=sd, imgUUID=img, volUUID=vol, purpose="read")
            try:
                out = host_scratch / f"{name}-{new_id()}.raw"
                g.run("qemu-img", "convert", "-U", "-O", "raw", f"/dev/{sd}/{vol}", str(out))
                return out
            finally:
                await c.call("teardownImage", sdUUID=sd, imgUUID=img)

        async def same(vol: str, raw: Path) -> bool:
            await c.call("prepareImage", sdUUID=sd, imgUUID=img, volUUID=vol, purpose="read")
            try:
                r = subprocess.run(["qemu-img", "compare", "-U", f"/dev/{sd}/{vol}", str(raw)],
                                   capture_output=True, text=True)
                assert r.returncode in (0, 1), r.stderr
                return r.returncode == 0
            finally:
                await c.call("teardownImage", sdUUID=sd, imgUUID=img)

        async def reduced_size(vol: str) -> int:
            """What reduceVolume leaves of the LV: qcow2's image end plus the
            thin margin (20% of a 64 MiB chunk), in whole 8 MiB extents."""
            await c.call("prepareImage", sdUUID=sd, imgUUID=img, volUUID=vol, purpose="read")
            try:
                end = int(json.loads(g.run("qemu-img", "check", "--output", "json", "-U",
                                           f"/dev/{sd}/{vol}"))["image-end-offset"])
            finally:
                await c.call("teardownImage", sdUUID=sd, imgUUID=img)
            return (end + 64 * MiB // 5 + EXTENT - 1) // EXTENT * EXTENT

        await create_volume(c, sd, img, base, size=SIZE)
        await write(base, 0, 40, 0x11)
        await create_volume(c, sd, img, mid, size=SIZE, parent=base)
        await write(mid, 100, 48, 0x22)
        await create_volume(c, sd, img, top, size=SIZE, parent=mid)
        await write(top, 30, 20, 0x33)
        was_mid, was_top = await copy(mid, "mid"), await copy(top, "top")
        try:
            assert not await same(top, was_mid)     # the comparisons below can fail
            start = lvs(sd)[base]["size"]
            # base's 64 MiB LV holds 40 MiB; mid's 48 MiB do not fit beside them
            assert start == 64 * MiB, start

            job = await run_job(c, "mergeSnapshots", sdUUID=sd, imgUUID=img,
                                baseVolUUID=base, topVolUUID=mid)
            assert job["status"] == "done", job
            assert await chain_agrees(c, sd, img, top) == [base, top]
            assert mid not in lvs(sd)
            grown = lvs(sd)[base]["size"]
            # grown to take mid's data in, then reduced to what it holds
            assert grown >= 88 * MiB and grown == await reduced_size(base), grown
            assert await same(top, was_top) and await same(base, was_mid)

            job = await run_job(c, "mergeSnapshots", sdUUID=sd, imgUUID=img,
                                baseVolUUID=base, topVolUUID=top)
            assert job["status"] == "done", job
            assert await chain_agrees(c, sd, img, base) == [base]
            assert await same(base, was_top)
            end = lvs(sd)[base]["size"]
            assert end == await reduced_size(base), end
            print(f"base LV: {start // MiB} MiB, after merging mid {grown // MiB} MiB, "
                  f"after merging top {end // MiB} MiB")
            assert not lvs(sd)[base]["active"]
        finally:
            was_mid.unlink()
            was_top.unlink()
