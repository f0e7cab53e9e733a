"""A prepared block-domain volume opened the way a VM opens it: by a qemu that
libvirt runs as an unprivileged user in storage.vm_group (Debian:
libvirt-qemu:kvm; "kvm" is the agent's default), on a multipath iSCSI LUN in
the lab guest. The agent gives the LV's dm node that group at prepareImage;
udev keeps it on "change" events (lvextend, lvchange --refresh) but makes it
root:disk again on an "add" (a coldplug trigger), and an LV activated by
anything but a prepare is root:disk. With the package's rule,
udev/60-hostagent-lvm.rules, installed, a volume's node has the group after
every event and the domain's own LVs stay root:disk."""

from __future__ import annotations

import grp
import os
import stat
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.agentproc import ROOT, AgentProcess
from tests.conftest import require_tools
from tests.integration.test_domains_file import create_volume, new_id
from tests.lab import guestlib as g
from tests.lab.test_domains_block_lab import (
    connect_luns,
    format_and_disconnect,
    start,
    stop_agent,
)

MiB = 1 << 20
VM_GROUP = "kvm"          # storage.vm_group's default, and the rule's group
RULE = ROOT / "udev" / "60-hostagent-lvm.rules"
RUN_RULES = Path("/run/udev/rules.d")


class Opener:
    """Opens a device as some user with only one group (qemu under libvirt)."""

    def __init__(self, user: str, group: str) -> None:
        self.user = user
        self.group = group

    def qemu_io(self, path: str, *cmds: str) -> subprocess.CompletedProcess[str]:
        """qemu-io with O_DIRECT (-t none), as qemu opens a block volume."""
        args = [a for c in cmds for a in ("-c", c)]
        return subprocess.run(["setpriv", f"--reuid={self.user}", f"--regid={self.group}",
                               "--clear-groups", "--", "qemu-io", "-f", "raw", "-t", "none",
                               *args, path], capture_output=True, text=True, timeout=60)

    def can_write(self, path: str, offset: int) -> bool:
        """Opens path read-write, writes and reads back 64 KiB at offset."""
        return self._ok(self.qemu_io(path, f"write -P 0x5a {offset} 64k",
                                     f"read -P 0x5a {offset} 64k"))

    def can_open(self, path: str) -> bool:
        """Opens path read-write (as qemu does) and only reads: for LVs
        whose data a wrong answer must not damage."""
        return self._ok(self.qemu_io(path, "read 0 4k"))

    @staticmethod
    def _ok(r: subprocess.CompletedProcess[str]) -> bool:
        out = r.stdout + r.stderr
        if r.returncode == 0 and "failed" not in out:
            return True
        assert "Permission denied" in out, r
        return False


@pytest.fixture
def vm_user() -> Iterator[Opener]:
    """A system user whose only group is the vm group (the guest's /etc is a
    tmpfs overlay: nothing reaches the host)."""
    require_tools("useradd", "userdel", "setpriv", "qemu-io")
    user = f"hatq{uuid.uuid4().hex[:8]}"
    g.run("useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
          "-g", VM_GROUP, user)
    try:
        yield Opener(user, VM_GROUP)
    finally:
        g.run("userdel", user)


@pytest.fixture
def lvm_rule() -> Iterator[Callable[[], None]]:
    """install() puts the package's rule where udevd reads runtime rules;
    removed after the test."""
    require_tools("udevadm")
    dest = RUN_RULES / RULE.name

    def install() -> None:
        RUN_RULES.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(RULE.read_bytes())
        g.run("udevadm", "control", "--reload")

    try:
        yield install
    finally:
        dest.unlink(missing_ok=True)
        g.run("udevadm", "control", "--reload")


def node(path: str) -> tuple[str, int]:
    """(group name, mode) of the device node behind udev's /dev/<vg>/<lv> link."""
    st = os.stat(path)
    assert stat.S_ISBLK(st.st_mode), path
    return grp.getgrgid(st.st_gid).gr_name, stat.S_IMODE(st.st_mode)


