"""Two agents on one host sharing a posixfs domain, as two hosts would: each
with its own host id and the local lease backend (file locks on the
domain). Writes to one volume exclude each other, concurrent creates all
land, one agent's garbage collection leaves the other's volume being made
alone, and a domain whose lock policy this host lacks refuses every write.
(The same with sanlock and separate hosts: tests/lab/test_multihost_lab.py.)"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from rpc.client import Client, RpcError
from storage.leases.local import try_lock
from tests.agentproc import AgentProcess
from tests.integration.storagefixtures import FsMount, make_fs

MiB = 1024**2
GiB = 1024**3

pytestmark = pytest.mark.parametrize("fs_mount", [("ext4", 512)], indirect=True,
                                     ids=["ext4-512"])


def new_id() -> str:
    return str(uuid.uuid4())


def config(host_id: int, backends: tuple[str, ...] = ("local",), policy: str = "local",
           run_dir: Path | None = None) -> str:
    lines = ["[leases]", f"host_id = {host_id}",
             "backends = [" + ", ".join(f'"{b}"' for b in backends) + "]",
             f'policy = "{policy}"', "io_timeout = 1", "domain_lease_timeout = 30.0"]
    if run_dir is not None:
        lines.append(f'run_dir = "{run_dir}"')
    return "\n".join(lines) + "\n"


@dataclass
class Host:
    agent: AgentProcess
    c: Client


@dataclass
class Shared:
    hosts: list[Host]
    sd: str
    params: dict[str, Any]


async def job(c: Client, verb: str, **params: Any) -> dict[str, Any]:
    job_id = new_id()
    await c.call(verb, jobUUID=job_id, **params)
    return dict(await c.wait_job(job_id, timeout=180))


def start(agent_factory: Callable[..., AgentProcess], tmp_path: Path, name: str,
          toml: str) -> AgentProcess:
    state = tmp_path / name
    state.mkdir()
    (state / "hostagent.toml").write_text(toml)
    return agent_factory(state)


@pytest.fixture
async def shared(fs_mount: FsMount, loop_device: Callable[..., Path],
                 agent_factory: Callable[..., AgentProcess],
                 tmp_path: Path) -> AsyncIterator[Shared]:
    """Host 1 creates a posixfs domain; host 2 connects and activates it."""
    dev = loop_device(size=3 * GiB, sector_size=512)
    make_fs(dev, "ext4")
    params = {"id": new_id(), "connection": str(dev), "vfs_type": "ext4"}
    sd = new_id()
    hosts = []
    async with contextlib.AsyncExitStack() as stack:
        for host_id in (1, 2):
            agent = start(agent_factory, tmp_path, f"host{host_id}", config(host_id))
            c = await stack.enter_async_context(agent.client())
            [st] = await c.call("connectStorageServer", domType="posixfs",
                                connectionParams=[params])
            assert st["status"] == 0, st
            hosts.append(Host(agent, c))
        await hosts[0].c.call("createStorageDomain", sdUUID=sd, domType="posixfs",
                              name="shared", domClass="data", connectionId=params["id"],
                              ovfStore=False)
        await hosts[1].c.call("activateStorageDomain", sdUUID=sd)
        yield Shared(hosts, sd, params)
        for h in hosts:
            await h.c.call("disconnectStorageServer", domType="posixfs",
                           connectionParams=[params])


async def test_both_hosts_joined_with_their_ids(shared: Shared) -> None:
    for host_id, h in enumerate(shared.hosts, 1):
        info = await h.c.call("getStorageDomainInfo", sdUUID=shared.sd)
        assert info["lockPolicy"] == "local"
        ls = info["lockspace"]
        assert (ls["hostId"], ls["state"], ls["backend"]) == (host_id, "joined", "local"), ls


async def test_concurrent_creates_from_two_hosts_all_land(shared: Shared) -> None:
    img = {h.agent.port: new_id() for h in shared.hosts}

    async def creates(h: Host, n: int) -> list[str]:
        vols = []
        for _ in range(n):
            vol = new_id()
            info = await job(h.c, "createVolume", sdUUID=shared.sd, imgUUID=img[h.agent.port],
                             volUUID=vol, size=GiB, format="cow", preallocate="sparse",
                             **({"parentVolUUID": vols[-1]} if vols else {}))
            assert info["status"] == "done", info
            vols.append(vol)
        return vols

    made = await asyncio.gather(*(creates(h, 10) for h in shared.hosts))
    for h in shared.hosts:
        for vols, image in zip(made, img.values(), strict=True):
            listed = await h.c.call("getVolumesList", sdUUID=shared.sd, imgUUID=image)
            assert sorted(listed) == sorted(vols)
            top = await h.c.call("getVolumeInfo", sdUUID=shared.sd, imgUUID=image,
                                 volUUID=vols[-1])
            assert top["legality"] == "LEGAL" and top["voltype"] == "LEAF"
    stats = await shared.hosts[0].c.call("getStats")
    assert stats["leases"] == []


async def make_source(h: Host, sd: str, size: int) -> tuple[str, str]:
    """A raw volume full of data (a copy of it takes a while)."""
    img, vol = new_id(), new_id()
    info = await job(h.c, "createVolume", sdUUID=sd, imgUUID=img, volUUID=vol, size=size,
                     format="raw", preallocate="preallocated")
    assert info["status"] == "done", info
    prep = await h.c.call("prepareImage", sdUUID=sd, imgUUID=img, volUUID=vol, purpose="copy")
    subprocess.run(["dd", "if=/dev/urandom", f"of={prep['path']}", "bs=4M",
                    f"count={size // (4 * MiB)}", "conv=notrunc,fsync", "status=none"],
                   check=True)
    await h.c.call("teardownImage", sdUUID=sd, imgUUID=img, volUUID=vol)
    return img, vol


async def test_two_hosts_copying_into_one_target(shared: Shared) -> None:
    """Both copy into the same new volume at once: one makes it, the other
    is refused with 651 while it is being made; the target is the source's
    data; the loser's garbage collection did not touch it."""
    a, b = shared.hosts
    src_img, src_vol = await make_source(a, shared.sd, 768 * MiB)
    dst = {"sdUUID": shared.sd, "imgUUID": new_id(), "volUUID": new_id()}
    src = {"sdUUID": shared.sd, "imgUUID": src_img, "volUUID": src_vol}
    first = new_id()
    await a.c.call("copyImage", jobUUID=first, src=src, dst=dst, preallocate="preallocated")
    # host 2 arrives once host 1 holds the target
    for _ in range(200):
        held = (await a.c.call("getStats"))["leases"]
        if any(lease["resource"] == dst["volUUID"] for lease in held):
            break
        await asyncio.sleep(0.02)
    else:
        pytest.fail("host 1 never held the target's lease")
    second = await job(b.c, "copyImage", src=src, dst=dst, preallocate="preallocated")
    assert second["status"] == "failed", second
    assert second["error"]["code"] == 651, second["error"]
    # host 2 re-activates meanwhile: its garbage collection leaves the target
    await b.c.call("deactivateStorageDomain", sdUUID=shared.sd)
    await b.c.call("activateStorageDomain", sdUUID=shared.sd)
    deleted = await job(b.c, "deleteImage", sdUUID=shared.sd, imgUUID=dst["imgUUID"])
    assert deleted["status"] == "failed" and deleted["error"]["code"] == 651, deleted
    info = await a.c.wait_job(first, timeout=180)
    assert info["status"] == "done", info
    paths = []
    for d in (src, dst):
        prep = await b.c.call("prepareImage", purpose="read", **d)
        paths.append(prep["path"])
    subprocess.run(["qemu-img", "compare", "-U", *paths], check=True, capture_output=True)
    for d in (src, dst):
        await b.c.call("teardownImage", **d)
    vol = await b.c.call("getVolumeInfo", **dst)
    assert vol["legality"] == "LEGAL"


