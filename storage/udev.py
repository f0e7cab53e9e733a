"""SCSI disks as udev and sysfs see them (pyudev), and the sysfs knobs that add
and remove them: scan a SCSI host, delete a disk, wait for disks to appear
(udev done with them) or to go.

pyudev and sysfs calls block, though briefly (kernel memory, the udev
database): async callers go through the `async def` helpers, which run them
in a thread under a deadline. A sysfs scan or delete write can take as long
as the SCSI commands behind it; the deadline bounds the caller's wait (the
kernel finishes the write on its own).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import threading
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

import pyudev

from storage.errors import InvalidParameter, ResourceTimeout

log = logging.getLogger("storage.udev")

SYSFS = Path("/sys")
_HOST = re.compile(r"host\d+")
_DISK = re.compile(r"[a-z]+[a-z0-9]*")
_SESSION = re.compile(r"/session(\d+)/")


@dataclass(frozen=True)
class ScsiDisk:
    name: str                 # sdX
    devnode: str              # /dev/sdX ('' until udev made it)
    wwid: str                 # what multipath uses: udev's ID_SERIAL (scsi_id)
    vendor: str
    model: str
    serial: str
    size: int                 # bytes
    hctl: str                 # H:C:T:L
    transport: str            # iSCSI, FCP or SCSI
    session: int | None       # iSCSI session id
    initialized: bool         # udev has processed it
    logical_block_size: int = 512
    physical_block_size: int = 512

    @property
    def lun(self) -> int | None:
        return lun_of(self.hctl)

    @property
    def ready(self) -> bool:
        """udev is done with it: the node exists and its WWID is known."""
        return self.initialized and bool(self.devnode) and bool(self.wwid)


def lun_of(hctl: str) -> int | None:
    """The LUN number of a SCSI address H:C:T:L, or None if it is not one."""
    try:
        return int(hctl.rsplit(":", 1)[1])
    except (IndexError, ValueError):
        return None


def wwid_from_sysfs(text: str) -> str:
    """/sys/block/sdX/device/wwid ('naa.6001...', 't10.ATA...', 'eui.00...')
    -> the scsi_id style WWID multipath uses ('36001...'), or ''."""
    text = text.strip()
    prefix, _, value = text.partition(".")
    code = {"naa": "3", "eui": "2", "t10": "1"}.get(prefix)
    if code is None or not value:
        return ""
    return code + value.replace(" ", "_") if code == "1" else code + value.lower()


def transport_of(sys_path: str) -> str:
    if _SESSION.search(sys_path + "/"):
        return "iSCSI"
    if "/rport-" in sys_path:
        return "FCP"
    return "SCSI"


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _int(text: str, default: int = 0) -> int:
    try:
        return int(text)
    except ValueError:
        return default


def disk_from(name: str, sys_path: str, devnode: str, props: Mapping[str, str], hctl: str,
              initialized: bool) -> ScsiDisk:
    """A ScsiDisk from a block device's udev properties and sysfs directory."""
    syspath = Path(sys_path)
    wwid = props.get("ID_SERIAL", "") or wwid_from_sysfs(_read(syspath / "device" / "wwid"))
    m = _SESSION.search(sys_path + "/")
    return ScsiDisk(
        name=name, devnode=devnode if devnode and os.path.exists(devnode) else "",
        wwid=wwid,
        vendor=props.get("ID_VENDOR") or props.get("SCSI_VENDOR")
        or _read(syspath / "device" / "vendor"),
        model=props.get("ID_MODEL") or props.get("SCSI_MODEL")
        or _read(syspath / "device" / "model"),
        serial=props.get("ID_SCSI_SERIAL") or props.get("SCSI_IDENT_SERIAL", ""),
        size=_int(_read(syspath / "size")) * 512,
        hctl=hctl, transport=transport_of(sys_path),
        session=int(m.group(1)) if m else None, initialized=initialized,
        logical_block_size=_int(_read(syspath / "queue" / "logical_block_size"), 512),
        physical_block_size=_int(_read(syspath / "queue" / "physical_block_size"), 512))


def _disk_of(dev: pyudev.Device) -> ScsiDisk | None:
    scsi = dev.find_parent("scsi", "scsi_device")
    if scsi is None:
        return None
    return disk_from(dev.sys_name, dev.sys_path, dev.device_node or "", dict(dev.properties),
                     scsi.sys_name, bool(dev.is_initialized))


def list_scsi_disks() -> list[ScsiDisk]:
    """Every SCSI disk (not partitions), blocking; see `scsi_disks()`."""
    ctx = pyudev.Context()
    disks = []
    for dev in ctx.list_devices(subsystem="block", DEVTYPE="disk"):
        disk = _disk_of(dev)
        if disk is not None:
            disks.append(disk)
    return sorted(disks, key=lambda d: d.name)


def get_disk(name: str, ctx: pyudev.Context | None = None) -> ScsiDisk | None:
    if ctx is None:
        ctx = pyudev.Context()
    try:
        dev = pyudev.Devices.from_name(ctx, "block", name)
    except pyudev.DeviceNotFoundError:
        return None
    return _disk_of(dev)


async def scsi_disks(*, timeout: float = 10.0) -> list[ScsiDisk]:
    return await asyncio.wait_for(asyncio.to_thread(list_scsi_disks), timeout)


