"""`make deb`: the Debian package is built, holds what a host needs, enables
nothing, its unit passes `systemd-analyze verify` in the installed tree, and
the agent it installs runs on Debian's own python3 and modules (no venv)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.agentproc import ROOT, free_port
from tests.conftest import require_tools

pytestmark = pytest.mark.root

DEB = ROOT / "build" / "hostagent_0.1.0_amd64.deb"
# systemd-analyze security of the unit as measured when it was written
# (systemd 252, Debian 12); the unit says which settings it cannot take.
SECURITY_EXPOSURE = 5.2


@pytest.fixture(scope="module")
def deb() -> Path:
    require_tools("make", "dpkg-deb", "git")
    r = subprocess.run(["make", "-C", str(ROOT), "deb"], capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert DEB.is_file(), r.stdout[-2000:]
    return DEB


@pytest.fixture(scope="module")
def installed(deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package unpacked into a root that also has the host's units."""
    root = tmp_path_factory.mktemp("root")
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    units = root / "lib" / "systemd" / "system"
    for unit in Path("/lib/systemd/system").iterdir():
        if not (units / unit.name).exists():
            if unit.is_symlink():
                (units / unit.name).symlink_to(os.readlink(unit))
            elif unit.is_file():
                shutil.copy2(unit, units / unit.name)
    return root


def _contents(deb: Path) -> set[str]:
    out = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True,
                         check=True).stdout
    return {line.split()[-1].lstrip(".") for line in out.splitlines() if line.split()}


def test_package_holds_what_a_host_needs(deb: Path) -> None:
    files = _contents(deb)
    for path in ("/usr/bin/hostagentd", "/usr/bin/hostagent-client",
                 "/lib/systemd/system/hostagent.service", "/usr/lib/tmpfiles.d/hostagent.conf",
                 "/etc/hostagent/hostagent.toml.example",
                 "/usr/share/doc/hostagent/README.md",
                 "/usr/lib/hostagent/agent/daemon.py", "/usr/lib/hostagent/rpc/server.py",
                 "/usr/lib/hostagent/storage/leases/lockholder.py",
                 "/usr/lib/hostagent/ovfstore/__init__.py",
                 "/usr/lib/hostagent/vendor/jsonrpcserver/__init__.py",
                 "/usr/lib/hostagent/vendor/aiohttp/__init__.py"):
        assert path in files, path
    assert not any("__pycache__" in f for f in files)

    def field(name: str) -> str:
        return subprocess.run(["dpkg-deb", "-f", str(deb), name], capture_output=True,
                              text=True, check=True).stdout
    depends = {d.strip().split()[0] for d in field("Depends").split(",")}
    # from Debian where Debian has them; aiohttp is vendored (Debian 12's is 3.8)
    assert {"python3-cryptography", "python3-psutil", "python3-pyudev",
            "python3-prometheus-client", "python3-defusedxml", "lvm2",
            "qemu-utils"} <= depends, depends
    assert "python3-aiohttp" not in depends


def test_package_ships_the_lvm_udev_rule(installed: Path) -> None:
    """The rule that gives block-domain volumes' dm nodes the vm group
    (tests/lab/test_vm_access_block_lab.py runs it), as in the checkout,
    where udevd reads the packages' rules."""
    rule = installed / "lib/udev/rules.d/60-hostagent-lvm.rules"
    assert rule.read_bytes() == (ROOT / "udev/60-hostagent-lvm.rules").read_bytes()
    assert stat.S_IMODE(rule.stat().st_mode) == 0o644


def test_postinst_enables_and_starts_nothing(deb: Path, tmp_path: Path) -> None:
    subprocess.run(["dpkg-deb", "-e", str(deb), str(tmp_path / "ctl")], check=True)
    postinst = (tmp_path / "ctl" / "postinst").read_text()
    assert "systemd-tmpfiles" in postinst and "hostagent.conf" in postinst
    assert "deb-systemd-invoke" not in postinst          # nothing started
    # `enable` only to keep an admin's earlier choice (was-enabled)
    enables = [i for i, line in enumerate(postinst.splitlines())
               if "deb-systemd-helper enable" in line]
    assert enables, postinst
    lines = postinst.splitlines()
    for i in enables:
        assert any("was-enabled" in line for line in lines[max(0, i - 3):i]), postinst


def test_unit_verifies_in_the_installed_tree(installed: Path) -> None:
    require_tools("systemd-analyze")
    r = subprocess.run(["systemd-analyze", "verify", f"--root={installed}",
                        "hostagent.service"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(), r
    sec = subprocess.run(["systemd-analyze", "security", "--offline=yes",
                          str(installed / "lib/systemd/system/hostagent.service")],
                         capture_output=True, text=True, timeout=120)
    m = re.search(r"Overall exposure level for hostagent.service: (\d+\.\d)", sec.stdout)
    assert m, sec.stdout[-3000:] + sec.stderr
    assert float(m.group(1)) <= SECURITY_EXPOSURE, sec.stdout


@pytest.fixture
def packaged_agent(installed: Path, tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """The package's hostagentd in dev mode, on /usr/bin/python3 with no
    PYTHONPATH: ready when it sends READY=1."""
    port = free_port()
    state = tmp_path / "state"
    sock_path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(sock_path)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = "/usr/sbin:/usr/bin:/sbin:/bin"
    env["NOTIFY_SOCKET"] = sock_path
    log = tmp_path / "agent.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(installed / "usr/bin/hostagentd"), "--dev",
                                 "--state-dir", str(state), "--port", str(port)],
                                env=env, cwd="/", stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        ready = False
        while not ready:
            left = deadline - time.monotonic()
            assert left > 0 and proc.poll() is None, log.read_text()
            sock.settimeout(min(left, 0.5))
            try:
                ready = "READY=1" in sock.recv(4096).decode().split("\n")
            except TimeoutError:
                pass
        yield state, port
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()
        assert " ERROR " not in log.read_text(), log.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        sock.close()


def test_packaged_agent_runs_on_debian_python(installed: Path,
                                              packaged_agent: tuple[Path, int]) -> None:
    state, port = packaged_agent
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    r = subprocess.run([str(installed / "usr/bin/hostagent-client"), "--dev", str(state),
                        "--port", str(port), "getCapabilities"], env=env, cwd="/",
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r
    assert '"apiVersion": 1' in r.stdout, r.stdout
    # the modules it ran are the package's, on Debian's interpreter
    pid = (state / "hostagentd.lock").read_text().strip()
    maps = Path(f"/proc/{pid}/maps").read_text()
    assert str(installed / "usr/lib/hostagent/vendor") in maps     # aiohttp's C parts
    assert Path(f"/proc/{pid}/exe").resolve() == Path("/usr/bin/python3").resolve()
