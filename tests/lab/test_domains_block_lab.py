"""A block storage domain through the agent's API, on a multipath iSCSI LUN:
create (with its OVF store), volumes, prepare activates the chain's LVs and
teardown deactivates them, an OVF upload, a second agent finds the domain
on the LUN, format leaves no VG."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import subprocess
import tarfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from storage.domains.blockdomain import SLOT_SIZE
from tests.agentproc import AgentProcess
from tests.lab import guestlib as g
from tests.lab.test_connections_lab import (
    PORTAL1,
    PORTAL2,
    disconnect_all,
    iscsi_params,
)

MiB = 1024**2


def new_id() -> str:
    return str(uuid.uuid4())


def start(state: Path, port: int | None = None, monitor_interval: float = 2.0,
          chunk_size: int = 64 * MiB, watermark_percent: int = 20,
          log_commands: bool = False) -> AgentProcess:
    """An agent with 8 MiB extents. Domain monitoring costs a dd and a vgs per
    domain and interval: tests that do not look at it pass a long interval
    (in the guest every LVM command takes most of a second of CPU).
    `log_commands`: every command it runs in its log (storage.commands)."""
    state.mkdir(parents=True, exist_ok=True)
    (state / "hostagent.toml").write_text(
        f"[storage]\nblock_extent_size = 8388608\nmonitor_interval = {monitor_interval}\n"
        "[ovf]\nmax_tar_size = 16777216\n"
        # small LUNs: thin cow volumes start at 64 MiB, not VDSM's 2560 MiB
        f"[thin]\nchunk_size = {chunk_size}\nwatermark_percent = {watermark_percent}\n" +
        ('[logging.levels]\n"storage.commands" = "DEBUG"\n' if log_commands else ""))
    agent = AgentProcess(state, port=port)
    g.LOG_DIR.mkdir(parents=True, exist_ok=True)
    agent.log_path = g.LOG_DIR / f"agent-block-{agent.port}.log"
    return agent.start(timeout=60)


async def job(c: Any, verb: str, **params: Any) -> dict[str, Any]:
    jid = new_id()
    await c.call(verb, jobUUID=jid, **params)
    info = dict(await c.wait_job(jid, timeout=120))
    assert info["status"] == "done", info
    return info


def lv_active(sd: str, vol: str) -> bool:
    return os.path.exists(f"/dev/{sd}/{vol}")


def lvs(vg: str) -> dict[str, dict[str, Any]]:
    """{lv name: {size, tags, active}} of `vg`, as the lvm tool reports it."""
    out = g.lvm("lvs", "--reportformat", "json", "--units", "b", "--nosuffix",
                "-o", "lv_name,lv_size,lv_tags,lv_attr", vg)
    return {r["lv_name"]: {"size": int(r["lv_size"]), "tags": sorted(r["lv_tags"].split(",")),
                           "active": r["lv_attr"][4] == "a"}
            for r in json.loads(out)["report"][0]["lv"]}


def lv_slot(lv: dict[str, Any]) -> int:
    [slot] = [int(t[3:]) for t in lv["tags"] if t.startswith("MD_")]
    return slot


def read_slots(sd: str, count: int) -> bytes:
    """The first `count` metadata slots of a block domain (its metadata LV
    stays active while an agent knows the domain)."""
    return g.direct_read(f"/dev/{sd}/metadata", count * SLOT_SIZE)


def deactivate_vgs(*vgs: str) -> None:
    """Deactivate every LV of the VGs that still exist (a test failed before
    it formatted its domains): active LVs keep the maps from being flushed."""
    found = g.lvm("vgs", "--noheadings", "-o", "vg_name").split()
    for vg in vgs:
        if vg in found:
            g.run_ok("lvm", "vgchange", "-an", vg)

def stop_agent(agent: AgentProcess, *vgs: str) -> None:
    """Stop a test's agent (it must exit 0) and leave no LV of its domains'
    VGs active, also when the test failed before formatting them."""
    rc = agent.stop()
    deactivate_vgs(*vgs)
    assert rc == 0, f"agent exit status {rc}; log:\n{agent.log()}"


async def format_and_disconnect(c: Any, sd: str) -> None:
    """The end of a test's block domain: formatted, every connection gone."""
    await c.call("formatStorageDomain", sdUUID=sd)
    for st in await disconnect_all(c):
        assert st["status"] == 0, st



async def connect_luns(c: Any, target: g.Target) -> tuple[list[dict[str, Any]],
                                                          list[dict[str, Any]]]:
    """Connect `target` on both portals; returns (connection params, its LUNs
    from getDeviceList, smallest first)."""
    params = [iscsi_params(target, PORTAL1), iscsi_params(target, PORTAL2)]
    statuses = await c.call("connectStorageServer", domType="iscsi", connectionParams=params)
    assert [s["status"] for s in statuses] == [0, 0], statuses
    luns = [d for d in await c.call("getDeviceList")
            if {p["iqn"] for p in d["pathlist"]} == {target.iqn}]
    assert len(luns) == len(target.luns), luns
    return params, sorted(luns, key=lambda d: int(d["capacity"]))


