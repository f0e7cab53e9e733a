"""Storage services for the lab guest: tools, daemons and their clean-up.

Runs inside the User-Mode Linux guest only (tests/lab/conftest.py checks it):
everything here writes to /etc, loads kernel modules and starts daemons, which
the guest's copy-on-write overlays and private tmpfs make harmless. Every tool
is called with an argument list; every daemon runs in the foreground under a
`Daemon`, with its output in LOG_DIR, so a test run can always stop it by pid.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import mmap
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

LOG_DIR = Path(os.environ.get("LAB_LOG_DIR") or "/tmp/lab-logs")
IQN_BASE = "iqn.2024-01.lab.local"
PORTALS = ("127.0.0.1:3260", "127.0.0.2:3260")
PYLIB = Path(__file__).resolve().parent / "vm" / "pylib"
TOOL_ENV = {"LVM_SUPPRESS_FD_WARNINGS": "1"}

Arg = str | os.PathLike[str]


class CommandError(RuntimeError):
    def __init__(self, argv: Sequence[str], rc: int, stdout: str, stderr: str) -> None:
        self.argv, self.rc, self.stdout, self.stderr = list(argv), rc, stdout, stderr
        out = (stderr.strip() or stdout.strip())[-2000:]
        super().__init__(f"{' '.join(argv)}: exit status {rc}\n{out}")


def in_guest() -> bool:
    """True inside the lab's UML guest (not merely with LAB_GUEST set)."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "User Mode Linux" in cpuinfo and Path("/run/lab/cmd.sh").exists()


def run(*argv: Arg, check: bool = True, timeout: float = 60,
        input: str | None = None) -> str:
    """Run a tool; return its stdout, raise CommandError on failure."""
    args = [os.fspath(a) for a in argv]
    stdin = None if input is not None else subprocess.DEVNULL   # never the console
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, input=input,
                          stdin=stdin, env={**os.environ, **TOOL_ENV})
    if check and proc.returncode != 0:
        raise CommandError(args, proc.returncode, proc.stdout, proc.stderr)
    return proc.stdout


def run_ok(*argv: Arg, timeout: float = 60) -> bool:
    """Run a tool; True if it exited 0 (for probes and best-effort clean-up)."""
    try:
        run(*argv, timeout=timeout)
    except (CommandError, subprocess.TimeoutExpired):
        return False
    return True


def wait_until(probe: Callable[[], T | None], what: str, timeout: float = 30,
               interval: float = 0.1) -> T:
    """Call probe until it returns something truthy; return that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def modprobe(*modules: str) -> None:
    run("modprobe", "-a", *modules)


class Cleanup:
    """LIFO stack of clean-up steps; every step runs even if an earlier one fails."""

    def __init__(self) -> None:
        self._steps: list[tuple[str, Callable[[], object]]] = []

    def push(self, what: str, step: Callable[[], object]) -> None:
        self._steps.append((what, step))

    def run(self) -> None:
        errors: list[str] = []
        while self._steps:
            what, step = self._steps.pop()
            try:
                step()
            except Exception as e:
                errors.append(f"{what}: {e}")
        if errors:
            raise RuntimeError("clean-up failed:\n" + "\n".join(errors))


# ---- daemons -------------------------------------------------------------------------

class Daemon:
    """A daemon run in the foreground, output to LOG_DIR/<name>.log."""

    def __init__(self, name: str, argv: Sequence[Arg]) -> None:
        self.name = name
        self.argv = [os.fspath(a) for a in argv]
        self.log_path = LOG_DIR / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Daemon:
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"==== {time.strftime('%H:%M:%S')} {' '.join(self.argv)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True,
                                         env={**os.environ, **TOOL_ENV})
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check_alive(self) -> bool:
        """For wait_until probes: raise if the daemon already died."""
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with status {self.proc.returncode}; "
                               f"log:\n{self.log_tail()}")
        return True

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int | None:
        """Signal the daemon and wait; SIGKILL after timeout. Returns its status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


# ---- block and file systems ----------------------------------------------------------

