"""The LUNs this host sees (getDeviceList): each multipath map with its paths'
states, the SCSI disks and iSCSI sessions behind them, its LVM identity, and
whether it is free for a new domain. `refresh` rescans first (new LUNs, LUNs
the array grew), as VDSM's getDeviceList does with its rescan.

A LUN is listed once per map, however many paths reach it. The LVM and
signature probes are limited to the maps listed: pvs (storage/lvm.py) gets a
filter that accepts only them (never scanning every disk of the host),
blkid -p reads only the map.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from storage import commands, iscsiadm, lvm, multipath, udev
from storage.errors import HostAgentError, InaccessiblePhysDev

log = logging.getLogger("storage.devices")

FREE, USED = "free", "used"
MAPPER = Path("/dev/mapper")
# blkid -p: 2 = no signature found
BLKID_NOTHING = 2
_SAFE_NAME = re.compile(r"[A-Za-z0-9._+-]+")


async def has_signature(device: str, *, timeout: float,
                        runner: commands.Runner = commands.run) -> str | None:
    """The type of the first data signature on `device` (a file system, a
    partition table, an LVM label...), None if blank. Probes the device
    itself (blkid -p), not blkid's cache."""
    result = await runner(["blkid", "-p", "-o", "export", device], timeout=timeout,
                          ok_rcs=(0, BLKID_NOTHING))
    if result.rc == BLKID_NOTHING:
        return None
    values = dict(line.partition("=")[::2] for line in result.lines())
    return values.get("TYPE") or values.get("PTTYPE") or "unknown"


def busy(device: str) -> bool:
    """True if the device is held: mounted, an LV or partition map on it, or
    opened exclusively by another process (O_EXCL on a block device)."""
    try:
        fd = os.open(device, os.O_RDONLY | os.O_EXCL)
    except OSError as e:
        return e.errno == errno.EBUSY
    os.close(fd)
    return False


async def refresh(*, timeout: float, runner: commands.Runner = commands.run,
                  sysfs: Path = udev.SYSFS) -> list[str]:
    """Rescan what the host sees: every iSCSI session (new LUNs appear and
    each disk reads its capacity again), every FC host, then each path of
    each multipath map, and resize the maps whose paths grew. Returns the
    names of the maps resized. A host without iSCSI or FC skips that part."""
    try:
        await iscsiadm.rescan_sessions(timeout=timeout, runner=runner)
    except commands.CommandError as e:
        log.warning("Cannot rescan iSCSI sessions: %s", e)
    fc_hosts = await asyncio.to_thread(udev.scsi_hosts, sysfs, "fc_host")
    await asyncio.gather(*(udev.scan_host(h, timeout=timeout, sysfs=sysfs) for h in fc_hosts))
    try:
        maps = await multipath.maps(timeout=timeout, runner=runner)
    except commands.CommandError as e:
        await multipath.check_down(str(e.fields.get("stderr") or e.message), sysfs=sysfs)
        return []
    if not maps:
        return []
    paths = await multipath.paths(timeout=timeout, runner=runner)
    resized = []
    for m in maps:
        if await resize_map(m, paths, timeout=timeout, runner=runner, sysfs=sysfs):
            resized.append(m.name)
    return resized


async def resize_lun(guid: str, *, timeout: float, runner: commands.Runner = commands.run,
                     sysfs: Path = udev.SYSFS) -> bool:
    """Rescan the paths of the map of LUN `guid` and resize the map if they
    grew (resizePV, before pvresize); 606 when no map has that WWID."""
    found = [m for m in await multipath.maps(timeout=timeout, runner=runner) if m.wwid == guid]
    if not found:
        raise InaccessiblePhysDev(devices=guid)
    paths = await multipath.paths(timeout=timeout, runner=runner)
    return await resize_map(found[0], paths, timeout=timeout, runner=runner, sysfs=sysfs)


async def resize_map(m: multipath.Map, paths: Sequence[multipath.MPath], *, timeout: float,
                     runner: commands.Runner = commands.run, sysfs: Path = udev.SYSFS
                     ) -> bool:
    """Rescan the disks of the map's active paths; when they all agree on a
    size larger than the map's, `multipathd resize map` (online: I/O goes on).
    True if the map was resized. A path whose rescan fails keeps its old
    size, and the map is then left alone (multipathd refuses paths of
    different sizes): the next refresh tries again."""
    disks = sorted(p.dev for p in paths if p.map == m.name and p.active)
    if not disks:
        return False
    done = await asyncio.gather(*(udev.rescan_disk(d, timeout=timeout, sysfs=sysfs)
                                  for d in disks), return_exceptions=True)
    for d, r in zip(disks, done, strict=True):
        if isinstance(r, BaseException):
            if not isinstance(r, (OSError, HostAgentError)):
                raise r
            log.warning("Cannot rescan %s, a path of %s: %s", d, m.name, r)

    def sizes() -> tuple[int, set[int]]:
        return (udev.size_bytes(m.sysfs, sysfs),
                {udev.size_bytes(d, sysfs) for d in disks})

    current, grown = await asyncio.wait_for(asyncio.to_thread(sizes), timeout)
    if len(grown) != 1:
        log.warning("Paths of %s disagree on its size (%s): not resized", m.name,
                    ", ".join(str(s) for s in sorted(grown)))
        return False
    size = grown.pop()
    if size <= current:
        return False
    await multipath.resize(m.name, timeout=timeout, runner=runner)
    log.info("Multipath map %s (%s) resized from %d to %d bytes", m.name, m.wwid, current,
             size)
    return True


