"""What a block domain does with its LUNs besides holding volumes: add LUNs
to its VG, grow a PV after its LUN grew, follow LUNs another host added, and
zero (wipe) a volume's extents before its LV goes. `LUNs` is a mixin of
BlockDomain; the functions are its pure parts, tested on their own."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from storage import commands, devices, lvm, multipath
from storage.errors import (
    CouldNotResizePhysicalVolume,
    HostAgentError,
    InvalidParameter,
    LVMCommandError,
    PhysDevInitializationError,
    VolumeGroupBlockSizeError,
    VolumeGroupExtendError,
)
from storage.metadata import DomainMetadata, VolumeMetadata

if TYPE_CHECKING:
    from typing import Protocol

    from storage.domains.leaseapi import Leases
    from storage.fileio import IOPool

    class TaggedLV(Protocol):
        @property
        def image(self) -> str: ...
        @property
        def wipe(self) -> bool: ...

log = logging.getLogger("storage.domains.block")

MiB = 1 << 20
WIPE = "WIPE"
# LVM's metadata area on each PV. LVM rewrites the whole VG text (about 450
# bytes per volume LV with our tags) on every change and needs room for the
# new copy beside the old one: pvcreate's default (1 MiB) stops a domain at
# about 1,200 volumes (lvcreate: "VG ... metadata on ... exceeds maximum
# metadata size"). 32 MiB holds the text of a full metadata LV's worth of
# volumes (one per 8 KiB slot) with room for multi-segment LVs.
DEFAULT_MDA_SIZE = 32 * MiB
# LUN guids -> their devices on this host (606 for one it lacks)
LunPaths = Callable[[list[str]], Awaitable[list[str]]]
# Wiping: the slowest a LUN may zero before the wipe counts as hung (the
# runner's deadline): 1 MiB/s, after a minute's allowance.
_WIPE_MIN_RATE = MiB
_WIPE_GRACE = 60.0


def lun_id(path: str, sysfs: str = "/sys") -> str:
    """The WWID of a multipath map (its dm uuid is "mpath-<wwid>"), the same
    on every host whatever the map is called there; else the device's name."""
    name = os.path.basename(os.path.realpath(path))
    try:
        with open(f"{sysfs}/block/{name}/dm/uuid") as f:
            uuid = f.read().strip()
    except OSError:
        uuid = ""
    return uuid[len("mpath-"):] if uuid.startswith("mpath-") else os.path.basename(path)


def pv_list(pvs: Iterable[lvm.PV], ids: Mapping[str, str]) -> str:
    """The PVS value of the domain metadata: "<LUN id>:<pv uuid>" of each PV
    (`ids`: device path -> WWID), sorted."""
    return ",".join(sorted(f"{ids.get(pv.name, os.path.basename(pv.name))}:{pv.uuid}"
                           for pv in pvs))


def pvs_ids(value: str) -> list[str]:
    """The LUN ids of a PVS value."""
    return [entry.rpartition(":")[0] for entry in value.split(",") if entry]


def new_devices(vg: str, wanted: Sequence[str], pvs: Iterable[lvm.PV]
                ) -> tuple[list[str], list[str]]:
    """(devices to add to `vg`, of them those that are PVs of no VG already)
    of `wanted`, given the PVs LVM sees on them and on `vg`: a device that
    is a PV of `vg` is there already (idempotent); one of another VG is
    refused (601)."""
    by_name = {pv.name: pv for pv in pvs}
    add, orphans = [], []
    for d in dict.fromkeys(wanted):
        pv = by_name.get(d)
        if pv is not None and pv.vg_name == vg:
            continue
        if pv is not None and pv.vg_name:
            raise PhysDevInitializationError(devices=d,
                                             reason=f"it is a PV of volume group {pv.vg_name}")
        add.append(d)
        if pv is not None:
            orphans.append(d)
    return add, orphans


def wipe_timeout(size: int) -> float:
    return _WIPE_GRACE + size / _WIPE_MIN_RATE


def discards(dm_name: str, sysfs: str = "/sys") -> bool:
    """The device passes discards down (a thin LUN can free the space)."""
    try:
        with open(f"{sysfs}/block/{dm_name}/queue/discard_max_bytes") as f:
            return int(f.read().strip() or 0) > 0
    except (OSError, ValueError):
        return False


