"""kill -9 of the agent (and of whatever it runs) during the extension of a
thin volume that qemu-storage-daemon writes, in the lab guest (a multipath
iSCSI LUN): LAB_THIN_CRASH_TRIALS trials (3 in make test; 20 by hand).

The writer (the VM) runs through all trials. Each trial writes past the
armed threshold (a burst through NBD that stays within the LV), waits for
the agent's lvextend and kills the agent at one of three points:
- at once: inside lvextend (LVM killed with it: its metadata commit done or
  not, the device's table reloaded or not, the device maybe left suspended);
- after a random delay of up to 1.5 s: inside it or just after;
- once the device shows the new size: lvextend done, the watch's re-arming
  and its notification not (yet) done.
An extension writes no volume metadata (the LV's size is not in it), so
there is no "between lvextend and the metadata write" point: LVM's commit is
the one step. After each restart: the restarted agent watches the writer
again and extends it past the burst plus the margin; the device is as large
as LVM's metadata says (never smaller: a write there would fail); lvs,
getVolumeInfo and the device agree; capacity, generation and legality are
unchanged; the writer is alive and none of its writes failed. At the end
every burst reads back."""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from storage.qmp import QMPClient
from tests.agentproc import AgentProcess
from tests.integration.crashharness import _argv, descendants, kill_tree
from tests.integration.test_domains_file import create_volume, new_id
from tests.lab import guestlib as g
from tests.lab.test_domains_block_lab import (
    connect_luns,
    format_and_disconnect,
    lvs,
    start,
    stop_agent,
)
from tests.lab.test_thin_lab import StorageDaemon
from tests.polling import until

MiB = 1 << 20
GiB = 1 << 30
EXTENT = 8 * MiB
CHUNK = 64 * MiB
WATERMARK = 50
MARGIN = CHUNK * WATERMARK // 100
TRIALS = int(os.environ.get("LAB_THIN_CRASH_TRIALS", "3"))
AIMS = ("at once", "random", "after lvextend")


