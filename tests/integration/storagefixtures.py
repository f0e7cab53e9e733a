"""Host-tier building blocks: loop devices, file systems, mounts and a tgtd
iSCSI target, each made for one test and always cleaned up.

Plain classes, so a test can also drive them by hand (see test_host_smoke);
tests/integration/conftest.py wraps them in fixtures. Each records what it
made before the next step can fail, and its cleanup() tries every step and
reports all errors at the end.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

MiB = 1024 * 1024
GiB = 1024 * MiB

# mkfs.xfs refuses file systems smaller than 300 MiB; the backing file is
# sparse, so this costs only what mkfs writes.
DEFAULT_LOOP_SIZE = 512 * MiB

# tgtd's own name for it is /var/run/tgtd; /proc/PID/fd shows the resolved path.
TGTD_SOCKET_DIR = Path("/var/run/tgtd").resolve()


class CommandFailed(subprocess.CalledProcessError):
    """CalledProcessError whose str() shows what the tool said."""

    def __str__(self) -> str:
        argv = self.cmd if isinstance(self.cmd, str) else " ".join(map(str, self.cmd))
        err = (self.stderr or "").strip() or (self.output or "").strip()
        return f"{argv} failed with rc={self.returncode}: {err[-2000:]}"


class CleanupError(Exception):
    """One or more cleanup steps failed; every step was still tried."""


def cmd(*argv: str | os.PathLike[str], check: bool = True, input: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """Run a command for a test, capturing text output (LC_ALL=C; `env` is
    added to the environment). Raises CommandFailed (a CalledProcessError)
    when check and rc != 0.
    """
    args = [os.fspath(a) for a in argv]
    env = {**os.environ, **(env or {}), "LC_ALL": "C"}
    result = subprocess.run(args, input=input, capture_output=True, text=True, env=env,
                            timeout=timeout, check=False,
                            stdin=None if input is not None else subprocess.DEVNULL)
    if check and result.returncode != 0:
        raise CommandFailed(result.returncode, args, result.stdout, result.stderr)
    return result


def free_port() -> int:
    """A TCP port nobody listens on right now (from the ephemeral range, so never 3260)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(condition: str, predicate: Callable[[], bool], timeout: float,
             interval: float = 0.05) -> None:
    """Poll `predicate()` until true; AssertionError naming `condition` after timeout."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {condition}")
        time.sleep(interval)


def _within(path: str, root: Path) -> bool:
    return path == str(root) or path.startswith(str(root) + "/")


# --- loop devices -------------------------------------------------------------------------


def attached_loops() -> dict[Path, str]:
    """Every attached loop device and its backing file, from sysfs."""
    loops: dict[Path, str] = {}
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            name = backing.read_text().rstrip("\n")
        except OSError:  # detached while we looked
            continue
        loops[Path("/dev") / backing.parent.parent.name] = name.removesuffix(" (deleted)")
    return loops


class LoopDevices:
    """Loop devices over sparse files in `workdir`."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.devices: list[tuple[Path, Path]] = []
        self._files: list[Path] = []

    def make(self, size: int = DEFAULT_LOOP_SIZE, sector_size: int = 512) -> Path:
        """Attach a new loop device with `sector_size`-byte logical sectors; return its path."""
        if sector_size not in (512, 1024, 2048, 4096):
            raise ValueError(f"bad sector size {sector_size}")
        backing = self.workdir / f"loop{len(self._files)}-{sector_size}.img"
        self._files.append(backing)
        with open(backing, "wb") as f:
            f.truncate(size)
        out = cmd("losetup", "--find", "--show", "--sector-size", str(sector_size),
                  backing).stdout
        device = Path(out.strip())
        self.devices.append((device, backing))
        actual = int(cmd("blockdev", "--getss", device).stdout)
        if actual != sector_size:
            raise AssertionError(f"{device}: logical sector size {actual}, wanted {sector_size}")
        return device

    def cleanup(self) -> None:
        errors: list[str] = []
        for device, backing in reversed(self.devices):
            try:
                detach_loop(device, backing)
            except Exception as e:
                errors.append(f"{device}: {e}")
        self.devices.clear()
        for path in self._files:
            path.unlink(missing_ok=True)
        self._files.clear()
        if errors:
            raise CleanupError("; ".join(errors))


