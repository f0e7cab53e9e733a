"""The agent's watch of a VM's writer (prepareImage's `writer`) against a real
qemu-storage-daemon on this host: it connects once the QMP socket appears,
arms the write threshold on the protocol node, extends on each
BLOCK_WRITE_THRESHOLD by a chunk and re-arms, connects again after the
writer restarts, asks again while the VG is full; and
storage/qmp.py's errors. The volume is a qcow2 file and `extend` a fake LV
(sizes only): the LVM side is the lab's (tests/lab/test_thin_lab.py)."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from storage.domains.writers import Link, WriterWatch
from storage.errors import NoSpaceLeftOnDomain
from storage.qmp import QMPClient, QMPError
from storage.thin import ThinPolicy
from tests.conftest import require_tools

MiB = 1 << 20
CHUNK = 16 * MiB
THIN = ThinPolicy(chunk_size=CHUNK, watermark_percent=50)    # margin 8 MiB


class Qsd:
    def __init__(self, image: Path, work: Path) -> None:
        self.image = image
        self.qmp = str(work / "qmp.sock")
        self.nbd = str(work / "nbd.sock")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([
            "qemu-storage-daemon",
            "--blockdev", f"driver=file,node-name=file0,filename={self.image}",
            "--blockdev", "driver=qcow2,node-name=fmt0,file=file0",
            "--nbd-server", f"addr.type=unix,addr.path={self.nbd}",
            "--export", "type=nbd,id=e0,node-name=fmt0,name=e0,writable=on",
            "--chardev", f"socket,id=m0,path={self.qmp},server=on,wait=off",
            "--monitor", "chardev=m0"], stdin=subprocess.DEVNULL)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    async def write(self, offset: int, length: int) -> None:
        p = await asyncio.create_subprocess_exec(
            "qemu-io", "-f", "raw", "-c", f"write -P 0x33 {offset} {length}",
            f"nbd+unix:///e0?socket={self.nbd}", stdout=asyncio.subprocess.DEVNULL)
        assert await asyncio.wait_for(p.wait(), 60) == 0


@pytest.fixture
def qsd(tmp_path: Path) -> Iterator[Qsd]:
    require_tools("qemu-storage-daemon", "qemu-img", "qemu-io")
    image = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "1G"], check=True)
    d = Qsd(image, tmp_path)
    try:
        yield d
    finally:
        d.stop()


class FakeLV:
    """extend() of a volume: whole MiB, full after `limit` (the VG full)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.asked: list[int] = []
        self.full = False
        self.grown = asyncio.Event()

    async def current(self) -> int:
        return self.size

    async def extend(self, min_size: int, *, report: bool = True) -> int:
        self.asked.append(min_size)
        if self.full:
            raise NoSpaceLeftOnDomain(sdUUID="sd")
        if min_size > self.size:
            self.size = (min_size + MiB - 1) // MiB * MiB
            self.grown.set()
        return self.size

    async def wait_size(self, at_least: int, timeout: float = 20) -> None:
        async def grown() -> None:
            while self.size < at_least:
                self.grown.clear()
                await self.grown.wait()
        await asyncio.wait_for(grown(), timeout)


async def test_watch_extends_ahead_of_a_restarting_writer(qsd: Qsd) -> None:
    lv = FakeLV(CHUNK)
    watch = WriterWatch("sd/img/vol", qsd.qmp, "file0", THIN, current=lv.current,
                        extend=lv.extend, retry_interval=0.1).start()
    try:
        qsd.start()       # after prepareImage, as a VM starts after its disks
        await asyncio.wait_for(watch.connected.wait(), 20)
        # below the threshold (16 - 8 MiB): nothing asked
        await qsd.write(0, 4 * MiB)
        # past it: one chunk more, the margin beyond the write
        await qsd.write(4 * MiB, 6 * MiB)
        await lv.wait_size(2 * CHUNK)
        assert lv.asked == [2 * CHUNK], lv.asked
        # re-armed at 32 - 8 MiB: a write to 30 MiB asks again
        await qsd.write(10 * MiB, 20 * MiB)
        await lv.wait_size(3 * CHUNK)
        assert lv.asked == [2 * CHUNK, 3 * CHUNK], lv.asked

        # the writer restarts and writes while the agent is not connected
        qsd.stop()
        await asyncio.wait_for(_cleared(watch.connected), 20)
        qsd.start()
        await asyncio.wait_for(watch.connected.wait(), 20)
        await qsd.write(30 * MiB, 12 * MiB)    # to 42 MiB: past 48 - 8
        await lv.wait_size(4 * CHUNK)
        assert lv.asked[-1] == 4 * CHUNK, lv.asked

        # the VG full: asked again until space comes back
        lv.full = True
        await qsd.write(42 * MiB, 2 * MiB)     # 44 MiB > 56
        await qsd.write(44 * MiB, 14 * MiB)    # to 58 MiB: past 64 - 8
        await asyncio.wait_for(_asked(lv, 5 * CHUNK, 3), 20)
        lv.full = False
        await lv.wait_size(5 * CHUNK)
    finally:
        await watch.stop()


