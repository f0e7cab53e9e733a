"""Lab tier: fixtures for real storage inside the User-Mode Linux guest.

Run with `bash tests/lab/run.sh [pytest args]` or `make test-lab`; outside the
guest every lab test fails at once with that advice. Services start lazily,
when the first test needing them asks, and expensive ones live for the
session; every fixture cleans up after itself even when its test failed.

    target_server      tgtd on 127.0.0.1:3260 and 127.0.0.2:3260
    iscsi_initiator    iscsid (open-iscsi)
    make_target        factory: make_target(name, lun_sizes, chap=None) -> Target;
                       make_target.replica(target) -> a copy with the same WWIDs
    multipathd         multipathd with a test multipath.conf
    make_mpath         factory: make_mpath(name, size) -> MultipathDevice (2 active paths)
    mpath_device       session MultipathDevice of a 1 GiB LUN over two iSCSI sessions
    lvm_device         mpath_device's /dev/mapper path, wiped of LVM after the test
    direct_io_dir      a fresh directory on ext4-on-loop (O_DIRECT works there)
    nfs_mounts         NfsMounts(export, v3, v42): one export mounted NFSv3 and NFSv4.2
    sanlock_daemon     sanlock daemon without watchdog
    sanlock_py         the python3-sanlock module (Debian's, via tests/lab/vm/pylib)
    lab_agent          the agent daemon (tests/agentproc.py) running in the guest
"""

from __future__ import annotations

import functools
import importlib
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from types import ModuleType

import pytest

from tests.agentproc import AgentProcess
from tests.conftest import missing, require_tools
from tests.lab import guestlib as g

LAB_DIR = Path(__file__).resolve().parent
WORK = Path("/tmp/lab")   # guest-private tmpfs
GiB = 1 << 30
MiB = 1 << 20

IN_GUEST = os.environ.get("LAB_GUEST") == "1"
REALLY_IN_GUEST = IN_GUEST and g.in_guest()
NOT_IN_GUEST = ("lab tests run only inside the lab guest: use `bash tests/lab/run.sh "
                "[pytest args]` or `make test-lab`")


# ---- guard, markers, reports ---------------------------------------------------------

def _is_lab_item(item: pytest.Item) -> bool:
    return LAB_DIR in Path(str(item.path)).resolve().parents


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _is_lab_item(item):
            item.add_marker(pytest.mark.lab)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    if not _is_lab_item(item):
        return
    if not IN_GUEST:
        pytest.fail(NOT_IN_GUEST, pytrace=False)
    if not REALLY_IN_GUEST:
        pytest.fail("LAB_GUEST is set, but this is not the lab guest; " + NOT_IN_GUEST,
                    pytrace=False)


_timing: dict[str, float] = {}


def pytest_runtest_logstart(nodeid: str) -> None:
    _timing.setdefault("first_test", time.time())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item,
                              call: pytest.CallInfo[None]
                              ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report: pytest.TestReport = yield
    if report.failed and REALLY_IN_GUEST and _is_lab_item(item):
        # what the daemons and the guest kernel said, next to the failure
        for log in sorted(g.LOG_DIR.glob("*.log")):
            lines = log.read_text(errors="replace").splitlines()[-15:]
            report.sections.append((f"lab log {log.name} (last lines)", "\n".join(lines)))
        dmesg = subprocess.run(["dmesg"], capture_output=True, text=True).stdout
        report.sections.append(("guest dmesg (last lines)",
                                "\n".join(dmesg.splitlines()[-25:])))
        # a full /tmp fails the writes of LUNs kept there (new_scratch_dir)
        tmp = os.statvfs("/tmp")
        report.sections.append(("guest /tmp", f"{tmp.f_bavail * tmp.f_frsize // MiB} MiB "
                                               f"free of {tmp.f_blocks * tmp.f_frsize // MiB} MiB"))
    return report


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    t0 = os.environ.get("LAB_RUN_T0")
    if not (REALLY_IN_GUEST and t0):
        return
    start = float(t0)
    parts = []
    if os.environ.get("LAB_CMD_T0"):
        parts.append(f"guest booted {float(os.environ['LAB_CMD_T0']) - start:.1f} s")
    if "first_test" in _timing:
        parts.append(f"first test started {_timing['first_test'] - start:.1f} s (fixed cost)")
    parts.append(f"pytest done {time.time() - start:.1f} s")
    terminalreporter.write_line("lab timing, from run.sh start: " + ", ".join(parts))


# ---- iSCSI ---------------------------------------------------------------------------