@dataclasses.dataclass
class LoopFs:
    """A file system on a loop device over a sparse file (supports O_DIRECT,
    unlike the guest's tmpfs and the hostfs shares)."""

    image: Path
    mountpoint: Path
    size: int = 256 << 20
    fstype: str = "ext4"
    device: str = ""

    def create(self) -> LoopFs:
        modprobe("loop")
        self.image.parent.mkdir(parents=True, exist_ok=True)
        with open(self.image, "wb") as f:
            f.truncate(self.size)
        self.device = run("losetup", "--find", "--show", self.image).strip()
        try:
            mkfs = ["mkfs.ext4", "-q", "-F"] if self.fstype == "ext4" else ["mkfs.xfs", "-q", "-f"]
            run(*mkfs, self.device)
            self.mountpoint.mkdir(parents=True, exist_ok=True)
            run("mount", "-t", self.fstype, self.device, self.mountpoint)
        except Exception:
            self.destroy()
            raise
        return self

    def destroy(self) -> None:
        if os.path.ismount(self.mountpoint):
            run("umount", self.mountpoint)
        if self.device:
            run("losetup", "-d", self.device)
            self.device = ""
        self.image.unlink(missing_ok=True)


def direct_write(path: Arg, data: bytes, offset: int = 0) -> None:
    """Write data (a multiple of 4 KiB) with O_DIRECT from an aligned buffer."""
    assert len(data) % 4096 == 0 and offset % 4096 == 0
    buf = mmap.mmap(-1, len(data))
    try:
        buf.write(data)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
        try:
            assert os.pwrite(fd, buf, offset) == len(data)
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        buf.close()


def direct_read(path: Arg, size: int, offset: int = 0) -> bytes:
    """Read size bytes (a multiple of 4 KiB) with O_DIRECT into an aligned buffer."""
    assert size % 4096 == 0 and offset % 4096 == 0
    buf = mmap.mmap(-1, size)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        try:
            got = os.preadv(fd, [buf], offset)
        finally:
            os.close(fd)
        return bytes(buf[:got])
    finally:
        buf.close()


# ---- iSCSI target: tgtd --------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Chap:
    """CHAP credentials; with in_username/in_password the target authenticates
    itself to the initiator too (mutual CHAP)."""

    username: str
    password: str
    in_username: str = ""
    in_password: str = ""


@dataclasses.dataclass
class Lun:
    number: int
    path: Path
    size: int


@dataclasses.dataclass
class Target:
    tid: int
    iqn: str
    luns: list[Lun]
    chap: Chap | None = None