async def test_volume_lease_held_elsewhere_refuses_writes(shared: Shared,
                                                         tmp_path: Path) -> None:
    """A third holder (another host's lock on the volume's lease) makes
    every write to that volume fail with 651, and changes nothing."""
    a, _ = shared.hosts
    img, vol = new_id(), new_id()
    info = await job(a.c, "createVolume", sdUUID=shared.sd, imgUUID=img, volUUID=vol,
                     size=GiB, format="cow", preallocate="sparse")
    assert info["status"] == "done", info
    root = Path((await a.c.call("getStorageDomainInfo", sdUUID=shared.sd))["path"])
    fd = try_lock(str(root / "images" / img / f"{vol}.lease"), 0)
    assert fd is not None
    try:
        before = await a.c.call("getVolumeInfo", sdUUID=shared.sd, imgUUID=img, volUUID=vol)
        with pytest.raises(RpcError) as e:
            await a.c.call("extendVolumeSize", sdUUID=shared.sd, imgUUID=img, volUUID=vol,
                           newSize=2 * GiB)
        assert e.value.code == 651, e.value
        with pytest.raises(RpcError) as e:
            await a.c.call("deleteVolume", sdUUID=shared.sd, imgUUID=img, volUUID=vol)
        assert e.value.code == 651, e.value
        deleted = await job(a.c, "deleteImage", sdUUID=shared.sd, imgUUID=img)
        assert deleted["status"] == "failed" and deleted["error"]["code"] == 651, deleted
        after = await a.c.call("getVolumeInfo", sdUUID=shared.sd, imgUUID=img, volUUID=vol)
        assert after == before
    finally:
        os.close(fd)
    await a.c.call("deleteVolume", sdUUID=shared.sd, imgUUID=img, volUUID=vol)