@pytest.fixture(scope="session")
def target_server() -> Iterator[g.TargetServer]:
    require_tools("tgtd", "tgtadm")
    server = g.TargetServer(WORK / "luns").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def iscsi_initiator() -> Iterator[g.Initiator]:
    require_tools("iscsid", "iscsiadm")
    initiator = g.Initiator().start()
    try:
        yield initiator
    finally:
        initiator.stop()


class TargetFactory:
    """Makes targets and tears them down: maps flushed, sessions logged out,
    target deleted, LUN files removed."""

    def __init__(self, server: g.TargetServer, initiator: g.Initiator) -> None:
        self.server = server
        self.initiator = initiator
        self.made: list[g.Target] = []

    def __call__(self, name: str, lun_sizes: tuple[int, ...] = (GiB,),
                 chap: g.Chap | None = None, block_sizes: tuple[int, ...] = (),
                 lun_dir: Path | None = None) -> g.Target:
        target = self.server.create_target(f"{name}-{uuid.uuid4().hex[:6]}", lun_sizes, chap,
                                           block_sizes, lun_dir)
        self.made.append(target)
        return target

    def replica(self, source: g.Target, name: str = "replica") -> g.Target:
        """A copy of source's LUNs under the same WWIDs, in a new target."""
        target = self.server.create_replica(f"{name}-{uuid.uuid4().hex[:6]}", source)
        self.made.append(target)
        return target

    def release(self, target: g.Target) -> None:
        steps = g.Cleanup()
        steps.push(f"delete target {target.iqn}", lambda: self.server.delete_target(target))
        # sessions someone else made (the agent under test, when a test failed
        # before it disconnected): never leave them to a deleted target
        steps.push(f"log out of other sessions to {target.iqn}", lambda: [
            g.run_ok("iscsiadm", "-m", "session", "-r", str(s.sid), "-u")
            for s in self.initiator.sessions(target)])
        steps.push(f"log out of {target.iqn}", lambda: self.initiator.forget(target))
        disks = {d for s in self.initiator.sessions(target) for d in s.disks}
        if disks and g.run_ok("multipathd", "show", "daemon"):
            for wwid in {g.disk_wwid(d) for d in disks}:
                name = g.Multipathd.map_name(wwid)
                if name:
                    steps.push(f"flush map {name}", functools.partial(g.Multipathd.flush, name))
        steps.run()

    def release_all(self) -> None:
        steps = g.Cleanup()
        for target in self.made:
            steps.push(f"release {target.iqn}", functools.partial(self.release, target))
        self.made.clear()
        steps.run()


def new_scratch_dir() -> Path:
    """A new directory on the host's disk (under the checkout's git-ignored
    build/, which the guest shares read-write): room for LUN files and data
    of hundreds of MiB, which would fill the guest's small /tmp (a tmpfs of
    half the guest's memory, about 1000 MiB by default, shared by every test
    of the guest run) under the other tests' files. tgtd then fails the
    LUN's writes with medium errors, which the kernel gives as ENODATA and
    qemu's NBD server, knowing no such NBD error, as EINVAL ("write failed:
    Invalid argument" at an NBD client)."""
    path = Path(__file__).resolve().parents[2] / "build" / "lab-scratch" / uuid.uuid4().hex
    path.mkdir(parents=True)
    return path


@pytest.fixture
def host_scratch() -> Iterator[Path]:
    """new_scratch_dir(), removed after the test."""
    path = new_scratch_dir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def make_target(target_server: g.TargetServer,
                iscsi_initiator: g.Initiator) -> Iterator[TargetFactory]:
    """make_target(name, lun_sizes=(1 GiB,), chap=None, block_sizes=()) -> Target:
    a new target exporting sparse-file LUNs (of 512-byte blocks unless given);
    log in with iscsi_initiator.login(target)."""
    factory = TargetFactory(target_server, iscsi_initiator)
    try:
        yield factory
    finally:
        factory.release_all()


# ---- multipath -----------------------------------------------------------------------

@pytest.fixture(scope="session")
def multipathd() -> Iterator[g.Multipathd]:
    require_tools("multipathd", "multipath")
    daemon = g.Multipathd().start()
    try:
        yield daemon
    finally:
        daemon.stop()


def _login_mpath(factory: TargetFactory, mpd: g.Multipathd, name: str,
                 size: int) -> g.MultipathDevice:
    """A one-LUN target, logged in on both portals; returns its multipath
    device once the map has the LUN's WWID with two active paths."""
    target = factory(name, (size,))
    factory.initiator.login(target)
    sessions = factory.initiator.sessions(target)
    disks = [d for s in sessions for d in s.disks]
    assert len(sessions) == len(g.PORTALS) and len(disks) == len(g.PORTALS), sessions
    wwids = {g.disk_wwid(d) for d in disks}
    assert len(wwids) == 1, f"paths of one LUN disagree on the WWID: {wwids}"
    wwid = wwids.pop()
    map_name = mpd.wait_active_paths(wwid, len(g.PORTALS))
    return g.MultipathDevice(map_name, wwid, target, target.luns[0])