class TargetServer:
    """tgtd listening on every portal, exporting plain files as LUNs.

    Files, not loop devices: target and initiator share one kernel, and the
    initiator's LVM would see a PV on a loop-backed LUN twice (loop and sdX).
    """

    def __init__(self, lun_dir: Path, portals: Sequence[str] = PORTALS) -> None:
        self.lun_dir = lun_dir
        self.portals = tuple(portals)
        self.daemon = Daemon("tgtd", ["tgtd", "-f", "--iscsi", f"portal={self.portals[0]}"])
        self.targets: dict[int, Target] = {}
        self._next_tid = 1

    def tgtadm(self, *args: str) -> str:
        return run("tgtadm", "--lld", "iscsi", *args)

    def start(self) -> TargetServer:
        self.lun_dir.mkdir(parents=True, exist_ok=True)
        self.daemon.start()
        wait_until(lambda: self.daemon.check_alive() and run_ok(
            "tgtadm", "--lld", "iscsi", "--op", "show", "--mode", "sys"), "tgtd", 15)
        for portal in self.portals[1:]:
            self.tgtadm("--op", "new", "--mode", "portal", "--param", f"portal={portal}")
        return self

    def create_target(self, name: str, lun_sizes: Iterable[int],
                      chap: Chap | None = None,
                      block_sizes: Iterable[int] = (), lun_dir: Path | None = None) -> Target:
        """Export a new target NAME with one sparse file LUN per size (LUN 1..n);
        `block_sizes`, one per LUN, are their logical block sizes (default 512);
        the LUN files go in `lun_dir` (default: the server's, on the guest's
        small tmpfs)."""
        sizes = list(lun_sizes)
        blocks = list(block_sizes) or [512] * len(sizes)
        tid = self._next_tid
        self._next_tid += 1
        target = Target(tid, f"{IQN_BASE}:{name}", [], chap)
        self.tgtadm("--op", "new", "--mode", "target", "--tid", str(tid), "-T", target.iqn)
        self.targets[tid] = target
        for number, (size, block) in enumerate(zip(sizes, blocks, strict=True), start=1):
            path = (lun_dir or self.lun_dir) / f"t{tid}-lun{number}.img"
            with open(path, "wb") as f:
                f.truncate(size)
            self.tgtadm("--op", "new", "--mode", "logicalunit", "--tid", str(tid),
                        "--lun", str(number), "-b", str(path), "--blocksize", str(block))
            self.tgtadm("--op", "update", "--mode", "logicalunit", "--tid", str(tid),
                        "--lun", str(number), "--params", f"scsi_sn=LAB{tid:04d}{number:04d}")
            target.luns.append(Lun(number, path, size))
        if chap is not None:
            self._add_account(tid, chap.username, chap.password)
            if chap.in_username:
                self._add_account(tid, chap.in_username, chap.in_password, outgoing=True)
        self.tgtadm("--op", "bind", "--mode", "target", "--tid", str(tid), "-I", "ALL")
        return target

    def grow_lun(self, target: Target, number: int, size: int) -> None:
        """What an array does when its admin grows a LUN: the file made
        `size` bytes, and the LU deleted and added again with the same file
        and serial (tgtd reads a backing file's size only when the LU is
        made; `--op update --params path=` is refused for a disk: found in
        the lab). The SCSI id follows the target and LUN numbers, so the
        initiator sees the same WWID, larger once it rescans."""
        lun = next(x for x in target.luns if x.number == number)
        block = 512
        for line in self.tgtadm("--op", "show", "--mode", "target").splitlines():
            if "Backing store path:" in line and line.split(":", 1)[1].strip() == str(lun.path):
                break
            if line.strip().startswith("Size:") and "Block size:" in line:
                block = int(line.rsplit(":", 1)[1])
        os.truncate(lun.path, size)
        lu = ("--tid", str(target.tid), "--lun", str(number))
        self.tgtadm("--op", "delete", "--mode", "logicalunit", *lu)
        self.tgtadm("--op", "new", "--mode", "logicalunit", *lu, "-b", str(lun.path),
                    "--blocksize", str(block))
        self.tgtadm("--op", "update", "--mode", "logicalunit", *lu, "--params",
                    f"scsi_sn=LAB{target.tid:04d}{number:04d}")
        lun.size = size

    def lun_scsi_id(self, tid: int, lun: int) -> str:
        """The SCSI ID tgtd gives a LUN ('IET     00010001'): the NAA WWID the
        initiator sees is derived from it."""
        out = self.tgtadm("--op", "show", "--mode", "target")
        target = lun_no = None
        for line in out.splitlines():
            if line.startswith("Target "):
                target = int(line.split()[1].rstrip(":"))
            elif line.strip().startswith("LUN:"):
                lun_no = int(line.split(":")[1])
            elif line.strip().startswith("SCSI ID:") and (target, lun_no) == (tid, lun):
                return line.split(":", 1)[1].lstrip(" ")
        raise KeyError(f"no LUN {lun} in target {tid}")

    def create_replica(self, name: str, source: Target) -> Target:
        """A new target exporting copies of source's LUN files under the same
        SCSI ids and serials, so its LUNs have the same WWIDs: what a host sees
        of a replicated array (the fail-over target of an edited connection).
        Copy while nothing writes to the source."""
        tid = self._next_tid
        self._next_tid += 1
        target = Target(tid, f"{IQN_BASE}:{name}", [], None)
        self.tgtadm("--op", "new", "--mode", "target", "--tid", str(tid), "-T", target.iqn)
        self.targets[tid] = target
        for lun in source.luns:
            path = self.lun_dir / f"t{tid}-lun{lun.number}.img"
            run("cp", "--sparse=always", lun.path, path)
            self.tgtadm("--op", "new", "--mode", "logicalunit", "--tid", str(tid),
                        "--lun", str(lun.number), "-b", str(path))
            scsi_id = self.lun_scsi_id(source.tid, lun.number)
            self.tgtadm("--op", "update", "--mode", "logicalunit", "--tid", str(tid),
                        "--lun", str(lun.number), "--params",
                        f"scsi_id={scsi_id},scsi_sn=LAB{source.tid:04d}{lun.number:04d}")
            target.luns.append(Lun(lun.number, path, lun.size))
        self.tgtadm("--op", "bind", "--mode", "target", "--tid", str(tid), "-I", "ALL")
        return target

    def _add_account(self, tid: int, user: str, password: str, outgoing: bool = False) -> None:
        self.tgtadm("--op", "new", "--mode", "account", "--user", user, "--password", password)
        self.tgtadm("--op", "bind", "--mode", "account", "--tid", str(tid), "--user", user,
                    *(["--outgoing"] if outgoing else []))

    def delete_target(self, target: Target) -> None:
        # --force: drop the target even with initiators still logged in
        self.tgtadm("--op", "delete", "--mode", "target", "--tid", str(target.tid), "--force")
        if target.chap is not None:
            for user in (target.chap.username, target.chap.in_username):
                if user:
                    self.tgtadm("--op", "delete", "--mode", "account", "--user", user)
        for lun in target.luns:
            lun.path.unlink(missing_ok=True)
        del self.targets[target.tid]

    def stop(self) -> None:
        # tgtd ignores SIGTERM while it has targets: delete them, then the system
        steps = Cleanup()
        steps.push("stop tgtd", self.daemon.stop)
        if self.daemon.alive():
            steps.push("tgtadm delete system", lambda: run_ok(
                "tgtadm", "--op", "delete", "--mode", "system", "--force"))
            for target in list(self.targets.values()):
                steps.push(f"delete target {target.iqn}",
                           functools.partial(self.delete_target, target))
        steps.run()