def detach_loop(device: Path, backing: Path, timeout: float = 10.0) -> None:
    """Detach `device` if it still serves `backing`, and wait until it is gone.

    `losetup -d` on a device someone still holds open (udev's blkid, a lazy
    unmount) only sets autoclear and succeeds; the device goes when the last
    user closes it. A device that was already freed may have been reused by
    another test on this host, so check the backing file first.
    """
    def ours() -> bool:
        return attached_loops().get(device) == str(backing)

    if not ours():
        return
    deadline = time.monotonic() + timeout
    while True:
        result = cmd("losetup", "--detach", device, check=False)
        try:
            wait_for(f"{device} to detach", lambda: not ours(), timeout=1.0)
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{device} still attached to {backing} after {timeout} s"
                    f" (losetup: {result.stderr.strip() or 'ok'}; open by: {openers(device)})"
                ) from None


def openers(device: Path) -> list[str]:
    """Who keeps a block device open: holders (device mapper...) and processes."""
    found = [f"holder {h.name}" for h in Path(f"/sys/block/{device.name}/holders").glob("*")]
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if any(os.readlink(fd) == str(device) for fd in (proc / "fd").iterdir()):
                found.append(f"pid {proc.name} ({(proc / 'comm').read_text().strip()})")
        except OSError:
            continue
    return found


# --- file systems and mounts --------------------------------------------------------------


def make_fs(device: str | os.PathLike[str], fstype: str) -> None:
    """Make an ext4 or xfs file system on `device` (whatever was there is lost)."""
    if fstype == "ext4":
        cmd("mkfs.ext4", "-q", "-F", device)
    elif fstype == "xfs":
        cmd("mkfs.xfs", "-q", "-f", device)
    else:
        raise ValueError(f"unsupported file system {fstype!r}")


def _unescape_mount_field(field: str) -> str:
    # /proc/mounts writes space, tab, newline and backslash as \ooo.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounted() -> list[tuple[str, str, str]]:
    """(source, mountpoint, fstype) of every mount, in mount order."""
    entries = []
    with open("/proc/self/mounts") as f:
        for line in f:
            source, target, fstype = line.split()[:3]
            entries.append((_unescape_mount_field(source), _unescape_mount_field(target),
                            fstype))
    return entries


def is_mounted(path: Path) -> bool:
    return any(target == str(path) for _, target, _ in mounted())


def unmount(path: Path, busy_timeout: float = 3.0) -> None:
    """Unmount `path` (every mount stacked on it). A busy mount is retried
    for a while, then detached lazily with `umount -l`."""
    deadline = time.monotonic() + busy_timeout
    while is_mounted(path):
        result = cmd("umount", path, check=False)
        if result.returncode == 0:
            continue
        if time.monotonic() < deadline and "busy" in result.stderr:
            time.sleep(0.1)
            continue
        cmd("umount", "--lazy", path)


@dataclass(frozen=True)
class FsMount:
    """A mounted file system on a loop device, for tests that run on each kind."""

    path: Path
    device: Path
    fstype: str
    sector_size: int