@pytest.fixture
def make_mpath(make_target: TargetFactory,
               multipathd: g.Multipathd) -> Callable[[str, int], g.MultipathDevice]:
    """make_mpath(name, size=1 GiB) -> MultipathDevice, torn down after the test."""
    def make(name: str, size: int = GiB) -> g.MultipathDevice:
        return _login_mpath(make_target, multipathd, name, size)

    return make


@pytest.fixture(scope="session")
def mpath_device(target_server: g.TargetServer, iscsi_initiator: g.Initiator,
                 multipathd: g.Multipathd) -> Iterator[g.MultipathDevice]:
    factory = TargetFactory(target_server, iscsi_initiator)
    try:
        yield _login_mpath(factory, multipathd, "shared", GiB)
    finally:
        factory.release_all()


@pytest.fixture
def lvm_device(mpath_device: g.MultipathDevice) -> Iterator[str]:
    """A blank block device for LVM (the multipath map); wiped after the test."""
    require_tools("lvm", "wipefs")
    try:
        yield mpath_device.path
    finally:
        g.lvm_wipe(mpath_device.path)


# ---- file systems, NFS ---------------------------------------------------------------

@pytest.fixture(scope="session")
def _ext4_scratch() -> Iterator[Path]:
    fs = g.LoopFs(WORK / "scratch.img", Path("/mnt/lab-scratch"), 256 * MiB).create()
    try:
        yield fs.mountpoint
    finally:
        fs.destroy()


