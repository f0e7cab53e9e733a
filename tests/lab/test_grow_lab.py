"""Growing a block domain and wiping its volumes, on multipath iSCSI in the
lab guest (issue 17):

- a domain on one LUN; extendStorageDomain refuses a LUN this host does not
  see (606) and a PV of another VG (601), changing nothing; it adds a second
  LUN (again: nothing changes); the domain metadata lists both PVs; a volume
  larger than the first LUN's free space is made in the new space;
- the array grows that LUN (tgtd: file truncated larger, LU re-added);
  getDeviceList(refresh) shows the new capacity; resizePV: the domain's
  free space grows by exactly the PV's growth while a prepared volume stays
  active and is read without a failed read all through the refresh and the
  resize;
- wipe: after deleteVolume / deleteImage with wipe, the volumes' former
  extents read zeros on the LUN; a volume deleted without wipe leaves its
  data there (what wipe is for); an agent killed while it zeroes finishes
  the wipe after its restart.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from rpc.client import Client, RpcError
from tests.integration.test_domains_file import create_volume, new_id, run_job
from tests.lab import guestlib as g
from tests.lab.test_domains_block_lab import (
    connect_luns,
    format_and_disconnect,
    lvs,
    read_slots,
    start,
    stop_agent,
)
from tests.polling import until

MiB = 1 << 20
EXTENT = 8 * MiB        # the lab agents' block_extent_size


def dev(path: str) -> str:
    """A block device by its node (/dev/dm-N): lvm may name a map either way."""
    return os.path.realpath(path)


def pvs(vg: str) -> dict[str, dict[str, int]]:
    """{device node: {size, free, pe_start}} of the VG's PVs, as lvm reports them."""
    out = g.lvm("pvs", "--reportformat", "json", "--units", "b", "--nosuffix",
                "-o", "pv_name,vg_name,pv_size,pv_free,pe_start")
    return {dev(r["pv_name"]): {"size": int(r["pv_size"]), "free": int(r["pv_free"]),
                                "pe_start": int(r["pe_start"])}
            for r in json.loads(out)["report"][0]["pv"] if r["vg_name"] == vg}


def extents(vg: str, lv: str) -> list[tuple[str, int, int]]:
    """(PV device node, first extent, last extent) of each segment of vg/lv
    (`lvs -o seg_pe_ranges`)."""
    out = g.lvm("lvs", "--reportformat", "json", "--segments", "-o", "seg_pe_ranges",
                f"{vg}/{lv}")
    report = json.loads(out)["report"][0]
    ranges = []
    for row in report.get("seg") or report.get("lv") or []:
        for part in row["seg_pe_ranges"].split():
            path, _, span = part.rpartition(":")
            first, _, last = span.partition("-")
            ranges.append((dev(path), int(first), int(last)))
    assert ranges, out
    return ranges


# Data is written, read and compared an extent at a time, as digests: under
# UML a guest process's resident pages are host mappings, and one holding a
# few hundred MiB at once (a CI run's 128 MiB volume read whole beside the
# 128 MiB it was compared with) ran the host out of vm.max_map_count
# (65,530); the guest kernel then killed the test run.


def extents_digest(vg: str, ranges: list[tuple[str, int, int]]) -> str:
    """sha256 of what the LUNs hold at those extents (read from the
    multipath maps with O_DIRECT, past the LV layer)."""
    starts = {dev: pv["pe_start"] for dev, pv in pvs(vg).items()}
    h = hashlib.sha256()
    for node, first, last in ranges:
        for extent in range(first, last + 1):
            h.update(g.direct_read(node, EXTENT, starts[node] + extent * EXTENT))
    return h.hexdigest()


def pattern(size: int, seed: int) -> bytes:
    """The pattern of `seed`; size a multiple of 4 KiB, at most an extent."""
    assert size <= EXTENT
    block = bytes((seed + i) % 251 for i in range(4096))
    return block * (size // 4096)


def pattern_digest(size: int, seed: int | None) -> str:
    """sha256 of `size` bytes of the pattern of `seed` (None: zeros)."""
    h = hashlib.sha256()
    chunk = bytes(EXTENT) if seed is None else pattern(EXTENT, seed)
    for offset in range(0, size, EXTENT):
        h.update(chunk[:size - offset])
    return h.hexdigest()


SPACE = ("capacity", "free", "used", "volumes")


class Reader:
    """Reads a block of a device with O_DIRECT over and over in a thread
    until stopped: the reads done, and what failed or read wrong."""

    def __init__(self, path: str, offset: int, data: bytes) -> None:
        self.reads = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(path, offset, data),
                                        daemon=True)

    def _run(self, path: str, offset: int, data: bytes) -> None:
        while not self._stop.is_set():
            try:
                if g.direct_read(path, len(data), offset) != data:
                    self.errors.append(f"read {self.reads}: other data")
            except OSError as e:
                self.errors.append(f"read {self.reads}: {e}")
            self.reads += 1

    def __enter__(self) -> Reader:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)