async def _cleared(event: asyncio.Event) -> None:
    while event.is_set():
        await asyncio.sleep(0.05)


async def _asked(lv: FakeLV, size: int, times: int) -> None:
    while len([a for a in lv.asked if a == size]) < times:
        await asyncio.sleep(0.05)


async def test_qmp_errors(qsd: Qsd) -> None:
    qsd.start()
    started = asyncio.get_running_loop().time()
    while True:
        try:
            client = await QMPClient(qsd.qmp).connect()
            break
        except (FileNotFoundError, ConnectionRefusedError):
            assert asyncio.get_running_loop().time() - started < 20
            await asyncio.sleep(0.05)
    try:
        with pytest.raises(QMPError) as e:
            await client.execute("nosuch-command")
        assert e.value.error_class == "CommandNotFound"
        with pytest.raises(QMPError) as e:
            await client.execute("block-set-write-threshold",
                                 {"node-name": "nosuch", "write-threshold": 1})
        assert e.value.error_class == "GenericError"
        qsd.stop()
        with pytest.raises(QMPError):     # (after its SHUTDOWN event)
            await client.next_event("BLOCK_WRITE_THRESHOLD", timeout=10)
        with pytest.raises(QMPError):
            await client.execute("query-status")
    finally:
        await client.close()


async def test_disks_of_one_writer_share_its_monitor(tmp_path: Path) -> None:
    """Two disks of one VM, one monitor (it serves one client at a time):
    both watches run on one connection and each disk is extended on its
    own threshold only."""
    require_tools("qemu-storage-daemon", "qemu-img", "qemu-io")
    argv = ["qemu-storage-daemon", "--nbd-server",
            f"addr.type=unix,addr.path={tmp_path / 'nbd.sock'}"]
    for i in range(2):
        image = tmp_path / f"disk{i}.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "1G"],
                       check=True)
        argv += ["--blockdev", f"driver=file,node-name=file{i},filename={image}",
                 "--blockdev", f"driver=qcow2,node-name=fmt{i},file=file{i}",
                 "--export", f"type=nbd,id=e{i},node-name=fmt{i},name=e{i},writable=on"]
    qmp = str(tmp_path / "qmp.sock")
    argv += ["--chardev", f"socket,id=m0,path={qmp},server=on,wait=off",
             "--monitor", "chardev=m0"]
    lvs = [FakeLV(CHUNK), FakeLV(CHUNK)]
    link = Link(qmp, retry_interval=0.1)
    watches = [WriterWatch(f"sd/img/vol{i}", qmp, f"file{i}", THIN, current=lv.current,
                           extend=lv.extend, retry_interval=0.1, link=link).start()
               for i, lv in enumerate(lvs)]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
    try:
        for w in watches:
            await asyncio.wait_for(w.connected.wait(), 20)
        for i, lv in enumerate(lvs):
            p = await asyncio.create_subprocess_exec(
                "qemu-io", "-f", "raw", "-c", f"write -P 0x33 0 {10 * MiB}",
                f"nbd+unix:///e{i}?socket={tmp_path / 'nbd.sock'}",
                stdout=asyncio.subprocess.DEVNULL)
            assert await asyncio.wait_for(p.wait(), 60) == 0
            await lv.wait_size(2 * CHUNK)
            # the other disk's event did not extend this one
            assert lv.asked == [2 * CHUNK], (i, lv.asked)
        assert lvs[1].asked == [2 * CHUNK], lvs[1].asked
    finally:
        for w in watches:
            await w.stop()
        assert link.idle and link.qmp is None
        proc.terminate()
        proc.wait(10)