# ---- iSCSI initiator: open-iscsi -----------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Session:
    sid: int
    iqn: str
    portal: str
    disks: tuple[str, ...]   # sdX names of the session's LUNs


class Initiator:
    """iscsid plus iscsiadm node/session handling."""

    def __init__(self) -> None:
        self.daemon = Daemon("iscsid", ["iscsid", "-f"])
        self.nodes: set[tuple[str, str]] = set()

    def start(self) -> Initiator:
        modprobe("iscsi_tcp", "sd_mod")
        self.daemon.start()

        def up() -> bool:
            self.daemon.check_alive()
            out = subprocess.run(["iscsiadm", "-m", "session"], capture_output=True, text=True,
                                 stdin=subprocess.DEVNULL)
            # 21: no sessions yet, which is fine; "can not connect": iscsid not up
            return "can not connect" not in out.stderr and out.returncode in (0, 21)

        wait_until(up, "iscsid", 15)
        return self

    def login(self, target: Target, portals: Sequence[str] = PORTALS,
              chap: Chap | None = None) -> None:
        """Discover and log in to target on every portal (with chap, if given;
        default: the target's own credentials)."""
        chap = chap if chap is not None else target.chap
        for portal in portals:
            run("iscsiadm", "-m", "discovery", "-t", "sendtargets", "-p", portal)
            self.nodes.add((target.iqn, portal))
            if chap is not None:
                self._set_chap(target.iqn, portal, chap)
            run("iscsiadm", "-m", "node", "-T", target.iqn, "-p", portal, "--login")

        # login returns before the kernel has scanned the LUNs and udev made nodes
        def scanned() -> bool:
            mine = [s for s in self.sessions(target) if s.portal in portals]
            return len(mine) == len(portals) and all(
                len(s.disks) == len(target.luns)
                and all(os.path.exists(f"/dev/{d}") for d in s.disks) for s in mine)

        wait_until(scanned, f"the LUNs of {target.iqn} on {', '.join(portals)}", 30)

    def _set_chap(self, iqn: str, portal: str, chap: Chap) -> None:
        settings = {"node.session.auth.authmethod": "CHAP",
                    "node.session.auth.username": chap.username,
                    "node.session.auth.password": chap.password}
        if chap.in_username:
            settings["node.session.auth.username_in"] = chap.in_username
            settings["node.session.auth.password_in"] = chap.in_password
        for key, value in settings.items():
            run("iscsiadm", "-m", "node", "-T", iqn, "-p", portal, "--op", "update",
                "-n", key, "-v", value)

    def logout(self, target: Target, portal: str) -> None:
        run("iscsiadm", "-m", "node", "-T", target.iqn, "-p", portal, "--logout")

    def forget(self, target: Target) -> None:
        """Log out of every portal of target and delete its node records."""
        for iqn, portal in sorted(self.nodes):
            if iqn != target.iqn:
                continue
            if any(s.portal == portal for s in self.sessions(target)):
                self.logout(target, portal)
            run_ok("iscsiadm", "-m", "node", "-T", iqn, "-p", portal, "--op", "delete")
            self.nodes.discard((iqn, portal))

    @staticmethod
    def sessions(target: Target | None = None) -> list[Session]:
        """Logged-in sessions (of target), from sysfs."""
        found = []
        for sdir in sorted(glob.glob("/sys/class/iscsi_session/session*")):
            sid = int(sdir.rsplit("session", 1)[1])
            try:
                iqn = Path(sdir, "targetname").read_text().strip()
                conn = glob.glob(f"/sys/class/iscsi_connection/connection{sid}:*")[0]
                addr = Path(conn, "persistent_address").read_text().strip()
                port = Path(conn, "persistent_port").read_text().strip()
            except (OSError, IndexError):
                continue   # session going away
            if target is not None and iqn != target.iqn:
                continue
            disks = tuple(sorted(os.path.basename(b) for b in glob.glob(
                f"{sdir}/device/target*/*/block/*")))
            found.append(Session(sid, iqn, f"{addr}:{port}", disks))
        return found

    def stop(self) -> None:
        steps = Cleanup()
        steps.push("stop iscsid", self.daemon.stop)
        steps.push("log out all sessions", lambda: self.sessions() and run(
            "iscsiadm", "-m", "node", "--logoutall=all"))
        steps.run()