async def stats(c: Client, sd: str) -> dict[str, Any]:
    return {k: v for k, v in (await c.call("getStorageDomainStats", sdUUID=sd)).items()
            if k in SPACE}


async def written_volume(c: Client, sd: str, size: int, seed: int) -> tuple[str, str]:
    """A raw volume filled with pattern(seed), torn down again."""
    img, vol = new_id(), new_id()
    await create_volume(c, sd, img, vol, size=size, fmt="raw", prealloc="preallocated")
    path = (await c.call("prepareImage", sdUUID=sd, imgUUID=img, volUUID=vol,
                         purpose="copy"))["path"]
    chunk = pattern(EXTENT, seed)
    for offset in range(0, size, EXTENT):
        g.direct_write(path, chunk[:size - offset], offset)
    await c.call("teardownImage", sdUUID=sd, imgUUID=img, volUUID=vol)
    return img, vol


@pytest.mark.timeout(600)
async def test_extend_resize_and_wipe(make_target: Callable[..., g.Target],
                                      target_server: g.TargetServer,
                                      multipathd: g.Multipathd, tmp_path: Path,
                                      host_scratch: Path) -> None:
    target = make_target("grow", (64 * MiB, 512 * MiB, 768 * MiB), lun_dir=host_scratch)
    agent = start(tmp_path / "agent", monitor_interval=60)
    sd = new_id()
    try:
        async with agent.client() as c:
            _, [foreign, first, second] = await connect_luns(c, target)
            lun1, lun2 = dev(first["path"]), dev(second["path"])
            await c.call("createStorageDomain", sdUUID=sd, domType="iscsi", name="grow",
                         devices=[first["guid"]], ovfStore=False)
            before = await stats(c, sd)
            assert list(pvs(sd)) == [lun1]

            # ---- refused: a LUN this host does not see, a PV of another VG --------
            with pytest.raises(RpcError) as e:
                await c.call("extendStorageDomain", sdUUID=sd,
                             devices=[second["guid"], "36001405000000000000000000000dead"])
            assert e.value.code == 606, e.value
            other_vg = f"foreign-{uuid.uuid4().hex[:8]}"
            g.lvm("pvcreate", foreign["path"])
            g.lvm("vgcreate", other_vg, foreign["path"])
            try:
                with pytest.raises(RpcError) as e:
                    await c.call("extendStorageDomain", sdUUID=sd,
                                 devices=[second["guid"], foreign["guid"]])
                assert e.value.code == 601 and other_vg in e.value.message, e.value
            finally:
                g.lvm_wipe(foreign["path"])
            assert list(pvs(sd)) == [lun1] and await stats(c, sd) == before

            # ---- a second LUN -----------------------------------------------------
            after = await c.call("extendStorageDomain", sdUUID=sd, devices=[second["guid"]])
            added = pvs(sd)[lun2]
            assert set(pvs(sd)) == {lun1, lun2}
            assert after["capacity"] == before["capacity"] + added["size"], (before, after)
            assert after["free"] == before["free"] + added["size"], (before, after)
            # again: nothing changes
            again = await c.call("extendStorageDomain", sdUUID=sd, devices=[second["guid"]])
            assert {k: again[k] for k in SPACE} == {k: after[k] for k in SPACE}
            assert set(pvs(sd)) == {lun1, lun2}
            # the domain metadata (slot 0 of the metadata LV) lists both LUNs by
            # WWID (map names differ between hosts) with their PV uuids
            md = read_slots(sd, 1)[:4096].decode(errors="replace")
            [listed] = [ln[4:] for ln in md.splitlines() if ln.startswith("PVS=")]
            assert sorted(p.split(":")[0] for p in listed.split(",")) == sorted(
                [first["guid"], second["guid"]]), md
            assert {p.split(":")[1] for p in listed.split(",")} == {
                lun["pvUUID"] for lun in await c.call(
                    "getDeviceList", guids=[first["guid"], second["guid"]])}, md
            # the new space is used: a volume larger than the first LUN's free space
            big_img, big = new_id(), new_id()
            first_free = pvs(sd)[lun1]["free"]
            await create_volume(c, sd, big_img, big, size=first_free + 64 * MiB, fmt="raw",
                                prealloc="preallocated")
            assert lun2 in {node for node, _, _ in extents(sd, big)}

            # ---- the array grows the second LUN -----------------------------------
            ref = {"sdUUID": sd, "imgUUID": big_img, "volUUID": big}
            path = (await c.call("prepareImage", **ref, purpose="vm"))["path"]
            data = pattern(4 * MiB, 7)
            g.direct_write(path, data, offset=first_free)   # on the second LUN
            pv_before = pvs(sd)[lun2]
            space_before = await stats(c, sd)
            target_server.grow_lun(target, 3, 1024 * MiB)
            multipathd.wait_active_paths(second["guid"], len(g.PORTALS))
            # a VM reading its disk all along: no read fails while the LUN's
            # paths are rescanned, its map resized and its PV resized
            with Reader(path, first_free, data) as reader:
                [seen] = await c.call("getDeviceList", guids=[second["guid"]], refresh=True)
                resized = await c.call("resizePV", sdUUID=sd, guid=second["guid"])
            assert reader.reads > 0 and reader.errors == [], (reader.reads, reader.errors)
            assert seen["capacity"] == 1024 * MiB, seen
            assert {p["capacity"] for p in seen["pathstatus"]} == {1024 * MiB}, seen
            pv_after = pvs(sd)[lun2]
            grown = pv_after["size"] - pv_before["size"]
            assert grown == 256 * MiB, (pv_before, pv_after)
            assert resized["size"] == pv_after["size"]
            assert resized["free"] == space_before["free"] + grown, (space_before, resized)
            assert resized["capacity"] == space_before["capacity"] + grown
            # the prepared volume stayed active and reads what was written
            assert lvs(sd)[big]["active"]
            assert g.direct_read(path, len(data), first_free) == data
            await c.call("teardownImage", **ref)

            # ---- wipe -------------------------------------------------------------
            size = 4 * EXTENT
            kept_img, kept = await written_volume(c, sd, size, 1)
            wiped_img, wiped = await written_volume(c, sd, size, 2)
            job_img, job_vol = await written_volume(c, sd, size, 3)
            places = {v: extents(sd, v) for v in (kept, wiped, job_vol)}
            for v, seed in ((kept, 1), (wiped, 2), (job_vol, 3)):
                assert extents_digest(sd, places[v]) == pattern_digest(size, seed)
            await c.call("deleteVolume", sdUUID=sd, imgUUID=kept_img, volUUID=kept)
            await c.call("deleteVolume", sdUUID=sd, imgUUID=wiped_img, volUUID=wiped,
                         wipe=True)
            info = await run_job(c, "deleteImage", sdUUID=sd, imgUUID=job_img, wipe=True)
            assert info["status"] == "done", info
            names = set(lvs(sd))
            assert not {kept, wiped, job_vol} & names, names
            zeros = pattern_digest(size, None)
            assert extents_digest(sd, places[wiped]) == zeros
            assert extents_digest(sd, places[job_vol]) == zeros
            # without wipe the data stays on the LUN
            assert extents_digest(sd, places[kept]) == pattern_digest(size, 1)

            await format_and_disconnect(c, sd)
    finally:
        stop_agent(agent, sd)