def event(action: str, *paths: str) -> None:
    """A uevent on the dm nodes behind paths, processed by udevd: "change"
    as after a table reload, "add" as a coldplug (systemd-udev-trigger.service
    runs `udevadm trigger --action=add`; admins do too)."""
    g.run("udevadm", "trigger", f"--action={action}", "--settle",
          *(os.path.realpath(p) for p in paths))


@pytest.mark.timeout(600)
async def test_vm_group_opens_a_prepared_block_volume(make_target: Callable[..., g.Target],
                                                      multipathd: g.Multipathd,
                                                      vm_user: Opener,
                                                      lvm_rule: Callable[[], None],
                                                      tmp_path: Path) -> None:
    nobody = Opener("nobody", "nogroup")
    target = make_target("blockvm", (1024 * MiB,))
    agent: AgentProcess = start(tmp_path / "a1", monitor_interval=60)
    sd, img, vol = new_id(), new_id(), new_id()
    specials = [f"/dev/{sd}/{lv}" for lv in ("metadata", "ids", "leases")]
    try:
        async with agent.client() as c:
            _, [lun] = await connect_luns(c, target)
            await c.call("createStorageDomain", sdUUID=sd, domType="iscsi", name="vm",
                         devices=[lun["guid"]], ovfStore=False)
            await create_volume(c, sd, img, vol, size=64 * MiB, fmt="raw",
                                prealloc="preallocated")
            ids = dict(sdUUID=sd, imgUUID=img, volUUID=vol)

            # ---- the agent alone (a host without the rule)
            p = await c.call("prepareImage", **ids, purpose="vm")
            path = p["path"]
            assert node(path) == (VM_GROUP, 0o660)
            assert vm_user.can_write(path, 0)
            assert not nobody.can_write(path, 0)
            # measured (systemd-udevd 252): udev leaves a node's group alone
            # on "change" (lvextend, lvchange --refresh)...
            ext = await c.call("extendVolumeSize", **ids, newSize=80 * MiB)
            assert ext["capacity"] == 80 * MiB, ext
            g.run("lvm", "lvchange", "--refresh", f"{sd}/{vol}")
            event("change", path)
            assert node(path) == (VM_GROUP, 0o660)
            assert vm_user.can_write(path, 72 * MiB)
            # ...but applies its rules' root:disk again on "add"
            event("add", path)
            assert node(path) == ("disk", 0o660)
            assert not vm_user.can_write(path, 0)
            await c.call("teardownImage", **ids)
            assert not os.path.exists(path), "the last teardown deactivates the LV"

            # ---- with the package's rule
            lvm_rule()
            p = await c.call("prepareImage", **ids, purpose="vm")
            assert node(path) == (VM_GROUP, 0o660)
            ext = await c.call("extendVolumeSize", **ids, newSize=128 * MiB)
            assert ext["capacity"] == 128 * MiB, ext
            g.run("lvm", "lvchange", "--refresh", sd)      # every active LV of the domain
            for action in ("change", "add"):
                event(action, path, *specials)
                assert node(path) == (VM_GROUP, 0o660), action
                assert vm_user.can_write(path, 100 * MiB), action   # beyond the old size
                assert not nobody.can_write(path, 100 * MiB), action
                # the domain's own LVs stay root's
                for special in specials:
                    assert node(special) == ("disk", 0o660), (action, special)
                    assert not vm_user.can_open(special), (action, special)
            await c.call("teardownImage", **ids)
            assert not os.path.exists(path)
            # the rule alone: an LV activated by anything but a prepare
            g.run("lvm", "lvchange", "-ay", f"{sd}/{vol}")
            try:
                assert node(path) == (VM_GROUP, 0o660)
                assert vm_user.can_write(path, 0)
            finally:
                g.run("lvm", "lvchange", "-an", f"{sd}/{vol}")

            await format_and_disconnect(c, sd)
    finally:
        stop_agent(agent, sd)