async def sector_size(device: str, runner: commands.Runner) -> int:
    lvm.check_device(device)
    r = await runner(["blockdev", "--getss", device], timeout=30)
    try:
        return int(r.text.strip())
    except ValueError:
        raise InvalidParameter(field="devices",
                               reason=f"blockdev --getss {device}: {r.text.strip()!r}") from None


async def pv_list_of(pvs: Sequence[lvm.PV]) -> str:
    ids = await asyncio.to_thread(lambda: {pv.name: lun_id(pv.name) for pv in pvs})
    return pv_list(pvs, ids)


async def check_blank(device: str, timeout: float, runner: commands.Runner) -> None:
    """A LUN to become a new PV: no data signature, not open exclusively."""
    sig = await devices.has_signature(device, timeout=timeout, runner=runner)
    if sig:
        raise PhysDevInitializationError(devices=device, reason=f"it holds {sig}")
    if await asyncio.wait_for(asyncio.to_thread(devices.busy, device), timeout):
        raise PhysDevInitializationError(devices=device, reason="it is in use")


async def remove_vg(lvm_: lvm.LVM, vg: str) -> None:
    """Deactivate every LV of `vg`, remove it and its PVs' labels."""
    lvm_.invalidate(vg)
    pvs = [pv.name for pv in await lvm_.pvs(vg)]
    names = [lv.name for lv in await lvm_.lvs(vg)]
    if names:
        await lvm_.deactivate(vg, names)
    await lvm_.vgremove(vg)
    if pvs:
        await lvm_.pvremove(pvs)