async def wait_disks(names: Collection[str], *, timeout: float,
                     interval: float = 0.2) -> dict[str, ScsiDisk]:
    """Wait until udev has processed every disk in `names` (node made, WWID
    known); returns them by name. Raises ResourceTimeout (851)."""
    deadline = time.monotonic() + timeout
    want = set(names)

    def probe() -> dict[str, ScsiDisk]:
        ctx = pyudev.Context()
        found = {}
        for name in want:
            disk = get_disk(name, ctx)
            if disk is not None and disk.ready:
                found[name] = disk
        return found

    while True:
        left = max(0.1, deadline - time.monotonic())
        try:
            found = await asyncio.wait_for(asyncio.to_thread(probe), left)
        except TimeoutError:
            found = {}
        if len(found) == len(want):
            return found
        if time.monotonic() >= deadline:
            raise ResourceTimeout(reason=f"disks {', '.join(sorted(want - set(found)))} not "
                                         f"ready (udev) within {timeout:g} s")
        await asyncio.sleep(interval)


async def wait_gone(names: Collection[str], *, timeout: float, interval: float = 0.1,
                    sysfs: Path = SYSFS) -> list[str]:
    """Wait until none of the block devices `names` exists; returns those
    still there at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        left = [n for n in names if (sysfs / "block" / n).exists()]
        if not left or time.monotonic() >= deadline:
            return left
        await asyncio.sleep(interval)


def _write(path: Path, data: str) -> None:
    with open(path, "w") as f:
        f.write(data)


async def _write_in_own_thread(path: Path, data: str, timeout: float) -> None:
    """A sysfs write in a thread of its own: a scan or delete blocks for as
    long as the SCSI commands behind it take (seconds when many sessions log
    in at once), and must not hold a thread of the shared executor that every
    sysfs read and udev query goes through. On timeout the caller stops
    waiting; the kernel finishes the write and the thread ends on its own."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def settle(error: BaseException | None) -> None:
        if done.done():
            return
        if error is None:
            done.set_result(None)
        else:
            done.set_exception(error)

    def work() -> None:
        error: BaseException | None = None
        try:
            _write(path, data)
        except BaseException as e:
            error = e
        try:
            loop.call_soon_threadsafe(settle, error)
        except RuntimeError:
            pass   # the loop is gone: nobody waits any more

    threading.Thread(target=work, name=f"sysfs {path.parent.name}", daemon=True).start()
    await asyncio.wait_for(done, timeout)


async def scan_host(host: str, *, timeout: float, sysfs: Path = SYSFS) -> None:
    """Scan every channel, target and LUN of a SCSI host ("- - -" to its scan
    file); the write returns when the kernel's scan is done."""
    if not _HOST.fullmatch(host):
        raise InvalidParameter(field="host", reason=f"{host!r} is not a SCSI host name")
    path = sysfs / "class" / "scsi_host" / host / "scan"
    try:
        await _write_in_own_thread(path, "- - -", timeout)
    except TimeoutError:
        raise ResourceTimeout(reason=f"scan of SCSI {host} did not finish within "
                                     f"{timeout:g} s") from None


_DISK = re.compile(r"sd[a-z]+")


async def rescan_disk(name: str, *, timeout: float, sysfs: Path = SYSFS) -> None:
    """Make the kernel read a SCSI disk's capacity again ("1" to its
    device/rescan): a LUN the array grew shows its new size. The write
    returns when the disk answered."""
    if not _DISK.fullmatch(name):
        raise InvalidParameter(field="disk", reason=f"{name!r} is not a SCSI disk name")
    try:
        await _write_in_own_thread(sysfs / "block" / name / "device" / "rescan", "1", timeout)
    except TimeoutError:
        raise ResourceTimeout(reason=f"rescan of SCSI disk {name} did not finish within "
                                     f"{timeout:g} s") from None


def scsi_hosts(sysfs: Path = SYSFS, kind: str = "scsi_host") -> list[str]:
    """Names of SCSI hosts (kind 'scsi_host'), or of FC hosts ('fc_host')."""
    try:
        return sorted(p.name for p in (sysfs / "class" / kind).iterdir()
                      if _HOST.fullmatch(p.name))
    except OSError:
        return []


async def delete_disk(name: str, *, timeout: float, sysfs: Path = SYSFS) -> None:
    """Remove a SCSI disk from the kernel (after its I/O is flushed); gone
    already is fine."""
    if not _DISK.fullmatch(name):
        raise InvalidParameter(field="disk", reason=f"{name!r} is not a disk name")
    path = sysfs / "block" / name / "device" / "delete"
    try:
        await _write_in_own_thread(path, "1", timeout)
    except FileNotFoundError:
        return
    except TimeoutError:
        raise ResourceTimeout(reason=f"removal of /dev/{name} did not finish within "
                                     f"{timeout:g} s") from None


def dm_node(name: str, sysfs: Path = SYSFS) -> str | None:
    """/dev/dm-N of the device-mapper device `name` (None: not there), from
    sysfs: the kernel (devtmpfs) makes that node with the device, udev its
    /dev/mapper and /dev/VG/LV links later (an LV activated with
    --noudevsync: issue 21). Blocking, briefly (sysfs)."""
    for name_file in sysfs.glob("block/dm-*/dm/name"):
        try:
            if name_file.read_text().strip() == name:
                return f"/dev/{name_file.parent.parent.name}"
        except OSError:
            continue   # removed meanwhile
    return None


def holders(name: str, sysfs: Path = SYSFS) -> list[str]:
    """Block devices stacked on `name` (LVs on a multipath map, ...)."""
    try:
        return sorted(p.name for p in (sysfs / "block" / name / "holders").iterdir())
    except OSError:
        return []


def partitions(name: str, sysfs: Path = SYSFS) -> list[str]:
    base = sysfs / "block" / name
    try:
        return sorted(p.name for p in base.iterdir() if (p / "partition").exists())
    except OSError:
        return []


def size_bytes(name: str, sysfs: Path = SYSFS) -> int:
    return _int(_read(sysfs / "block" / name / "size")) * 512
