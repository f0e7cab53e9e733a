"""The OVF store of a block domain (an LV on a multipath iSCSI LUN) through
the agent: upload, replace and ranged download, the bytes on the LV itself;
hostile and broken tars refused with the stored tar intact; kill -9 in the
middle of uploads. The checks are the host tier's (file domains), imported
from tests/integration/test_ovfstore.py."""

from __future__ import annotations

import asyncio
import hashlib
import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ovfstore.store import DATA_OFFSET, HEADER_SIZE, Header
from rpc.client import Client
from tests.agentproc import AgentProcess
from tests.integration.test_ovfstore import (
    check_refusals,
    client_of,
    get,
    kill9_trials,
    make_tar,
    ovf_xml,
    put,
    upload,
)
from tests.lab import guestlib as g
from tests.lab.conftest import TargetFactory
from tests.lab.test_connections_lab import PORTAL1, PORTAL2, disconnect_all, iscsi_params

MiB = 1024**2
SLOT = 64 * MiB      # max_tar_size: the store LV is 1 MiB + 2 slots


def new_id() -> str:
    return str(uuid.uuid4())


def start(state: Path, port: int | None = None) -> AgentProcess:
    """The agent with the [ovf] settings check_refusals expects."""
    state.mkdir(parents=True, exist_ok=True)
    (state / "hostagent.toml").write_text(
        "[storage]\nblock_extent_size = 8388608\n"
        f"[ovf]\nmax_tar_size = {SLOT}\nmax_member_size = 1048576\nticket_ttl = 2.0\n")
    agent = AgentProcess(state, port=port)
    g.LOG_DIR.mkdir(parents=True, exist_ok=True)
    agent.log_path = g.LOG_DIR / f"agent-ovf-{agent.port}.log"
    return agent.start(timeout=60)


@dataclass
class BlockDomain:
    agent: AgentProcess      # replaced when a test restarts the agent
    sd: str


@pytest.fixture(scope="module")
def block_domain(target_server: g.TargetServer, iscsi_initiator: g.Initiator,
                 multipathd: g.Multipathd,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[BlockDomain]:
    """One block domain for the module (creating one takes most of a minute
    in the guest), on a 1 GiB LUN over two portals; formatted, disconnected
    and the target removed at the end."""
    factory = TargetFactory(target_server, iscsi_initiator)
    state = tmp_path_factory.mktemp("ovf-agent") / "state"
    dom = BlockDomain(AgentProcess(state), new_id())   # not started yet

    async def create() -> None:
        async with client_of(dom.agent) as c:
            statuses = await c.call("connectStorageServer", domType="iscsi",
                                    connectionParams=[iscsi_params(target, PORTAL1),
                                                      iscsi_params(target, PORTAL2)])
            assert [s["status"] for s in statuses] == [0, 0], statuses
            [lun] = [d for d in await c.call("getDeviceList")
                     if {p["iqn"] for p in d["pathlist"]} == {target.iqn}]
            await c.call("createStorageDomain", sdUUID=dom.sd, domType="iscsi",
                         name="ovfstore", devices=[lun["guid"]])

    async def destroy() -> None:
        async with client_of(dom.agent) as c:
            await c.call("formatStorageDomain", sdUUID=dom.sd)
            for st in await disconnect_all(c):
                assert st["status"] == 0, st

    try:
        target = factory("ovfstore", (1024 * MiB,))
        dom.agent = start(state)
        asyncio.run(create())
        yield dom
        asyncio.run(destroy())
    finally:
        dom.agent.stop()
        factory.release_all()


async def store_lv(c: Client, sd: str) -> str:
    """The device path of the domain's OVF store volume."""
    for img in await c.call("getImagesList", sdUUID=sd):
        for vol in await c.call("getVolumesList", sdUUID=sd, imgUUID=img):
            info = await c.call("getVolumeInfo", sdUUID=sd, imgUUID=img, volUUID=vol)
            if info["diskType"] == "OVFS":
                return f"/dev/{sd}/{vol}"
    raise AssertionError(f"no OVF store volume on {sd}")


def on_lv(path: str, size: int) -> tuple[Header, bytes]:
    """The header and the current tar as they are on the LV (O_DIRECT: not
    this host's page cache)."""
    header = Header.decode(g.direct_read(path, HEADER_SIZE))
    base = DATA_OFFSET + header.slot * SLOT
    length = (size + 4095) // 4096 * 4096
    return header, g.direct_read(path, length, base)[:size]


async def test_upload_replace_download(block_domain: BlockDomain) -> None:
    agent, sd = block_domain.agent, block_domain.sd
    async with client_of(agent) as c:
        vm, tpl = new_id(), new_id()
        img, vol = new_id(), new_id()
        first = make_tar([(f"{vm}.ovf", ovf_xml("web01", tpl, [(img, vol)])),
                          (f"{tpl}.ovf", ovf_xml("base", tpl, [])),
                          ("metadata.json", b'{"version": 1}')])
        status, result = await upload(c, agent, sd, first)
        assert status == 200, result
        gen = result["generation"]
        assert (await get(agent, sd)) == (200, first)
        entities = {e["id"]: e for e in await c.call("listOvfEntities", sdUUID=sd)}
        assert entities[vm]["name"] == "web01" and entities[vm]["kind"] == "vm"
        assert entities[vm]["disks"] == [{"imgUUID": img, "volUUID": vol, "sdUUID": None}]
        assert entities[tpl]["kind"] == "template"

        # a replacement larger than one upload buffer, sent in odd-sized chunks
        second = make_tar([(f"{new_id()}.ovf", random.Random(5).randbytes(900_000))
                           for _ in range(6)])
        t = await c.call("uploadOvfTar", sdUUID=sd, size=len(second),
                         sha256=hashlib.sha256(second).hexdigest())
        status, result = await put(agent, t["path"], second, chunk=100_003)
        assert status == 200, result
        assert result == {"generation": gen + 1, "size": len(second),
                          "sha256": hashlib.sha256(second).hexdigest()}
        assert (await get(agent, sd)) == (200, second)
        assert (await get(agent, sd, "bytes=1000-4999999")) == (206, second[1000:5000000])
        info = await c.call("getOvfStoreInfo", sdUUID=sd)
        assert info["generation"] == gen + 1 and info["entries"] == 6
        # the tar is on the LV itself, behind the header that names it
        header, data = on_lv(await store_lv(c, sd), len(second))
        assert header.generation == gen + 1 and header.size == len(second)
        assert data == second


async def test_hostile_and_broken_tars_leave_old_tar(block_domain: BlockDomain) -> None:
    agent, sd = block_domain.agent, block_domain.sd
    async with client_of(agent) as c:
        good = await check_refusals(agent, c, sd)
        header, data = on_lv(await store_lv(c, sd), len(good))
    assert data == good and header.sha256 == hashlib.sha256(good).hexdigest()


@pytest.mark.timeout(240)
async def test_kill9_during_uploads(block_domain: BlockDomain) -> None:
    def restart(dead: AgentProcess) -> AgentProcess:
        block_domain.agent = start(dead.state_dir, port=dead.port)
        return block_domain.agent

    _, outcomes = await kill9_trials(block_domain.agent, restart, block_domain.sd,
                                     trials=10, rng=random.Random(11))
    print(f"kill -9 during uploads: {outcomes}")
    assert outcomes["old"] + outcomes["new"] == 10
    assert outcomes["old"] and outcomes["new"], outcomes