async def test_domain_of_a_policy_this_host_lacks_refuses_writes(
        fs_mount: FsMount, loop_device: Callable[..., Path],
        agent_factory: Callable[..., AgentProcess], tmp_path: Path) -> None:
    """Host 1 has the sanlock backend configured (its daemon is not running
    here) and makes a sanlock domain; host 2 has only the local backend.
    Both see the domain and read it; neither writes to it unprotected."""
    dev = loop_device(size=GiB, sector_size=512)
    make_fs(dev, "ext4")
    params = {"id": new_id(), "connection": str(dev), "vfs_type": "ext4"}
    sd = new_id()
    run_dir = tmp_path / "run"
    one = start(agent_factory, tmp_path, "host1",
                config(1, ("local", "sanlock"), "sanlock", run_dir))
    two = start(agent_factory, tmp_path, "host2", config(2))
    async with one.client() as c1, two.client() as c2:
        for c in (c1, c2):
            [st] = await c.call("connectStorageServer", domType="posixfs",
                                connectionParams=[params])
            assert st["status"] == 0, st
        try:
            info = await c1.call("createStorageDomain", sdUUID=sd, domType="posixfs",
                                 name="sanlocked", domClass="data",
                                 connectionId=params["id"], ovfStore=False)
            assert info["lockPolicy"] == "sanlock"
            # no daemon here: host 1 cannot join either
            assert info["lockspace"]["state"] in ("free", "failed"), info["lockspace"]
            await c2.call("activateStorageDomain", sdUUID=sd)
            info2 = await c2.call("getStorageDomainInfo", sdUUID=sd)
            assert info2["state"] == "active" and info2["lockspace"]["state"] != "joined"
            assert "sanlock" in info2["lockspace"]["reason"]
            for c, why in ((c1, "sanlock"), (c2, "not configured")):
                created = await job(c, "createVolume", sdUUID=sd, imgUUID=new_id(),
                                    volUUID=new_id(), size=GiB, format="cow",
                                    preallocate="sparse")
                assert created["status"] == "failed", created
                assert created["error"]["code"] == 661, created["error"]
                assert why in created["error"]["message"], created["error"]
            with pytest.raises(RpcError) as e:
                await c2.call("setStorageDomainBackup", sdUUID=sd, backup=True)
            assert e.value.code == 661
            assert await c2.call("getImagesList", sdUUID=sd) == []
            assert (await c2.call("getStorageDomainInfo", sdUUID=sd))["backup"] is False
        finally:
            for c in (c1, c2):
                await c.call("disconnectStorageServer", domType="posixfs",
                             connectionParams=[params])


