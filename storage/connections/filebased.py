"""File connections: NFS and posixfs mounts, localfs directories.

Mount points (and localfs links) live under the storage root, named from
the remote spec by a reversible escaping, so the same export is always
mounted at the same place and two specs never share one. Only mounts this
agent made are ever unmounted: what connect did is recorded before it does it.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from storage import commands, fileaccess, mount
from storage.connections.base import FULL_MESSAGE, Connection
from storage.errors import (
    HostAgentError,
    InvalidParameter,
    MountError,
    StorageServerConnectionError,
    StorageServerDisconnectionError,
)

NFS_DEFAULT_TIMEO = 600  # deciseconds, as VDSM: 60 s per try
NFS_DEFAULT_RETRANS = 6
NFS_VERSIONS = {"3": "3", "4": "4", "4.0": "4.0", "4.1": "4.1", "4.2": "4.2"}
# Options the agent sets for NFS itself; a user option may not override them.
NFS_MANAGED = {"vers", "nfsvers", "timeo", "retrans", "soft", "hard", "nosharecache",
               "sharecache"}


def nfs_user_options(text: str) -> list[str]:
    """The user's NFS mount options, checked: none the agent sets itself."""
    user = mount.split_options(text)
    for opt in user:
        if opt.split("=", 1)[0] in NFS_MANAGED:
            raise InvalidParameter(
                field="mnt_options",
                reason=f"{opt!r} is set by the agent; use protocol_version, timeout, retrans")
    return user


# '%' and '_' percent-encoded, then '/' turned into '_': one name per spec,
# and a spec without '_' or '%' gets the name VDSM gives it.
_ESCAPES = {"%": "%25", "_": "%5F", "/": "_"}
_ESCAPED = re.compile(r"%([0-9A-F]{2})|_")
NAME_MAX = 255


def escape_spec(spec: str) -> str:
    """The file name under the storage root for `spec`; reversed by
    unescape_spec."""
    return "".join(_ESCAPES.get(c, c) for c in spec)


def unescape_spec(name: str) -> str:
    return _ESCAPED.sub(lambda m: chr(int(m.group(1), 16)) if m.group(1) else "/", name)


def mount_name(spec: str) -> str:
    """escape_spec(spec), refused when it cannot be a file name (a spec of up
    to 1024 bytes can give more than NAME_MAX)."""
    name = escape_spec(spec)
    size = len(name.encode("utf-8", "surrogateescape"))
    if size > NAME_MAX:
        raise InvalidParameter(field="connection",
                               reason=f"too long: its name under the storage root would be "
                                      f"{size} bytes, over {NAME_MAX}")
    return name


def legacy_escape_spec(spec: str) -> str:
    """VDSM's naming, used by this agent before: '_' doubled, '/' turned into
    '_'. Not reversible ('/a_/b' and '/a/_b' are both '_a___b'): only
    connections recorded under such a name keep it."""
    return spec.replace("_", "__").replace("/", "_")


def normalize_remote(spec: str) -> str:
    """'server:/a//b/' -> 'server:/a/b' so one export has one identity."""
    server, sep, path = spec.partition(":")
    if sep and path.startswith("/"):
        norm = posixpath.normpath(path)
        norm = "/" + norm.lstrip("/")
        return f"{server}:{norm}"
    return spec.rstrip("/") if len(spec) > 1 else spec


def _reachable(what: str, access: fileaccess.Access, details: dict[str, Any]
               ) -> dict[str, Any]:
    """testStorageConnection's answer for storage that answered: a full file
    system is reachable (and said to be full), not lost."""
    if access == fileaccess.FULL:
        return {"reachable": True, "message": f"{what}; {FULL_MESSAGE}",
                "details": {**details, "full": True}}
    return {"reachable": True, "message": f"{what}; read and write work",
            "details": {**details, "full": False}}


