"""A live snapshot of a VM's three disks on three domains, in the lab
guest: two iSCSI block domains (one multipath LUN each, two portals) and
one NFS v3 domain. One qemu-storage-daemon is the VM: it holds the three
disks (host_device nodes on the LVs, a file node on NFS), each written
through NBD by its own qemu-io while the agent switches them.

- A failure on the third disk (the VM manager reads that disk's dirty
  bitmap over NBD, a pull-mode backup: the bitmap is busy, it cannot be
  carried onto the new layer; refused before the transaction): no disk is
  switched, no new layer is left on any domain, the VM holds only its own
  nodes, the writers go on where they were, and no write is lost.
- The same snapshot once that backup ended: all three switched in one
  transaction; each old layer is the disk at one point in time, each chain
  reads every write, the NFS disk's bitmap goes on in its new layer.

And an incremental backupVolume of a thin block disk the VM writes, onto
an NFS backup domain: a full backup, then an incremental one while the
writes go on; the backup chain reads as the disk at the switch.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from rpc.client import Client
from storage.qmp import QMPClient
from tests.integration.test_domains_file import Storage, create_volume, new_id, run_job
from tests.integration.test_live_snapshot_file import (
    Writer,
    blocks_written,
    data_extents,
    more_writes,
    read_raw,
)
from tests.lab import guestlib as g
from tests.lab.test_connections_lab import disconnect_all
from tests.lab.test_domains_block_lab import connect_luns, deactivate_vgs, lvs, start
from tests.polling import until

MiB = 1 << 20
GiB = 1 << 30
SIZE = 64 * MiB         # each disk: small, the writers write a few MiB
BITMAP = "since-backup"
WRITE_IOPS = 300


class VM:
    """qemu-storage-daemon holding disks (protocol node fileN under qcow2
    node fmtN, exported as eN), a QMP monitor for the agent and one for the
    test (the VM manager's)."""

    def __init__(self, work: Path, disks: list[tuple[str, str]]) -> None:
        self.qmp = str(work / "qmp.sock")
        self.qmp_test = str(work / "qmp-test.sock")
        self.nbd = str(work / "nbd.sock")
        # The guest has one vCPU: three writers at full speed would starve
        # the agent's LVM commands. A throttle filter over each disk (as a
        # VM's I/O limits) keeps them at WRITE_IOPS together.
        argv = ["qemu-storage-daemon", "--nbd-server", f"addr.type=unix,addr.path={self.nbd}",
                "--object", f"throttle-group,id=tg,x-iops-write={WRITE_IOPS}"]
        for i, (driver, path) in enumerate(disks):
            argv += ["--blockdev", f"driver={driver},node-name=file{i},filename={path},"
                                   "cache.direct=on",
                     "--blockdev", f"driver=qcow2,node-name=fmt{i},file=file{i}",
                     "--blockdev", f"driver=throttle,node-name=io{i},throttle-group=tg,"
                                   f"file=fmt{i}",
                     "--export", f"type=nbd,id=e{i},node-name=io{i},name=e{i},writable=on"]
        argv += ["--chardev", f"socket,id=m0,path={self.qmp},server=on,wait=off",
                 "--monitor", "chardev=m0",
                 "--chardev", f"socket,id=m1,path={self.qmp_test},server=on,wait=off",
                 "--monitor", "chardev=m1"]
        self.daemon = g.Daemon("qemu-storage-daemon", argv)

    def start(self) -> VM:
        self.daemon.start()
        g.wait_until(lambda: os.path.exists(self.nbd) or not self.daemon.check_alive(),
                     "the VM's NBD server", 30)
        assert self.daemon.check_alive(), self.daemon.log_tail()
        return self

    def url(self, i: int) -> str:
        return f"nbd+unix:///e{i}?socket={self.nbd}"

    async def nodes(self) -> list[str]:
        async with QMPClient(self.qmp_test) as mon:
            return sorted(n["node-name"] for n in
                          await mon.execute("query-named-block-nodes", {"flat": True}))


def bitmaps(path: str) -> list[tuple[str, list[str]]]:
    info = json.loads(g.run("qemu-img", "info", "--output", "json", "-U", path))
    return [(b["name"], b["flags"]) for b in info["format-specific"]["data"].get("bitmaps", [])]


async def volumes(c: Client, disks: list[dict[str, str]]) -> list[list[str]]:
    return [sorted(await c.call("getVolumesList", sdUUID=d["sdUUID"], imgUUID=d["imgUUID"]))
            for d in disks]


@pytest.mark.timeout(300)
async def test_live_snapshot_of_three_disks_on_block_and_nfs(
        make_target: Callable[..., g.Target], multipathd: g.Multipathd,
        nfs_server: g.NfsServer, tmp_path: Path, host_scratch: Path) -> None:
    marks = [("start", time.monotonic())]
    target = make_target("live", (GiB, GiB), lun_dir=host_scratch)
    agent = start(tmp_path / "agent", monitor_interval=60)
    block_sds = [new_id(), new_id()]
    vm: VM | None = None
    writers: list[Writer] = []
    try:
        async with agent.client() as c:
            _, luns = await connect_luns(c, target)
            for i, (sd, lun) in enumerate(zip(block_sds, luns, strict=True)):
                await c.call("createStorageDomain", sdUUID=sd, domType="iscsi",
                             name=f"live {i}", devices=[lun["guid"]], ovfStore=False)
            nfs = Storage(c, "nfs", {"connection": f"127.0.0.1:{nfs_server.exports[0]}",
                                     "protocol_version": "3"})
            await nfs.connect()
            await nfs.create_domain(name="live nfs")
            disks: list[dict[str, str]] = []
            paths: list[str] = []
            qmp = str(tmp_path / "qmp.sock")
            for i, sd in enumerate([*block_sds, nfs.sd]):
                img, vol = new_id(), new_id()
                await create_volume(c, sd, img, vol, size=SIZE)
                disks.append({"sdUUID": sd, "imgUUID": img, "volUUID": vol})
                p = await c.call("prepareImage", **disks[-1], purpose="vm",
                                 writer={"qmpSocket": qmp, "nodeName": f"file{i}"})
                paths.append(p["path"])
            marks.append(("domains and disks", time.monotonic()))
            # the NFS disk records its changes since a backup
            g.run("qemu-img", "bitmap", "--add", paths[2], BITMAP)
            vm = VM(tmp_path, [("host_device", paths[0]), ("host_device", paths[1]),
                               ("file", paths[2])]).start()
            writers = [Writer(vm.url(i), SIZE).start() for i in range(3)]
            await until(lambda: all(w.at_least(64) for w in writers), "writes before",
                        timeout=60)
            own_nodes = await vm.nodes()
            before = {sd: set(lvs(sd)) for sd in block_sds}
            nfs_files = sorted(os.listdir(Path(paths[2]).parent))

            # ---- the third disk's bitmap busy: nothing switched, nothing left
            async with QMPClient(vm.qmp_test) as mon:
                await mon.execute("block-export-add", {
                    "type": "nbd", "id": "pull", "node-name": "fmt2", "name": "pull",
                    "writable": True, "bitmaps": [BITMAP]})
                info = await run_job(c, "snapshotImages",
                                     disks=[{**d, "newVolUUID": new_id()} for d in disks])
                assert info["status"] == "failed", info
                assert info["error"]["code"] == 203 and BITMAP in info["error"]["message"], \
                    info["error"]
                at_failure = await more_writes(writers, 64, "writes after the failure")
                await mon.execute("block-export-del", {"id": "pull"})
            assert await volumes(c, disks) == [[d["volUUID"]] for d in disks]
            assert {sd: set(lvs(sd)) for sd in block_sds} == before
            assert sorted(os.listdir(Path(paths[2]).parent)) == nfs_files
            assert await vm.nodes() == own_nodes
            marks.append(("failed snapshot", time.monotonic()))

            # ---- the backup over: all three switched in one transaction
            news = [new_id() for _ in disks]
            info = await run_job(c, "snapshotImages", disks=[
                {**d, "newVolUUID": n} for d, n in zip(disks, news, strict=True)])
            assert info["status"] == "done", info.get("error")
            at_switch = await more_writes(writers, 64, "writes after the switch")
            marks.append(("snapshot", time.monotonic()))
            for w in writers:
                await w.stop()
            assert len(await vm.nodes()) == len(own_nodes) + 6
            vm.daemon.stop()

            assert await volumes(c, disks) == [sorted([d["volUUID"], n])
                                               for d, n in zip(disks, news, strict=True)]
            for i, (d, new, w) in enumerate(zip(disks, news, writers, strict=True)):
                top = str(Path(paths[i]).with_name(new))
                info = await c.call("getVolumeInfo", **{**d, "volUUID": new})
                assert info["parent"] == d["volUUID"] and info["legality"] == "LEGAL", info
                # the old layer: the disk at one point in time, before the job ended
                raw = read_raw(paths[i], tmp_path / "old.raw")
                k = blocks_written(raw)
                assert at_failure[i] + 64 <= k <= at_switch[i], (i, k, at_failure, at_switch)
                # the chain: every write
                assert blocks_written(read_raw(top, tmp_path / "chain.raw")) == w.written
                if i == 2:
                    assert bitmaps(paths[i]) == bitmaps(top) == [(BITMAP, ["auto"])]
            for d in disks:
                await c.call("teardownImage", sdUUID=d["sdUUID"], imgUUID=d["imgUUID"])
            for sd in [*block_sds, nfs.sd]:
                await c.call("formatStorageDomain", sdUUID=sd)
            assert all(st["status"] == 0 for st in await disconnect_all(c))
            marks.append(("checks and clean-up", time.monotonic()))
            print("\nlive snapshot, 2 block + 1 NFS: " + ", ".join(
                f"{name} {t - prev:.1f} s" for (_, prev), (name, t) in
                itertools.pairwise(marks)))
    finally:
        for w in writers:
            w.stopping = True
        if vm is not None:
            vm.daemon.stop()
        # ended by now (stopped, or failing without their VM): outcome checked above
        await asyncio.gather(*(w.task for w in writers if w.task), return_exceptions=True)
        rc = agent.stop()
        deactivate_vgs(*block_sds)
    assert rc == 0, f"agent exit status {rc}; log:\n{agent.log()}"


@pytest.mark.timeout(300)
async def test_incremental_backup_of_a_thin_block_disk_being_written(
        make_target: Callable[..., g.Target], multipathd: g.Multipathd,
        nfs_server: g.NfsServer, tmp_path: Path, host_scratch: Path) -> None:
    """A full backupVolume, then an incremental one, of a thin block disk
    the VM writes all along: the incremental holds only the blocks written
    since the full one (the bitmap the VM held, stored on the old layer by
    the switch), and the backup chain reads as the disk at the switch."""
    started = time.monotonic()
    target = make_target("livebackup", (GiB,), lun_dir=host_scratch)
    agent = start(tmp_path / "agent", monitor_interval=60)
    sd = new_id()
    vm: VM | None = None
    writer: Writer | None = None
    try:
        async with agent.client() as c:
            _, [lun] = await connect_luns(c, target)
            await c.call("createStorageDomain", sdUUID=sd, domType="iscsi", name="live",
                         devices=[lun["guid"]], ovfStore=False)
            nfs = Storage(c, "nfs", {"connection": f"127.0.0.1:{nfs_server.exports[0]}",
                                     "protocol_version": "3"})
            await nfs.connect()
            await nfs.create_domain(name="backups", domClass="backup")
            img, vol = new_id(), new_id()
            await create_volume(c, sd, img, vol, size=SIZE)
            disk = {"sdUUID": sd, "imgUUID": img, "volUUID": vol}
            path = (await c.call("prepareImage", **disk, purpose="vm", writer={
                "qmpSocket": str(tmp_path / "qmp.sock"), "nodeName": "file0"}))["path"]
            vm = VM(tmp_path, [("host_device", path)]).start()
            writer = Writer(vm.url(0), SIZE).start()
            bimg = new_id()
            backups: list[str] = []
            layers = [vol]
            ends: list[int] = []
            for n in range(2):
                await until(lambda: writer is not None and writer.at_least(
                    (ends[-1] if ends else 0) + 64), "writes before the backup", timeout=60)
                dst = {"sdUUID": nfs.sd, "imgUUID": bimg, "volUUID": new_id()}
                inc = {"incrementalFrom": {**dst, "volUUID": backups[-1]}} if backups else {}
                info = await run_job(c, "backupVolume", src={**disk, "volUUID": layers[-1]},
                                     dst=dst, keepSnapshot=False, **inc)
                assert info["status"] == "done", (n, info.get("error"))
                assert info["result"]["incremental"] is (n > 0), info["result"]
                ends.append(writer.written)
                layers.append(info["result"]["snapshotVolUUID"])
                backups.append(dst["volUUID"])
            await until(lambda: writer is not None and writer.at_least(ends[-1] + 64),
                        "writes after", timeout=60)
            await writer.stop()
            vm.daemon.stop()

            copied = (await c.call("prepareImage", sdUUID=nfs.sd, imgUUID=bimg,
                                   volUUID=backups[-1], purpose="read"))["path"]
            full, incremental = (str(Path(copied).with_name(b)) for b in backups)
            k0 = blocks_written(read_raw(full, tmp_path / "full.raw"))
            k1 = blocks_written(read_raw(incremental, tmp_path / "inc.raw"))
            assert 64 <= k0 <= ends[0] and k0 < k1 <= ends[1], (k0, k1, ends)
            # the chain up to the incremental: the disk at its switch (the
            # layer the VM left then, on the block domain)
            g.run("qemu-img", "compare", "-q", "-f", "qcow2", "-F", "qcow2", incremental,
                  str(Path(path).with_name(layers[1])))
            # only the blocks written since the full backup (64 KiB bitmap granularity)
            lo, hi = k0 * 4096 // 65536 * 65536, (k1 * 4096 + 65535) // 65536 * 65536
            held = data_extents(incremental)
            assert held and all(lo <= a < b <= hi for a, b in held), (held, lo, hi)
            top = str(Path(path).with_name(layers[-1]))
            assert blocks_written(read_raw(top, tmp_path / "chain.raw")) == writer.written
            await c.call("teardownImage", sdUUID=nfs.sd, imgUUID=bimg)
            await c.call("teardownImage", sdUUID=sd, imgUUID=img)
            for dom in (sd, nfs.sd):
                await c.call("formatStorageDomain", sdUUID=dom)
            assert all(st["status"] == 0 for st in await disconnect_all(c))
            print(f"\nlive incremental backup of a thin block disk: {k0} then {k1} blocks "
                  f"written at the switches, {sum(b - a for a, b in held)} bytes in the "
                  f"incremental, {time.monotonic() - started:.0f} s")
    finally:
        if writer is not None:
            writer.stopping = True
        if vm is not None:
            vm.daemon.stop()
        if writer is not None and writer.task is not None:
            await asyncio.gather(writer.task, return_exceptions=True)
        rc = agent.stop()
        deactivate_vgs(sd)
    assert rc == 0, f"agent exit status {rc}; log:\n{agent.log()}"