class Mounts:
    """Mounts on fresh directories in `workdir`."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.mountpoints: list[Path] = []
        self._count = 0

    def mount(self, device: str | os.PathLike[str], fstype: str | None = None,
              options: Sequence[str] = ()) -> Path:
        """Mount `device` on a new directory and return the directory."""
        self._count += 1
        mountpoint = self.workdir / f"mnt{self._count}"
        mountpoint.mkdir()
        # Recorded first: cleanup removes the directory even if mount fails.
        self.mountpoints.append(mountpoint)
        argv: list[str | os.PathLike[str]] = ["mount"]
        if fstype:
            argv += ["-t", fstype]
        if options:
            argv += ["-o", ",".join(options)]
        cmd(*argv, device, mountpoint)
        return mountpoint

    def cleanup(self) -> None:
        errors: list[str] = []
        for mountpoint in reversed(self.mountpoints):
            try:
                unmount(mountpoint)
                if mountpoint.exists():
                    mountpoint.rmdir()
            except Exception as e:
                errors.append(f"{mountpoint}: {e}")
        self.mountpoints.clear()
        if errors:
            raise CleanupError("; ".join(errors))


# --- tgtd iSCSI target --------------------------------------------------------------------


@dataclass(frozen=True)
class IscsiLun:
    """A LUN served by a test's tgtd on 127.0.0.1."""

    host: str
    port: int
    iqn: str
    lun: int
    backing: Path
    size: int
    block_size: int

    @property
    def portal(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        """For qemu-img and libiscsi tools."""
        return f"iscsi://{self.host}:{self.port}/{self.iqn}/{self.lun}"


class TgtdStartError(Exception):
    pass


class Tgtd:
    """One tgtd serving iSCSI on 127.0.0.1:port.

    Several can run at once (parallel test sessions, the lab guest on 3260):
    each gets a free port, and a control port derived from it, which names
    its management socket /run/tgtd/socket.N (tgtd takes 1..32767; 0 is the
    system service's). A control port in use makes tgtd exit, and a portal
    that cannot bind does not stop it (it falls back to 0.0.0.0:3260), so
    start() checks both and retries on another port.
    """

    def __init__(self, workdir: Path, host: str = "127.0.0.1") -> None:
        self.workdir = workdir
        self.host = host
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.targets: list[int] = []
        self.luns: list[IscsiLun] = []
        self.log_path: Path | None = None
        self._files: list[Path] = []
        # True once our tgtd holds the control socket's lock: only then do
        # tgtadm commands reach it and not another tgtd on the same number.
        self._owned = False

    @property
    def control_port(self) -> int:
        return self.port % 32768

    def start(self, attempts: int = 5) -> None:
        error: Exception | None = None
        for _ in range(attempts):
            try:
                self._start(free_port())
                return
            except TgtdStartError as e:
                error = e
                self.stop()
        raise TgtdStartError(f"tgtd did not start in {attempts} attempts; last: {error}")

    def _start(self, port: int) -> None:
        self.port = port
        if self.control_port == 0:
            raise TgtdStartError("control port 0 belongs to the system's tgtd")
        self.log_path = self.workdir / f"tgtd-{port}.log"
        with open(self.log_path, "wb") as log:
            # Own session: a ^C for pytest must not kill it before stop() runs.
            self.proc = subprocess.Popen(
                ["tgtd", "--foreground", "--control-port", str(self.control_port),
                 "--iscsi", f"portal={self.host}:{port}"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
        deadline = time.monotonic() + 10
        while True:
            if self.proc.poll() is not None:
                raise TgtdStartError(f"tgtd exited with rc={self.proc.returncode}: "
                                     f"{self.log_path.read_text(errors='replace')[-500:]}")
            self._owned = self._owned or self._holds_lock()
            if (self._owned
                    and self.tgtadm("--op", "show", "--mode", "system",
                                    check=False).returncode == 0):
                break
            if time.monotonic() > deadline:
                raise TgtdStartError("tgtd did not answer tgtadm within 10 s")
            time.sleep(0.05)
        portals = self.tgtadm("--lld", "iscsi", "--op", "show", "--mode", "portal").stdout
        if f"Portal: {self.host}:{port}," not in portals:
            raise TgtdStartError(f"tgtd could not bind {self.host}:{port}: {portals!r}")

    def _holds_lock(self) -> bool:
        assert self.proc is not None
        lock = str(TGTD_SOCKET_DIR / f"socket.{self.control_port}.lock")
        try:
            fds = list(Path(f"/proc/{self.proc.pid}/fd").iterdir())
            return any(os.readlink(fd) == lock for fd in fds)
        except OSError:  # exited
            return False

    def tgtadm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return cmd("tgtadm", "--control-port", str(self.control_port), *args, check=check,
                   timeout=30)

    def add_lun(self, backing: Path | None = None, size: int = 64 * MiB,
                iqn: str | None = None, block_size: int = 512) -> IscsiLun:
        """A new target with LUN 1 on `backing` (a file or block device; by default a
        new sparse file of `size` bytes), open to every initiator, reporting
        `block_size`-byte logical blocks (tgtd's own choice is 512 whatever
        the backing store)."""
        tid = len(self.targets) + 1
        iqn = iqn or f"iqn.2024-01.org.hostagent.test:p{self.port}-t{tid}"
        if backing is None:
            backing = self.workdir / f"lun-{self.port}-{tid}.img"
            self._files.append(backing)
            with open(backing, "wb") as f:
                f.truncate(size)
        self.tgtadm("--lld", "iscsi", "--op", "new", "--mode", "target", "--tid", str(tid),
                    "--targetname", iqn)
        self.targets.append(tid)
        self.tgtadm("--lld", "iscsi", "--op", "new", "--mode", "logicalunit", "--tid",
                    str(tid), "--lun", "1", "--backing-store", str(backing),
                    "--blocksize", str(block_size))
        self.tgtadm("--lld", "iscsi", "--op", "bind", "--mode", "target", "--tid", str(tid),
                    "--initiator-address", "ALL")
        size = _device_size(backing)
        lun = IscsiLun(self.host, self.port, iqn, 1, backing, size, block_size)
        self.luns.append(lun)
        return lun

    def stop(self) -> None:
        """Stop tgtd and remove what it left in /run/tgtd.

        tgtd ignores SIGTERM; it exits on `--op delete --mode system`, which
        it refuses while it has targets, so those go first (--force: even
        with sessions logged in).
        """
        proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            if proc.poll() is None and self._owned:
                for tid in reversed(self.targets):
                    self.tgtadm("--lld", "iscsi", "--op", "delete", "--force", "--mode",
                                "target", "--tid", str(tid), check=False)
                self.tgtadm("--op", "delete", "--mode", "system", check=False)
                proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass  # tgtadm or tgtd hung: killed below
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
            self.targets.clear()
            if self._owned:
                for name in (f"socket.{self.control_port}",
                             f"socket.{self.control_port}.lock"):
                    (TGTD_SOCKET_DIR / name).unlink(missing_ok=True)
            self._owned = False
        self.luns.clear()
        for path in self._files:
            path.unlink(missing_ok=True)
        self._files.clear()


def _device_size(path: Path) -> int:
    if path.is_block_device():
        return int(cmd("blockdev", "--getsize64", path).stdout)
    return path.stat().st_size


def qemu_img_has_iscsi() -> bool:
    """qemu-img's iSCSI driver is a module (Debian: qemu-block-extra)."""
    result = cmd("qemu-img", "info", "iscsi://127.0.0.1:1/iqn.2024-01.invalid:probe/0",
                 check=False, timeout=30)
    return "Unknown protocol" not in result.stderr


# --- leftovers ----------------------------------------------------------------------------


@dataclass
class Leftovers:
    loops: list[tuple[Path, str]]
    mounts: list[str]
    processes: list[tuple[int, str]]

    def __bool__(self) -> bool:
        return bool(self.loops or self.mounts or self.processes)


def _processes_using(root: Path) -> Iterator[tuple[int, str]]:
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            links = [proc / "cwd", *(proc / "fd").iterdir()]
            for link in links:
                if _within(os.readlink(link), root):
                    yield int(proc.name), (proc / "comm").read_text().strip()
                    break
        except OSError:  # gone, or a kernel thread
            continue


def find_leftovers(root: Path) -> Leftovers:
    """Loop devices backed by files under `root`, mounts under it, and processes
    with a file or their cwd there."""
    return Leftovers(
        loops=[(dev, back) for dev, back in attached_loops().items() if _within(back, root)],
        mounts=[target for _, target, _ in mounted() if _within(target, root)],
        processes=list(_processes_using(root)),
    )


def force_cleanup(leftovers: Leftovers) -> None:
    """Best effort for what a broken fixture left: lazy unmounts, then detaches.
    Processes are only reported, never killed here."""
    for target in reversed(leftovers.mounts):
        cmd("umount", "--lazy", target, check=False)
    for device, _ in leftovers.loops:
        cmd("losetup", "--detach", device, check=False)