def disk_wwid(disk: str) -> str:
    """The WWID multipath uses for /dev/<disk> (scsi_id, as udev does)."""
    return run("/lib/udev/scsi_id", "--whitelisted", "--device", f"/dev/{disk}").strip()


# ---- multipath -----------------------------------------------------------------------

MULTIPATH_CONF = """\
defaults {
    user_friendly_names yes
    find_multipaths no
    polling_interval 1
    # fail I/O at once when the last path is gone: a test must not hang
    no_path_retry fail
}
"""


@dataclasses.dataclass(frozen=True)
class PathState:
    wwid: str
    dev: str
    dm_state: str     # active / failed / undef
    checker: str      # ready / faulty / ghost / ...


@dataclasses.dataclass(frozen=True)
class MultipathDevice:
    name: str
    wwid: str
    target: Target
    lun: Lun

    @property
    def path(self) -> str:
        return f"/dev/mapper/{self.name}"


class Multipathd:
    def __init__(self) -> None:
        self.daemon = Daemon("multipathd", ["multipathd", "-d", "-s"])

    def start(self) -> Multipathd:
        modprobe("dm-multipath", "dm-round-robin", "dm-service-time")
        # /etc is the guest's copy-on-write overlay: this never reaches the host
        Path("/etc/multipath.conf").write_text(MULTIPATH_CONF)
        self.daemon.start()
        wait_until(lambda: self.daemon.check_alive() and run_ok("multipathd", "show", "daemon"),
                   "multipathd", 20)
        return self

    @staticmethod
    def paths(wwid: str | None = None) -> list[PathState]:
        out = run("multipathd", "show", "paths", "raw", "format", "%w|%d|%t|%T")
        states = []
        for line in out.splitlines():
            fields = [f.strip() for f in line.split("|")]
            if len(fields) == 4 and (wwid is None or fields[0] == wwid):
                states.append(PathState(*fields))
        return states

    @staticmethod
    def map_name(wwid: str) -> str | None:
        out = run("multipathd", "show", "maps", "raw", "format", "%n|%w")
        for line in out.splitlines():
            name, _, map_wwid = (f.strip() for f in line.partition("|"))
            if map_wwid == wwid:
                return name
        return None

    def active_paths(self, wwid: str) -> list[PathState]:
        return [p for p in self.paths(wwid) if p.dm_state == "active" and p.checker == "ready"]

    def wait_active_paths(self, wwid: str, count: int, timeout: float = 30) -> str:
        """Wait until the map of wwid exists with exactly `count` active, ready
        paths; return the map name."""
        def ready() -> str | None:
            self.daemon.check_alive()
            name = self.map_name(wwid)
            if name and len(self.active_paths(wwid)) == count:
                return name
            return None

        try:
            return wait_until(ready, f"map {wwid} with {count} active paths", timeout, 0.2)
        except TimeoutError as e:
            raise TimeoutError(f"{e}\npaths: {self.paths()}\n"
                               f"{run('multipath', '-ll', check=False)}") from None

    @staticmethod
    def flush(name: str) -> None:
        # the map may be briefly busy (udev probing it after a change): retry
        wait_until(lambda: run_ok("multipath", "-f", name), f"flush of map {name}", 15, 0.5)

    def stop(self) -> None:
        steps = Cleanup()
        steps.push("flush all maps", lambda: run_ok("multipath", "-F"))
        steps.push("stop multipathd", self.daemon.stop)
        steps.run()


