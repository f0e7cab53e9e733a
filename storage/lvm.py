"""LVM wrapper: PV/VG/LV commands limited to given devices, cached reports.

One `LVM` object serves one set of devices (a block storage domain's LUNs,
or loop devices in tests). Every command it runs carries the same
`--config` string: a devices filter accepting exactly those paths and
rejecting everything else (so other VGs of the host and other domains' LUNs
are never scanned), no devices file, no hints, no cache file, and
`global {activation=0}` when the object was made with activation=False
(the host tier has no device-mapper; metadata-only commands still work).
LVM 2.03 has no lvmetad and no locking_type, so neither is set.

Locking: commands that change a VG's metadata (vgcreate, vgextend, vgremove,
pvresize, vgchange --addtag/--deltag, lvcreate, lvremove, lvrename, lvextend,
lvchange --addtag/--deltag) hold an `asyncio.Lock` for that VG name, one
lock per VG per LVM object: concurrent changes to one VG run one after the
other, changes to different VGs run in parallel. Activation, refresh and
reports take no lock (LVM's own file locks cover other processes).

Cache: `vgs(vg)`, `lvs(vg)` and `pvs(vg)` of one VG are cached per VG for at
most `cache_ttl` seconds. Every command of this object that can change what
they report (the metadata changes above, and refresh) drops that VG's
entries when it finishes, failed or not, and a report that was running
while the VG changed is not stored; activation and deactivation write no
metadata and update the cached LV rows instead (dropping them when they
fail). Changes made elsewhere (another host, the lvm CLI) are only seen
after `invalidate(vg)` or `invalidate()` or when the entry expires, or,
for a VG whose metadata stamp this object can read (`watch_metadata`,
storage/lvmlabel.py), after `suspect(vg)`: the LV report is then used again
only while the stamp reads as it did before the report ran (and an
`lvcreate(sole_writer=True)` adds its LV and the new stamp). Reports of
every VG (no VG given) are never cached.

Errors: a failed command raises `LVMCommandError` (code 621) whose reason
is the useful part of LVM's stderr; `LVMNotFound` (also 621) when LVM says
the VG or LV does not exist; lvcreate raises `CannotCreateLogicalVolume`
(550). Names, tags, devices and other request values are checked before they
reach the command line (`InvalidParameter`, 1000).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from storage import commands, lvmshell
from storage.errors import (
    CannotCreateLogicalVolume,
    HostAgentError,
    InvalidParameter,
    LVMCommandError,
)
from storage.lvmreport import LV as LV
from storage.lvmreport import PV as PV
from storage.lvmreport import VG as VG
from storage.lvmreport import T, parse_lvs, parse_pvs, parse_vgs

log = logging.getLogger(__name__)

LVM_TOOL = "lvm"
# NOUDEVSYNC: lvextend and refresh resume an LV's mapping in place (its nodes
# exist): no wait for udev's rules on the change (blkid of the LV: 0.75 s of
# an lvextend's 0.89 s under a writer in the lab guest, lvextend -vvvv).
DEFAULT_TIMEOUT = 120.0
DEFAULT_CACHE_TTL = 60.0

ENV = {"LVM_SUPPRESS_FD_WARNINGS": "1"}

# lvm's exit codes (tools/errors.h).
RC_NAMES: Mapping[int, str] = {
    1: "processed",
    2: "no-such-command",
    3: "invalid-command-line",
    5: "command-failed",
}

MAX_TAG_LEN = 1024
_TAG = re.compile(r"^[A-Za-z0-9_+.\-/=!:&#]+$")
# LVM accepts these in VG and LV names; "." and ".." and a leading "-" are refused.
_NAME = re.compile(r"^[A-Za-z0-9_+.\-]+$")
MAX_NAME_LEN = 127
# Device paths that may go into the filter: no '|' (the regex delimiter), no
# quotes, no backslash, nothing the config parser would read specially.
_DEVICE = re.compile(r"^/[A-Za-z0-9_.:+/\-]+$")
# Regex metacharacters a device path may contain; each becomes a one-char class.
_REGEX_SPECIAL = ".+"

SECTOR = 512

_PV_FIELDS = ("pv_name", "pv_uuid", "vg_name", "vg_uuid", "pv_size", "pv_free", "pe_start",
              "dev_size", "pv_pe_count", "pv_pe_alloc_count", "pv_mda_count", "pv_mda_size",
              "pv_mda_free", "pv_tags")
_VG_FIELDS = ("vg_name", "vg_uuid", "vg_attr", "vg_size", "vg_free", "vg_extent_size",
              "vg_extent_count", "vg_free_count", "vg_tags", "pv_count", "lv_count",
              "vg_mda_size", "vg_mda_free")
_LV_FIELDS = ("lv_name", "vg_name", "lv_uuid", "lv_size", "lv_tags", "lv_attr", "lv_active",
              "lv_path")

# Lines on stderr that never explain a failure.
_NOISE = (
    re.compile(r"^WARNING: Activation disabled"),
    re.compile(r"^WARNING: Logical volume .* not zeroed"),
    re.compile(r"^File descriptor \d+ .* leaked"),
    re.compile(r"^Run `\S+ --help' for more information"),
)
_NOT_FOUND = re.compile(r"not found|Failed to find", re.IGNORECASE)
_MAX_REASON = 500


class LVMNotFound(LVMCommandError):
    """LVM said the VG, LV or PV named in the command does not exist."""


# --- checks ------------------------------------------------------------------------------


def check_name(value: str, field: str) -> str:
    """A VG or LV name LVM accepts, safe on a command line."""
    commands.check_arg(value, field)
    if value in (".", "..") or len(value) > MAX_NAME_LEN or not _NAME.match(value):
        raise InvalidParameter(field=field, reason=f"invalid LVM name {value!r}")
    return value


def check_tag(value: str, field: str = "tag") -> str:
    """An LVM tag: 1..1024 characters of [A-Za-z0-9_+.-/=!:&#]."""
    commands.check_arg(value, field)
    if len(value) > MAX_TAG_LEN:
        raise InvalidParameter(field=field, reason=f"longer than {MAX_TAG_LEN} characters")
    if not _TAG.match(value):
        raise InvalidParameter(field=field, reason=f"invalid LVM tag {value!r}")
    return value


def check_device(value: str, field: str = "device") -> str:
    """An absolute device path that can be put into the devices filter."""
    commands.check_arg(value, field)
    if not _DEVICE.match(value) or "/../" in value or value.endswith("/.."):
        raise InvalidParameter(field=field, reason=f"invalid device path {value!r}")
    return value


def _check_size(value: int, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InvalidParameter(field=field, reason="must be a positive integer (bytes)")
    if value % SECTOR:
        raise InvalidParameter(field=field, reason=f"must be a multiple of {SECTOR} bytes")
    return value


def _bytes(value: int) -> str:
    return f"{value}b"


def _tags(values: Iterable[str], field: str) -> list[str]:
    if isinstance(values, str):
        raise InvalidParameter(field=field, reason="must be a list of tags")
    return [check_tag(t, field) for t in values]


# --- config --------------------------------------------------------------------------


def _filter_regex(device: str) -> str:
    escaped = "".join(f"[{c}]" if c in _REGEX_SPECIAL else c for c in device)
    return f"^{escaped}$"


def build_config(devices: Sequence[str] | None, *, activation: bool) -> str:
    """The --config string for every command (see the module docstring)."""
    devs = [
        # multipath maps have dm-N and by-id aliases; prefer the map's name
        'preferred_names=["^/dev/mapper/"]',
        "ignore_suspended_devices=1",
        "write_cache_state=0",
        "disable_after_error_count=3",
        "obtain_device_list_from_udev=0",
        "use_devicesfile=0",
        'hints="none"',
    ]
    if devices is not None:
        rules = [f'"a|{_filter_regex(d)}|"' for d in devices]
        rules.append('"r|.*|"')
        devs.append(f"filter=[{','.join(rules)}]")
    glob = ["prioritise_write_locks=1", "wait_for_locks=1"]
    if not activation:
        glob.append("activation=0")
    return (f"devices {{ {' '.join(devs)} }} global {{ {' '.join(glob)} }} "
            "backup { retain_min=50 retain_days=0 }")


# --- errors --------------------------------------------------------------------------


def error_reason(err: bytes | str) -> str:
    """The lines of LVM's stderr that explain a failure, without the noise."""
    text = err.decode("utf-8", "replace") if isinstance(err, bytes) else err
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    useful = [ln for ln in lines if not any(p.search(ln) for p in _NOISE)]
    reason = "; ".join(useful or lines[-1:]) or "no error message"
    if len(reason) > _MAX_REASON:
        reason = reason[:_MAX_REASON] + "..."
    return reason


def _lvm_error(e: commands.CommandError, op: str) -> LVMCommandError:
    reason = error_reason(e.err)
    status = f"rc={e.rc}" + (f" {e.rc_name}" if e.rc_name else "")
    cls = LVMNotFound if e.rc == 5 and _NOT_FOUND.search(reason) else LVMCommandError
    return cls(reason=f"{op}: {reason}", op=op, rc=e.rc, status=status)


# --- the wrapper ---------------------------------------------------------------------


@dataclass
class _Entry:
    time: float
    value: Any
    # the VG's metadata stamp read just before the report ran (lvmlabel)
    stamp: bytes | None = None
    # another host may have changed the VG since: valid only if the stamp
    # still reads the same
    suspect: bool = False


class LVM:
    """LVM commands on `devices` (None: the host's own lvm.conf filter; an empty
    list: no device at all). See the module docstring for locking and caching."""

    def __init__(self, runner: commands.Runner = commands.run, *,
                 devices: Sequence[str] | None = None, activation: bool = True,
                 timeout: float = DEFAULT_TIMEOUT, cache_ttl: float = DEFAULT_CACHE_TTL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._runner = runner
        # what a VM waits on, and a create, go to a running lvm shell
        # (issues 15, 21), unless a test gave its own runner
        self._shell = runner is commands.run
        self.activation = activation
        self.timeout = timeout
        self.cache_ttl = cache_ttl
        self._clock = clock
        self._locks: dict[str, asyncio.Lock] = {}
        self._cache: dict[tuple[str, str], _Entry] = {}
        # Bumped when a VG changes or is invalidated: a report that ran
        # across a bump is not stored.
        self._generation: dict[str, int] = {}
        self._devices: tuple[str, ...] | None = None
        self._config = ""
        # VG -> reads its metadata stamp (see watch_metadata)
        self._stampers: dict[str, Callable[[], Awaitable[bytes | None]]] = {}
        self.set_devices(devices)

    # -- configuration

    @property
    def devices(self) -> tuple[str, ...] | None:
        return self._devices

    @property
    def config(self) -> str:
        return self._config

    def set_devices(self, devices: Sequence[str] | None) -> None:
        """Change the devices filter (e.g. a LUN was added); drops the whole cache."""
        if isinstance(devices, str):
            raise InvalidParameter(field="devices", reason="must be a list of paths")
        if devices is not None:
            devices = tuple(dict.fromkeys(check_device(d, "devices") for d in devices))
        self._devices = devices
        self._config = build_config(devices, activation=self.activation)
        self.invalidate()

    # -- cache and locks

    def lock(self, vg: str) -> asyncio.Lock:
        """The lock this object holds while it changes `vg`'s metadata."""
        return self._locks.setdefault(vg, asyncio.Lock())

    def invalidate(self, vg: str | None = None) -> None:
        """Forget cached reports of `vg` (of every VG when None), e.g. after
        another host changed it."""
        names: Iterable[str] = ([vg] if vg is not None
                                 else {k[1] for k in self._cache} | set(self._generation))
        for name in names:
            self._generation[name] = self._generation.get(name, 0) + 1
            for kind in ("pv", "vg", "lv"):
                self._cache.pop((kind, name), None)

    def watch_metadata(self, vg: str, stamp: Callable[[], Awaitable[bytes | None]]) -> None:
        """Let `suspect(vg)` keep the cached LV report of `vg` as long as
        `stamp()` (lvmlabel.metadata_stamp of one of its PVs; None: cannot
        tell) reads what it read before that report ran."""
        self._stampers[vg] = stamp

    def suspect(self, vg: str) -> None:
        """Another host may have changed `vg` (this host just took the lease
        that keeps the others out): its cached reports go, except an LV
        report whose metadata stamp is checked before it is used again
        (one read of the PV's header instead of an lvs: issue 21)."""
        entry = self._cache.get(("lv", vg))
        self.invalidate(vg)
        if entry is not None and entry.stamp is not None and vg in self._stampers:
            self._cache[("lv", vg)] = replace(entry, suspect=True)

    def report_stamp(self, vg: str) -> bytes | None:
        """The metadata stamp of `vg` the cached LV report holds for (read
        before it ran, or after this object's own change); None: no report
        cached, or a suspect one not checked since."""
        entry = self._cache.get(("lv", vg))
        return None if entry is None or entry.suspect else entry.stamp

    async def _stamp(self, vg: str) -> bytes | None:
        stamper = self._stampers.get(vg)
        if stamper is None:
            return None
        try:
            return await stamper()
        except (OSError, HostAgentError) as e:
            log.debug("Cannot read the metadata stamp of VG %s: %s", vg, e)
            return None

    async def _cached(self, kind: str, vg: str) -> Any:
        entry = self._cache.get((kind, vg))
        if entry is None:
            return None
        if self._clock() - entry.time > self.cache_ttl:
            del self._cache[(kind, vg)]
            return None
        if entry.suspect:
            generation = self._generation.get(vg, 0)
            stamp = await self._stamp(vg)
            if self._cache.get((kind, vg)) is not entry or \
                    self._generation.get(vg, 0) != generation:
                return None     # changed meanwhile: ask LVM
            if stamp is None or stamp != entry.stamp:
                del self._cache[(kind, vg)]
                return None
            entry.suspect = False
        return entry.value

    # -- running

    async def _run(self, op: str, args: Sequence[str], *, urgent: bool = False,
                   in_shell: bool = False) -> commands.CommandResult:
        """urgent: a VM may wait on it (commands.run's higher priority).
        urgent or in_shell: in a running lvm shell when one is free (storage.
        lvmshell: a command that never asks and whose stdout is not read)."""
        argv = [LVM_TOOL, op, "--config", self._config, *args]
        runner = lvmshell.run if self._shell and (urgent or in_shell) else self._runner
        try:
            return await runner(argv, timeout=self.timeout, env=ENV, rc_names=RC_NAMES,
                                urgent=urgent)
        except commands.CommandError as e:
            raise _lvm_error(e, op) from None

    async def _change(self, vg: str, op: str, args: Sequence[str], *,
                      urgent: bool = False, in_shell: bool = False) -> commands.CommandResult:
        """Run a metadata change of `vg` under its lock; drop its cache after."""
        async with self.lock(vg):
            self.invalidate(vg)
            try:
                return await self._run(op, args, urgent=urgent, in_shell=in_shell)
            finally:
                self.invalidate(vg)

    async def _report(self, kind: str, vg: str | None, args: Sequence[str],
                      parse: Callable[[bytes], list[T]]) -> list[T]:
        generation = 0
        stamp = None
        if vg is not None:
            hit = await self._cached(kind, vg)
            if hit is not None:
                return list(hit)
            generation = self._generation.get(vg, 0)
            if kind == "lv":
                # before the report: a change after this read makes the
                # stamp differ from the one stored, never the other way
                stamp = await self._stamp(vg)
        result = await self._run(f"{kind}s", ["--reportformat", "json", "--units", "b",
                                               "--nosuffix", *args])
        rows = parse(result.out)
        if vg is not None and self._generation.get(vg, 0) == generation:
            self._cache[(kind, vg)] = _Entry(self._clock(), tuple(rows), stamp)
        return rows

    # -- reports

    async def pvs(self, vg: str | None = None) -> list[PV]:
        """PVs seen through the filter; only those of `vg` if given."""
        if vg is not None:
            check_name(vg, "vg_name")
        pvs = await self._report("pv", vg, ["-o", ",".join(_PV_FIELDS)], parse_pvs)
        return pvs if vg is None else [pv for pv in pvs if pv.vg_name == vg]

    async def vgs(self, vg: str | None = None) -> list[VG]:
        """Every VG seen through the filter, or just `vg` (LVMNotFound if missing)."""
        args = ["-o", ",".join(_VG_FIELDS)]
        if vg is not None:
            args.append(check_name(vg, "vg_name"))
        return await self._report("vg", vg, args, parse_vgs)

    async def vg(self, vg: str) -> VG:
        found = await self.vgs(vg)
        if len(found) != 1:
            raise LVMCommandError(reason=f"vgs {vg}: {len(found)} VGs reported")
        return found[0]

    async def lvs(self, vg: str | None = None) -> list[LV]:
        """LVs of every VG seen through the filter, or of `vg`."""
        args = ["-o", ",".join(_LV_FIELDS)]
        if vg is not None:
            args.append(check_name(vg, "vg_name"))
        return await self._report("lv", vg, args, parse_lvs)

    async def lv(self, vg: str, lv: str) -> LV:
        """One LV, from the (cached) report of its VG."""
        check_name(lv, "lv_name")
        for found in await self.lvs(vg):
            if found.name == lv:
                return found
        raise LVMNotFound(reason=f"lvs: logical volume {vg}/{lv} not found", op="lvs")

    # -- PVs and VGs

    async def pvcreate(self, devices: Sequence[str], *, metadata_size: int | None = None,
                       data_alignment: int | None = None, force: bool = False) -> None:
        """Initialise `devices` as PVs. force: also over other signatures
        (`--yes --force`); a PV of a VG is still refused."""
        devs = self._known_devices(devices)
        args = []
        if metadata_size is not None:
            args += ["--metadatasize", _bytes(_check_size(metadata_size, "metadata_size"))]
        if data_alignment is not None:
            args += ["--dataalignment", _bytes(_check_size(data_alignment, "data_alignment"))]
        if force:
            args += ["--yes", "--force"]
        await self._run("pvcreate", [*args, *devs])

    async def pvremove(self, devices: Sequence[str]) -> None:
        await self._run("pvremove", self._known_devices(devices))

    async def vgcreate(self, vg: str, devices: Sequence[str], *,
                       extent_size: int | None = None, tags: Iterable[str] = ()) -> None:
        check_name(vg, "vg_name")
        devs = self._known_devices(devices)
        args = []
        if extent_size is not None:
            args += ["--physicalextentsize", _bytes(_check_size(extent_size, "extent_size"))]
        for tag in _tags(tags, "tags"):
            args += ["--addtag", tag]
        await self._change(vg, "vgcreate", [*args, vg, *devs])

    async def vgextend(self, vg: str, devices: Sequence[str]) -> None:
        """Add PVs (pvcreate'd, in this object's filter) to `vg`."""
        check_name(vg, "vg_name")
        await self._change(vg, "vgextend", [vg, *self._known_devices(devices)])

    async def pvresize(self, vg: str, device: str) -> None:
        """Make a PV of `vg` take its device's size (the LUN grew); online,
        under `vg`'s lock: it changes the VG's metadata."""
        check_name(vg, "vg_name")
        await self._change(vg, "pvresize", self._known_devices([device]))

    async def vgremove(self, vg: str) -> None:
        """Remove `vg` and all its LVs (they must be inactive)."""
        check_name(vg, "vg_name")
        await self._change(vg, "vgremove", ["--force", vg])

    async def vgchange_tags(self, vg: str, *, add: Iterable[str] = (),
                            remove: Iterable[str] = ()) -> None:
        """Add and remove VG tags in one metadata change."""
        check_name(vg, "vg_name")
        await self._change(vg, "vgchange", [*_tag_args(add, remove), vg])

    async def vgck(self, vg: str) -> None:
        """Check `vg`'s metadata; LVMCommandError if it is inconsistent."""
        check_name(vg, "vg_name")
        await self._run("vgck", [vg])

    # -- LVs

    async def lvcreate(self, vg: str, lv: str, size: int, *, tags: Iterable[str] = (),
                       activate: bool = False, zero: bool = False, contiguous: bool = False,
                       sole_writer: bool = False, udev_sync: bool = True) -> None:
        """Create `vg/lv` of at least `size` bytes (LVM rounds up to extents).

        sole_writer: no other host changes `vg` meanwhile (the caller holds
        the lease that keeps them out) and `size` is whole extents. Then a
        cached, stamped LV report stays, with the new LV added and the VG's
        new metadata stamp: the next create needs no lvs (issue 21)."""
        check_name(vg, "vg_name")
        check_name(lv, "lv_name")
        tag_list = _tags(tags, "tags")
        _check_size(size, "size")
        args = ["--name", lv, "--size", _bytes(size), "--activate", "y" if activate else "n",
                "--zero", "y" if zero else "n"]
        if contiguous:
            args += ["--contiguous", "y"]
        if not udev_sync:
            args.append("--noudevsync")
        for tag in tag_list:
            args += ["--addtag", tag]
        if activate:
            self._check_activation()
        before = await self._sole_writer_report(vg) if sole_writer else None
        generation = self._generation.get(vg, 0)
        try:
            # in the shell: without zeroing it never asks (no signature
            # to wipe); 0.29 of a 0.70 s create in the lab guest was lvm's
            # start (issue 21)
            await self._change(vg, "lvcreate", [*args, vg], in_shell=not zero)
        except LVMCommandError as e:
            raise CannotCreateLogicalVolume(lvName=lv, vgName=vg,
                                            reason=e.fields.get("reason", str(e))) from None
        if before is not None:
            made = LV(name=lv, vg_name=vg, uuid="", size=size, tags=tuple(tag_list),
                      attr="-wi-a-----" if activate else "-wi-------", active=activate,
                      opened=False, path=f"/dev/{vg}/{lv}")
            # _change bumped the generation twice; more: someone else changed it too
            await self._keep_changed(vg, before, (*before.value, made), generation + 2)

    async def _sole_writer_report(self, vg: str) -> _Entry | None:
        """The cached LV report of `vg` before a change made as its sole
        writer, checked against the VG's metadata stamp if suspect (the
        lease was just taken); None: none that can be kept."""
        if await self._cached("lv", vg) is None:
            return None
        entry = self._cache.get(("lv", vg))
        return entry if entry is not None and entry.stamp is not None else None

    async def _keep_changed(self, vg: str, before: _Entry, rows: tuple[LV, ...],
                            generation: int) -> None:
        """After this object's own change of `vg` as its sole writer: the LV
        report `before` it, changed as the command changed the VG (`rows`),
        cached again with the VG's new metadata stamp; nothing if anything
        else changed the VG or its cache meanwhile (`generation`)."""
        if self._generation.get(vg, 0) != generation:
            return
        stamp = await self._stamp(vg)
        if stamp is None or self._generation.get(vg, 0) != generation \
                or ("lv", vg) in self._cache:
            return
        # as fresh as a report run now (its old time expired it: issue 15)
        self._cache[("lv", vg)] = _Entry(self._clock(), rows, stamp)

    async def lvremove(self, vg: str, lvs: Sequence[str]) -> None:
        """Remove LVs of `vg` in one command (they must be inactive or unused)."""
        await self._change(vg, "lvremove", ["--force", *self._lv_paths(vg, lvs)])

    async def lvrename(self, vg: str, lv: str, new_name: str) -> None:
        check_name(vg, "vg_name")
        check_name(lv, "lv_name")
        check_name(new_name, "new_name")
        await self._change(vg, "lvrename", [vg, lv, new_name])

    async def lvextend(self, vg: str, lv: str, size: int, *, sole_writer: bool = False) -> None:
        """Grow `vg/lv` to at least `size` bytes. Asking for the size it has
        already is not an error; asking for less is.

        sole_writer: as for lvcreate (the caller holds the lease that keeps
        other hosts out, `size` is whole extents): the cached, stamped LV
        report stays with the LV's new size, so that a thin volume's next
        extension runs one LVM command, the lvextend (issue 15)."""
        check_name(vg, "vg_name")
        check_name(lv, "lv_name")
        _check_size(size, "size")
        before = await self._sole_writer_report(vg) if sole_writer else None
        generation = self._generation.get(vg, 0)
        try:
            # no /etc/lvm/backup copy, as VDSM's extendLV (the archive stays)
            await self._change(vg, "lvextend", ["--autobackup", "n", "--noudevsync",
                                                "--size", _bytes(size), f"{vg}/{lv}"],
                               urgent=True)     # a writing VM may wait on it
        except LVMCommandError as e:
            if "matches existing size" not in str(e):
                raise
            return
        if before is not None:
            await self._keep_changed(vg, before, tuple(
                replace(r, size=size) if r.name == lv else r for r in before.value),
                generation + 2)

    async def lvreduce(self, vg: str, lv: str, size: int) -> None:
        """Shrink `vg/lv` to `size` bytes (whole extents); what lies past it
        is gone. --force: no prompt (the LV holds no file system)."""
        check_name(vg, "vg_name")
        check_name(lv, "lv_name")
        _check_size(size, "size")
        await self._change(vg, "lvreduce", ["--force", "--size", _bytes(size), f"{vg}/{lv}"])

    async def lvchange_tags(self, vg: str, lv: str, *, add: Iterable[str] = (),
                            remove: Iterable[str] = ()) -> None:
        """Add and remove tags of `vg/lv` in one command: one atomic metadata change."""
        check_name(vg, "vg_name")
        check_name(lv, "lv_name")
        await self._change(vg, "lvchange", [*_tag_args(add, remove), f"{vg}/{lv}"])

    async def activate(self, vg: str, lvs: Sequence[str]) -> None:
        """Activate LVs of `vg` in one command; /dev/<vg>/<lv> appear."""
        await self._set_active(vg, lvs, "y")

    async def deactivate(self, vg: str, lvs: Sequence[str], *, udev_sync: bool = True) -> None:
        """Deactivate LVs of `vg` in one command (fails for an LV in use).
        udev_sync=False: without waiting for udev (its links go later)."""
        await self._set_active(vg, lvs, "n", [] if udev_sync else ["--noudevsync"])

    async def refresh(self, vg: str, lvs: Sequence[str]) -> None:
        """Reload active LVs' mappings from metadata (another host extended
        them; NOUDEVSYNC). No metadata written, no state changed: the cached
        reports stay (issue 15), unless one could not tell a refreshed LV's
        state ("X": its mapping differed); nor one run across the refresh."""
        self._check_activation()
        paths = self._lv_paths(vg, lvs)
        self._generation[vg] = self._generation.get(vg, 0) + 1
        try:
            await self._run("lvchange", ["--refresh", "--noudevsync", *paths], urgent=True)
        except BaseException:
            self.invalidate(vg)
            raise
        finally:
            self._generation[vg] += 1
        entry = self._cache.get(("lv", vg))
        if entry is not None and any(lv.name in lvs and lv.active is None
                                     for lv in entry.value):
            self.invalidate(vg)

    async def _set_active(self, vg: str, lvs: Sequence[str], flag: str,
                          extra: Sequence[str] = ()) -> None:
        self._check_activation()
        paths = self._lv_paths(vg, lvs)
        try:
            # in a running lvm shell: a VM's start waits on the activation
            # of its disks' chains (prepareImage), and lvm's own start was
            # most of a small command's time (storage.lvmshell)
            await self._run("lvchange", [*extra, "--activate", flag, *paths], in_shell=True)
        except BaseException:
            self.invalidate(vg)
            raise
        self._set_cached_state(vg, set(lvs), flag == "y")

    def _set_cached_state(self, vg: str, names: set[str], active: bool) -> None:
        """Activation writes no VG metadata: the cached LV report stays, with
        the new state of `names` (issue 21: dropping it made the commit of
        every block volume create run lvs once more). A report that ran
        across the change is not stored (generation)."""
        self._generation[vg] = self._generation.get(vg, 0) + 1
        entry = self._cache.get(("lv", vg))
        if entry is None:
            return
        state = "a" if active else "-"
        rows = []
        for lv in entry.value:
            if lv.name in names:
                attr = lv.attr[:4] + state + ("-" if not active else lv.attr[5:6]) + lv.attr[6:]
                lv = replace(lv, attr=attr, active=active,
                                         opened=lv.opened if active else False)
            rows.append(lv)
        self._cache[("lv", vg)] = replace(entry, value=tuple(rows))

    # -- helpers

    def _check_activation(self) -> None:
        # With activation=0 `lvchange -ay` exits 0 and activates nothing.
        if not self.activation:
            raise LVMCommandError(reason="activation is disabled for this LVM object")

    def _lv_paths(self, vg: str, lvs: Sequence[str]) -> list[str]:
        check_name(vg, "vg_name")
        if isinstance(lvs, str):
            raise InvalidParameter(field="lvs", reason="must be a list of LV names")
        if not lvs:
            raise InvalidParameter(field="lvs", reason="must not be empty")
        return [f"{vg}/{check_name(lv, 'lv_name')}" for lv in lvs]

    def _known_devices(self, devices: Sequence[str]) -> list[str]:
        if isinstance(devices, str):
            raise InvalidParameter(field="devices", reason="must be a list of paths")
        if not devices:
            raise InvalidParameter(field="devices", reason="must not be empty")
        devs = [check_device(d, "devices") for d in devices]
        if self._devices is not None:
            unknown = [d for d in devs if d not in self._devices]
            if unknown:
                raise InvalidParameter(field="devices",
                                       reason=f"not in this LVM's filter: {unknown}")
        return devs


def dm_name(vg: str, lv: str) -> str:
    """The device-mapper name of LV `vg/lv` (each '-' doubled)."""
    return f"{vg.replace('-', '--')}-{lv.replace('-', '--')}"


def _tag_args(add: Iterable[str], remove: Iterable[str]) -> list[str]:
    added = _tags(add, "add_tags")
    removed = _tags(remove, "remove_tags")
    if not added and not removed:
        raise InvalidParameter(field="tags", reason="nothing to add or remove")
    both = set(added) & set(removed)
    if both:
        # LVM would apply --deltag last and drop the tag: refuse the ambiguity.
        raise InvalidParameter(field="tags", reason=f"added and removed at once: {sorted(both)}")
    args = []
    for tag in removed:
        args += ["--deltag", tag]
    for tag in added:
        args += ["--addtag", tag]
    return args
