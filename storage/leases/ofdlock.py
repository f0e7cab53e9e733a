"""OFD byte-range locks on one byte of a file: the primitives of the local lock
backend (local.py), run in the agent's IOPool or in the lock holder process
(lockholder.py). Blocking calls: never on the event loop.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

# struct flock {short l_type; short l_whence; off_t l_start; off_t l_len; pid_t l_pid;}
# on 64-bit Linux: native alignment pads after l_whence and at the end (32 bytes).
FLOCK = struct.Struct("@hhqqi4x")


def _flock(kind: int, offset: int) -> bytes:
    # l_pid must be 0 for OFD requests
    return FLOCK.pack(kind, os.SEEK_SET, offset, 1, 0)


def try_lock(path: str, offset: int) -> int | None:
    """Open path and take a write lock on byte `offset`: the fd, or None
    when another open file holds a conflicting lock (blocking: IOPool)."""
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _flock(fcntl.F_WRLCK, offset))
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EAGAIN, errno.EACCES):
            return None
        raise
    except BaseException:
        os.close(fd)
        raise
    return fd


def lock_visible(path: str, offset: int) -> bool:
    """True if some open file holds a lock on byte `offset` of path, as seen
    from a new open file (ours conflicts with it, so it shows)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        out = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _flock(fcntl.F_WRLCK, offset))
    finally:
        os.close(fd)
    kind = FLOCK.unpack(out)[0]
    return bool(kind != fcntl.F_UNLCK)