# ---- NFS server ----------------------------------------------------------------------

class NfsServer:
    """knfsd exporting directories to 127.0.0.1 (rw, no_root_squash).

    NFSv3 clients mount 127.0.0.1:DIR; NFSv4 clients mount 127.0.0.1:/NAME
    (NAME = basename of DIR) through a tmpfs pseudo-root: the guest's / is
    hostfs, which nfsd cannot export. Grace periods are cut short: a fresh
    server would block the first NLM (v3) lock ~50 s and v4 opens ~90 s.
    """

    PSEUDO_ROOT = Path("/srv/nfs4")
    OPTIONS = "rw,sync,no_subtree_check,no_root_squash,insecure"
    NLM_TIMEOUT = 3   # the kernel's minimum

    def __init__(self, exports: Sequence[Path]) -> None:
        self.exports = list(exports)
        self.daemons = [Daemon("rpcbind", ["rpcbind", "-f", "-w"]),
                        Daemon("rpc.mountd", ["rpc.mountd", "-F"]),
                        Daemon("rpc.statd", ["rpc.statd", "-F", "--no-notify"])]
        self._cleanup = Cleanup()
        self._lockd_started = 0.0

    def start(self) -> NfsServer:
        try:
            self._start()
        except Exception:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        modprobe("nfsd", "lockd", "nfs", "nfsv3", "nfsv4")
        if not os.path.ismount("/proc/fs/nfsd"):
            run("mount", "-t", "nfsd", "nfsd", "/proc/fs/nfsd")
            self._cleanup.push("umount nfsd", lambda: run("umount", "/proc/fs/nfsd"))
        # grace periods: NLM's must be set before nfsd starts; v4's is ended below
        Path("/proc/sys/fs/nfs/nlm_timeout").write_text(f"{self.NLM_TIMEOUT}\n")
        Path("/proc/sys/fs/nfs/nlm_grace_period").write_text("1\n")
        Path("/proc/fs/nfsd/nfsv4gracetime").write_text("10\n")
        Path("/proc/fs/nfsd/nfsv4leasetime").write_text("10\n")
        for state_dir in ("/var/lib/nfs/rpc_pipefs", "/var/lib/nfs/v4recovery"):
            os.makedirs(state_dir, exist_ok=True)
        self.PSEUDO_ROOT.mkdir(parents=True, exist_ok=True)
        run("mount", "-t", "tmpfs", "tmpfs", self.PSEUDO_ROOT)
        self._cleanup.push("umount pseudo-root", lambda: run("umount", self.PSEUDO_ROOT))
        lines = [f"{self.PSEUDO_ROOT} 127.0.0.1(ro,fsid=0,crossmnt,no_subtree_check,insecure)"]
        for d in self.exports:
            bind = self.PSEUDO_ROOT / d.name
            bind.mkdir()
            run("mount", "--bind", d, bind)
            self._cleanup.push(f"umount {bind}", functools.partial(run, "umount", bind))
            lines += [f"{d} 127.0.0.1({self.OPTIONS})", f"{bind} 127.0.0.1({self.OPTIONS})"]
        # /etc is the guest's copy-on-write overlay
        Path("/etc/exports").write_text("\n".join(lines) + "\n")
        rpcbind, mountd, statd = self.daemons
        rpcbind.start()
        self._cleanup.push("stop rpcbind", rpcbind.stop)
        wait_until(lambda: rpcbind.check_alive() and run_ok("rpcinfo", "-p", "127.0.0.1"),
                   "rpcbind", 15)
        # NFSv3 locking needs statd (mount.nfs would start one, unlogged). It
        # must outlive nfsd: lockd talks to it while shutting down, and stopping
        # nfsd hangs for a minute when statd is already gone
        statd.start()
        self._cleanup.push("stop rpc.statd", statd.stop)
        run("exportfs", "-ra")
        self._cleanup.push("unexport", lambda: run("exportfs", "-ua"))
        mountd.start()
        self._cleanup.push("stop rpc.mountd", mountd.stop)
        run("rpc.nfsd", "-H", "127.0.0.1", "8")
        self._lockd_started = time.monotonic()
        self._cleanup.push("stop nfsd", lambda: run("rpc.nfsd", "0"))
        Path("/proc/fs/nfsd/v4_end_grace").write_text("Y\n")
        wait_until(lambda: mountd.check_alive() and run_ok("showmount", "-e", "127.0.0.1"),
                   "NFS exports", 20)

    def wait_nlm_grace(self) -> None:
        """Wait out lockd's grace period (it cannot be ended by hand, unlike
        v4's): roundup(nlm_grace_period, nlm_timeout) = 3 s after nfsd
        started. A v3 lock taken during it is refused and retried by the
        client only after 5 s. Mounting usually takes most of those 3 s."""
        left = self._lockd_started + self.NLM_TIMEOUT + 0.2 - time.monotonic()
        if left > 0:
            time.sleep(left)

    def stop(self) -> None:
        self._cleanup.run()