def holds_vg_lock(pid: int, vg: str) -> bool:
    """`pid` has LVM's lock file of `vg` open: an LVM command on it runs
    there (in the agent's lvm shell, storage/lvmshell.py, only while one
    does)."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").endswith(f"/V_{vg}"):
                return True
        except OSError:
            continue
    return False


def extending(agent: AgentProcess, vg: str) -> bool:
    """The agent runs an lvextend: an lvm of its own, or a command in its
    lvm shell (the watch runs nothing else on the VG between its start and
    teardown)."""
    return agent.proc is not None and any(
        "lvextend" in _argv(pid) or holds_vg_lock(pid, vg)
        for pid in descendants(agent.proc.pid))


def device_size(path: str) -> int:
    """The size the device mapper gives the LV now (not LVM's metadata)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


async def burst(nbd_url: str, offset: int, length: int, pattern: int) -> None:
    """The VM writes: qemu-io through the export; a failed write fails the test."""
    p = await asyncio.create_subprocess_exec(
        "qemu-io", "-f", "raw", "-c", f"write -P {pattern} {offset} {length}", nbd_url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(p.communicate(), 120)
    assert p.returncode == 0 and b"error" not in out.lower(), f"a write failed: {out.decode()}"


async def highest_write(qsd: StorageDaemon) -> int:
    async with QMPClient(qsd.qmp2_path) as qmp:
        stats = await qmp.execute("query-blockstats", {"query-nodes": True})
    [highest] = [s["stats"]["wr_highest_offset"] for s in stats if s.get("node-name") == "file0"]
    return int(highest)


@pytest.mark.timeout(300 + 120 * TRIALS)
async def test_agent_killed_during_extensions(make_target: Callable[..., g.Target],
                                              multipathd: g.Multipathd, tmp_path: Path,
                                              host_scratch: Path) -> None:
    rng = random.Random(1515)
    target = make_target("thincrash", (3 * GiB,), lun_dir=host_scratch)
    state = tmp_path / "agent"
    conf = {"monitor_interval": 60, "chunk_size": CHUNK, "watermark_percent": WATERMARK}
    agent: AgentProcess = start(state, **conf)
    sd, img, vol = new_id(), new_id(), new_id()
    ref = {"sdUUID": sd, "imgUUID": img, "volUUID": vol}
    path = f"/dev/{sd}/{vol}"
    qsd = StorageDaemon(path, tmp_path)
    stages: Counter[str] = Counter()
    restarts: list[float] = []
    bursts: list[tuple[int, int, int]] = []
    try:
        async with agent.client() as c:
            _, [lun] = await connect_luns(c, target)
            await c.call("createStorageDomain", sdUUID=sd, domType="iscsi", name="thin",
                         devices=[lun["guid"]], ovfStore=False)
            v = await create_volume(c, sd, img, vol, size=4 * GiB)
            await c.call("prepareImage", **ref, purpose="vm",
                         writer={"qmpSocket": qsd.qmp_path, "nodeName": "file0"})
        qsd.start()
        written = 0
        for trial in range(TRIALS + 1):
            size = lvs(sd)[vol]["size"]
            assert device_size(path) == size
            # past the threshold (size - MARGIN), within the LV
            length = size - MARGIN - written + 4 * MiB
            bursts.append((written, length, trial % 250 + 1))
            # the writer goes on while the agent is killed and restarted
            writing = asyncio.create_task(burst(qsd.nbd_url, written, length, trial % 250 + 1))
            written += length
            if trial == TRIALS:
                await writing
                # watched after the last restart: extended once more, unkilled
                await until(lambda s=size: device_size(path) > s,  # type: ignore[misc]
                            "the last extension", timeout=120)
                break
            aim = AIMS[trial % len(AIMS)]
            await until(lambda a=agent, s=size: (  # type: ignore[misc]
                extending(a, sd) or device_size(path) > s), "the agent's lvextend",
                timeout=120)
            if aim == "random":
                await asyncio.sleep(rng.uniform(0, 1.5))    # the kill's random point
            elif aim == "after lvextend":
                await until(lambda s=size: device_size(path) > s,  # type: ignore[misc]
                            "lvextend's new size on the device", timeout=120)
            inside = extending(agent, sd)
            killed = kill_tree(agent)
            grown = device_size(path)
            meta = lvs(sd)[vol]["size"]
            stage = ("inside lvextend" if inside or any("lvextend" in k for k in killed) else
                     "after lvextend" if grown > size else "before lvextend")
            stages[f"{stage}, metadata {'new' if meta > size else 'old'}, device "
                   f"{'new' if grown > size else 'old'}"] += 1
            assert grown <= meta, "the device is larger than LVM's metadata"
            t = time.monotonic()
            agent = start(state, port=agent.port, **conf)
            restarts.append(round(time.monotonic() - t, 1))
            # the restarted agent watches the writer again and gives it the margin
            await until(lambda w=written: device_size(path) >= w + MARGIN,  # type: ignore[misc]
                        "the restarted agent's extension", timeout=120)
            await writing
            assert qsd.daemon.check_alive(), qsd.daemon.log_tail()
            # (the offsets of the qcow2 file: the data plus qcow2's tables)
            highest = await highest_write(qsd)
            assert written <= highest < device_size(path), (written, highest)
            async with agent.client() as c:
                info = await c.call("getVolumeInfo", **ref)
            now = lvs(sd)[vol]["size"]
            assert info["apparentSize"] == info["trueSize"] == now, (info, now)
            assert now % EXTENT == 0 and now == device_size(path) >= written + MARGIN
            assert (info["capacity"], info["generation"], info["legality"]) == (
                4 * GiB, v["generation"], "LEGAL"), info
        qsd.daemon.stop()
        reads = [c for off, length, p in bursts for c in ("-c", f"read -P {p} {off} {length}")]
        out = g.run("qemu-io", "-f", "qcow2", *reads, path, timeout=300)
        assert "error" not in out.lower() and "Pattern verification failed" not in out, out
        final = lvs(sd)[vol]["size"]
        async with agent.client() as c:
            await c.call("teardownImage", **ref)
            info = await c.call("getVolumeInfo", **ref)
            assert info["apparentSize"] == final and info["legality"] == "LEGAL", info
            await c.call("deleteVolume", **ref)
            await format_and_disconnect(c, sd)
        print(f"\nthin crash: {TRIALS} kills: {dict(stages)}; agent restarts took (s) "
              f"{restarts}; LV {final // MiB} MiB, {written // MiB} MiB written")
    finally:
        qsd.daemon.stop()
        stop_agent(agent, sd)
