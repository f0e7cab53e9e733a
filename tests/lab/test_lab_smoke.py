"""Smoke tests of the lab itself: each storage service the agent drives works
for real in the guest. Each test can fail; none skips."""

from __future__ import annotations

import dataclasses
import fcntl
import os
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

from tests.agentproc import AgentProcess
from tests.lab import guestlib as g

MiB = 1 << 20


def mount_options(mountpoint: Path) -> dict[str, str]:
    for line in Path("/proc/mounts").read_text().splitlines():
        _dev, mnt, fstype, opts, *_ = line.split()
        if mnt == str(mountpoint):
            parsed = dict(o.partition("=")[::2] for o in opts.split(","))
            return {"fstype": fstype, **parsed}
    raise AssertionError(f"{mountpoint} is not mounted")


def test_lv_on_multipath(lvm_device: str, mpath_device: g.MultipathDevice) -> None:
    g.lvm("pvcreate", "-q", lvm_device)
    g.lvm("vgcreate", "-q", "--addtag", "LAB_SD", "vglab", lvm_device)
    # LVM must use the multipath map, not one of its sdX paths
    pvs = g.lvm("pvs", "--noheadings", "-o", "pv_name,vg_name", "--select", "vg_name=vglab")
    assert pvs.split() == [lvm_device, "vglab"]
    g.lvm("lvcreate", "-q", "-L", "64M", "-n", "lv1", "--addtag", "LAB_IMAGE", "vglab")
    lv = "/dev/vglab/lv1"
    assert Path(lv).is_block_device()
    # the active LV sits on the map
    deps = g.run("dmsetup", "deps", "-o", "devname", "vglab-lv1")
    assert f"({mpath_device.name})" in deps
    data = os.urandom(4 * MiB)
    g.direct_write(lv, data, offset=8 * MiB)
    assert g.direct_read(lv, len(data), offset=8 * MiB) == data
    # deactivate, activate: the data is on the LUN, not in a cache
    g.lvm("lvchange", "-q", "-an", "vglab/lv1")
    assert not Path(lv).exists()
    g.lvm("lvchange", "-q", "-ay", "vglab/lv1")
    assert g.direct_read(lv, len(data), offset=8 * MiB) == data
    tags = g.lvm("lvs", "--noheadings", "-o", "lv_tags", "vglab/lv1").strip()
    assert tags == "LAB_IMAGE"


def test_multipath_io_survives_path_loss(
        make_mpath: Callable[[str, int], g.MultipathDevice],
        iscsi_initiator: g.Initiator, multipathd: g.Multipathd) -> None:
    dev = make_mpath("failover", 256 * MiB)
    before = os.urandom(1 * MiB)
    g.direct_write(dev.path, before)
    lost_portal = g.PORTALS[1]
    lost = next(s for s in iscsi_initiator.sessions(dev.target) if s.portal == lost_portal)
    iscsi_initiator.logout(dev.target, lost_portal)
    try:
        # multipathd sees that path fail or go away; one path stays active
        def one_path_left() -> bool:
            paths = {p.dev: p for p in multipathd.paths(dev.wwid)}
            gone = all(d not in paths or paths[d].dm_state == "failed" for d in lost.disks)
            return gone and len(multipathd.active_paths(dev.wwid)) == 1

        g.wait_until(one_path_left, "multipathd to drop the logged-out path", 20, 0.2)
        assert [s.portal for s in iscsi_initiator.sessions(dev.target)] == [g.PORTALS[0]]
        # I/O goes on through the remaining path
        after = os.urandom(1 * MiB)
        g.direct_write(dev.path, after, offset=4 * MiB)
        assert g.direct_read(dev.path, len(before)) == before
        assert g.direct_read(dev.path, len(after), offset=4 * MiB) == after
    finally:
        iscsi_initiator.login(dev.target, [lost_portal])
    # the path is back: a new disk, active again
    assert multipathd.wait_active_paths(dev.wwid, 2) == dev.name
    assert g.direct_read(dev.path, len(after), offset=4 * MiB) == after


