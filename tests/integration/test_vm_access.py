"""A prepared volume opened the way a VM opens it: by a qemu that libvirt runs
as an unprivileged user in the storage.vm_group group (Debian:
libvirt-qemu:kvm), not as root. The agent runs with the unit's umask and its
state directory has the unit's mode, as on a host."""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.agentproc import AgentProcess
from tests.conftest import require_tools
from tests.integration.crashharness import done, localfs_domains

pytestmark = pytest.mark.root

UNIT_UMASK = 0o027          # systemd/hostagent.service: UMask=
UNIT_STATE_MODE = 0o711     # systemd/hostagent.service: StateDirectoryMode=
TMPFILES_STORAGE_MODE = 0o755   # systemd/hostagent.tmpfiles.conf: the storage root


@dataclass
class VmUser:
    user: str
    group: str

    def run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        """argv as this user, with only its own group (like qemu under libvirt)."""
        return subprocess.run(["setpriv", f"--reuid={self.user}", f"--regid={self.group}",
                               "--clear-groups", "--", *argv],
                              capture_output=True, text=True, timeout=60)


@pytest.fixture
def vm_user() -> Iterator[VmUser]:
    require_tools("useradd", "groupadd", "setpriv", "qemu-io")
    tag = uuid.uuid4().hex[:8]
    u = VmUser(f"hatq{tag}", f"hatk{tag}")
    subprocess.run(["groupadd", "--system", u.group], check=True)
    try:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell",
                        "/usr/sbin/nologin", "-g", u.group, u.user], check=True)
        try:
            yield u
        finally:
            subprocess.run(["userdel", u.user], check=True)
    finally:
        subprocess.run(["groupdel", u.group], check=True)


@pytest.fixture
def host_dir() -> Iterator[Path]:
    """A directory others may pass (pytest's tmp_path is under a 0700 one)."""
    d = Path(tempfile.mkdtemp(prefix="hostagent-vm-", dir="/var/tmp"))
    os.chmod(d, 0o711)
    yield d
    shutil.rmtree(d)


def _start_like_the_unit(agent_factory: Callable[..., AgentProcess], state: Path,
                         group: str) -> AgentProcess:
    state.mkdir(mode=UNIT_STATE_MODE)
    os.chmod(state, UNIT_STATE_MODE)
    (state / "storage").mkdir(mode=TMPFILES_STORAGE_MODE)
    (state / "hostagent.toml").write_text(f'[storage]\nvm_group = "{group}"\n')
    old = os.umask(UNIT_UMASK)
    try:
        return agent_factory(state, test_verbs=False)
    finally:
        os.umask(old)


async def test_vm_group_opens_prepared_chain_read_write(
        agent_factory: Callable[..., AgentProcess], vm_user: VmUser, host_dir: Path) -> None:
    agent = _start_like_the_unit(agent_factory, host_dir / "state", vm_user.group)
    gid = grp.getgrnam(vm_user.group).gr_gid
    async with agent.client() as c:
        doms = await localfs_domains(c, host_dir, ["store"])
        sd, img = doms.sds[0], str(uuid.uuid4())
        base, top = str(uuid.uuid4()), str(uuid.uuid4())
        common = {"sdUUID": sd, "imgUUID": img, "size": 1 << 20, "format": "cow",
                  "preallocate": "sparse"}
        await done(c, "createVolume", volUUID=base, **common)
        await done(c, "createVolume", volUUID=top, parentVolUUID=base, **common)

        # before a prepare the files are root's alone
        before = vm_user.run("qemu-io", "-c", "read 0 4k", "-f", "qcow2",
                             f"{doms.roots[0]}/images/{img}/{top}")
        assert before.returncode != 0, before

        prepared = await c.call("prepareImage", sdUUID=sd, imgUUID=img, volUUID=top,
                                purpose="vm")
        path = prepared["path"]
        assert [v["volUUID"] for v in prepared["chain"]] == [base, top]
        for v in prepared["chain"]:
            st = os.stat(v["path"])
            assert (st.st_gid, stat.S_IMODE(st.st_mode)) == (gid, 0o660), v

        # qemu's own way in: the chain through the relative backing file, written
        w = vm_user.run("qemu-io", "-c", "write -P 0x5a 0 64k", "-c", "flush", "-f", "qcow2",
                        path)
        assert w.returncode == 0 and "wrote 65536/65536" in w.stdout, w
        r = vm_user.run("qemu-io", "-c", "read -P 0x5a 0 64k", "-f", "qcow2", path)
        assert r.returncode == 0 and "read 65536/65536" in r.stdout, r
        # the base is opened read-write too when qemu commits into it
        b = vm_user.run("qemu-io", "-c", "write -P 0x11 512k 4k", "-f", "qcow2",
                        prepared["chain"][0]["path"])
        assert b.returncode == 0, b

        # nobody else: a user outside the group still cannot
        other = subprocess.run(["setpriv", f"--reuid={pwd.getpwnam('nobody').pw_uid}",
                                "--regid=nogroup", "--clear-groups", "--", "qemu-io", "-c",
                                "read 0 4k", "-f", "qcow2", path],
                               capture_output=True, text=True, timeout=60)
        assert other.returncode != 0 and "Permission denied" in other.stdout + other.stderr, \
            other

        await c.call("teardownImage", sdUUID=sd, imgUUID=img)
        await doms.release(c)
    assert agent.stop() == 0
    assert " ERROR " not in agent.log(), agent.log()
