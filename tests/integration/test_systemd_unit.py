"""The package under a real systemd as PID 1: a systemd-nspawn container
booted from this host's own root (an overlay, so nothing of the host
changes) with a network of its own, the .deb installed with dpkg. The unit
as shipped (hardening included) must reach active (READY=1), come back after
SIGKILL, be restarted by the watchdog when its event loop stops (SIGSTOP),
and stop with status 0 during a job, which the next start reports as
interrupted."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.agentproc import ROOT
from tests.conftest import require_tools
from tests.integration.storagefixtures import wait_for

pytestmark = [pytest.mark.root, pytest.mark.slow]

DEB = ROOT / "build" / "hostagent_0.1.0_amd64.deb"
PORT = 45321        # inside the container's own network namespace
PKI = "/etc/pki/hostagent"
CLIENT = ["hostagent-client", "--port", str(PORT), "--ca", f"{PKI}/ca.pem",
          "--cert", f"{PKI}/client.pem", "--key", f"{PKI}/client.key"]


class Container:
    """systemd-nspawn --boot of an overlay of / (upper layer on a tmpfs)."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.root = base / "root"
        self.layer = base / "layer"
        for d in (self.root, self.layer):
            d.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2G", "tmpfs", str(self.layer)],
                       check=True)
        (self.layer / "upper").mkdir()
        (self.layer / "work").mkdir()
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        f"lowerdir=/,upperdir={self.layer}/upper,workdir={self.layer}/work",
                        str(self.root)], check=True)
        # its own machine id (nspawn refuses the host's for the journal)
        (self.root / "etc" / "machine-id").write_text(uuid.uuid4().hex + "\n")
        self.log = base / "boot.log"
        self.nspawn: subprocess.Popen[bytes] | None = None
        self.pid = 0

    def boot(self, timeout: float = 120) -> None:
        with open(self.log, "wb") as out:
            # basic.target: not the host's multi-user services (databases,
            # target daemons) that its overlay would start too
            self.nspawn = subprocess.Popen(
                ["systemd-nspawn", "-D", str(self.root), "--boot", "--register=no",
                 "--keep-unit", "--link-journal=no", "--private-network",
                 "--console=pipe", "-M", f"ha{uuid.uuid4().hex[:8]}",
                 "--", "--unit=basic.target"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)
        wait_for("systemd as the container's PID 1", self._find_init, timeout)
        wait_for("the container booted", lambda: self.run(
            "systemctl is-system-running", check=False).stdout.strip() in
            ("running", "degraded"), timeout)

    def _find_init(self) -> bool:
        assert self.nspawn is not None
        assert self.nspawn.poll() is None, self.log.read_text()
        kids = Path(f"/proc/{self.nspawn.pid}/task/{self.nspawn.pid}/children")
        for pid in kids.read_text().split():
            if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                self.pid = int(pid)
                return True
        return False

    def run(self, command: str, check: bool = True,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(["nsenter", "-t", str(self.pid), "-a", "sh", "-c", command],
                           capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            journal = subprocess.run(
                ["nsenter", "-t", str(self.pid), "-a", "journalctl", "--no-pager", "-n", "60",
                 "-u", "hostagent"], capture_output=True, text=True, timeout=30).stdout
            raise AssertionError(f"{command}: rc {r.returncode}\n{r.stdout}{r.stderr}\n"
                                 f"journal:\n{journal}")
        return r

    def show(self, prop: str) -> str:
        return self.run(f"systemctl show -p {prop} --value hostagent").stdout.strip()

    def close(self) -> None:
        if self.nspawn is not None and self.nspawn.poll() is None:
            if self.pid:
                self.run("systemctl poweroff", check=False)
            try:
                self.nspawn.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.nspawn.pid, signal.SIGKILL)
                self.nspawn.wait()
        for d in (self.root, self.layer):
            subprocess.run(["umount", str(d)], check=False)


@pytest.fixture
def container() -> Iterator[Container]:
    require_tools("systemd-nspawn", "nsenter", "make", "dpkg-deb")
    r = subprocess.run(["make", "-C", str(ROOT), "deb"], capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    base = Path(tempfile.mkdtemp(prefix="hostagent-nspawn-", dir="/var/tmp"))
    c = Container(base)
    try:
        c.boot()
        shutil.copy(DEB, c.root / "root" / DEB.name)
        c.run(f"dpkg -i /root/{DEB.name}")
        yield c
    finally:
        c.close()
        shutil.rmtree(base)


def _client(c: Container, *args: str) -> Any:
    r = c.run(shlex.join([*CLIENT, *args]), check=False)
    assert r.returncode == 0, r
    return json.loads(r.stdout)


def test_unit_under_systemd_as_pid1(container: Container) -> None:
    c = container
    # installed, not enabled, not started; its directories made by tmpfiles
    assert c.run("systemctl is-enabled hostagent", check=False).stdout.strip() == "disabled"
    assert c.run("systemctl is-active hostagent", check=False).stdout.strip() == "inactive"
    # what an admin adds: certificates and settings
    c.run('python3 -c "import sys; sys.path[:0] = [\'/usr/lib/hostagent\']; '
          'from pathlib import Path; from agent.pki import write_pki; '
          f"write_pki(Path('{PKI}'))\"")
    c.run("printf '[server]\\nhost = \"127.0.0.1\"\\nport = %d\\n[ovf]\\ndata_port = 0\\n"
          f"[debug]\\ntest_verbs = true\\n' {PORT} > /etc/hostagent/conf.d/50-test.toml")

    # start: active only once READY=1 came (Type=notify)
    c.run("systemctl start hostagent")
    assert c.show("ActiveState") == "active"
    assert c.show("StatusText").startswith("listening on 127.0.0.1")
    assert _client(c, "ping") == {}

    # its mounts are the host's (here: the container's PID 1's), where the VMs are:
    # no mount namespace of its own
    conn = {"id": str(uuid.uuid4()), "connection": "hostagent-unit-test", "vfs_type": "tmpfs"}
    _client(c, "connectStorageServer", "domType=posixfs",
            f"connectionParams={json.dumps([conn])}")
    seen = c.run("findmnt -n -o TARGET -S hostagent-unit-test", check=False).stdout
    assert seen.startswith("/var/lib/hostagent/storage/"), seen
    _client(c, "disconnectStorageServer", "domType=posixfs",
            f"connectionParams={json.dumps([conn])}")
    # and prepared volumes below it can be reached by qemu's group
    assert c.run("stat -c %a /var/lib/hostagent").stdout.strip() == "711"

    # SIGKILL: Restart=on-failure brings it back
    pid = c.show("MainPID")
    c.run("systemctl kill -s KILL hostagent")
    wait_for("a restart after SIGKILL", lambda: c.show("NRestarts") == "1"
             and c.show("ActiveState") == "active" and c.show("MainPID") not in ("0", pid),
             30)
    assert _client(c, "ping") == {}

    # a stopped event loop: no watchdog pings, systemd restarts it (WatchdogSec=30s)
    pid = c.show("MainPID")
    started = time.monotonic()
    c.run("systemctl kill -s STOP hostagent")
    wait_for("a watchdog restart", lambda: c.show("NRestarts") == "2"
             and c.show("ActiveState") == "active", 90)
    assert time.monotonic() - started >= 25
    assert "Watchdog timeout" in c.run("journalctl -u hostagent --no-pager").stdout
    assert c.show("MainPID") != pid
    assert _client(c, "ping") == {}

    # stop during a job: exit status 0; after the next start the job is interrupted
    job = str(uuid.uuid4())
    _client(c, "testStepJob", f"jobUUID={job}", "steps=120", "stepSeconds=1")
    wait_for("the job running", lambda: _client(
        c, "getJobs", f'jobUUIDs=["{job}"]')[job]["status"] == "running", 30)
    c.run("systemctl stop hostagent")
    assert (c.show("ExecMainStatus"), c.show("Result")) == ("0", "success")
    c.run("systemctl start hostagent")
    info = _client(c, "getJobs", f'jobUUIDs=["{job}"]')[job]
    assert info["status"] == "failed" and info["error"]["data"]["name"] == "JobInterrupted", \
        info
    journal = c.run("journalctl -u hostagent --no-pager").stdout
    assert "hostagentd" in journal and " ERROR " not in journal, journal
