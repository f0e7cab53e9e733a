"""Host-tier fixtures: loop devices, file systems, mounts and a tgtd target.

Every test in tests/integration is a root test (marked here if its module
forgot). Each fixture cleans up what it made even when the test or a later
setup step fails, and a guard fails the test if anything under its tmp_path
is still attached, mounted or held open by a process afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import missing, require_tools
from tests.integration.storagefixtures import (
    DEFAULT_LOOP_SIZE,
    FsMount,
    IscsiLun,
    LoopDevices,
    Mounts,
    Tgtd,
    cmd,
    find_leftovers,
    force_cleanup,
    make_fs,
    qemu_img_has_iscsi,
)

HERE = Path(__file__).resolve().parent

# (fstype, logical sector size) pairs that file-based storage runs on.
FS_KINDS = [("ext4", 512), ("ext4", 4096), ("xfs", 512), ("xfs", 4096)]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in item.path.resolve().parents and item.get_closest_marker("root") is None:
            item.add_marker(pytest.mark.root)


@pytest.fixture(autouse=True)
def _no_leftovers(tmp_path: Path) -> Iterator[None]:
    """After every other fixture's teardown: nothing of this test may remain."""
    yield
    leftovers = find_leftovers(tmp_path)
    if leftovers:
        force_cleanup(leftovers)
        pytest.fail(f"left behind under {tmp_path}: {leftovers}", pytrace=False)


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """Factory: `loop_device(size=512 MiB, sector_size=512|4096)` -> /dev/loopN.

    Backed by a sparse file in tmp_path; detached (and the file removed) at
    teardown.
    """
    require_tools("losetup", "blockdev")
    loops = LoopDevices(tmp_path)
    try:
        yield loops.make
    finally:
        loops.cleanup()


@pytest.fixture
def mount(tmp_path: Path, loop_device: Callable[..., Path]) -> Iterator[Callable[..., Path]]:
    """Factory: `mount(device, fstype=None, options=())` -> new mount point in tmp_path.

    Unmounted at teardown (retried while busy, then lazily), before
    loop_device detaches its devices.
    """
    require_tools("mount", "umount")
    mounts = Mounts(tmp_path)
    try:
        yield mounts.mount
    finally:
        mounts.cleanup()


@pytest.fixture
def make_fs_mount(loop_device: Callable[..., Path],
                  mount: Callable[..., Path]) -> Callable[..., FsMount]:
    """Factory: `make_fs_mount(fstype, sector_size=512, size=512 MiB)` -> FsMount:
    a new loop device with that sector size, a new file system, mounted."""

    def make(fstype: str, sector_size: int = 512, size: int = DEFAULT_LOOP_SIZE) -> FsMount:
        require_tools(f"mkfs.{fstype}")
        device = loop_device(size=size, sector_size=sector_size)
        make_fs(device, fstype)
        path = mount(device, fstype)
        return FsMount(path=path, device=device, fstype=fstype, sector_size=sector_size)

    return make


@pytest.fixture(params=FS_KINDS, ids=[f"{fs}-{ss}" for fs, ss in FS_KINDS])
def fs_mount(request: pytest.FixtureRequest,
             make_fs_mount: Callable[..., FsMount]) -> FsMount:
    """A mounted file system: the test runs once for each of FS_KINDS."""
    fstype, sector_size = request.param
    return make_fs_mount(fstype, sector_size)


@pytest.fixture
def tgtd(tmp_path: Path, loop_device: Callable[..., Path]) -> Iterator[Tgtd]:
    """A running tgtd on 127.0.0.1 and a free port (never 3260). Add LUNs with
    `tgtd.add_lun(backing=None, size=64 MiB, iqn=None, block_size=512)`.
    Stopped at teardown, before loop_device detaches a device it may serve."""
    require_tools("tgtd", "tgtadm")
    daemon = Tgtd(tmp_path)
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture
def iscsi_lun(tgtd: Tgtd) -> IscsiLun:
    """A 64 MiB LUN on a sparse file, seen through the userspace initiator."""
    require_tools("iscsi-ls")
    lun = tgtd.add_lun()
    listing = cmd("iscsi-ls", "--show-luns", f"iscsi://{lun.portal}", timeout=30).stdout
    assert f"Target:{lun.iqn} Portal:{lun.portal}" in listing, listing
    assert f"Lun:{lun.lun} " in listing, listing
    return lun


@pytest.fixture
def qemu_iscsi() -> None:
    """qemu-img can open iscsi:// URLs."""
    require_tools("qemu-img")
    if not qemu_img_has_iscsi():
        missing("qemu-img has no iSCSI driver (Debian package qemu-block-extra)")