def test_iscsi_mutual_chap(make_target: Callable[..., g.Target],
                           iscsi_initiator: g.Initiator) -> None:
    chap = g.Chap("labuser", "lab-secret-123", "labtarget", "lab-secret-456")
    target = make_target("chap", (64 * MiB,), chap=chap)
    portal = g.PORTALS[0]
    # the target refuses a wrong initiator secret (24: ISCSI_ERR_LOGIN_AUTH_FAILED);
    # the initiator refuses a target answering with a wrong secret (19: login failure)
    for wrong, rc in ((dataclasses.replace(chap, password="wrong-secret-1"), 24),
                      (dataclasses.replace(chap, in_password="wrong-secret-2"), 19)):
        with pytest.raises(g.CommandError) as failed:
            iscsi_initiator.login(target, [portal], chap=wrong)
        assert failed.value.rc == rc, failed.value
        assert iscsi_initiator.sessions(target) == []
    iscsi_initiator.login(target, [portal])
    [session] = iscsi_initiator.sessions(target)
    assert session.portal == portal and len(session.disks) == 1


def test_nfs_v42_direct_io_and_v3(nfs_mounts: g.NfsMounts) -> None:
    v42, v3 = mount_options(nfs_mounts.v42), mount_options(nfs_mounts.v3)
    assert (v42["fstype"], v42["vers"]) == ("nfs4", "4.2")
    assert (v3["fstype"], v3["vers"]) == ("nfs", "3")
    data = os.urandom(2 * MiB)
    g.direct_write(nfs_mounts.v42 / "direct.img", data)
    assert g.direct_read(nfs_mounts.v42 / "direct.img", len(data)) == data
    # the same bytes on the server's file system and through NFSv3
    assert (nfs_mounts.export / "direct.img").read_bytes() == data
    assert (nfs_mounts.v3 / "direct.img").read_bytes() == data
    (nfs_mounts.v3 / "v3.txt").write_text("written over NFSv3\n")
    assert (nfs_mounts.v42 / "v3.txt").read_text() == "written over NFSv3\n"
    # an NLM lock over NFSv3 is granted at once: no grace period left (a lock
    # refused for grace is retried by the client after 5 s)
    t = time.monotonic()
    with open(nfs_mounts.v3 / "v3.txt", "r+") as f:
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.lockf(f, fcntl.LOCK_UN)
    assert time.monotonic() - t < 3


def sanlock_status() -> str:
    return g.run("sanlock", "client", "status")


def test_sanlock_lockspace_and_resource(sanlock_daemon: g.SanlockDaemon,
                                        direct_io_dir: Path, sanlock_py: ModuleType) -> None:
    ids, leases = direct_io_dir / "ids", direct_io_dir / "leases"
    for path in (ids, leases):
        with open(path, "wb") as f:
            f.truncate(MiB)
    lockspace = f"LABLS:1:{ids}:0"
    resource = f"LABLS:vol1:{leases}:0"
    g.run("sanlock", "direct", "init", "-s", f"LABLS:0:{ids}:0", "-o", "1")
    g.run("sanlock", "direct", "init", "-r", resource)
    holder: subprocess.Popen[bytes] | None = None
    t = time.monotonic()
    # io_timeout 1 s: joining takes 2 x io_timeout + 1 s (21 s at the default 10)
    g.run("sanlock", "client", "add_lockspace", "-s", lockspace, "-o", "1")
    joined = time.monotonic() - t
    try:
        assert f"s {lockspace}" in sanlock_status()
        assert joined < 10, f"add_lockspace took {joined:.1f} s"
        # `client command` registers, acquires the lease, then execs the command:
        # the lease is held as long as that process lives
        holder = subprocess.Popen(["sanlock", "client", "command", "-r", resource,
                                   "-c", "/bin/sleep", "300"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        g.wait_until(lambda: re.search(rf"^r {re.escape(resource)}:\d+", sanlock_status(),
                                       re.M),
                     "the lease to be acquired", 20)
        # the daemon lists the resource while it is still writing the lease:
        # read the owner from disk until it is there (under load: a while)
        g.wait_until(lambda: [o["host_id"] for o in sanlock_py.read_resource_owners(
            b"LABLS", b"vol1", [(str(leases), 0)])] == [1], "the owner on disk", 20)
        holder.terminate()
        holder.wait(10)
        g.wait_until(lambda: f"r {resource}" not in sanlock_status(),
                     "the lease to be released", 20)
        assert sanlock_py.read_resource_owners(b"LABLS", b"vol1", [(str(leases), 0)]) == []
    finally:
        if holder is not None and holder.poll() is None:
            holder.kill()
            holder.wait()
        g.run("sanlock", "client", "rem_lockspace", "-s", lockspace)
    assert f"s {lockspace}" not in sanlock_status()


async def test_agent_ping(lab_agent: AgentProcess) -> None:
    async with lab_agent.client() as client:
        assert await client.call("ping") == {}