def zeroing(lv: str) -> bool:
    """A `blkdiscard --zeroout` of that LV runs (any process's cmdline)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv[:2] == [b"blkdiscard", b"--zeroout"] and any(lv.encode() in a for a in argv):
            return True
    return False


@pytest.mark.timeout(400)
async def test_wipe_finished_after_a_kill(make_target: Callable[..., g.Target],
                                          multipathd: g.Multipathd, tmp_path: Path,
                                          host_scratch: Path) -> None:
    """kill -9 the agent while it zeroes a volume of a deleteImage with wipe:
    the LV is left tagged WIPE (its metadata REMOVING); after the restart the
    job's recovery (garbage collection) zeroes it, then removes it."""
    target = make_target("wipekill", (1024 * MiB,), lun_dir=host_scratch)
    state = tmp_path / "agent"
    agent = start(state, monitor_interval=60)
    sd = new_id()
    size = 128 * MiB
    try:
        async with agent.client() as c:
            _, [lun] = await connect_luns(c, target)
            await c.call("createStorageDomain", sdUUID=sd, domType="iscsi", name="wipekill",
                         devices=[lun["guid"]], ovfStore=False)
            img, vol = await written_volume(c, sd, size, 9)
            places = extents(sd, vol)
            await c.call("deleteImage", jobUUID=new_id(), sdUUID=sd, imgUUID=img, wipe=True)
            g.wait_until(lambda: zeroing(vol), "blkdiscard --zeroout of the volume", 60, 0.005)
            agent.kill()
        left = lvs(sd)
        assert vol in left and "WIPE" in left[vol]["tags"], left
        agent = start(state, port=agent.port, monitor_interval=60)
        async with agent.client() as c:
            await until(lambda: vol not in lvs(sd), "the wiped LV removed", 120)
            assert extents_digest(sd, places) == pattern_digest(size, None)
            assert await c.call("getImagesList", sdUUID=sd) == []
            await format_and_disconnect(c, sd)
    finally:
        stop_agent(agent, sd)
