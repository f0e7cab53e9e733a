"""snapshotImages of a running VM's disks (prepareImage with a `writer`):
the agent switches the writer onto the new layers in one QMP transaction
while it writes. The VM is a qemu-storage-daemon holding three disks on
three file domains, each written through NBD by its own qemu-io during the
snapshot: afterwards each old layer is the disk at one point in time and
stays unchanged, the new layers hold every later write, and each chain
reads exactly what its writer wrote (`qemu-img compare`)."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import os
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from rpc.client import Client
from storage import nbd
from storage.domains.imageops import bitmap_name
from storage.domains.writers import layer_nodes
from storage.qmp import QMPClient
from tests.conftest import require_tools
from tests.integration.storagefixtures import FsMount
from tests.integration.test_domains_file import Storage, create_volume, new_id, run_job
from tests.polling import until, until_async

KiB = 1 << 10
MiB = 1 << 20
BLOCK = 4 * KiB
SIZE = 256 * MiB


def pattern(j: int) -> int:
    """The byte block j is written with (never 0: a block not written reads 0)."""
    return j % 255 + 1


class Writer:
    """A qemu-io writing 4 KiB blocks in a row through NBD, one at a time,
    counting those it completed (`written`) until stopped."""

    def __init__(self, url: str, size: int = SIZE) -> None:
        self.url = url
        self.size = size
        self.written = 0
        self.stopping = False
        self.task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        p = await asyncio.create_subprocess_exec(
            "qemu-io", "-f", "raw", self.url, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE)
        assert p.stdin is not None and p.stdout is not None
        try:
            while not self.stopping and (self.written + 1) * BLOCK <= self.size:
                j = self.written
                p.stdin.write(f"write -P {pattern(j)} {j * BLOCK} {BLOCK}\n".encode())
                await p.stdin.drain()
                while True:
                    line = await p.stdout.readline()
                    assert line, f"qemu-io stopped after {j} writes"
                    assert b"error" not in line.lower(), line
                    if b"wrote" in line:
                        break
                self.written = j + 1
            p.stdin.write(b"quit\n")
            await p.stdin.drain()
            assert await asyncio.wait_for(p.wait(), 30) == 0
        finally:
            if p.returncode is None:
                p.kill()
                await p.wait()

    def at_least(self, n: int) -> bool:
        if self.task is not None and self.task.done():
            self.task.result()      # its failure, raised
            raise AssertionError(f"the writer stopped after {self.written} writes")
        return self.written >= n

    def start(self) -> Writer:
        self.task = asyncio.create_task(self._run())
        return self

    async def stop(self) -> None:
        self.stopping = True
        if self.task is not None:
            await asyncio.wait_for(self.task, 60)


async def more_writes(writers: list[Writer], n: int, what: str) -> list[int]:
    """Wait until every writer completed `n` more writes; their counts
    before (the point the test marks)."""
    before = [w.written for w in writers]
    await until(lambda: all(w.at_least(b + n) for w, b in zip(writers, before, strict=True)),
                what, timeout=60)
    return before


async def vm_disks(client: Client, domains: list[Storage], qmp: str,
                   nodes: list[str]) -> tuple[list[dict[str, str]], list[str]]:
    """A new volume on each domain, prepared for a VM whose writer's monitor
    is `qmp`, disk i on writer node nodes[i]: (their references, paths)."""
    disks, paths = [], []
    for s, node in zip(domains, nodes, strict=True):
        img, vol = new_id(), new_id()
        await create_volume(client, s.sd, img, vol, size=SIZE)
        disks.append({"sdUUID": s.sd, "imgUUID": img, "volUUID": vol})
        paths.append((await client.call("prepareImage", **disks[-1], purpose="vm",
                                        writer={"qmpSocket": qmp, "nodeName": node}))["path"])
    return disks, paths


class VM:
    """One qemu-storage-daemon holding disks (file node fileN under qcow2
    node fmtN, exported as eN), its QMP monitor for the agent."""

    def __init__(self, work: Path, paths: list[str]) -> None:
        self.qmp = str(work / "qmp.sock")
        self.nbd = str(work / "nbd.sock")
        argv = ["qemu-storage-daemon", "--nbd-server", f"addr.type=unix,addr.path={self.nbd}"]
        for i, path in enumerate(paths):
            argv += ["--blockdev", f"driver=file,node-name=file{i},filename={path}",
                     "--blockdev", f"driver=qcow2,node-name=fmt{i},file=file{i}",
                     "--export", f"type=nbd,id=e{i},node-name=fmt{i},name=e{i},writable=on"]
        # a monitor for the agent, one for the test (as a VM manager's)
        self.qmp_test = str(work / "qmp-test.sock")
        argv += ["--chardev", f"socket,id=m0,path={self.qmp},server=on,wait=off",
                 "--monitor", "chardev=m0",
                 "--chardev", f"socket,id=m1,path={self.qmp_test},server=on,wait=off",
                 "--monitor", "chardev=m1"]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)

    def url(self, i: int) -> str:
        return f"nbd+unix:///e{i}?socket={self.nbd}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture
def vm_factory(tmp_path: Path) -> Iterator[Callable[[list[str]], VM]]:
    require_tools("qemu-storage-daemon", "qemu-img", "qemu-io")
    made: list[VM] = []

    def make(paths: list[str]) -> VM:
        made.append(VM(tmp_path, paths))
        return made[-1]

    yield make
    for vm in made:
        vm.stop()


@pytest.fixture
async def domains(make_fs_mount: Callable[..., FsMount], agent: Any,
                  client: Client) -> AsyncIterator[list[Storage]]:
    """Three localfs domains, each on its own connection."""
    fs = make_fs_mount("ext4", size=1024 * MiB)
    out = []
    for i in range(3):
        d = fs.path / f"sd{i}"
        d.mkdir()
        s = Storage(client, "localfs", {"connection": str(d)})
        await s.connect()
        await s.create_domain(name=f"domain {i}")
        out.append(s)
    yield out
    for s in out:
        for img in await client.call("getImagesList", sdUUID=s.sd):
            await client.call("teardownImage", sdUUID=s.sd, imgUUID=img)
        await s.disconnect()


def sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def read_raw(image: str, out: Path) -> bytes:
    """What a chain (opened from its top) reads, as raw bytes."""
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", image, str(out)],
                   check=True)
    return out.read_bytes()


def blocks_written(data: bytes) -> int:
    """How many blocks in a row from the start hold their pattern; every
    block after them must read zeros (a disk at one point of the writer)."""
    k = 0
    while k * BLOCK < len(data) and data[k * BLOCK:(k + 1) * BLOCK] == \
            bytes([pattern(k)]) * BLOCK:
        k += 1
    assert not data[k * BLOCK:].strip(b"\0"), f"block {k} and later: not one point in time"
    return k


async def test_live_snapshot_of_three_disks_being_written(
        domains: list[Storage], client: Client, vm_factory: Callable[[list[str]], VM],
        tmp_path: Path) -> None:
    """Two snapshots in a row (the second over the layer the first made),
    each of the three disks in one transaction while they are written."""
    disks, paths = await vm_disks(client, domains, str(tmp_path / "qmp.sock"),
                                  ["file0", "file1", "file2"])
    layers = [[p] for p in paths]     # per disk, its volumes' paths, base first
    vm = vm_factory([paths[0] for paths in layers])   # after its disks are prepared
    await until(lambda: os.path.exists(vm.nbd), "the VM's NBD server", timeout=20)
    writers = [Writer(vm.url(i)).start() for i in range(3)]
    at_switch: list[list[int]] = [[], [], []]
    sums: list[list[str]] = [[], [], []]
    try:
        await more_writes(writers, 256, "writes before")
        for _ in range(2):
            news = [new_id() for _ in disks]
            info = await run_job(client, "snapshotImages", disks=[
                {**d, "volUUID": Path(paths[-1]).name, "newVolUUID": n}
                for d, paths, n in zip(disks, layers, news, strict=True)])
            assert info["status"] == "done", info.get("error")
            for i, w in enumerate(writers):
                at_switch[i].append(w.written)
                sums[i].append(sha256(layers[i][-1]))
                layers[i].append(str(Path(layers[i][-1]).with_name(news[i])))
            # the writers go on, on the new layers only
            await more_writes(writers, 256, "writes after")
    finally:
        for w in writers:
            await w.stop()
    assert [[sha256(p) for p in paths[:-1]] for paths in layers] == sums, \
        "a layer was written after the switch off it"
    vm.stop()

    for i, (s, d, w) in enumerate(zip(domains, disks, writers, strict=True)):
        ref = {"sdUUID": s.sd, "imgUUID": d["imgUUID"]}
        vols = [Path(p).name for p in layers[i]]
        assert sorted(await client.call("getVolumesList", **ref)) == sorted(vols)
        for parent, vol in itertools.pairwise(vols):
            info = await client.call("getVolumeInfo", **ref, volUUID=vol)
            assert info["parent"] == parent and info["legality"] == "LEGAL", info
        # each old layer: the disk at one point in time, before its job ended
        before = 256
        for n, path in enumerate(layers[i][:-1]):
            k = blocks_written(read_raw(path, tmp_path / f"old{i}-{n}.raw"))
            assert before <= k <= at_switch[i][n], (n, before, k, at_switch[i])
            before = at_switch[i][n] + 256
        # the chain: every write, what came after the switch in the new layer
        top = layers[i][-1]
        data = read_raw(top, tmp_path / f"chain{i}.raw")
        assert blocks_written(data) == w.written >= at_switch[i][-1] + 256
        expected = tmp_path / f"expected{i}.raw"
        with expected.open("wb") as f:
            for j in range(w.written):
                f.write(bytes([pattern(j)]) * BLOCK)
            f.truncate(SIZE)
        subprocess.run(["qemu-img", "compare", "-q", "-f", "qcow2", "-F", "raw", top,
                        str(expected)], check=True)
        mapped = subprocess.run(["qemu-img", "map", "--output", "json", "-f", "qcow2", top],
                                capture_output=True, text=True, check=True).stdout
        assert _top_bytes(mapped) >= (w.written - at_switch[i][-1]) * BLOCK


def _top_bytes(map_json: str) -> int:
    return sum(e["length"] for e in json.loads(map_json) if e["depth"] == 0 and e["data"])


async def test_live_snapshot_all_or_none(
        domains: list[Storage], client: Client, vm_factory: Callable[[list[str]], VM],
        tmp_path: Path) -> None:
    """The third disk's writer cannot be switched (its node is not in the
    VM): no disk is switched, every new layer is gone, the overlays the
    writer opened are closed, the disks go on being written where they were."""
    disks, paths = await vm_disks(client, domains, str(tmp_path / "qmp.sock"),
                                  ["file0", "file1", "nosuch"])
    vm = vm_factory(paths)
    await until(lambda: os.path.exists(vm.nbd), "the VM's NBD server", timeout=20)
    writers = [Writer(vm.url(i)).start() for i in range(3)]
    try:
        await more_writes(writers, 256, "writes before")
        info = await run_job(client, "snapshotImages",
                             disks=[{**d, "newVolUUID": new_id()} for d in disks])
        assert info["status"] == "failed", info
        assert info["error"]["code"] == 203 and "disks[2]" in info["error"]["message"], \
            info["error"]
        await more_writes(writers, 256, "writes after")
        async with QMPClient(vm.qmp_test) as mon:
            nodes = await mon.execute("query-named-block-nodes", {"flat": True})
        assert sorted(n["node-name"] for n in nodes) == \
            sorted([f"{kind}{i}" for kind in ("file", "fmt") for i in range(3)])
    finally:
        for w in writers:
            await w.stop()
    vm.stop()
    for d, path, w in zip(disks, paths, writers, strict=True):
        assert await client.call("getVolumesList", sdUUID=d["sdUUID"],
                                 imgUUID=d["imgUUID"]) == [d["volUUID"]]
        # every write in the volume the VM had, none lost
        assert blocks_written(read_raw(path, tmp_path / "disk.raw")) == w.written


async def test_live_snapshot_refused_while_a_block_job_holds_a_disk(
        domains: list[Storage], client: Client, vm_factory: Callable[[list[str]], VM],
        tmp_path: Path) -> None:
    """The VM manager runs a block job on the third disk (a backup job,
    sync none: it stays until cancelled): qemu would refuse that disk's
    snapshot inside the transaction after preparing the first two; the
    agent refuses it before (203 naming the disk and the job), nothing is
    switched or left, no write is lost; once the job ends the same snapshot
    switches all three."""
    disks, paths = await vm_disks(client, domains, str(tmp_path / "qmp.sock"),
                                  ["file0", "file1", "file2"])
    vm = vm_factory(paths)
    await until(lambda: os.path.exists(vm.nbd), "the VM's NBD server", timeout=20)
    writers = [Writer(vm.url(i)).start() for i in range(3)]
    news = [new_id() for _ in disks]
    try:
        await more_writes(writers, 256, "writes before")
        async with QMPClient(vm.qmp_test) as mon:
            await mon.execute("blockdev-add", {"driver": "null-co", "node-name": "sink",
                                               "size": SIZE})
            await mon.execute("blockdev-backup", {"job-id": "pull-2", "device": "fmt2",
                                                  "target": "sink", "sync": "none"})
            info = await run_job(client, "snapshotImages", disks=[
                {**d, "newVolUUID": n} for d, n in zip(disks, news, strict=True)])
            assert info["status"] == "failed", info
            assert info["error"]["code"] == 203, info["error"]
            assert "disks[2]" in info["error"]["message"] and \
                "pull-2" in info["error"]["message"], info["error"]
            for d in disks:
                assert await client.call("getVolumesList", sdUUID=d["sdUUID"],
                                         imgUUID=d["imgUUID"]) == [d["volUUID"]]
            at_failure = await more_writes(writers, 256, "writes after the refusal")
            await mon.execute("block-job-cancel", {"device": "pull-2", "force": True})
            await until_async(lambda: _no_jobs(mon), "the job's end", timeout=30)
            await mon.execute("blockdev-del", {"node-name": "sink"})
        info = await run_job(client, "snapshotImages", disks=[
            {**d, "newVolUUID": n} for d, n in zip(disks, news, strict=True)])
        assert info["status"] == "done", info.get("error")
        at_switch = await more_writes(writers, 256, "writes after the switch")
    finally:
        for w in writers:
            await w.stop()
    vm.stop()
    for path, new, w, n in zip(paths, news, writers, at_switch, strict=True):
        # the old layer: a point in time between the refusal and the switch's end
        assert at_failure[0] <= blocks_written(read_raw(path, tmp_path / "old.raw")) <= n
        # the chain: every write, none lost
        top = str(Path(path).with_name(new))
        assert blocks_written(read_raw(top, tmp_path / "chain.raw")) == w.written


async def _no_jobs(mon: QMPClient) -> bool:
    return not await mon.execute("query-block-jobs")


async def written_disk(client: Client, s: Storage, img: str, vol: str,
                       tmp_path: Path) -> tuple[dict[str, str], str]:
    """A new volume prepared for a VM whose writer's QMP socket is in
    `tmp_path` (node file0): (its reference, its path)."""
    await create_volume(client, s.sd, img, vol, size=SIZE)
    disk = {"sdUUID": s.sd, "imgUUID": img, "volUUID": vol}
    qmp = str(tmp_path / "qmp.sock")
    path = (await client.call("prepareImage", **disk, purpose="vm",
                              writer={"qmpSocket": qmp, "nodeName": "file0"}))["path"]
    return disk, path


async def backup_domain(client: Client, domains: list[Storage],
                        make_fs_mount: Callable[..., FsMount]) -> Storage:
    """A backup domain on a fresh ext4, cleaned up with `domains`."""
    d = make_fs_mount("ext4", size=1024 * MiB).path / "backup"
    d.mkdir()
    backup = Storage(client, "localfs", {"connection": str(d)})
    await backup.connect()
    domains.append(backup)
    await backup.create_domain(name="backup", domClass="backup")
    return backup


async def test_backup_of_a_disk_being_written(
        domains: list[Storage], client: Client, vm_factory: Callable[[list[str]], VM],
        make_fs_mount: Callable[..., FsMount], tmp_path: Path) -> None:
    """backupVolume of a disk a VM writes (keepSnapshot false): the VM is
    switched onto the backup's layer first, so the copy is the disk at one
    point in time, the layer the VM writes is kept (for a live merge), and
    every write is in the disk's chain."""
    s = domains[0]
    img, vol = new_id(), new_id()
    disk, path = await written_disk(client, s, img, vol, tmp_path)
    backup = await backup_domain(client, domains, make_fs_mount)
    dst = {"sdUUID": backup.sd, "imgUUID": new_id(), "volUUID": new_id()}
    vm = vm_factory([path])
    await until(lambda: os.path.exists(vm.nbd), "the VM's NBD server", timeout=20)
    writer = Writer(vm.url(0)).start()
    try:
        await until(lambda: writer.at_least(256), "writes before", timeout=60)
        info = await run_job(client, "backupVolume", src=disk, dst=dst, keepSnapshot=False)
        assert info["status"] == "done", info.get("error")
        at_end = writer.written
        result = info["result"]
        assert result["merged"] is False and result["snapshotVolUUID"], result
        layer = result["snapshotVolUUID"]
        old_sum = sha256(path)
        await until(lambda: writer.at_least(at_end + 256), "writes after", timeout=60)
    finally:
        await writer.stop()
    assert sha256(path) == old_sum, "the backed-up layer was written after the backup"
    vm.stop()
    assert sorted(await client.call("getVolumesList", sdUUID=s.sd, imgUUID=img)) == \
        sorted([vol, layer])
    copied = await client.call("prepareImage", **dst, purpose="read")
    k = blocks_written(read_raw(copied["path"], tmp_path / "backup.raw"))
    assert 256 <= k <= at_end, (k, at_end)
    assert read_raw(path, tmp_path / "old.raw") == read_raw(copied["path"],
                                                            tmp_path / "backup2.raw")
    await client.call("teardownImage", **dst)
    top = str(Path(path).with_name(layer))
    assert blocks_written(read_raw(top, tmp_path / "chain.raw")) == writer.written


