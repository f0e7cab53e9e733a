"""Host tier smoke tests: the fixtures work, the tools behave as the agent
expects on 512 and 4096 byte sectors and over iSCSI, and nothing is left behind."""

from __future__ import annotations

import json
import re
import socket
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from storage.commands import run_with_progress
from tests.conftest import require_tools
from tests.integration.storagefixtures import (
    CommandFailed,
    FsMount,
    IscsiLun,
    LoopDevices,
    MiB,
    Mounts,
    Tgtd,
    attached_loops,
    cmd,
    find_leftovers,
    is_mounted,
    make_fs,
)

pytestmark = pytest.mark.root

ROOT = Path(__file__).resolve().parents[2]


def make_source(path: Path) -> None:
    """A 64 MiB qcow2 with three runs of data written by qemu-io."""
    cmd("qemu-img", "create", "-f", "qcow2", path, "64M")
    cmd("qemu-io", "-f", "qcow2",
        "-c", "write -P 0xab 0 1M",
        "-c", "write -P 0xcd 10M 3M",
        "-c", "write -P 0xef 63M 512k",
        path)


async def convert(argv: list[str]) -> list[float]:
    """qemu-img convert through the agent's runner, returning the progress it saw."""
    seen: list[float] = []
    await run_with_progress(["qemu-img", "convert", "-p", *argv], timeout=120,
                            progress=seen.append)
    return seen


async def test_qemu_img_direct_io(fs_mount: FsMount, tmp_path: Path) -> None:
    require_tools("qemu-img", "qemu-io")
    ss = str(fs_mount.sector_size)
    assert cmd("blockdev", "--getss", fs_mount.device).stdout.strip() == ss
    if fs_mount.fstype == "xfs":
        require_tools("xfs_info")
        info = cmd("xfs_info", fs_mount.path).stdout
        assert re.search(rf"^\s*=\s+sectsz={ss}\s", info, re.M), info

    src = tmp_path / "src.qcow2"
    make_source(src)
    dst = fs_mount.path / "dst.qcow2"
    cmd("qemu-img", "create", "-f", "qcow2", dst, "64M")

    # -t none -T none: O_DIRECT both ways, so requests must be aligned to
    # the device's logical sector size.
    seen = await convert(["-n", "-t", "none", "-T", "none", "-f", "qcow2", "-O", "qcow2",
                          str(src), str(dst)])
    assert seen and seen[-1] == 100.0
    assert seen == sorted(seen)

    compare = cmd("qemu-img", "compare", "-T", "none", "-f", "qcow2", "-F", "qcow2",
                  src, dst)
    assert "Images are identical" in compare.stdout
    read = cmd("qemu-io", "-f", "qcow2", "-t", "none", "-c", "read -P 0xcd 10M 3M", dst)
    assert "read 3145728/3145728 bytes" in read.stdout
    check = json.loads(cmd("qemu-img", "check", "--output", "json", dst).stdout)
    assert check.get("corruptions", 0) == 0
    assert check.get("leaks", 0) == 0

    # A raw copy on the 4k file system, read back with O_DIRECT.
    raw = fs_mount.path / "copy.raw"
    await convert(["-t", "none", "-T", "none", "-f", "qcow2", "-O", "raw", str(dst), str(raw)])
    assert raw.stat().st_size == 64 * MiB
    cmd("qemu-img", "compare", "-T", "none", "-f", "qcow2", "-F", "raw", src, raw)


async def test_iscsi_lun(iscsi_lun: IscsiLun, qemu_iscsi: None, tmp_path: Path) -> None:
    require_tools("qemu-img", "qemu-io")
    info = json.loads(cmd("qemu-img", "info", "--output", "json", iscsi_lun.url).stdout)
    assert info["virtual-size"] == iscsi_lun.size

    src = tmp_path / "src.qcow2"
    make_source(src)
    seen = await convert(["-n", "-f", "qcow2", "-O", "raw", str(src), iscsi_lun.url])
    assert seen[-1] == 100.0

    compare = cmd("qemu-img", "compare", "-f", "qcow2", "-F", "raw", src, iscsi_lun.url)
    assert "Images are identical" in compare.stdout
    # The data went through tgtd into its backing file.
    cmd("qemu-img", "compare", "-f", "qcow2", "-F", "raw", src, iscsi_lun.backing)


def test_iscsi_lun_on_loop_device(tgtd: Tgtd, loop_device: Callable[..., Path]) -> None:
    require_tools("iscsi-readcapacity16")
    device = loop_device(size=32 * MiB, sector_size=4096)
    lun = tgtd.add_lun(backing=device, block_size=4096)
    assert lun.size == 32 * MiB
    capacity = cmd("iscsi-readcapacity16", lun.url, timeout=30).stdout
    assert "LOGICAL BLOCK LENGTH IN BYTES:4096" in capacity, capacity
    assert "Total size:33554432" in capacity, capacity