def _pathlist(disk_names: Collection[str], disks: Mapping[str, udev.ScsiDisk],
              sessions: Mapping[int, iscsiadm.Session]) -> list[dict[str, Any]]:
    """One entry per iSCSI session that carries a path of the LUN."""
    entries: dict[int, dict[str, Any]] = {}
    for name in sorted(disk_names):
        disk = disks.get(name)
        if disk is None or disk.session is None or disk.session in entries:
            continue
        s = sessions.get(disk.session)
        if s is None:
            continue
        entries[s.sid] = {"connection": s.portal.address, "port": s.portal.port,
                          "iqn": s.iqn, "portal": s.portal.hostport, "tpgt": s.portal.tpgt,
                          "ifaceName": s.iface, "initiatorName": s.initiator_name,
                          "sessionId": s.sid}
    return [entries[sid] for sid in sorted(entries)]


async def device_list(guids: Collection[str] | None = None, check_status: bool = False, *,
                      timeout: float, runner: commands.Runner = commands.run,
                      sysfs: Path = udev.SYSFS, mapper: Path = MAPPER
                      ) -> list[dict[str, Any]]:
    """Every multipathed LUN (or those in `guids`), sorted by guid.

    status is `used` when the LUN is an LVM PV or has something stacked on
    it (holders, partitions); with check_status also when it carries any
    data signature or is open exclusively.
    """
    try:
        maps = await multipath.maps(timeout=timeout, runner=runner)
    except commands.CommandError as e:
        await multipath.check_down(str(e.fields.get("stderr") or e.message), sysfs=sysfs)
        log.warning("multipathd does not answer (%s): no LUN to list", e.fields.get("stderr"))
        return []
    if guids is not None:
        wanted = set(guids)
        maps = [m for m in maps if m.wwid in wanted]
    if not maps:
        return []
    all_paths, disk_list, session_list = await asyncio.gather(
        multipath.paths(timeout=timeout, runner=runner), udev.scsi_disks(timeout=timeout),
        iscsiadm.sessions(timeout=timeout, sysfs=sysfs))
    devpaths = {m.name: str(mapper / m.name) for m in maps if _SAFE_NAME.fullmatch(m.name)}
    pvs = await lvm.LVM(runner, devices=sorted(devpaths.values()), timeout=timeout).pvs()

    def sysfs_facts() -> dict[str, MapFacts]:
        return {m.name: MapFacts(udev.size_bytes(m.sysfs, sysfs), udev.holders(m.sysfs, sysfs),
                                 udev.partitions(m.sysfs, sysfs)) for m in maps}

    facts = await asyncio.wait_for(asyncio.to_thread(sysfs_facts), timeout)

    async def deep_check(name: str) -> str | None:
        path = devpaths.get(name)
        if path is None:
            return None
        sig = await has_signature(path, timeout=timeout, runner=runner)
        if sig:
            return f"holds {sig}"
        if await asyncio.wait_for(asyncio.to_thread(busy, path), timeout):
            return "open by another user"
        return None

    busy: dict[str, str | None] = {}
    if check_status:
        reasons = await asyncio.gather(*(deep_check(m.name) for m in maps))
        busy = dict(zip((m.name for m in maps), reasons, strict=True))
    return assemble(maps, all_paths, disk_list, session_list,
                    {pv.name: pv for pv in pvs}, facts, busy, mapper=mapper)


@dataclass(frozen=True)
class MapFacts:
    size: int
    holders: list[str]
    partitions: list[str]


def assemble(maps: Sequence[multipath.Map], paths: Sequence[multipath.MPath],
             disks: Sequence[udev.ScsiDisk], sessions: Sequence[iscsiadm.Session],
             pvs: Mapping[str, lvm.PV], facts: Mapping[str, MapFacts],
             busy: Mapping[str, str | None], *, mapper: Path = MAPPER
             ) -> list[dict[str, Any]]:
    """The getDeviceList entries of `maps` from what the tools reported."""
    by_disk = {d.name: d for d in disks}
    by_sid = {s.sid: s for s in sessions}
    luns = []
    for m in maps:
        mpaths = sorted((p for p in paths if p.map == m.name), key=lambda p: p.dev)
        pdisks = [by_disk[p.dev] for p in mpaths if p.dev in by_disk]
        first = pdisks[0] if pdisks else None
        fact = facts.get(m.name, MapFacts(0, [], []))
        path = str(mapper / m.name)
        pv = pvs.get(path)
        stacked = fact.holders + fact.partitions
        used = pv is not None or bool(stacked) or bool(busy.get(m.name))
        entry: dict[str, Any] = {
            "guid": m.wwid,
            "name": m.name,
            "path": path,
            "capacity": fact.size,
            "vendorID": first.vendor if first else "",
            "productID": first.model if first else "",
            "serial": first.serial if first else "",
            "devtype": first.transport if first else "",
            "logicalblocksize": first.logical_block_size if first else 512,
            "physicalblocksize": first.physical_block_size if first else 512,
            "pathlist": _pathlist([p.dev for p in mpaths], by_disk, by_sid),
            "pathstatus": [{"physdev": p.dev, "state": p.dm_state, "checker": p.checker,
                            "devState": p.dev_state, "lun": p.lun, "hctl": p.hctl,
                            "type": by_disk[p.dev].transport if p.dev in by_disk else "",
                            "capacity": by_disk[p.dev].size if p.dev in by_disk else 0}
                           for p in mpaths],
            "pvUUID": pv.uuid if pv else "",
            "vgUUID": pv.vg_uuid if pv else "",
            "status": USED if used else FREE,
        }
        if stacked:
            entry["usedBy"] = stacked
        if busy.get(m.name):
            entry["statusReason"] = busy[m.name]
        luns.append(entry)
    return sorted(luns, key=lambda lun: str(lun["guid"]))
