"""A FUSE file system whose operations can be made to hang (hangfs.c), for
tests of the agent on storage that stops answering.

`build(dest)` compiles the helper (gcc and libfuse3-dev, in TEST_DEBS);
`HangFs(workdir, binary)` mounts a passthrough of `workdir/hangfs-backing` on
`workdir/hangfs`; `hang()` makes every new operation block (`hang_writes()`
those that change something), `release()` lets them all go on. `stop()`
always leaves nothing behind: it releases first (callers blocked in the
kernel finish), unmounts (lazily if busy) and ends the daemon; killing the
daemon also fails whatever still waits on it.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import time
from pathlib import Path

from tests.conftest import missing, require_tools
from tests.integration.storagefixtures import cmd, is_mounted, unmount

SOURCE = Path(__file__).resolve().parent / "hangfs.c"
# Where libfuse3-dev puts them, for hosts without pkg-config.
FALLBACK_FLAGS = ["-I/usr/include/fuse3", "-lfuse3", "-lpthread"]


def build(dest: Path) -> Path:
    """Compile hangfs.c into `dest`; skips (fails under CI) without the tools."""
    require_tools("gcc")
    if not os.path.exists("/dev/fuse"):
        missing("no /dev/fuse (the fuse kernel module is not loaded)")
    if not Path("/usr/include/fuse3/fuse.h").exists():
        missing("fuse3 headers missing (Debian package libfuse3-dev)")
    flags = FALLBACK_FLAGS
    if shutil.which("pkg-config"):
        r = cmd("pkg-config", "--cflags", "--libs", "fuse3", check=False)
        if r.returncode == 0:
            flags = r.stdout.split()
    binary = dest / "hangfs"
    cmd("gcc", "-Wall", "-Wextra", "-Werror", "-O2", "-o", binary, SOURCE, *flags,
        timeout=60)
    return binary


class HangFs:
    def __init__(self, workdir: Path, binary: Path) -> None:
        self.backing = workdir / "hangfs-backing"
        self.mountpoint = workdir / "hangfs"
        self.binary = binary
        self.log_path = workdir / "hangfs.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._out = b""

    def start(self, timeout: float = 10.0) -> HangFs:
        self.backing.mkdir()
        self.mountpoint.mkdir()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([self.binary, self.backing, self.mountpoint],
                                         stdout=subprocess.PIPE, stderr=log,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        self._expect("ready", timeout)
        deadline = time.monotonic() + timeout
        while not is_mounted(self.mountpoint):
            if time.monotonic() > deadline:
                raise AssertionError(f"hangfs not mounted on {self.mountpoint}")
            time.sleep(0.02)
        return self

    def _expect(self, word: str, timeout: float) -> None:
        """Wait for the daemon to print `word` on a line of its own."""
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while True:
            lines = self._out.split(b"\n")
            if word.encode() in lines[:-1]:
                # Consume through that line, so the next switch needs its own answer.
                idx = lines.index(word.encode())
                self._out = b"\n".join(lines[idx + 1:])
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"hangfs did not say {word!r} in {timeout} s; "
                                     f"log: {self.log()}")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 4096)
                if not chunk:
                    raise AssertionError(f"hangfs exited ({self.proc.wait()}) before "
                                         f"saying {word!r}; log: {self.log()}")
                self._out += chunk

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except FileNotFoundError:
            return ""

    def _signal(self, sig: int, answer: str) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)
        self._expect(answer, 5.0)

    def hang(self) -> None:
        """From now on every operation on the mount blocks."""
        self._signal(signal.SIGUSR1, "hung")

    def hang_writes(self) -> None:
        """From now on every operation that changes something blocks (a
        write, a sync, a create, a rename, a removal, a truncation); reads,
        and opens for writing, are served."""
        self._signal(signal.SIGHUP, "hung writes")

    def release(self) -> None:
        """Blocked operations go on; new ones are served again."""
        if self.proc is not None and self.proc.poll() is None:
            self._signal(signal.SIGUSR2, "released")

    def stop(self) -> None:
        errors = []
        if self.proc is not None:
            try:
                self.release()
            except Exception as e:
                errors.append(f"release: {e}")
        try:
            unmount(self.mountpoint)
        except Exception as e:
            errors.append(f"unmount: {e}")
            cmd("umount", "--lazy", self.mountpoint, check=False)
        if self.proc is not None:
            # Unmounted, the daemon exits by itself; a dead daemon aborts the
            # FUSE connection, which fails every request still waiting on it.
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            if self.proc.stdout is not None:
                self.proc.stdout.close()
            self.proc = None
        if is_mounted(self.mountpoint):
            cmd("umount", "--lazy", self.mountpoint, check=False)
        if self.mountpoint.exists():
            try:
                self.mountpoint.rmdir()
            except OSError as e:
                errors.append(f"rmdir: {e}")
        if errors:
            raise AssertionError("hangfs cleanup: " + "; ".join(errors))