async def test_block_domain_through_the_api(make_target: Callable[..., g.Target],
                                            multipathd: g.Multipathd,
                                            tmp_path: Path) -> None:
    target = make_target("blockdom", (1024 * MiB,))
    agent = start(tmp_path / "a1")
    other: AgentProcess | None = None
    sd = new_id()
    try:
        async with agent.client() as c:
            p1, p2 = iscsi_params(target, PORTAL1), iscsi_params(target, PORTAL2)
            statuses = await c.call("connectStorageServer", domType="iscsi",
                                    connectionParams=[p1, p2])
            assert [s["status"] for s in statuses] == [0, 0], statuses
            [lun] = [d for d in await c.call("getDeviceList")
                     if {p["iqn"] for p in d["pathlist"]} == {target.iqn}]
            assert lun["status"] == "free"
            info = await c.call("createStorageDomain", sdUUID=sd, domType="iscsi",
                                name="block", devices=[lun["guid"]])
            assert info["type"] == "iscsi" and info["state"] == "active"
            [lun] = await c.call("getDeviceList", guids=[lun["guid"]])
            assert lun["status"] == "used" and lun["vgUUID"]

            img, base, top = new_id(), new_id(), new_id()
            await job(c, "createVolume", sdUUID=sd, imgUUID=img, volUUID=base,
                      size=64 * MiB, format="raw", preallocate="preallocated")
            await job(c, "createVolume", sdUUID=sd, imgUUID=img, volUUID=top,
                      size=64 * MiB, format="cow", preallocate="sparse", parentVolUUID=base)
            assert not lv_active(sd, top)
            prepared = await c.call("prepareImage", sdUUID=sd, imgUUID=img, volUUID=top,
                                    purpose="vm")
            assert prepared["path"] == f"/dev/{sd}/{top}"
            assert lv_active(sd, top) and lv_active(sd, base)
            chain = json.loads(subprocess.run(
                ["qemu-img", "info", "--output", "json", "-U", "--backing-chain",
                 prepared["path"]], capture_output=True, text=True, check=True).stdout)
            assert [c_["format"] for c_ in chain] == ["qcow2", "raw"]
            assert chain[0]["virtual-size"] == 64 * MiB
            await c.call("teardownImage", sdUUID=sd, imgUUID=img, volUUID=top)
            assert not lv_active(sd, top) and not lv_active(sd, base)

            # the OVF store is a volume of the block domain too
            body = io.BytesIO()
            with tarfile.open(fileobj=body, mode="w") as tar:
                data = b"<ovf/>" * 1000
                ti = tarfile.TarInfo(f"{new_id()}.ovf")
                ti.size = len(data)
                tar.addfile(ti, io.BytesIO(data))
            tar_bytes = body.getvalue()
            t = await c.call("uploadOvfTar", sdUUID=sd, size=len(tar_bytes),
                             sha256=hashlib.sha256(tar_bytes).hexdigest())
            import aiohttp

            from rpc.client import client_ssl_context
            pki = agent.pki
            ctx = client_ssl_context(pki / "ca.pem", pki / "client.pem", pki / "client.key")
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as s:
                async with s.put(f"{agent.url}{t['path']}", data=tar_bytes) as r:
                    assert r.status == 200, await r.text()
                async with s.get(f"{agent.url}/ovfstore/{sd}") as r:
                    assert await r.read() == tar_bytes
            info = await c.call("getOvfStoreInfo", sdUUID=sd)
            assert info["generation"] == 1 and info["entries"] == 1

            # another agent on this host, fresh state dir, finds it all on the LUN
            other = start(tmp_path / "a2")
            async with other.client() as c2:
                assert sd in await c2.call("getStorageDomainsList")
                vols = sorted(await c2.call("getVolumesList", sdUUID=sd, imgUUID=img))
                assert vols == sorted([base, top])
                mine = await c2.call("getVolumeInfo", sdUUID=sd, imgUUID=img, volUUID=top)
                theirs = await c.call("getVolumeInfo", sdUUID=sd, imgUUID=img, volUUID=top)
                assert mine == theirs
            other.stop()
            other = None

            await job(c, "deleteImage", sdUUID=sd, imgUUID=img)
            assert img not in await c.call("getImagesList", sdUUID=sd)
            await c.call("formatStorageDomain", sdUUID=sd)
            vgs = subprocess.run(["vgs", "--noheadings", "-o", "vg_name"],
                                 capture_output=True, text=True).stdout
            assert sd not in vgs
            await asyncio.sleep(0)
            for st in await disconnect_all(c):
                assert st["status"] == 0, st
    finally:
        if other is not None:
            other.stop()
        agent.stop()