def test_two_targets_do_not_clash(tmp_path: Path) -> None:
    # Two tgtd at once (as with a parallel run or the lab guest): distinct
    # ports and control sockets, neither on 3260.
    require_tools("tgtd", "tgtadm", "iscsi-ls")
    first, second = Tgtd(tmp_path), Tgtd(tmp_path)
    try:
        first.start()
        second.start()
        assert first.port != second.port
        assert 3260 not in (first.port, second.port)
        lun1, lun2 = first.add_lun(), second.add_lun()
        listing = cmd("iscsi-ls", f"iscsi://{lun2.portal}").stdout
        assert lun2.iqn in listing and lun1.iqn not in listing
    finally:
        first.stop()
        second.stop()
    assert not port_open(first.port) and not port_open(second.port)


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_cleanup_leaves_nothing(tmp_path: Path) -> None:
    require_tools("losetup", "mkfs.xfs", "tgtd", "tgtadm")
    loops, mounts, daemon = LoopDevices(tmp_path), Mounts(tmp_path), Tgtd(tmp_path)
    try:
        device = loops.make(sector_size=4096)
        make_fs(device, "xfs")
        path = mounts.mount(device, "xfs")
        (path / "file").write_text("data")
        daemon.start()
        daemon.add_lun()
        # Busy for a moment: the unmount must retry, not give up or go lazy.
        cmd("sh", "-c", "cd \"$1\" && sleep 0.5 </dev/null >/dev/null 2>&1 &", "sh", path)
        assert find_leftovers(tmp_path)
    finally:
        daemon.stop()
        mounts.cleanup()
        loops.cleanup()
    assert not find_leftovers(tmp_path)
    assert not path.exists()
    assert device not in attached_loops() or not attached_loops()[device].startswith(
        str(tmp_path))
    assert list(tmp_path.iterdir()) == [tmp_path / f"tgtd-{daemon.port}.log"]


def test_cleanup_after_failed_step(tmp_path: Path) -> None:
    require_tools("losetup", "mount")
    loops, mounts = LoopDevices(tmp_path), Mounts(tmp_path)
    try:
        device = loops.make()
        with pytest.raises(CommandFailed, match="mount"):
            mounts.mount(device, "xfs")  # no file system on it
    finally:
        mounts.cleanup()
        loops.cleanup()
    assert not find_leftovers(tmp_path)
    assert list(tmp_path.iterdir()) == []


INNER_CONFTEST = """\
import pytest

from tests.integration.conftest import *  # noqa: F403
from tests.integration.conftest import _no_leftovers  # noqa: F401


@pytest.fixture
def broken_fs(make_fs_mount):
    # mkfs.xfs refuses 16 MiB: setup fails after the loop device exists.
    return make_fs_mount("xfs", 4096, size=16 * 1024 * 1024)
"""

INNER_TESTS = """\
import json
import os


def record(**fields):
    with open(os.environ["SMOKE_RECORD"], "a") as f:
        f.write(json.dumps(fields) + "\\n")


def test_fails_with_everything_set_up(make_fs_mount, iscsi_lun):
    fs = make_fs_mount("xfs", 4096)
    record(device=str(fs.device), mount=str(fs.path), port=iscsi_lun.port)
    open(fs.path / "file", "w").close()
    assert False, "deliberate failure"


def test_fails_in_setup(broken_fs):
    pass


def test_fails_in_a_step(loop_device, mount):
    device = loop_device()
    record(device=str(device))
    mount(device, "xfs")  # no file system: mount fails


def test_leaks_a_loop_device(tmp_path):
    # Made by hand and never detached: the guard must catch and detach it.
    from tests.integration.storagefixtures import LoopDevices

    record(device=str(LoopDevices(tmp_path).make()))
"""


@pytest.mark.slow
def test_cleanup_when_tests_fail(tmp_path: Path) -> None:
    """Run failing tests in a pytest of their own; nothing of theirs may remain."""
    require_tools("losetup", "mkfs.xfs", "tgtd", "tgtadm", "iscsi-ls")
    inner = tmp_path / "inner"
    inner.mkdir()
    (inner / "pytest.ini").write_text("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    (inner / "conftest.py").write_text(INNER_CONFTEST)
    (inner / "test_inner.py").write_text(textwrap.dedent(INNER_TESTS))
    record = tmp_path / "record.jsonl"
    env = {"SMOKE_RECORD": str(record), "PYTHONPATH": str(ROOT)}
    result = cmd(sys.executable, "-m", "pytest", "-c", inner / "pytest.ini",
                 "--rootdir", inner, "--basetemp", tmp_path / "base", "-p", "no:cacheprovider",
                 "-q", "-rN", inner, check=False, env=env, timeout=110)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    # Two failed tests, one setup error and the guard's teardown error for the
    # leak; no teardown error from a fixture.
    assert re.search(r"^2 failed, 1 passed, 2 errors in ", output, re.M), output
    assert "deliberate failure" in output
    assert output.count("left behind under") == 1, output
    assert re.search(r"left behind under \S*test_leaks_a_loop_device0", output), output

    records = [json.loads(line) for line in record.read_text().splitlines()]
    assert len(records) == 3
    loops = attached_loops()
    for rec in records:
        assert loops.get(Path(rec["device"]), "").startswith(str(tmp_path)) is False
    assert not is_mounted(Path(records[0]["mount"]))
    assert not port_open(records[0]["port"])
    assert not find_leftovers(tmp_path)
