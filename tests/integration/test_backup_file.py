"""Backup domains and backups to secondary storage (the seeds "Backup
Storage Domain" and "VolumeSnapshot API Enhancement") through the real
agent, on the three file domains of test_images_file plus a backup domain."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import tarfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest

from rpc.client import Client, client_ssl_context
from tests.agentproc import AgentProcess
from tests.integration.test_domains_file import Storage, new_id, qemu_info
from tests.integration.test_images_file import Disk, Env, release, three_domains

MiB = 1024**2


class BackupEnv(Env):
    def __init__(self, c: Client, storages: list[Storage], backup: Storage,
                 agent: AgentProcess) -> None:
        super().__init__(c, storages)
        self.agent = agent
        self.backup = backup.sd
        self.backup_conn = backup.params
        self.sds_all = [*self.sds, backup.sd]

    async def volumes(self) -> dict[str, list[str]]:
        return {sd: sorted(await self.c.call("getVolumesList", sdUUID=sd))
                for sd in self.sds_all}


@pytest.fixture
async def benv(loop_device: Callable[..., Path], agent: AgentProcess, client: Client,
               tmp_path: Path) -> AsyncIterator[BackupEnv]:
    storages = await three_domains(client, loop_device, tmp_path)
    bdir = tmp_path / "backup"
    bdir.mkdir()
    backup = Storage(client, "localfs", {"connection": str(bdir)})
    await backup.connect()
    # a backup domain with its OVF store: what an importer needs
    await backup.create_domain(name="backup", domClass="backup", ovfStore=True)
    yield BackupEnv(client, storages, backup, agent)
    await release(client, [*storages, backup])


def allocated(path: str) -> int:
    """Bytes of guest data the image itself holds (not its backing)."""
    out = subprocess.run(["qemu-img", "map", "--output", "json", "-U", path],
                         capture_output=True, text=True, check=True).stdout
    return sum(e["length"] for e in json.loads(out) if e["data"] and e["depth"] == 0)


async def test_backup_domain_restrictions(benv: BackupEnv) -> None:
    c = benv.c
    info = await c.call("getStorageDomainInfo", sdUUID=benv.backup)
    assert info["backup"] is True and info["class"] == "backup"
    d = await benv.disk(benv.sds[0], data=1)
    on_backup = await benv.disk(benv.backup)
    before = await benv.volumes()
    # a backup domain's volume is never prepared for a running VM
    with pytest.raises(Exception) as e:
        await c.call("prepareImage", **on_backup.ref(), purpose="vm")
    assert getattr(e.value, "code", None) == 2104
    await benv.path(on_backup, "read")
    await benv.teardown(on_backup)
    # a disk a running VM uses cannot move onto a backup domain
    await benv.path(d, "vm")
    info = await benv.job("moveImage", sdUUID=d.sd, imgUUID=d.img, dstSdUUID=benv.backup)
    assert info["status"] == "failed" and info["error"]["code"] == 2104, info
    # a domain with a VM's prepared volume cannot become a backup domain
    with pytest.raises(Exception) as e:
        await c.call("setStorageDomainBackup", sdUUID=d.sd, backup=True)
    assert getattr(e.value, "code", None) == 2102
    assert (await c.call("getStorageDomainInfo", sdUUID=d.sd))["backup"] is False
    await benv.teardown(d)
    # backups go to backup domains only
    info = await benv.job("backupVolume", src=d.ref(),
                          dst=Disk(benv.sds[1], new_id(), new_id()).ref())
    assert info["status"] == "failed" and info["error"]["code"] == 1000, info
    assert "dst.sdUUID" in info["error"]["message"]
    assert await benv.volumes() == before
    # unmarked, the domain is a data domain again on storage
    await c.call("setStorageDomainBackup", sdUUID=benv.backup, backup=False)
    assert (await c.call("getStorageDomainInfo", sdUUID=benv.backup))["class"] == "data"
    await c.call("setStorageDomainBackup", sdUUID=benv.backup, backup=True)


async def test_full_backup_round_trip(benv: BackupEnv) -> None:
    c = benv.c
    d = await benv.disk(benv.sds[0], data=0x11)
    at_backup = await benv.digest(d)
    b = Disk(benv.backup, new_id(), new_id())
    result = await benv.done("backupVolume", src=d.ref(), dst=b.ref(), keepSnapshot=False)
    assert result["merged"] is True and result["snapshotVolUUID"] is None
    assert result["backup"]["format"] == "cow" and result["backup"]["legality"] == "LEGAL"
    # the layer was merged back: the disk is one volume again
    assert await c.call("getVolumesList", sdUUID=d.sd, imgUUID=d.img) == [d.vol]
    # the disk keeps changing; the backup does not
    await benv.write(d, 0x22, offset=4 * MiB, length=MiB)
    assert await benv.digest(d) != at_backup
    assert await benv.digest(b) == at_backup
    # restore: copyImage from the backup domain to any data domain
    restored = Disk(benv.sds[2], new_id(), new_id())
    await benv.done("copyImage", src=b.ref(), dst=restored.ref(), format="raw")
    assert await benv.digest(restored) == at_backup


async def test_incremental_backups(benv: BackupEnv) -> None:
    c = benv.c
    size = 256 * MiB
    d = await benv.disk(benv.sds[1], size=size, fmt="cow")
    await benv.write(d, 0x31, offset=0, length=size)
    full = Disk(benv.backup, new_id(), new_id())
    r = await benv.done("backupVolume", src=d.ref(), dst=full.ref())
    # keepSnapshot (default): the disk goes on on the new layer
    top = Disk(d.sd, d.img, r["snapshotVolUUID"])
    assert (await c.call("getVolumeInfo", **top.ref()))["parent"] == d.vol
    at_full = await benv.digest(top)

    # change 1% of the disk, in three places
    for off in (10 * MiB, 100 * MiB, 200 * MiB):
        await benv.write(top, 0x32, offset=off, length=size // 300)
    at_inc1 = await benv.digest(top)
    inc1 = Disk(benv.backup, full.img, new_id())
    r = await benv.done("backupVolume", src=top.ref(), dst=inc1.ref(), keepSnapshot=False,
                        incrementalFrom=full.ref())
    assert r["incremental"] is True and r["merged"] is True
    info = await c.call("getVolumeInfo", **inc1.ref())
    assert info["parent"] == full.vol and info["format"] == "cow"
    # it holds about the 1% that changed, not the disk
    path = await benv.path(inc1)
    held = allocated(path)
    await benv.teardown(inc1)
    assert size // 100 <= held <= size // 100 + 3 * MiB, held
    # restoring the top of the chain gives the disk at the second backup
    assert await benv.digest(inc1) == at_inc1
    assert await benv.digest(full) == at_full

    # after the merge the disk still tracks changes since both backups
    await benv.write(top, 0x33, offset=50 * MiB, length=MiB)
    at_inc2 = await benv.digest(top)
    inc2 = Disk(benv.backup, full.img, new_id())
    await benv.done("backupVolume", src=top.ref(), dst=inc2.ref(), incrementalFrom=inc1.ref())
    path = await benv.path(inc2)
    assert allocated(path) <= 2 * MiB
    await benv.teardown(inc2)
    assert await benv.digest(inc2) == at_inc2
    restored = Disk(benv.sds[0], new_id(), new_id())
    await benv.done("copyImage", src=inc2.ref(), dst=restored.ref())
    assert await benv.digest(restored) == at_inc2

    # incremental from a backup the disk has no record of: refused, nothing made
    other = await benv.disk(benv.sds[2], data=1)
    before = await benv.volumes()
    info = await benv.job("backupVolume", src=other.ref(),
                          dst=Disk(benv.backup, full.img, new_id()).ref(),
                          incrementalFrom=full.ref())
    assert info["status"] == "failed" and info["error"]["code"] == 1000, info
    assert "incrementalFrom" in info["error"]["message"]
    assert await benv.volumes() == before


async def test_three_disk_vm_backed_up_and_imported_elsewhere(
        benv: BackupEnv, agent_factory: Callable[..., AgentProcess], tmp_path: Path) -> None:
    c = benv.c
    vm_id = new_id()
    vm = [await benv.disk(sd, data=0x40 + i) for i, sd in enumerate(benv.sds)]
    digests = [await benv.digest(d) for d in vm]
    backups = [Disk(benv.backup, new_id(), new_id()) for _ in vm]
    result = await benv.done("backupVolume", src=[d.ref() for d in vm],
                             dst=[b.ref() for b in backups], keepSnapshot=False)
    assert [r["backup"]["uuid"] for r in result] == [b.vol for b in backups]
    # the VM's OVF goes into the backup domain's OVF store
    ovf = ('<?xml version="1.0"?><ovf:Envelope xmlns:ovf="http://schemas.dmtf.org/ovf/'
           'envelope/1/" xmlns:rasd="x" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">'
           '<References>' + "".join(
               f'<File ovf:href="{b.img}/{b.vol}" ovf:id="{b.vol}"/>' for b in backups)
           + '</References><Content ovf:id="out" xsi:type="ovf:VirtualSystem_Type">'
           '<Name>backed-up-vm</Name><TemplateId>00000000-0000-0000-0000-000000000000'
           '</TemplateId></Content></ovf:Envelope>').encode()
    body = io.BytesIO()
    with tarfile.open(fileobj=body, mode="w") as tar:
        ti = tarfile.TarInfo(f"{vm_id}.ovf")
        ti.size = len(ovf)
        tar.addfile(ti, io.BytesIO(ovf))
    t = await c.call("uploadOvfTar", sdUUID=benv.backup, size=len(body.getvalue()))
    pki = benv.agent.pki
    ctx = client_ssl_context(pki / "ca.pem", pki / "client.pem", pki / "client.key")
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as s:
        async with s.put(f"{benv.agent.url}{t['path']}", data=body.getvalue()) as r:
            assert r.status == 200, await r.text()

    # another host (a second agent, fresh state dir) attaches the backup
    # domain's storage and finds the VM and every disk there
    bconn = benv.backup_conn
    other = agent_factory(tmp_path / "importer")
    async with other.client() as c2:
        [st] = await c2.call("connectStorageServer", domType="localfs",
                             connectionParams=[bconn])
        assert st["status"] == 0, st
        assert benv.backup in await c2.call("getStorageDomainsList")
        info = await c2.call("getStorageDomainInfo", sdUUID=benv.backup)
        assert info["backup"] is True
        images = set(await c2.call("getImagesList", sdUUID=benv.backup))
        assert {b.img for b in backups} <= images
        [entity] = [e for e in await c2.call("listOvfEntities", sdUUID=benv.backup)
                    if e["id"] == vm_id]
        assert entity["kind"] == "vm" and entity["name"] == "backed-up-vm"
        assert sorted((d["imgUUID"], d["volUUID"], d["sdUUID"]) for d in entity["disks"]) == \
            sorted((b.img, b.vol, benv.backup) for b in backups)
        await c2.call("activateStorageDomain", sdUUID=benv.backup)
        # restore each disk from there onto a data domain it can reach: its own
        # localfs directory next to the backup
        for b, dig in zip(backups, digests, strict=True):
            p = await c2.call("prepareImage", **b.ref(), purpose="read")
            assert qemu_info(p["path"])["format"] == "qcow2"
            await c2.call("teardownImage", sdUUID=b.sd, imgUUID=b.img)
            assert await benv.digest(b) == dig
        await c2.call("deactivateStorageDomain", sdUUID=benv.backup)
        await c2.call("disconnectStorageServer", domType="localfs", connectionParams=[bconn])


async def test_backup_of_several_disks_is_all_or_nothing(benv: BackupEnv) -> None:
    c = benv.c
    vm = [await benv.disk(sd, data=0x50 + i, fmt="cow") for i, sd in enumerate(benv.sds)]
    taken = await benv.disk(benv.backup)
    before = await benv.volumes()
    # the third disk's target exists already: nothing of the first two stays
    dst = [Disk(benv.backup, new_id(), new_id()).ref() for _ in vm[:2]] + [taken.ref()]
    info = await benv.job("backupVolume", src=[d.ref() for d in vm], dst=dst)
    assert info["status"] == "failed" and info["error"]["code"] == 212, info
    assert await benv.volumes() == before
    for d in vm:
        assert (await c.call("getVolumeInfo", **d.ref()))["voltype"] == "LEAF"
    # shapes that do not match are refused before a job exists
    with pytest.raises(Exception) as e:
        await c.call("backupVolume", jobUUID=new_id(), src=[d.ref() for d in vm],
                     dst=dst[:2])
    assert getattr(e.value, "code", None) == -32602 and "dst" in str(e.value)


async def test_aborted_backup_of_several_disks_leaves_nothing(benv: BackupEnv) -> None:
    c = benv.c
    vm = []
    for i, sd in enumerate(benv.sds):
        d = await benv.disk(sd, size=384 * MiB, fmt="cow")
        await benv.write(d, 0x60 + i, offset=0, length=384 * MiB)
        vm.append(d)
    before = await benv.volumes()
    jid = new_id()
    await c.call("backupVolume", jobUUID=jid, src=[d.ref() for d in vm],
                 dst=[Disk(benv.backup, new_id(), new_id()).ref() for _ in vm])
    # abort once the first disk's copy is done and the second's runs
    for _ in range(600):
        job = (await c.call("getJobs", jobUUIDs=[jid]))[jid]
        if job["progress"] >= 40 or job["status"] != "running":
            break
        await asyncio.sleep(0.02)
    await c.call("abortJob", jobUUID=jid)
    info = await c.wait_job(jid, timeout=60)
    assert info["status"] == "aborted", info
    assert await benv.volumes() == before
    for d in vm:
        assert (await c.call("getVolumeInfo", **d.ref()))["voltype"] == "LEAF"