async def test_live_snapshot_carries_dirty_bitmaps(
        domains: list[Storage], client: Client, vm_factory: Callable[[list[str]], VM],
        tmp_path: Path) -> None:
    """The VM holds a disk's persistent dirty bitmaps while it runs (the copy
    on storage is stale, flagged in-use): the new layer gets each one in the
    switch's transaction, with what it recorded so far, and goes on
    recording; after the VM stops both layers hold it, consistent."""
    s = domains[0]
    img, vol, new = new_id(), new_id(), new_id()
    await create_volume(client, s.sd, img, vol, size=SIZE)
    ref = {"sdUUID": s.sd, "imgUUID": img, "volUUID": vol}
    qmp = str(tmp_path / "qmp.sock")
    path = (await client.call("prepareImage", **ref, purpose="vm",
                              writer={"qmpSocket": qmp, "nodeName": "file0"}))["path"]
    subprocess.run(["qemu-img", "bitmap", "--add", path, "since-backup"], check=True)
    vm = vm_factory([path])
    await until(lambda: os.path.exists(vm.nbd), "the VM's NBD server", timeout=20)
    writer = Writer(vm.url(0)).start()
    try:
        await until(lambda: writer.at_least(256), "writes before", timeout=60)
        info = await run_job(client, "snapshotImages", disks=[{**ref, "newVolUUID": new}])
        assert info["status"] == "done", info.get("error")
        at_switch = writer.written
        await until(lambda: writer.at_least(at_switch + 256), "writes after", timeout=60)
    finally:
        await writer.stop()
    vm.stop()
    top = str(Path(path).with_name(new))
    for p in (path, top):
        info = json.loads(subprocess.run(
            ["qemu-img", "info", "--output", "json", p], capture_output=True, text=True,
            check=True).stdout)
        bitmaps = info["format-specific"]["data"].get("bitmaps", [])
        assert [(b["name"], b["flags"]) for b in bitmaps] == [("since-backup", ["auto"])], \
            (p, bitmaps)
    # every block written since the bitmap was added, before the switch and
    # after, in the bitmap's granularity (64 KiB)
    dirty = nbd.coalesce(await nbd.dirty_extents(top, "since-backup"), gap=1)
    end = writer.written * BLOCK
    assert dirty == [(0, (end + 65535) // 65536 * 65536)], (dirty, writer.written)


def data_extents(image: str) -> list[tuple[int, int]]:
    """(start, end) of the data a qcow2 layer holds itself (not its backing)."""
    out = subprocess.run(["qemu-img", "map", "--output", "json", "-f", "qcow2", image],
                         capture_output=True, text=True, check=True).stdout
    return [(e["start"], e["start"] + e["length"]) for e in json.loads(out)
            if e["depth"] == 0 and e["data"]]


async def test_incremental_backup_of_a_disk_being_written(
        domains: list[Storage], client: Client, vm_factory: Callable[[list[str]], VM],
        make_fs_mount: Callable[..., FsMount], tmp_path: Path) -> None:
    """A full backupVolume, then two incremental ones, of a disk the VM
    writes all along: each incremental holds only the blocks written since
    the backup before (the bitmap the VM held, stored by the switch), and
    the backup chain reads exactly as the disk at the switch (its old
    layer, which the VM writes no more)."""
    s = domains[0]
    img, vol = new_id(), new_id()
    disk, path = await written_disk(client, s, img, vol, tmp_path)
    backup = await backup_domain(client, domains, make_fs_mount)
    bimg = new_id()
    backups: list[str] = []         # the backup volumes, full first
    layers = [vol]                  # the disk's volumes, base first
    ends: list[int] = []            # blocks written when each backup was done
    vm = vm_factory([path])
    await until(lambda: os.path.exists(vm.nbd), "the VM's NBD server", timeout=20)
    writer = Writer(vm.url(0)).start()
    try:
        for n in range(3):
            await until(lambda: writer.at_least((ends[-1] if ends else 0) + 256),
                        "writes before the backup", timeout=60)
            dst = {"sdUUID": backup.sd, "imgUUID": bimg, "volUUID": new_id()}
            inc = {"incrementalFrom": {**dst, "volUUID": backups[-1]}} if backups else {}
            info = await run_job(client, "backupVolume", src={**disk, "volUUID": layers[-1]},
                                 dst=dst, keepSnapshot=False, **inc)
            assert info["status"] == "done", (n, info.get("error"))
            ends.append(writer.written)
            assert info["result"]["incremental"] is (n > 0), info["result"]
            layers.append(info["result"]["snapshotVolUUID"])
            backups.append(dst["volUUID"])
    finally:
        await writer.stop()
    vm.stop()
    paths = [str(Path(path).with_name(v)) for v in layers]
    copied = (await client.call("prepareImage", sdUUID=backup.sd, imgUUID=bimg,
                                volUUID=backups[-1], purpose="read"))["path"]
    bpaths = [str(Path(copied).with_name(v)) for v in backups]
    at: list[int] = []                # blocks in the disk at each backup's switch
    for n, (bpath, layer) in enumerate(zip(bpaths, paths[:-1], strict=True)):
        # the backup chain up to backup n: the disk at its switch
        k = blocks_written(read_raw(bpath, tmp_path / f"b{n}.raw"))
        assert (at[-1] if at else 0) < k <= ends[n], (n, k, at, ends)
        at.append(k)
        subprocess.run(["qemu-img", "compare", "-q", "-f", "qcow2", "-F", "qcow2", bpath,
                        layer], check=True)
        if n:
            # only what changed: the blocks written since the backup before,
            # in the bitmap's granularity (64 KiB)
            lo, hi = at[-2] * BLOCK // 65536 * 65536, (k * BLOCK + 65535) // 65536 * 65536
            held = data_extents(bpath)
            assert held and all(lo <= a < b <= hi for a, b in held), (held, lo, hi)
    await client.call("teardownImage", sdUUID=backup.sd, imgUUID=bimg)
    assert blocks_written(read_raw(paths[-1], tmp_path / "chain.raw")) == writer.written


async def test_incremental_backup_refused_once_the_vm_dropped_the_bitmap(
        domains: list[Storage], client: Client, vm_factory: Callable[[list[str]], VM],
        make_fs_mount: Callable[..., FsMount], tmp_path: Path) -> None:
    """The VM manager removed the bitmap of the last backup from the running
    VM: the disk no longer records its changes since then, so an incremental
    backup from it is refused (1000, take a full one) and nothing is made."""
    s = domains[0]
    vol = new_id()
    disk, path = await written_disk(client, s, new_id(), vol, tmp_path)
    backup = await backup_domain(client, domains, make_fs_mount)
    full = {"sdUUID": backup.sd, "imgUUID": new_id(), "volUUID": new_id()}
    vm = vm_factory([path])
    await until(lambda: os.path.exists(vm.nbd), "the VM's NBD server", timeout=20)
    writer = Writer(vm.url(0)).start()
    try:
        await until(lambda: writer.at_least(256), "writes before", timeout=60)
        info = await run_job(client, "backupVolume", src=disk, dst=full, keepSnapshot=False)
        assert info["status"] == "done", info.get("error")
        layer = info["result"]["snapshotVolUUID"]
        async with QMPClient(vm.qmp_test) as mon:
            await mon.execute("block-dirty-bitmap-remove", {
                "node": layer_nodes(layer)[1], "name": bitmap_name(full["volUUID"])})
        info = await run_job(client, "backupVolume", src={**disk, "volUUID": layer},
                             dst={**full, "volUUID": new_id()}, keepSnapshot=False,
                             incrementalFrom=full)
        assert info["status"] == "failed", info
        assert info["error"]["code"] == 1000 and "full backup" in info["error"]["message"], \
            info["error"]
    finally:
        await writer.stop()
    vm.stop()
    assert sorted(await client.call("getVolumesList", **{k: disk[k] for k in (
        "sdUUID", "imgUUID")})) == sorted([vol, layer])
    assert await client.call("getVolumesList", sdUUID=backup.sd,
                             imgUUID=full["imgUUID"]) == [full["volUUID"]]