@dataclasses.dataclass(frozen=True)
class NfsMounts:
    export: Path   # the exported directory, seen locally
    v3: Path
    v42: Path


def iscsi_services(work: Path, steps: Cleanup) -> TargetServer:
    """tgtd serving LUN files under `work`/luns, iscsid and multipathd
    started, each stopped by `steps` (the benchmarks' storage)."""
    server = TargetServer(work / "luns").start()
    steps.push("stop tgtd", server.stop)
    initiator = Initiator().start()
    steps.push("stop iscsid", initiator.stop)
    mpd = Multipathd().start()
    steps.push("stop multipathd", mpd.stop)
    return server


def nfs_mount(spec: str, mountpoint: Path, version: str) -> None:
    mountpoint.mkdir(parents=True, exist_ok=True)
    opts = f"vers={version},soft,timeo=100,retrans=3"
    if version == "3":
        opts += ",nosharecache"
    run("mount", "-t", "nfs", "-o", opts, spec, mountpoint)


def umount(mountpoint: Path) -> None:
    if os.path.ismount(mountpoint):
        # lazy fallback: a dead server must not keep a test run from ending
        if not run_ok("umount", mountpoint, timeout=30):
            run("umount", "-l", mountpoint)


# ---- sanlock -------------------------------------------------------------------------

class SanlockDaemon:
    """The sanlock daemon without watchdog (no wdmd in the guest)."""

    def __init__(self) -> None:
        self.daemon = Daemon("sanlock", ["sanlock", "daemon", "-D", "-w", "0",
                                         "-U", "root", "-G", "root"])

    def start(self) -> SanlockDaemon:
        os.makedirs("/run/sanlock", exist_ok=True)
        self.daemon.start()
        wait_until(lambda: self.daemon.check_alive() and run_ok("sanlock", "client", "status"),
                   "sanlock daemon", 15)
        return self

    def stop(self) -> None:
        proc = self.daemon.proc
        if proc is not None and proc.poll() is None:
            # a clean shutdown releases the leases; -f 1: even with lockspaces
            run_ok("sanlock", "client", "shutdown", "-f", "1")
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        self.daemon.stop()


# ---- LVM -----------------------------------------------------------------------------

def lvm(*args: Arg) -> str:
    return run("lvm", *args)


def lvm_wipe(device: str) -> None:
    """Remove every VG on device and its PV label: back to a blank disk."""
    out = run("lvm", "pvs", "--noheadings", "-o", "vg_name", device, check=False)
    vg = out.strip()
    if vg:
        run("lvm", "vgchange", "-an", vg)
        run("lvm", "vgremove", "-f", vg)
    if run_ok("lvm", "pvs", device):
        run("lvm", "pvremove", "-ff", "-y", device)
    run("wipefs", "-a", device)