def holder_pid(agent: AgentProcess) -> int:
    """The agent's lock holder process (its child running lockholder)."""
    assert agent.proc is not None
    out = subprocess.run(["pgrep", "-P", str(agent.proc.pid), "-f", "lockholder"],
                         capture_output=True, text=True).stdout.split()
    assert len(out) == 1, out
    return int(out[0])


async def test_lost_lease_stops_the_copy_and_the_host_recovers(
        fs_mount: FsMount, loop_device: Callable[..., Path],
        agent_factory: Callable[..., AgentProcess], tmp_path: Path) -> None:
    """The locks vanish under a running copy (the lock holder dies, as an
    expired NFSv4 lock would): the copy stops with 2112 LeaseLost, its target
    is gone, the host id is joined again and the next copy works."""
    dev = loop_device(size=4 * GiB, sector_size=512)
    make_fs(dev, "ext4")
    params = {"id": new_id(), "connection": str(dev), "vfs_type": "ext4"}
    sd = new_id()
    agent = start(agent_factory, tmp_path, "host1",
                  config(1) + "check_interval = 0.2\n[storage]\nmonitor_interval = 0.5\n")
    async with agent.client() as c:
        [st] = await c.call("connectStorageServer", domType="posixfs",
                            connectionParams=[params])
        assert st["status"] == 0, st
        try:
            await c.call("createStorageDomain", sdUUID=sd, domType="posixfs", name="lost",
                         domClass="data", connectionId=params["id"], ovfStore=False)
            h = Host(agent, c)
            src_img, src_vol = await make_source(h, sd, 1024 * MiB)
            src = {"sdUUID": sd, "imgUUID": src_img, "volUUID": src_vol}
            dst = {"sdUUID": sd, "imgUUID": new_id(), "volUUID": new_id()}
            job_id = new_id()
            await c.call("copyImage", jobUUID=job_id, src=src, dst=dst, format="cow")
            for _ in range(500):
                held = (await c.call("getStats"))["leases"]
                if any(lease["resource"] == dst["volUUID"] for lease in held):
                    break
                await asyncio.sleep(0.01)
            else:
                pytest.fail(f"the copy never held its target's lease: "
                            f"{await c.call('getJobs')}")
            os.kill(holder_pid(agent), 9)
            info = await c.wait_job(job_id, timeout=60)
            assert info["status"] == "failed", info
            assert info["error"]["code"] == 2112, info["error"]
            # joined again by the monitor; the half-made target is collected
            for _ in range(100):
                ls = (await c.call("getStorageDomainInfo", sdUUID=sd))["lockspace"]
                if ls["state"] == "joined":
                    break
                await asyncio.sleep(0.1)
            assert ls["state"] == "joined", ls
            for _ in range(50):
                if dst["imgUUID"] not in await c.call("getImagesList", sdUUID=sd):
                    break
                await asyncio.sleep(0.1)
            else:
                pytest.fail("the lost copy's target is still listed")
            again = await job(c, "copyImage", src=src, dst=dst)
            assert again["status"] == "done", again
        finally:
            await c.call("disconnectStorageServer", domType="posixfs",
                         connectionParams=[params])
