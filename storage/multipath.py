"""multipathd(8)/multipath(8) wrapper: maps and paths as the daemon sees them,
flushing a map, waiting for a map to have its paths, resizing.

Listings use `multipathd show ... raw format` with '|' between the fields:
one line per map or path, no headers, no padding.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

from storage import commands
from storage.errors import MultipathSetupError, ResourceTimeout, StorageServerDisconnectionError
from storage.udev import SYSFS, lun_of

log = logging.getLogger("storage.multipath")

MULTIPATHD = "multipathd"
MULTIPATH = "multipath"

# name, WWID, dm device (dm-N), number of paths, dm state
MAP_FORMAT = "%n|%w|%d|%N|%t"
# WWID, path device (sdX), dm state, checker state, device state, H:C:T:L,
# map name ("[orphan]" when in no map), major:minor
PATH_FORMAT = "%w|%d|%t|%T|%o|%i|%m|%D"

ORPHAN = "[orphan]"
UNDEF = "[undef]"


@dataclass(frozen=True)
class Map:
    name: str
    wwid: str
    sysfs: str       # dm-N
    path_count: int
    dm_state: str    # active / suspend


@dataclass(frozen=True)
class MPath:
    wwid: str
    dev: str         # sdX
    dm_state: str    # active / failed / undef
    checker: str     # ready / faulty / ghost / i/o pending / ...
    dev_state: str   # running / offline / ...
    hctl: str        # H:C:T:L
    map: str | None  # None: the path is in no map
    devt: str        # major:minor

    @property
    def lun(self) -> int | None:
        return lun_of(self.hctl)

    @property
    def active(self) -> bool:
        """In use by the map and not known to be bad: a path multipathd has
        just added reads "i/o pending" until its checker's next tick."""
        return self.dm_state == "active" and self.checker in ("ready", "i/o pending")


def _fields(line: str, count: int) -> list[str] | None:
    parts = [p.strip() for p in line.split("|")]
    return parts if len(parts) == count else None


def _undef(value: str) -> str:
    return "" if value in (UNDEF, "undef") else value


def parse_maps(text: str) -> list[Map]:
    maps = []
    for line in text.splitlines():
        f = _fields(line, 5)
        if f is None or not f[0] or not f[1]:
            continue
        try:
            count = int(f[3])
        except ValueError:
            count = 0
        maps.append(Map(name=f[0], wwid=f[1], sysfs=f[2], path_count=count, dm_state=f[4]))
    return maps


def parse_paths(text: str) -> list[MPath]:
    paths = []
    for line in text.splitlines():
        f = _fields(line, 8)
        if f is None or not f[1]:
            continue
        paths.append(MPath(wwid=_undef(f[0]), dev=f[1], dm_state=f[2], checker=f[3],
                           dev_state=f[4], hctl=f[5],
                           map=None if f[6] in (ORPHAN, "", UNDEF) else f[6], devt=f[7]))
    return paths


class MultipathError(commands.CommandError):
    """multipath or multipathd failed: VDSM's MultipathSetupError (467) on the
    wire; still a CommandError for callers that handle a failed command."""

    code = MultipathSetupError.code
    wire_name = MultipathSetupError.error_name()


async def _run(argv: list[str], *, timeout: float,
               runner: commands.Runner) -> commands.CommandResult:
    try:
        return await runner(argv, timeout=timeout)
    except commands.CommandError as e:
        raise MultipathError(e.argv, e.rc, e.out, e.err) from None


def dm_maps(sysfs: Path = SYSFS) -> list[str]:
    """Names of the multipath maps device-mapper holds (dm uuid "mpath-..."),
    from sysfs: they are there whether multipathd runs or not."""
    found = []
    for uuid_file in sorted(sysfs.glob("block/dm-*/dm/uuid")):
        try:
            if uuid_file.read_text().startswith("mpath-"):
                found.append(uuid_file.with_name("name").read_text().strip())
        except OSError:
            continue   # removed meanwhile
    return found


async def check_down(why: str, *, sysfs: Path = SYSFS) -> None:
    """multipathd does not answer (`why`). Fine on a host without multipath;
    where device-mapper holds multipath maps it is VDSM's 467: their LUNs
    exist, and an empty answer would read as "no LUN"."""
    held = await asyncio.to_thread(dm_maps, sysfs)
    if held:
        raise MultipathSetupError(reason=f"multipathd does not answer ({why.strip()}) while "
                                         f"device-mapper holds multipath maps "
                                         f"{', '.join(held)}")


