"""The agent's state directory on a full file system (a host's /var filled
by logs): a verb whose change cannot be recorded answers 2107
HostStateError and changes nothing, in memory as on disk; jobs end; and
once there is space again the same calls work, and a restart finds what the
engine was told."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from rpc.client import Client, RpcError
from tests.agentproc import AgentProcess

pytestmark = [pytest.mark.timeout(120)]

GiB = 1024**3


def new_id() -> str:
    return str(uuid.uuid4())


class StateFs:
    """A small tmpfs for the agent's state directory, filled on demand."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.filler = path / "filler"

    def fill(self) -> None:
        subprocess.run(["dd", "if=/dev/zero", f"of={self.filler}", "bs=4k"],
                       capture_output=True, check=False)
        probe = self.path / "probe"
        with pytest.raises(OSError, match="No space left"):
            probe.write_bytes(b"x" * 4096)
        probe.unlink(missing_ok=True)

    def free(self) -> None:
        self.filler.unlink()


@pytest.fixture
def state_fs(tmp_path: Path) -> Iterator[StateFs]:
    path = tmp_path / "state"
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(path)], check=True)
    try:
        yield StateFs(path)
    finally:
        subprocess.run(["umount", "--lazy", str(path)], check=True)


async def refused(call: Any) -> RpcError:
    with pytest.raises(RpcError) as e:
        await call
    assert e.value.code == 2107, e.value
    assert "No space left on device" in str(e.value), e.value
    return e.value


async def domain_state(c: Client, sd: str) -> str:
    return str((await c.call("getStorageDomainInfo", sdUUID=sd))["state"])


async def test_full_state_directory(state_fs: StateFs,
                                    agent_factory: Callable[..., AgentProcess],
                                    tmp_path: Path) -> None:
    agent = agent_factory(state_fs.path)
    data = tmp_path / "data"
    (data / "a").mkdir(parents=True)
    (data / "b").mkdir()
    conn = {"id": new_id(), "connection": str(data / "a")}
    other = {"id": new_id(), "connection": str(data / "b")}
    sd, img, vol = new_id(), new_id(), new_id()
    async with agent.client() as c:
        [st] = await c.call("connectStorageServer", domType="localfs", connectionParams=[conn])
        assert st["status"] == 0, st
        await c.call("createStorageDomain", sdUUID=sd, domType="localfs", name="a",
                     connectionId=conn["id"], ovfStore=False)
        job = new_id()
        await c.call("createVolume", jobUUID=job, sdUUID=sd, imgUUID=img, volUUID=vol,
                     size=GiB, format="cow", preallocate="sparse")
        assert (await c.wait_job(job, timeout=30, poll=0.1))["status"] == "done"
        ref = {"sdUUID": sd, "imgUUID": img, "volUUID": vol}

        state_fs.fill()
        # a new connection: not made, and said why
        [st] = await c.call("connectStorageServer", domType="localfs", connectionParams=[other])
        assert st["status"] == 2107 and "No space left" in st["message"], st
        assert other["id"] not in {x["id"] for x in await c.call("getStorageConnections")}
        # the domain stays active (it was left inactive in memory, active on disk)
        await refused(c.call("deactivateStorageDomain", sdUUID=sd))
        assert await domain_state(c, sd) == "active"
        # a volume is not prepared (it was counted in memory, not on disk)
        await refused(c.call("prepareImage", **ref, purpose="read"))
        # a job fails, and ends (it stayed running for ever)
        job = new_id()
        await c.call("createVolume", jobUUID=job, sdUUID=sd, imgUUID=new_id(),
                     volUUID=new_id(), size=GiB, format="cow", preallocate="sparse")
        info = await c.wait_job(job, timeout=30, poll=0.1)
        assert info["status"] == "failed" and info["error"]["code"] == 2107, info

        state_fs.free()
        [st] = await c.call("connectStorageServer", domType="localfs", connectionParams=[other])
        assert st["status"] == 0, st
        await c.call("prepareImage", **ref, purpose="read")
        await c.call("teardownImage", **ref)
        # nothing left prepared: the refused prepare was not counted
        await c.call("deactivateStorageDomain", sdUUID=sd)
        assert await domain_state(c, sd) == "inactive"
        state_fs.fill()
        await refused(c.call("activateStorageDomain", sdUUID=sd))
        assert await domain_state(c, sd) == "inactive"
        state_fs.free()

    # what a restart finds is what the engine was told
    agent.stop()
    agent = agent_factory(state_fs.path, port=agent.port)
    async with agent.client() as c:
        assert await domain_state(c, sd) == "inactive"
        conns = {x["id"]: x["state"] for x in await c.call("getStorageConnections")}
        assert conns == {conn["id"]: "connected", other["id"]: "connected"}, conns
        await c.call("activateStorageDomain", sdUUID=sd)
        assert await domain_state(c, sd) == "active"
        assert (await c.call("getVolumeInfo", **ref))["legality"] == "LEGAL"