@pytest.fixture
def direct_io_dir(_ext4_scratch: Path, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A fresh directory on ext4 on a loop device (tmpfs and hostfs in the guest
    do not support O_DIRECT)."""
    path = _ext4_scratch / f"{request.node.name[:40]}-{uuid.uuid4().hex[:6]}"
    path.mkdir()
    try:
        yield path
    finally:
        shutil.rmtree(path)


@pytest.fixture(scope="session")
def nfs_server() -> Iterator[g.NfsServer]:
    """The NFS server exporting one directory (ext4 on a loop device)."""
    require_tools("rpc.nfsd", "rpc.mountd", "rpcbind", "exportfs", "mount.nfs")
    fs = g.LoopFs(WORK / "export.img", Path("/srv/export"), 512 * MiB).create()
    try:
        fs.mountpoint.chmod(0o777)
        server = g.NfsServer([fs.mountpoint]).start()
        try:
            yield server
        finally:
            server.stop()
    finally:
        fs.destroy()


@pytest.fixture(scope="session")
def nfs_mounts(nfs_server: g.NfsServer) -> Iterator[g.NfsMounts]:
    export = nfs_server.exports[0]
    mounts = g.NfsMounts(export, Path("/mnt/lab-nfs3"), Path("/mnt/lab-nfs42"))
    steps = g.Cleanup()
    try:
        g.nfs_mount(f"127.0.0.1:{export}", mounts.v3, "3")
        steps.push("umount v3", lambda: g.umount(mounts.v3))
        g.nfs_mount(f"127.0.0.1:/{export.name}", mounts.v42, "4.2")
        steps.push("umount v4.2", lambda: g.umount(mounts.v42))
        nfs_server.wait_nlm_grace()
        yield mounts
    finally:
        steps.run()


# ---- sanlock -------------------------------------------------------------------------

@pytest.fixture(scope="session")
def sanlock_daemon() -> Iterator[g.SanlockDaemon]:
    require_tools("sanlock")
    daemon = g.SanlockDaemon().start()
    try:
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture(scope="session")
def sanlock_py() -> ModuleType:
    if not any(g.PYLIB.glob("sanlock.*.so")):
        missing(f"no sanlock module in {g.PYLIB} (make deps-test links it)")
    sys.path.insert(0, str(g.PYLIB))
    try:
        return importlib.import_module("sanlock")
    finally:
        sys.path.remove(str(g.PYLIB))


# ---- the agent -----------------------------------------------------------------------

@pytest.fixture(scope="session")
def lab_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    agent = AgentProcess(tmp_path_factory.mktemp("agent") / "state")
    agent.log_path = g.LOG_DIR / f"agent-{agent.port}.log"   # with the daemons' logs
    g.LOG_DIR.mkdir(parents=True, exist_ok=True)
    agent.start(timeout=60)
    try:
        yield agent
    finally:
        rc = agent.stop()
        assert rc == 0, f"agent exit status {rc} after SIGTERM; log:\n{agent.log()}"


# ---- simulated hosts sharing storage (tests/lab/multihost.py) ------------------------
#
#    shared_storage     module: SharedStorage, the NFS export and a new 2 GiB LUN (2 portals)
#    sim_hosts          module: factory sim_hosts(name, host_id, sanlock=True, **kw) -> SimHost
#
# Module-scoped: starting hosts, connecting them and making domains costs a
# minute of guest time, so a file's scenarios share them.

from tests.lab.multihost import HostFactory, SharedStorage  # noqa: E402


@pytest.fixture(scope="module")
def shared_storage(nfs_server: g.NfsServer, target_server: g.TargetServer,
                   iscsi_initiator: g.Initiator,
                   multipathd: g.Multipathd) -> Iterator[SharedStorage]:
    """The NFS export and a new 2 GiB LUN (two portals, its file on the
    host's disk: new_scratch_dir) for simulated hosts. After the module (its
    hosts stopped first): every VG on the LUN is deactivated, the target
    released, every domain made on the export removed."""
    require_tools("unshare", "nsenter", "sanlock", "lvm")
    export = nfs_server.exports[0]
    before = set(os.listdir(export))
    factory = TargetFactory(target_server, iscsi_initiator)
    # No NFSv4 delegations while hosts share the export: in one kernel every
    # simulated host is the same NFS client, and knfsd does not recall a
    # delegation from the client whose own request conflicts with it, so
    # host 2 would go on reading from its cache a file host 1 replaced.
    # Separate machines get the delegation recalled; without any, each open
    # asks the server, as after a recall.
    leases = Path("/proc/sys/fs/leases-enable")
    leases_was = leases.read_text()
    leases.write_text("0\n")
    scratch = new_scratch_dir()
    try:
        storage = SharedStorage(export, factory("multihost", (2 * GiB,), lun_dir=scratch))
        yield storage
    finally:
        steps = g.Cleanup()
        steps.push(f"remove {scratch}", functools.partial(shutil.rmtree, scratch))
        steps.push("enable leases again", lambda: leases.write_text(leases_was))
        steps.push("release the target", factory.release_all)
        for name in set(os.listdir(export)) - before:
            steps.push(f"remove {export / name}",
                       functools.partial(shutil.rmtree, export / name))
        if factory.made:
            for vg in storage.vgs():
                steps.push(f"deactivate VG {vg}",
                           functools.partial(g.lvm, "vgchange", "-an", vg))
        steps.run()


@pytest.fixture(scope="module")
def sim_hosts(shared_storage: SharedStorage,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostFactory]:
    """Factory of simulated hosts (each a mount namespace with its own
    sanlock daemon and agent); all stopped after the module, before the
    shared storage is cleaned."""
    factory = HostFactory(tmp_path_factory.mktemp("hosts"))
    try:
        yield factory
    finally:
        factory.stop_all()


# ---- fault injection (tests/lab/test_faults_lab.py) ---------------------------------
#
#    faulty_lun         a target whose LUN is a dm device a test swaps to error / flakey

import dataclasses  # noqa: E402


@dataclasses.dataclass(frozen=True)
class FaultyLun:
    target: g.Target
    device: g.DmDevice   # under the LUN: swap its table to inject faults


@pytest.fixture
def faulty_lun(target_server: g.TargetServer, iscsi_initiator: g.Initiator,
               multipathd: g.Multipathd) -> Iterator[FaultyLun]:
    """A target whose one 1 GiB LUN is a device-mapper device (a DmDevice,
    linear at first); nobody logged in. At the end the healthy table is put
    back, the target released (sessions logged out, maps flushed) and the
    device removed."""
    require_tools("dmsetup", "losetup")
    tag = uuid.uuid4().hex[:6]
    device = g.DmDevice(f"lab-faulty-{tag}", WORK / f"faulty-{tag}.img", GiB).create()
    factory = TargetFactory(target_server, iscsi_initiator)
    steps = g.Cleanup()
    steps.push("remove the dm device", device.destroy)
    steps.push("release the target", factory.release_all)

    def healthy() -> None:
        if device.table().split()[2] != "linear":
            device.load(device.linear())

    steps.push("healthy table", healthy)
    try:
        target = factory("faulty", ())
        g.add_device_lun(target_server, target, device.path, device.size)
        yield FaultyLun(target, device)
    finally:
        steps.run()