class FileBackend:
    """Shared by the three file types."""

    vfs_type = ""

    def __init__(self, storage_root: Path, tmp_dir: Path, *, mount_timeout: float,
                 io_timeout: float, runner: commands.Runner = commands.run) -> None:
        self.root = storage_root
        self.tmp_dir = tmp_dir
        self.mount_timeout = mount_timeout
        self.io_timeout = io_timeout
        self.runner = runner

    def spec(self, params: dict[str, Any]) -> str:
        return normalize_remote(str(params["connection"]))

    def target_key(self, params: dict[str, Any]) -> str:
        # The mount point identifies the target across nfs and posixfs.
        return "file:" + mount_name(self.spec(params))

    def local_path(self, conn: Connection) -> Path:
        spec = self.spec(conn.params)
        # A connection made before the escaping changed keeps the place it
        # was recorded at (a mount or link in use, paths handed out to VMs).
        recorded = conn.owned.get("mount_point") or conn.owned.get("link")
        if recorded:
            path = Path(recorded)
            if path.parent == self.root and path.name == legacy_escape_spec(spec):
                return path
        return self.root / mount_name(spec)


class MountBackend(FileBackend):
    """posixfs; NFS adds its options on top."""

    mounts = True  # local_path is this connection's own mount point

    def fstype(self, params: dict[str, Any]) -> str:
        return str(params["vfs_type"])

    def options(self, params: dict[str, Any]) -> list[str]:
        return mount.split_options(params.get("mnt_options") or "")

    async def connect(self, conn: Connection, save: Callable[[], None]) -> None:
        mnt = self.local_path(conn)
        entry = mount.find(mnt)
        if entry is not None and not conn.owned.get("mounted"):
            # Mounted by someone else (the admin, another tool): use it, never unmount it.
            conn.owned = {"mount_point": str(mnt), "mounted": False}
            await self._check_access(conn, mnt)
            return
        conn.owned = {"mount_point": str(mnt), "mounted": True}
        save()
        mnt.mkdir(parents=True, exist_ok=True)
        if entry is None:
            await mount.mount(self.spec(conn.params), mnt, self.fstype(conn.params),
                              self.options(conn.params), timeout=self.mount_timeout,
                              runner=self.runner)
        conn.owned = {"mount_point": str(mnt), "mounted": True,
                      "details": self._details(mnt)}
        try:
            await self._check_access(conn, mnt)
        except BaseException:
            with contextlib.suppress(HostAgentError):
                await self._unmount(mnt)
            raise

    async def _check_access(self, conn: Connection, mnt: Path) -> None:
        conn.full = await fileaccess.check_read_write(
            mnt, timeout=self.io_timeout, runner=self.runner) == fileaccess.FULL

    def _details(self, mnt: Path) -> dict[str, Any]:
        entry = mount.find(mnt)
        if entry is None:
            return {}
        return {"source": entry.source, "fstype": entry.fstype, "options": entry.options}

    async def _unmount(self, mnt: Path) -> None:
        if mount.find(mnt) is not None:
            try:
                await mount.umount(mnt, timeout=self.mount_timeout, runner=self.runner)
            except MountError as e:
                raise StorageServerDisconnectionError(reason=e.fields["reason"]) from None
        with contextlib.suppress(OSError):
            mnt.rmdir()  # noqa: ASYNC240 - the mount point dir is local, not on storage

    async def disconnect(self, conn: Connection) -> None:
        mnt = self.local_path(conn)
        if conn.owned.get("mounted"):
            await self._unmount(mnt)

    async def check(self, conn: Connection) -> None:
        mnt = self.local_path(conn)
        if mount.find(mnt) is None:
            raise StorageServerConnectionError(reason=f"{mnt} is not mounted")
        await self._check_access(conn, mnt)

    def _mounted_at(self, params: dict[str, Any]) -> Path | None:
        """Where this target is mounted as a connection, if it is: under its
        name, or under its legacy name when that mount is of this spec."""
        spec = self.spec(params)
        path = self.root / escape_spec(spec)
        if mount.find(path) is not None:
            return path
        legacy = self.root / legacy_escape_spec(spec)
        entry = mount.find(legacy)
        if entry is not None and entry.source == spec:
            return legacy
        return None

    async def test(self, params: dict[str, Any]) -> dict[str, Any]:
        """A trial mount in a private temporary directory, always removed;
        an existing mount of the same target is only checked."""
        existing = self._mounted_at(params)
        if existing is not None:
            try:
                access = await fileaccess.check_read_write(existing, timeout=self.io_timeout,
                                                           runner=self.runner)
            except HostAgentError as e:
                # Connected, but the server does not answer (or refuses): the
                # answer to the question asked, not a failure of the call.
                return {"reachable": False, "message": e.message,
                        "details": {**self._details(existing), "code": e.code,
                                    "name": e.name}}
            return _reachable("connected", access, self._details(existing))
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        trial = Path(tempfile.mkdtemp(prefix="test-", dir=self.tmp_dir))
        try:
            await mount.mount(self.spec(params), trial, self.fstype(params),
                              self.options(params), timeout=self.mount_timeout,
                              runner=self.runner)
            try:
                details = self._details(trial)
                access = await fileaccess.check_read_write(trial, timeout=self.io_timeout,
                                                           runner=self.runner)
            finally:
                await mount.umount(trial, timeout=self.mount_timeout, runner=self.runner)
        except HostAgentError as e:
            return {"reachable": False, "message": e.message,
                    "details": {"code": e.code, "name": e.name}}
        finally:
            if mount.find(trial) is None:
                with contextlib.suppress(OSError):
                    trial.rmdir()  # noqa: ASYNC240 - local, not on storage
        return _reachable("mounted", access, details)