class LUNs:
    """The LUN side of BlockDomain (which provides what is declared here)."""

    if TYPE_CHECKING:
        md: DomainMetadata
        lvm: lvm.LVM
        runner: commands.Runner
        io: IOPool
        sysfs: str
        leases: Leases

        @property
        def vg(self) -> str: ...
        @property
        def uuid(self) -> str: ...
        async def read_domain_md(self) -> DomainMetadata: ...
        async def write_domain_md(self, md: DomainMetadata) -> None: ...
        def volume_path(self, img: str, vol: str) -> str: ...
        async def _volume_lv(self, vol: str) -> TaggedLV | None: ...

    async def mark_wipe(self, vols: list[VolumeMetadata]) -> None:
        """Tag the volumes' LVs WIPE (one lvchange each, under the domain
        lease): from then on whoever removes them zeroes them first."""
        async with self.leases.metadata():
            for md in vols:
                v = await self._volume_lv(md.uuid)
                if v is not None and v.image == md.image and not v.wipe:
                    await self.lvm.lvchange_tags(self.vg, md.uuid, add=[WIPE])

    async def wipe_lv(self, image: str, name: str, size: int) -> None:
        """Zero every extent of the LV: `blkdiscard --zeroout`, the kernel's
        zero-out (WRITE ZEROES / WRITE SAME where the LUN has them, written
        zeros otherwise), so the LUN reads zeros there whatever it does with
        discards; then, where the LUN takes discards, discard the extents too
        (a thin LUN frees them). Deactivated again if that fails; else left
        active for the lvremove --force that follows (it deactivates)."""
        path = self.volume_path(image, name)
        await self.lvm.activate(self.vg, [name])
        try:
            await self.runner(["blkdiscard", "--zeroout", path], timeout=wipe_timeout(size))
            dm = os.path.basename(await asyncio.to_thread(os.path.realpath, path))
            if await asyncio.to_thread(discards, dm, self.sysfs):
                await self.runner(["blkdiscard", path], timeout=wipe_timeout(size))
        except BaseException:
            with contextlib.suppress(HostAgentError):
                await self.lvm.deactivate(self.vg, [name])
            raise
        log.info("Wiped LV %s/%s (%d bytes)", self.vg, name, size)

    async def add_devices(self, guids: Sequence[str], paths: LunPaths, *,
                          timeout: float) -> None:
        """Add LUNs (their multipath devices) to the VG, under the domain
        lease: a device already in the VG is skipped (a call repeated after
        a crash or a lost reply finishes the job); one of another VG, with
        data on it, in use, or of another sector size is refused and nothing
        changes. The domain metadata's PVS is written last: a crash between
        vgextend and it leaves a usable domain that the next call (or
        resize_device) lists."""
        wanted = [lvm.check_device(p, "devices") for p in await paths(list(guids))]
        async with self.leases.metadata():
            self.lvm.invalidate(self.vg)
            old = self.lvm.devices
            probe = lvm.LVM(self.runner, devices=[*(old or ()), *wanted], timeout=timeout)
            seen = await probe.pvs()
            add, orphans = new_devices(self.vg, wanted, seen)
            fresh = [d for d in add if d not in orphans]
            for d in add:
                size = await sector_size(d, self.runner)
                if size != self.md.block_size:
                    raise VolumeGroupBlockSizeError(
                        reason=f"{d}: {size}, the domain's: {self.md.block_size}")
            for d in fresh:
                await check_blank(d, timeout, self.runner)
            if add:
                self.lvm.set_devices([*(old or ()), *add])
                try:
                    if fresh:
                        mda = max((pv.mda_size for pv in seen if pv.vg_name == self.vg),
                                  default=DEFAULT_MDA_SIZE)
                        try:
                            await self.lvm.pvcreate(
                                fresh, metadata_size=-(-mda // lvm.SECTOR) * lvm.SECTOR)
                        except LVMCommandError as e:
                            raise PhysDevInitializationError(
                                devices=", ".join(fresh),
                                reason=e.fields.get("reason", str(e))) from None
                    try:
                        await self.lvm.vgextend(self.vg, add)
                    except LVMCommandError as e:
                        raise VolumeGroupExtendError(
                            vgName=self.vg, reason=e.fields.get("reason", str(e))) from None
                except BaseException:
                    self.lvm.set_devices(old)
                    raise
                log.info("Domain %s: added %s", self.uuid, ", ".join(add))
            await self._record_pvs()

    async def _record_pvs(self) -> None:
        md = await self.read_domain_md()
        listed = await pv_list_of(await self.lvm.pvs(self.vg))
        if md.pvs != listed:
            await self.write_domain_md(replace(md, pvs=listed))

    async def resize_device(self, guid: str, paths: LunPaths, *, timeout: float) -> int:
        """Rescan the paths of LUN `guid` and resize its multipath map, then
        pvresize its PV, under the domain lease; online: volumes in use go
        on. The PV's size after."""
        [path] = await paths([guid])
        lvm.check_device(path, "guid")
        self.lvm.invalidate(self.vg)
        if path not in {pv.name for pv in await self.lvm.pvs(self.vg)}:
            raise CouldNotResizePhysicalVolume(device=path,
                                               reason=f"not a PV of domain {self.uuid}")
        await devices.resize_lun(guid, timeout=timeout, runner=self.runner)
        async with self.leases.metadata():
            try:
                await self.lvm.pvresize(self.vg, path)
            except LVMCommandError as e:
                raise CouldNotResizePhysicalVolume(
                    device=path, reason=e.fields.get("reason", str(e))) from None
            await self._record_pvs()
            size = next(pv.size for pv in await self.lvm.pvs(self.vg) if pv.name == path)
        log.info("Domain %s: resized PV %s to %d bytes", self.uuid, path, size)
        return size

    async def follow_pvs(self) -> bool:
        """Another host added LUNs to the domain (its VG has more PVs than
        this host's filter lets LVM see, so LVM finds it partial and changes
        nothing): add the maps of the LUNs the domain metadata lists (PVS)
        to the filter. Run from the domain monitor's space check. True if
        the filter changed."""
        md = await self.read_domain_md()
        maps = {m.wwid: f"/dev/mapper/{m.name}"
                for m in await multipath.maps(timeout=self.io.timeout, runner=self.runner)}
        have = self.lvm.devices or ()
        new = [maps[i] for i in pvs_ids(md.pvs) if i in maps and maps[i] not in have]
        missing = [i for i in pvs_ids(md.pvs) if i not in maps]
        if missing:
            log.warning("Domain %s: LUNs %s are not visible on this host", self.uuid,
                        ", ".join(missing))
        if not new:
            return False
        self.lvm.set_devices([*have, *new])
        self.md = md
        log.info("Domain %s: LUNs added by another host: %s", self.uuid, ", ".join(new))
        return True