# ---- fault injection (tests/lab/test_faults_lab.py) -----------------------------------

def nfsd_stop() -> None:
    """Stop knfsd's threads (`rpc.nfsd 0`): every client request goes
    unanswered until nfsd_start(); mountd, statd and the exports stay."""
    run("rpc.nfsd", "0")


def nfsd_start(threads: int = 8) -> None:
    """Start knfsd again as NfsServer does, ending the NFSv4 grace period."""
    run("rpc.nfsd", "-H", "127.0.0.1", str(threads))
    Path("/proc/fs/nfsd/v4_end_grace").write_text("Y\n")


@dataclasses.dataclass
class DmDevice:
    """A device-mapper device over a loop device over a sparse file, whose
    table a test swaps under its users (suspend, load, resume): linear (the
    healthy device), delay (each I/O `ms` later), error (every I/O fails at
    once), flakey (fails for `down` seconds of every `up` + `down`).

    LVM sees a PV made on it twice (here and on the loop device under it):
    LVM commands on it name their devices (`--devices`, as the agent does).
    """

    name: str
    image: Path
    size: int
    loop: str = ""

    @property
    def path(self) -> str:
        return f"/dev/mapper/{self.name}"

    @property
    def sectors(self) -> int:
        return self.size // 512

    def linear(self) -> str:
        return f"0 {self.sectors} linear {self.loop} 0"

    def error(self) -> str:
        return f"0 {self.sectors} error"

    def delay(self, ms: int) -> str:
        return f"0 {self.sectors} delay {self.loop} 0 {ms}"

    def flakey(self, up: int, down: int, *features: str) -> str:
        extra = f" {len(features)} {' '.join(features)}" if features else ""
        return f"0 {self.sectors} flakey {self.loop} 0 {up} {down}{extra}"

    def create(self) -> DmDevice:
        modprobe("loop", "dm-mod", "dm-delay", "dm-flakey")
        self.image.parent.mkdir(parents=True, exist_ok=True)
        with open(self.image, "wb") as f:
            f.truncate(self.size)
        self.loop = run("losetup", "--find", "--show", self.image).strip()
        try:
            run("dmsetup", "create", self.name, "--table", self.linear())
        except Exception:
            self.destroy()
            raise
        return self

    def load(self, table: str) -> None:
        """Swap the table: I/O in flight finishes on the old one, new I/O
        sees the new one."""
        run("dmsetup", "suspend", self.name)
        try:
            run("dmsetup", "load", self.name, "--table", table)
        finally:
            run("dmsetup", "resume", self.name)

    def table(self) -> str:
        return run("dmsetup", "table", self.name).strip()

    def destroy(self) -> None:
        if os.path.exists(self.path):
            # udev may still hold it open briefly after its last user left
            wait_until(lambda: run_ok("dmsetup", "remove", self.name),
                       f"dmsetup remove {self.name}", 15, 0.5)
        if self.loop:
            run("losetup", "-d", self.loop)
            self.loop = ""
        self.image.unlink(missing_ok=True)


def add_device_lun(server: TargetServer, target: Target, device: str, size: int,
                   number: int = 1) -> Lun:
    """Export a block device as LUN `number` of `target`, opened O_DIRECT
    (bsoflags direct): no page cache in tgtd, so what the device does (an
    I/O error) reaches the initiator at once, as a SCSI medium error."""
    tid = target.tid
    server.tgtadm("--op", "new", "--mode", "logicalunit", "--tid", str(tid), "--lun",
                  str(number), "-b", device, "--bsoflags", "direct")
    server.tgtadm("--op", "update", "--mode", "logicalunit", "--tid", str(tid), "--lun",
                  str(number), "--params", f"scsi_sn=LAB{tid:04d}{number:04d}")
    # delete_target unlinks its LUNs' files: a path that is never the device
    lun = Lun(number, server.lun_dir / f"t{tid}-lun{number}.device-lun", size)
    target.luns.append(lun)
    return lun


def set_disk_state(disk: str, state: str) -> None:
    """The SCSI device state of /dev/<disk>: "offline" fails every command
    at once (the path is down), "running" brings it back."""
    Path(f"/sys/block/{disk}/device/state").write_text(f"{state}\n")
