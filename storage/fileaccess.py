"""Access checks on storage that may hang: run in a child process with a
deadline, so a dead NFS server costs a timeout, never a blocked agent."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Final, Literal

from storage import commands
from storage.errors import (
    ResourceTimeout,
    StorageServerAccessPermissionError,
    StorageServerConnectionError,
)

# Runs in the child: write, fsync, read back and remove a small file in the
# directory given as argv[1]. Exit 13 on EACCES/EPERM/EROFS, 28 when the file
# system is full (ENOSPC, EDQUOT at any step; the directory is then listed,
# to prove it answers), 1 on other errors.
_CHECK_RW = r"""
import errno, os, sys, uuid
directory = sys.argv[1]
path = os.path.join(directory, ".hostagent-check-" + uuid.uuid4().hex)
data = os.urandom(4096)
error = back = None
created = False
try:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    created = True
    try:
        if os.write(fd, data) != len(data):
            raise OSError(errno.ENOSPC, "short write")
        os.fsync(fd)
        os.lseek(fd, 0, 0)
        back = os.read(fd, 4096)
    finally:
        os.close(fd)
except OSError as e:
    error = e
if created:
    try:
        os.unlink(path)
    except OSError as e:
        error = error or e
if error is not None and error.errno in (errno.ENOSPC, errno.EDQUOT):
    try:
        os.listdir(directory)
    except OSError as e:
        error = e
    else:
        print(error, file=sys.stderr)
        sys.exit(28)
if error is not None:
    print(error, file=sys.stderr)
    sys.exit(13 if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS) else 1)
sys.exit(0 if back == data else 2)
"""

# Exit 0 if argv[1] is a readable directory, 13 if access is denied, 1 else.
_CHECK_DIR = r"""
import errno, os, sys
try:
    if not os.path.isdir(sys.argv[1]):
        print("not a directory", file=sys.stderr); sys.exit(1)
    os.listdir(sys.argv[1])
except OSError as e:
    print(e, file=sys.stderr)
    sys.exit(13 if e.errno in (errno.EACCES, errno.EPERM) else 1)
"""


Access = Literal["writable", "full"]
WRITABLE: Final = "writable"
FULL: Final = "full"
_RC_FULL = 28


async def check_read_write(path: str | Path, *, timeout: float,
                           runner: commands.Runner = commands.run) -> Access:
    """Prove the agent can create, write, read and delete a file in `path`:
    WRITABLE; or FULL when the storage answers but has no room for the file
    (ENOSPC or EDQUOT, recognised by errno): full, not lost."""
    rc = await _check(_CHECK_RW, path, timeout, runner, "read and write",
                      ok_rcs=(0, _RC_FULL))
    return FULL if rc == _RC_FULL else WRITABLE


async def check_directory(path: str | Path, *, timeout: float,
                          runner: commands.Runner = commands.run) -> None:
    """Prove `path` is a directory the agent can list."""
    await _check(_CHECK_DIR, path, timeout, runner, "list")


async def _check(script: str, path: str | Path, timeout: float, runner: commands.Runner,
                 what: str, ok_rcs: tuple[int, ...] = (0,)) -> int:
    try:
        r = await runner([sys.executable, "-I", "-c", script, str(path)], timeout=timeout,
                         ok_rcs=ok_rcs, rc_names={13: "permission denied"})
    except commands.CommandTimeout:
        raise ResourceTimeout(reason=f"cannot {what} {path}: no answer in {timeout:g} s") \
            from None
    except commands.CommandError as e:
        if e.rc == 13:
            raise StorageServerAccessPermissionError(path=str(path)) from None
        raise StorageServerConnectionError(
            reason=f"cannot {what} {path}: {e.err_text.strip() or f'rc={e.rc}'}") from None
    return r.rc