async def is_running(*, timeout: float, runner: commands.Runner = commands.run) -> bool:
    result = await runner([MULTIPATHD, "show", "daemon"], timeout=timeout, check=False)
    return result.rc == 0 and "pid" in result.text


async def maps(*, timeout: float, runner: commands.Runner = commands.run) -> list[Map]:
    result = await _run([MULTIPATHD, "show", "maps", "raw", "format", MAP_FORMAT],
                        timeout=timeout, runner=runner)
    return parse_maps(result.text)


async def paths(*, timeout: float, runner: commands.Runner = commands.run) -> list[MPath]:
    result = await _run([MULTIPATHD, "show", "paths", "raw", "format", PATH_FORMAT],
                        timeout=timeout, runner=runner)
    return parse_paths(result.text)


# A map no device holds can still be open for a moment: udev's blkid probing
# it after an LV on it went, or an LVM scan. `multipath -f` then says "map in
# use"; a real opener (an active LV, a process) is still there after these.
FLUSH_RETRY_DELAYS = (0.25, 0.5, 1.0)


async def flush(name: str, *, timeout: float, runner: commands.Runner = commands.run,
                retry_delays: Sequence[float] = FLUSH_RETRY_DELAYS) -> None:
    """Remove the map (not its paths). A map that stays open (an LV on it, a
    process holding it) is refused by multipath with "map in use": that is
    a disconnection error (452); nothing is changed then."""
    commands.check_arg(name, "map")
    for delay in (*retry_delays, None):
        try:
            await runner([MULTIPATH, "-f", name], timeout=timeout)
            return
        except commands.CommandError as e:
            text = (e.err + e.out).decode("utf-8", "replace")
            if "not a multipath device" in text:
                return   # already gone
            if "in use" not in text:
                raise MultipathError(e.argv, e.rc, e.out, e.err) from None
            if delay is None:
                raise StorageServerDisconnectionError(
                    reason=f"multipath map {name} is in use") from None
            log.info("Multipath map %s is open; flushing it again in %g s", name, delay)
            await asyncio.sleep(delay)


async def resize(name: str, *, timeout: float, runner: commands.Runner = commands.run) -> None:
    """Make the map take the new size of its paths (after a LUN was grown and
    its paths rescanned)."""
    commands.check_arg(name, "map")
    await _run([MULTIPATHD, "resize", "map", name], timeout=timeout, runner=runner)


async def reload(*, timeout: float, runner: commands.Runner = commands.run) -> None:
    """Create maps for eligible paths that have none yet (`multipath` with no
    argument; multipathd keeps running and picks them up)."""
    await runner([MULTIPATH], timeout=timeout, check=False)


async def wait_for_paths(wwid: str, devs: Collection[str], *, timeout: float,
                         interval: float = 0.2, runner: commands.Runner = commands.run,
                         command_timeout: float = 10.0,
                         fetch: Callable[[], Awaitable[list[MPath]]] | None = None) -> str:
    """Wait until the map of `wwid` exists and each of `devs` is an active
    path of it; return the map name. multipathd adds a path when udev has
    processed it, so this polls against a deadline instead of sleeping
    blindly. `fetch` replaces the `paths()` call (a shared poll). Raises
    ResourceTimeout (851)."""
    deadline = time.monotonic() + timeout
    want = set(devs)
    last: list[MPath] = []
    while True:
        found = await fetch() if fetch else await paths(timeout=command_timeout, runner=runner)
        last = [p for p in found if p.wwid == wwid]
        names = {p.map for p in last if p.dev in want and p.active and p.map}
        have = {p.dev for p in last if p.dev in want and p.active and p.map}
        if have == want and len(names) == 1:
            return names.pop()
        if time.monotonic() >= deadline:
            state = ", ".join(f"{p.dev}:{p.dm_state}/{p.checker}/{p.map or '-'}" for p in last)
            raise ResourceTimeout(reason=f"multipath map of {wwid} with paths "
                                         f"{', '.join(sorted(want))} did not come up within "
                                         f"{timeout:g} s (paths: {state or 'none'})")
        await asyncio.sleep(interval)


async def wait_map_gone(wwid: str, *, timeout: float, interval: float = 0.2,
                        runner: commands.Runner = commands.run,
                        command_timeout: float = 10.0) -> bool:
    """Wait until no map has `wwid`; False if one is still there at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        if not any(m.wwid == wwid for m in await maps(timeout=command_timeout, runner=runner)):
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(interval)