class PosixfsBackend(MountBackend):
    pass


class NfsBackend(MountBackend):
    def fstype(self, params: dict[str, Any]) -> str:
        return "nfs"

    def options(self, params: dict[str, Any]) -> list[str]:
        user = nfs_user_options(params.get("mnt_options") or "")
        timeo = params.get("timeout") or NFS_DEFAULT_TIMEO
        retrans = params.get("retrans") or NFS_DEFAULT_RETRANS
        # soft with bounded timeo/retrans: a dead server fails I/O in bounded
        # time instead of hanging it forever; nosharecache: each export keeps
        # its own options even when the server is mounted twice.
        opts = ["soft", "nosharecache", f"timeo={timeo}", f"retrans={retrans}"]
        version = params.get("protocol_version") or "auto"
        if version != "auto":
            opts.append(f"vers={NFS_VERSIONS[version]}")
        return opts + user

    def _details(self, mnt: Path) -> dict[str, Any]:
        details = super()._details(mnt)
        m = re.search(r"(?:^|,)vers=([0-9.]+)", details.get("options", ""))
        if m:
            details["version"] = m.group(1)
        return details


class LocalfsBackend(FileBackend):
    """A local directory, linked in under the storage root."""

    def spec(self, params: dict[str, Any]) -> str:
        return posixpath.normpath(str(params["connection"]))

    async def connect(self, conn: Connection, save: Callable[[], None]) -> None:
        path = self.spec(conn.params)
        await fileaccess.check_directory(path, timeout=self.io_timeout, runner=self.runner)
        conn.full = await fileaccess.check_read_write(
            path, timeout=self.io_timeout, runner=self.runner) == fileaccess.FULL
        link = self.local_path(conn)
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink():
            if os.readlink(link) != path:
                link.unlink()
        elif link.exists():
            raise StorageServerConnectionError(reason=f"{link} exists and is not a link")
        conn.owned = {"link": str(link)}
        save()
        if not link.is_symlink():
            link.symlink_to(path)

    async def disconnect(self, conn: Connection) -> None:
        link = self.local_path(conn)
        if link.is_symlink():
            link.unlink()

    async def check(self, conn: Connection) -> None:
        link = self.local_path(conn)
        if not link.is_symlink():
            raise StorageServerConnectionError(reason=f"{link} is missing")
        conn.full = await fileaccess.check_read_write(
            self.spec(conn.params), timeout=self.io_timeout,
            runner=self.runner) == fileaccess.FULL

    async def test(self, params: dict[str, Any]) -> dict[str, Any]:
        path = self.spec(params)
        try:
            await fileaccess.check_directory(path, timeout=self.io_timeout,
                                             runner=self.runner)
            access = await fileaccess.check_read_write(path, timeout=self.io_timeout,
                                                       runner=self.runner)
        except HostAgentError as e:
            return {"reachable": False, "message": e.message,
                    "details": {"code": e.code, "name": e.name}}
        return _reachable("directory exists", access, {"path": path})
