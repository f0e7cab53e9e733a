"""mount(8)/umount(8) wrapper and the kernel's mount table.

The table is read from /proc/self/mountinfo: it comes from the kernel's
memory, so reading it never blocks on a hung NFS server (unlike stat() of
a mount point). Mount options from requests are checked against a small
grammar before they reach the command line.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from storage import commands
from storage.errors import InvalidParameter, MountError

MOUNTINFO = Path("/proc/self/mountinfo")
_OPTION = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:@+/-]*(=[A-Za-z0-9_.:@+/,=-]*)?$")
# Options that would change what mount(8) does rather than how it mounts.
_REFUSED = {"bind", "rbind", "move", "remount", "make-shared", "make-private", "make-slave",
            "make-rshared", "make-rprivate", "make-rslave", "helper", "uhelper"}
# libmount's own options (X-mount.mkdir, .owner, .mode, .subdir, .idmap...):
# they make mount(8) change the host, not the file system it mounts.
_REFUSED_PREFIXES = ("x-mount.",)
# File system types that make mount(8) run a program named by the request:
# mount.fuse (and mount.fuse3) runs PROG of type "fuse.PROG" or of a
# "PROG#spec" source through /bin/sh. Subtypes ("type.sub") exist only for
# such helpers, so any dotted type is refused too.
_PROGRAM_TYPE = re.compile(r"fuse|\.")


@dataclass(frozen=True)
class MountEntry:
    source: str
    target: str
    fstype: str
    options: str


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[MountEntry]:
    entries = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields = left.split()
        rest = right.split()
        if len(fields) < 6 or len(rest) < 2:
            continue
        entries.append(MountEntry(source=_unescape(rest[1]), target=_unescape(fields[4]),
                                  fstype=rest[0],
                                  options=f"{fields[5]},{rest[2] if len(rest) > 2 else ''}"))
    return entries


def mounts() -> list[MountEntry]:
    return parse_mountinfo(MOUNTINFO.read_text())


def find(target: str | Path) -> MountEntry | None:
    """The mount at `target` (the last one mounted there), if any."""
    target = str(target)
    found = None
    for entry in mounts():
        if entry.target == target:
            found = entry
    return found


def split_options(text: str, field: str = "mnt_options") -> list[str]:
    """Split and check a comma separated option string. Values may contain
    commas only as the last option (e.g. 'sec=sys'); each option must match
    a conservative grammar and must not change mount's mode of operation."""
    if not text:
        return []
    options = []
    for opt in text.split(","):
        opt = opt.strip()
        if not opt:
            raise InvalidParameter(field=field, reason="empty option")
        if not _OPTION.match(opt):
            raise InvalidParameter(field=field, reason=f"option {opt!r} is not allowed")
        name = opt.split("=", 1)[0]
        if name in _REFUSED or name.lower().startswith(_REFUSED_PREFIXES):
            raise InvalidParameter(field=field, reason=f"option {opt!r} is not allowed")
        options.append(opt)
    return options


def check_fstype(vfstype: str, field: str = "vfs_type") -> str:
    """Return `vfstype` if mount(8) may be given it, else raise."""
    commands.check_arg(vfstype, field)
    if _PROGRAM_TYPE.search(vfstype.lower()):
        raise InvalidParameter(field=field,
                               reason=f"{vfstype!r}: FUSE types and subtypes run a program, "
                                      "not allowed")
    return vfstype


async def mount(spec: str, target: str | Path, vfstype: str, options: Sequence[str] = (), *,
                timeout: float, runner: commands.Runner = commands.run) -> None:
    commands.check_arg(spec, "connection")
    check_fstype(vfstype)
    argv = ["mount", "-t", vfstype]
    if options:
        argv += ["-o", ",".join(options)]
    argv += [spec, str(target)]
    try:
        await runner(argv, timeout=timeout)
    except commands.CommandError as e:
        raise MountError(reason=e.fields["stderr"]) from None


async def umount(target: str | Path, *, timeout: float, lazy: bool = False,
                 force: bool = False, runner: commands.Runner = commands.run) -> None:
    argv = ["umount"]
    if lazy:
        argv.append("-l")
    if force:
        argv.append("-f")
    argv.append(str(target))
    try:
        await runner(argv, timeout=timeout)
    except commands.CommandError as e:
        raise MountError(reason=e.fields["stderr"]) from None
