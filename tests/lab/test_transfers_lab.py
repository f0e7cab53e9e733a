"""Disk transfers on a block domain (LVs on a multipath iSCSI LUN) with
ovirt-imageio's own client: upload into a cow and a raw volume, download
back, equal; the host tier's helpers (tests/integration/test_transfers.py)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.agentproc import AgentProcess
from tests.integration.test_transfers import (
    Dom,
    client,
    make_image,
    new_id,
    qemu_img,
    qemu_nbd_of,
)
from tests.lab import guestlib as g
from tests.lab.conftest import TargetFactory
from tests.lab.test_connections_lab import PORTAL1, PORTAL2, disconnect_all, iscsi_params

MiB = 1024**2

pytestmark = pytest.mark.filterwarnings(
    r"ignore:Exception ignored in. <socket.socket .*imageio-:"
    "pytest.PytestUnraisableExceptionWarning")


@pytest.fixture(scope="module")
def block_agent(target_server: g.TargetServer, iscsi_initiator: g.Initiator,
                multipathd: g.Multipathd,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[AgentProcess, str]]:
    """An agent and one block domain on a 1 GiB LUN over two portals;
    formatted, disconnected and the target removed at the end."""
    factory = TargetFactory(target_server, iscsi_initiator)
    state = tmp_path_factory.mktemp("xfer-agent") / "state"
    state.mkdir(parents=True)
    (state / "hostagent.toml").write_text("[storage]\nblock_extent_size = 8388608\n")
    agent = AgentProcess(state)
    g.LOG_DIR.mkdir(parents=True, exist_ok=True)
    agent.log_path = g.LOG_DIR / f"agent-xfer-{agent.port}.log"
    sd = new_id()

    async def create() -> None:
        async with agent.client() as c:
            statuses = await c.call("connectStorageServer", domType="iscsi",
                                    connectionParams=[iscsi_params(target, PORTAL1),
                                                      iscsi_params(target, PORTAL2)])
            assert [s["status"] for s in statuses] == [0, 0], statuses
            [lun] = [d for d in await c.call("getDeviceList")
                     if {p["iqn"] for p in d["pathlist"]} == {target.iqn}]
            await c.call("createStorageDomain", sdUUID=sd, domType="iscsi",
                         name="xfer", devices=[lun["guid"]], ovfStore=False)

    async def destroy() -> None:
        async with agent.client() as c:
            await c.call("formatStorageDomain", sdUUID=sd)
            for st in await disconnect_all(c):
                assert st["status"] == 0, st

    try:
        target = factory("xfer", (1024 * MiB,))
        agent.start(timeout=60)
        asyncio.run(create())
        yield agent, sd
        asyncio.run(destroy())
    finally:
        agent.stop()
        factory.release_all()


@pytest.mark.parametrize("vol_fmt", ["cow", "raw"])
async def test_upload_download_block(block_agent: tuple[AgentProcess, str], tmp_path: Path,
                                     vol_fmt: str) -> None:
    agent, sd = block_agent
    size = 64 * MiB
    raw = tmp_path / "src.raw"
    data = make_image(raw, size, [(0, MiB), (20 * MiB, 3 * MiB), (60 * MiB, 4 * MiB)])
    src = tmp_path / "src.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", str(raw), str(src))
    async with agent.client() as c:
        d = Dom(agent, c, sd)
        kw = {"initialSize": size + 8 * MiB} if vol_fmt == "cow" else \
            {"preallocate": "preallocated"}
        img, vol = await d.volume(size, vol_fmt, **kw)
        t = await d.start(img, vol, "upload")
        assert (await d.info(img, vol))["legality"] == "ILLEGAL"
        await asyncio.to_thread(client.upload, str(src), t["url"], d.ca)
        done = await c.call("finalizeTransfer", transferId=t["transferId"])
        assert done["transferred"] == data
        assert (await d.info(img, vol))["legality"] == "LEGAL"
        t = await d.start(img, vol, "download")
        out = tmp_path / "out.qcow2"
        await asyncio.to_thread(client.download, t["url"], str(out), d.ca, fmt="qcow2")
        await c.call("finalizeTransfer", transferId=t["transferId"])
        qemu_img("compare", str(raw), str(out))
        # the LVs are deactivated once the transfer closed
        assert not Path(f"/dev/{sd}/{vol}").exists()


# the module's domain is set up and formatted within this test's time when
# it runs alone (about 100 s of the guest's LVM and iSCSI work)
@pytest.mark.timeout(300)
async def test_agent_killed_with_transfers_open_block(
        block_agent: tuple[AgentProcess, str]) -> None:
    """kill -9 with an upload and a download open on a block domain: their
    qemu-nbd end with the agent; after a restart both transfer jobs are
    failed as interrupted, the LVs they had active are deactivated, the
    upload's ILLEGAL volume is removed, the download's volume is LEGAL and
    not leased (a new transfer takes it)."""
    agent, sd = block_agent
    size = 16 * MiB
    async with agent.client() as c:
        d = Dom(agent, c, sd)
        img, vol = await d.volume(size, "cow", initialSize=size + 8 * MiB)
        kept_img, kept = await d.volume(size, "cow", initialSize=size + 8 * MiB)
        up = await d.start(img, vol, "upload")
        status, _ = d.request(up["url"], "PUT", body=os.urandom(MiB),
                              headers={"Content-Range": f"bytes 0-{MiB - 1}/*"})
        assert status == 200
        down = await d.start(kept_img, kept, "download")
        assert d.request(down["url"], "GET", headers={"Range": "bytes=0-4095"})[0] == 206
        assert len(qemu_nbd_of(vol)) == 1 and len(qemu_nbd_of(kept)) == 1
        assert Path(f"/dev/{sd}/{vol}").exists() and Path(f"/dev/{sd}/{kept}").exists()
    agent.kill()
    g.wait_until(lambda: not qemu_nbd_of(vol) and not qemu_nbd_of(kept),
                 "the transfers' qemu-nbd to end", timeout=10)
    agent.start(timeout=60)
    async with agent.client() as c:
        d = Dom(agent, c, sd)
        jobs = await c.call("getJobs", jobUUIDs=[up["transferId"], down["transferId"]])
        assert len(jobs) == 2, jobs
        for job in jobs.values():
            assert job["status"] == "failed" and job["error"]["code"] == 2106, job
        assert not Path(f"/dev/{sd}/{kept}").exists()
        assert img not in await c.call("getImagesList", sdUUID=sd)
        assert (await d.info(kept_img, kept))["legality"] == "LEGAL"
        t = await d.start(kept_img, kept, "upload")
        await c.call("cancelTransfer", transferId=t["transferId"])
        assert kept_img not in await c.call("getImagesList", sdUUID=sd)
        assert not Path(f"/dev/{sd}/{kept}").exists()
