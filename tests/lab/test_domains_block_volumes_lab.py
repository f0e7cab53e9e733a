"""Volumes of a block domain on a multipath iSCSI LUN through the agent's API,
in the lab guest: every kind, a chain three deep (prepare activates every LV
of the chain, teardown deactivates them), getVolumeInfo against `qemu-img
info` and the LV, extend raw and cow, deleteVolume, and bad input that must
fail with the right code and change nothing on storage (`lvs` and the
metadata slots compared before and after)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from rpc.client import Client, RpcError
from storage.metadata import BLANK_UUID
from tests.agentproc import AgentProcess
from tests.integration.test_domains_file import create_volume, new_id, qemu_info, run_job
from tests.lab import guestlib as g
from tests.lab.test_connections_lab import disconnect_all
from tests.lab.test_domains_block_lab import (
    connect_luns,
    lv_slot,
    lvs,
    read_slots,
    start,
    stop_agent,
)
from tests.lab.test_domains_nfs_lab import qemu_info_chain

MiB = 1 << 20
EXTENT = 8 * MiB          # block_extent_size of the agents `start` makes
CHUNK = 64 * MiB          # and their [thin] chunk_size
KINDS = [("raw", "sparse"), ("raw", "preallocated"), ("cow", "sparse"),
         ("cow", "preallocated")]
QEMU_FORMAT = {"raw": "raw", "cow": "qcow2"}
SLOTS_CHECKED = 64        # slots are taken lowest first: these hold every volume here


def round_up(n: int, unit: int) -> int:
    return (n + unit - 1) // unit * unit


def assert_matches(info: dict[str, Any], path: str, lv: dict[str, Any]) -> None:
    """getVolumeInfo agrees with qemu-img info on the prepared LV and with lvs."""
    q = qemu_info(path)
    assert q["format"] == QEMU_FORMAT[info["format"]], (info, q)
    assert info["apparentSize"] == info["trueSize"] == lv["size"], (info, lv)
    assert lv["size"] % EXTENT == 0
    if info["format"] == "raw":
        # a raw volume is its LV: whole extents, at least the capacity asked for
        assert q["virtual-size"] == lv["size"] == round_up(info["capacity"], EXTENT), (info, q)
    else:
        assert q["virtual-size"] == info["capacity"], (info, q)
    if info["parent"] == BLANK_UUID:
        assert "backing-filename" not in q, q
    else:
        # relative: the chain resolves in /dev/<sdUUID>/ on any host
        assert q["backing-filename"] == info["parent"], q
    if info["format"] == "cow" and info["type"] == "preallocated":
        assert lv["size"] >= info["capacity"], (info, lv)
    elif info["format"] == "cow":
        assert lv["size"] >= EXTENT, (info, lv)


def storage_state(sd: str) -> tuple[dict[str, dict[str, Any]], str]:
    """What a failed call must not change: the VG's LVs (names, sizes, tags,
    activation) and the metadata slots."""
    return lvs(sd), hashlib.sha256(read_slots(sd, SLOTS_CHECKED)).hexdigest()


async def info_of(c: Client, sd: str, img: str, vol: str) -> dict[str, Any]:
    return dict(await c.call("getVolumeInfo", sdUUID=sd, imgUUID=img, volUUID=vol))


async def prepared_check(c: Client, sd: str, img: str, vol: str) -> dict[str, Any]:
    """Prepare, compare getVolumeInfo with qemu-img and lvs, tear down."""
    p = await c.call("prepareImage", sdUUID=sd, imgUUID=img, volUUID=vol, purpose="read")
    assert p["path"] == f"/dev/{sd}/{vol}"
    info = await info_of(c, sd, img, vol)
    assert_matches(info, p["path"], lvs(sd)[vol])
    await c.call("teardownImage", sdUUID=sd, imgUUID=img, volUUID=vol)
    assert not lvs(sd)[vol]["active"]
    return info


@pytest.mark.timeout(300)
async def test_block_volumes_through_the_api(make_target: Callable[..., g.Target],
                                             multipathd: g.Multipathd,
                                             tmp_path: Path) -> None:
    target = make_target("blockvols", (256 * MiB, 1024 * MiB))
    agent: AgentProcess = start(tmp_path / "a1", monitor_interval=60, log_commands=True)
    sd, other_sd = new_id(), new_id()
    try:
        async with agent.client() as c:
            _, [small, big] = await connect_luns(c, target)
            await c.call("createStorageDomain", sdUUID=sd, domType="iscsi", name="vols",
                         devices=[big["guid"]], ovfStore=False)
            await c.call("createStorageDomain", sdUUID=other_sd, domType="iscsi",
                         name="other", devices=[small["guid"]], ovfStore=False)
            assert set(lvs(sd)) == {"metadata", "ids", "leases"}
            await scenario(c, sd, other_sd, agent)
            for dom in (sd, other_sd):
                await c.call("formatStorageDomain", sdUUID=dom)
            vgs = g.lvm("vgs", "--noheadings", "-o", "vg_name")
            assert sd not in vgs and other_sd not in vgs
            for st in await disconnect_all(c):
                assert st["status"] == 0, st
    finally:
        stop_agent(agent, sd, other_sd)


def lvm_changes(agent: AgentProcess, since: int, lv: str) -> list[str]:
    """The LVM commands the agent ran on LV `lv` (its log from line
    `since`), reports aside."""
    lines = agent.log_path.read_text(errors="replace").splitlines()[since:]
    return [op for line in lines
            if "storage.commands" in line and ": rc=" in line and " lvm " in line
            and (f"/{lv}" in line or f"--name {lv} " in line)     # not a PU_ tag
            and (op := line.split(" lvm ", 1)[1].split()[0]) not in ("lvs", "vgs", "pvs")]


def log_lines(agent: AgentProcess) -> int:
    return len(agent.log_path.read_text(errors="replace").splitlines())


async def scenario(c: Client, sd: str, other_sd: str, agent: AgentProcess) -> None:
    # ---- every kind; a raw size that is not whole extents
    made: dict[str, str] = {}    # vol -> img
    kinds_made: dict[str, str] = {}   # "fmt/prealloc" -> vol
    kinds = [*KINDS, ("raw", "sparse")]
    sizes = [64 * MiB] * len(KINDS) + [60 * MiB + 512]
    for (fmt, prealloc), size in zip(kinds, sizes, strict=True):
        img, vol = new_id(), new_id()
        v = await create_volume(c, sd, img, vol, size=size, fmt=fmt, prealloc=prealloc,
                                description=f"{fmt} {prealloc}")
        assert (v["legality"], v["format"], v["type"]) == ("LEGAL", fmt, prealloc), v
        assert v["capacity"] == size and v["generation"] == 1 and v["voltype"] == "LEAF"
        lv = lvs(sd)[vol]
        assert not lv["active"], "createVolume leaves the LV inactive"
        assert f"IU_{img}" in lv["tags"] and f"PU_{BLANK_UUID}" in lv["tags"], lv
        assert "INITIALIZING" not in lv["tags"]
        info = await prepared_check(c, sd, img, vol)
        assert info == v, (info, v)
        made[vol] = img
        kinds_made.setdefault(f"{fmt}/{prealloc}", vol)

    # ---- a chain three deep on a preallocated raw base
    img, base, mid, top = new_id(), new_id(), new_id(), new_id()
    since = log_lines(agent)
    await create_volume(c, sd, img, base, size=128 * MiB, fmt="raw", prealloc="preallocated")
    await create_volume(c, sd, img, mid, size=128 * MiB, parent=base)
    await create_volume(c, sd, img, top, size=256 * MiB, parent=mid, initialSize=16 * MiB)
    # each one LVM command, its lvcreate -an: the data went onto the PV at
    # the LV's first extent, no activation (issue 21); qemu-img on the LVs
    # below shows the bytes are where the activated LVs read them. (A cow
    # parent becoming internal has its own: the mid's, in top's create.)
    assert [lvm_changes(agent, since, v) for v in (base, top)] == [["lvcreate"]] * 2, \
        agent.log()
    chain = [base, mid, top]
    infos = {v: await info_of(c, sd, img, v) for v in chain}
    assert [infos[v]["voltype"] for v in chain] == ["INTERNAL", "INTERNAL", "LEAF"]
    assert [infos[v]["parent"] for v in chain] == [BLANK_UUID, base, mid]
    tags = lvs(sd)
    assert [f"PU_{p}" in tags[v]["tags"] for v, p in
            ((base, BLANK_UUID), (mid, base), (top, mid))] == [True] * 3
    # initialSize; without it a sparse cow LV starts at one chunk
    assert tags[top]["size"] == 16 * MiB and tags[mid]["size"] == CHUNK
    assert not any(tags[v]["active"] for v in chain)
    p = await c.call("prepareImage", sdUUID=sd, imgUUID=img, volUUID=top, purpose="vm")
    assert [x["volUUID"] for x in p["chain"]] == chain
    now = lvs(sd)
    assert all(now[v]["active"] for v in chain), now
    assert not any(now[v]["active"] for v in made), "only the chain is activated"
    for link in p["chain"]:
        assert_matches(infos[link["volUUID"]], link["path"], now[link["volUUID"]])
    q = qemu_info_chain(p["path"])
    assert [Path(x["filename"]).name for x in q] == [top, mid, base]
    assert [x["format"] for x in q] == ["qcow2", "qcow2", "raw"]
    # data written through the top lands in the top's LV, the base shows through
    g.run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 1M", f"/dev/{sd}/{base}")
    g.run("qemu-io", "-f", "qcow2", "-c", "write -P 0xa5 1M 1M", p["path"])
    g.run("qemu-io", "-f", "qcow2", "-c", "read -P 0x5a 0 1M", "-c", "read -P 0xa5 1M 1M",
          p["path"])
    with pytest.raises(RpcError) as e:
        await c.call("deleteVolume", sdUUID=sd, imgUUID=img, volUUID=top)
    assert e.value.code == 203, e.value      # prepared: VolumeIsBusy
    await c.call("teardownImage", sdUUID=sd, imgUUID=img, volUUID=top)
    now = lvs(sd)
    assert not any(now[v]["active"] for v in chain), now
    with pytest.raises(RpcError) as e:
        await c.call("deleteVolume", sdUUID=sd, imgUUID=img, volUUID=mid)
    assert e.value.code == 204 and "child" in e.value.message, e.value

    # ---- extend: a raw LV grows by whole extents, a cow's virtual size grows
    raw_vol = kinds_made["raw/preallocated"]
    ext = await c.call("extendVolumeSize", sdUUID=sd, imgUUID=made[raw_vol],
                       volUUID=raw_vol, newSize=100 * MiB)
    assert ext["capacity"] == 100 * MiB and ext["generation"] == 2, ext
    assert lvs(sd)[raw_vol]["size"] == 104 * MiB
    await prepared_check(c, sd, made[raw_vol], raw_vol)
    ext = await c.call("extendVolumeSize", sdUUID=sd, imgUUID=img, volUUID=top,
                       newSize=512 * MiB)
    assert ext["capacity"] == 512 * MiB and ext["generation"] == 2, ext
    assert not any(lvs(sd)[v]["active"] for v in chain), "extend leaves the chain inactive"
    p = await c.call("prepareImage", sdUUID=sd, imgUUID=img, volUUID=top, purpose="read")
    assert_matches(await info_of(c, sd, img, top), p["path"], lvs(sd)[top])
    g.run("qemu-io", "-f", "qcow2", "-c", "read -P 0xa5 1M 1M", p["path"])
    await c.call("teardownImage", sdUUID=sd, imgUUID=img, volUUID=top)

    # ---- deleteVolume: the LV and its slot go, the parent is a leaf again
    slot = lv_slot(lvs(sd)[top])
    await c.call("deleteVolume", sdUUID=sd, imgUUID=img, volUUID=top)
    assert top not in lvs(sd)
    assert read_slots(sd, slot + 1)[slot * 8192:] == bytes(8192), "slot not cleared"
    assert (await info_of(c, sd, img, mid))["voltype"] == "LEAF"
    assert sorted(await c.call("getVolumesList", sdUUID=sd, imgUUID=img)) == sorted([base, mid])
    with pytest.raises(RpcError) as e:
        await info_of(c, sd, img, top)
    assert e.value.code == 201

    # ---- bad input: the right error, nothing changed
    other_img, other_vol = new_id(), new_id()
    await create_volume(c, other_sd, other_img, other_vol, size=64 * MiB)
    before = storage_state(sd), storage_state(other_sd)
    unknown = new_id()
    calls: list[tuple[str, dict[str, Any], int, str | None]] = [
        ("getVolumeInfo", dict(sdUUID=unknown, imgUUID=img, volUUID=mid), 358, None),
        ("getVolumeInfo", dict(sdUUID=sd, imgUUID=img, volUUID=unknown), 201, None),
        ("getVolumeInfo", dict(sdUUID=sd, imgUUID=unknown, volUUID=mid), 201, None),
        ("getVolumesList", dict(sdUUID=sd, imgUUID=unknown), 268, None),
        ("getVolumesList", dict(sdUUID=unknown), 358, None),
        ("getImagesList", dict(sdUUID=unknown), 358, None),
        ("deleteVolume", dict(sdUUID=sd, imgUUID=img, volUUID=unknown), 201, None),
        ("deleteVolume", dict(sdUUID=unknown, imgUUID=img, volUUID=mid), 358, None),
        ("prepareImage", dict(sdUUID=sd, imgUUID=img, volUUID=unknown, purpose="vm"),
         201, None),
        ("extendVolumeSize", dict(sdUUID=sd, imgUUID=img, volUUID=unknown,
                                  newSize=256 * MiB), 201, None),
        ("extendVolumeSize", dict(sdUUID=sd, imgUUID=img, volUUID=mid,
                                  newSize=64 * MiB), 232, None),    # VolumeResizeValueError
        ("extendVolumeSize", dict(sdUUID=sd, imgUUID=img, volUUID=mid,
                                  newSize=256 * MiB + 100), -32602, "newSize"),
    ]
    for verb, params, code, field in calls:
        with pytest.raises(RpcError) as e:
            await c.call(verb, **params)
        assert e.value.code == code, (verb, params, e.value)
        if field:
            assert e.value.data["field"] == field, e.value.data
    new = dict(sdUUID=sd, imgUUID=new_id(), volUUID=new_id(), format="cow",
               preallocate="sparse")
    for params, field in [(dict(new, size=0), "size"), (dict(new, size=1000), "size"),
                          (dict(new, size=64 * MiB + 100), "size"),
                          (dict(new, size=64 * MiB, format="raw", parentVolUUID=mid),
                           "format")]:
        with pytest.raises(RpcError) as e:
            await c.call("createVolume", jobUUID=new_id(), **params)
        assert e.value.code == -32602 and e.value.data["field"] == field, e.value.data
    missing, gone_sd = new_id(), new_id()
    # (params, code, what the message must name)
    failing: list[tuple[dict[str, Any], int, str]] = [
        (dict(new, size=256 * MiB, parentVolUUID=missing), 201, missing),
        (dict(new, size=256 * MiB, parentVolUUID=other_vol), 201, other_vol),  # other domain
        (dict(new, imgUUID=img, volUUID=mid, size=256 * MiB), 212, mid),     # exists
        (dict(new, volUUID=base, size=256 * MiB), 212, base),                # in another image
        (dict(new, sdUUID=other_sd, volUUID=other_vol, size=64 * MiB), 212, other_vol),
        (dict(new, sdUUID=gone_sd, size=64 * MiB), 358, gone_sd),
        (dict(new, imgUUID=img, size=64 * MiB, parentVolUUID=mid), 1000, "capacity"),
    ]
    for params, code, named in failing:
        info = await run_job(c, "createVolume", **params)
        assert info["status"] == "failed" and info["error"]["code"] == code, (params, info)
        assert named in info["error"]["message"], info["error"]
    job = await run_job(c, "deleteImage", sdUUID=sd, imgUUID=new_id())
    assert job["status"] == "failed" and job["error"]["code"] == 268, job
    assert (storage_state(sd), storage_state(other_sd)) == before
    assert sorted(await c.call("getVolumesList", sdUUID=sd)) == sorted([*made, base, mid])
    assert await c.call("getVolumesList", sdUUID=other_sd) == [other_vol]

    # ---- deleteImage takes the chain's LVs and slots
    slots = [lv_slot(lvs(sd)[v]) for v in (base, mid)]
    job = await run_job(c, "deleteImage", sdUUID=sd, imgUUID=img)
    assert job["status"] == "done", job
    assert not {base, mid} & set(lvs(sd))
    data = read_slots(sd, SLOTS_CHECKED)
    assert all(data[s * 8192:(s + 1) * 8192] == bytes(8192) for s in slots)
    assert img not in await c.call("getImagesList", sdUUID=sd)
