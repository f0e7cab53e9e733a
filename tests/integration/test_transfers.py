"""Disk transfers through the real agent with ovirt-imageio's own client
(the `ovirt-imageio` package from PyPI): uploads of qcow2 and raw images
into new volumes of a localfs domain on an ext4 loop device, downloads
back, checksums, sparse uploads, and hostile requests."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import struct
import subprocess
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from rpc.client import Client, RpcError, verifying_context
from tests.agentproc import AgentProcess
from tests.integration.storagefixtures import wait_for

client = pytest.importorskip("ovirt_imageio.client")

# ovirt_imageio.client leaves its socket to its own qemu-nbd (the local
# image's, in /tmp/imageio-*) to the garbage collector
pytestmark = pytest.mark.filterwarnings(
    r"ignore:Exception ignored in. <socket.socket .*imageio-:"
    "pytest.PytestUnraisableExceptionWarning")

MiB = 1024**2
GiB = 1024**3


def new_id() -> str:
    return str(uuid.uuid4())


class Dom:
    def __init__(self, agent: AgentProcess, c: Client, sd: str) -> None:
        self.agent = agent
        self.c = c
        self.sd = sd
        self.ca = str(agent.pki / "ca.pem")

    async def volume(self, size: int, fmt: str = "cow", **kw: Any) -> tuple[str, str]:
        img, vol = new_id(), new_id()
        job = new_id()
        kw.setdefault("preallocate", "sparse")
        await self.c.call("createVolume", jobUUID=job, sdUUID=self.sd, imgUUID=img,
                          volUUID=vol, size=size, format=fmt, **kw)
        info = await self.c.wait_job(job, timeout=60, poll=0.5)
        assert info["status"] == "done", info
        return img, vol

    async def info(self, img: str, vol: str) -> dict[str, Any]:
        return dict(await self.c.call("getVolumeInfo", sdUUID=self.sd, imgUUID=img,
                                      volUUID=vol))

    async def start(self, img: str, vol: str, direction: str, **kw: Any) -> dict[str, Any]:
        return dict(await self.c.call("startTransfer", sdUUID=self.sd, imgUUID=img,
                                      volUUID=vol, direction=direction, **kw))

    def request(self, url: str, method: str, path: str = "", body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        """One request on the transfer url, without a client certificate."""
        u = urllib.parse.urlsplit(url)
        ctx = verifying_context(self.ca)
        con = http.client.HTTPSConnection(u.hostname or "", u.port, context=ctx, timeout=30)
        try:
            con.request(method, u.path + path, body=body, headers=headers or {})
            r = con.getresponse()
            return r.status, r.read()
        finally:
            con.close()


async def xfer_domain(c: Client, fs: Any) -> tuple[dict[str, str], str]:
    """A new localfs domain on mount `fs`: (its connection, its sdUUID)."""
    conn = {"id": new_id(), "connection": str(fs.path)}
    [st] = await c.call("connectStorageServer", domType="localfs", connectionParams=[conn])
    assert st["status"] == 0, st
    sd = new_id()
    await c.call("createStorageDomain", sdUUID=sd, domType="localfs", name="xfer",
                 connectionId=conn["id"], ovfStore=False)
    return conn, sd


@pytest.fixture
async def dom(make_fs_mount: Callable[..., Any], agent_factory: Callable[..., AgentProcess],
              tmp_path: Path) -> AsyncIterator[Dom]:
    fs = make_fs_mount("ext4", size=1024 * MiB)
    agent = agent_factory(tmp_path / "state")
    async with agent.client() as c:
        conn, sd = await xfer_domain(c, fs)
        yield Dom(agent, c, sd)
        # a test that failed with a transfer open: closed, or the format is
        # refused (its volume is leased) and hides the test's own failure
        for job in (await c.call("getJobs")).values():
            if job["type"] == "transfer" and job["status"] == "running":
                await c.call("abortJob", jobUUID=job["jobUUID"])
        await c.call("formatStorageDomain", sdUUID=sd)
        await c.call("disconnectStorageServer", domType="localfs", connectionParams=[conn])


def make_image(path: Path, size: int, chunks: list[tuple[int, int]]) -> int:
    """A sparse raw image with random data at each (offset, length); the bytes written."""
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, length in chunks:
            f.seek(offset)
            f.write(os.urandom(length))
    return sum(n for _, n in chunks)


def qemu_img(*args: str) -> str:
    return subprocess.run(["qemu-img", *args], check=True, capture_output=True,
                          text=True).stdout


async def upload(d: Dom, src: Path, img: str, vol: str) -> dict[str, Any]:
    t = await d.start(img, vol, "upload")
    assert (await d.info(img, vol))["legality"] == "ILLEGAL"
    await asyncio.to_thread(client.upload, str(src), t["url"], d.ca)
    return t


@pytest.mark.parametrize("vol_fmt", ["cow", "raw"])
@pytest.mark.parametrize("src_fmt", ["qcow2", "raw"])
async def test_upload_download_checksum(dom: Dom, tmp_path: Path, src_fmt: str,
                                        vol_fmt: str) -> None:
    """Into a cow volume through qemu-nbd; into a raw one, its file directly."""
    d = dom
    size = 64 * MiB
    raw = tmp_path / "src.raw"
    # 64 KiB aligned: the client sends whole qcow2 clusters
    data = make_image(raw, size, [(0, 1 * MiB), (5 * MiB, 3 * MiB + 64 * 1024),
                                  (60 * MiB, 4 * MiB)])
    src = raw
    if src_fmt == "qcow2":
        src = tmp_path / "src.qcow2"
        qemu_img("convert", "-f", "raw", "-O", "qcow2", str(raw), str(src))
    img, vol = await d.volume(size, vol_fmt)
    gen = (await d.info(img, vol))["generation"]
    async with d.c.notifications() as q:
        t = await upload(d, src, img, vol)
        done = await d.c.call("finalizeTransfer", transferId=t["transferId"])
        assert done["active"] is False and done["transferred"] == data
        # notifications: opened, then closed with the bytes moved
        states = []
        while not states or states[-1]["state"] == "open":
            msg = await asyncio.wait_for(q.get(), 10)
            if msg["method"] == "transfer.state" and \
                    msg["params"]["transferId"] == t["transferId"]:
                states.append(msg["params"])
        assert [s["state"] for s in states] == ["open", "finished"]
        assert states[-1]["transferred"] == data
    status, metrics = await d.c.get("/metrics")
    assert status == 200
    lines = [x for x in metrics.decode().splitlines()
             if x.startswith('hostagent_transfer_bytes_total{direction="upload"}')]
    assert lines and float(lines[0].split()[-1]) == data, lines
    info = await d.info(img, vol)
    assert info["legality"] == "LEGAL" and info["generation"] == gen + 1
    # the ticket is closed
    assert d.request(t["url"], "OPTIONS")[0] == 403

    t = await d.start(img, vol, "download")
    # the server's checksum agrees with the client's own computation of the source
    status, body = d.request(t["url"], "GET", "/checksum")
    assert status == 200, body
    assert json.loads(body) == client.checksum(str(src))
    out = tmp_path / "out.qcow2"
    await asyncio.to_thread(client.download, t["url"], str(out), d.ca, fmt="qcow2")
    qemu_img("compare", str(src), str(out))
    done = await d.c.call("finalizeTransfer", transferId=t["transferId"])
    assert done["transferred"] >= data
    assert (await d.info(img, vol))["generation"] == gen + 1


async def test_sparse_upload_sends_only_data(dom: Dom, tmp_path: Path) -> None:
    d = dom
    size = 10 * GiB
    raw = tmp_path / "sparse.raw"
    data = make_image(raw, size, [(i * GiB + 7 * MiB, 25 * MiB) for i in (0, 3, 6, 9)])
    assert data == 100 * MiB
    img, vol = await d.volume(size)
    t = await upload(d, raw, img, vol)
    got = await d.c.call("getTransfer", transferId=t["transferId"])
    assert got["active"] is True and got["transferred"] == data
    await d.c.call("finalizeTransfer", transferId=t["transferId"])
    t = await d.start(img, vol, "download")
    status, body = d.request(t["url"], "GET", "/extents", headers={})
    assert status == 200
    extents = json.loads(body)
    assert sum(e["length"] for e in extents if not e["zero"]) == data
    out = tmp_path / "out.qcow2"
    await asyncio.to_thread(client.download, t["url"], str(out), d.ca, fmt="qcow2")
    qemu_img("compare", str(raw), str(out))
    await d.c.call("finalizeTransfer", transferId=t["transferId"])


async def test_hostile_requests_are_refused(dom: Dom, tmp_path: Path) -> None:
    d = dom
    size = 4 * MiB
    img, vol = await d.volume(size)
    t = await d.start(img, vol, "upload", inactivityTimeout=1)
    url = t["url"]
    # a range past the end, refused before any byte is written
    status, _ = d.request(url, "PUT", body=b"x" * 4096,
                          headers={"Content-Range": f"bytes {size}-{size + 4095}/*"})
    assert status == 416
    status, _ = d.request(url, "GET", headers={"Range": f"bytes=0-{size}"})
    assert status == 416
    # an unknown ticket
    bogus = url.rsplit("/", 1)[0] + "/" + "A" * 32
    assert d.request(bogus, "OPTIONS")[0] == 403
    # the ticket closes after a second without a request; the volume stays ILLEGAL
    deadline = asyncio.get_running_loop().time() + 10
    while (await d.c.call("getTransfer", transferId=t["transferId"]))["active"]:
        assert asyncio.get_running_loop().time() < deadline, "ticket never expired"
        await asyncio.sleep(0.1)
    assert d.request(url, "PUT", body=b"x" * 4096)[0] == 403
    assert (await d.info(img, vol))["legality"] == "ILLEGAL"
    with pytest.raises(RpcError) as e:
        await d.c.call("finalizeTransfer", transferId=t["transferId"])
    assert e.value.code == 481
    # cancel removes an upload's volume
    await d.c.call("cancelTransfer", transferId=t["transferId"])
    assert img not in await d.c.call("getImagesList", sdUUID=d.sd)

    # a write on a download ticket
    img, vol = await d.volume(size)
    t = await d.start(img, vol, "download")
    status, _ = d.request(t["url"], "PUT", body=b"x" * 4096)
    assert status == 403
    status, _ = d.request(t["url"], "PATCH", body=json.dumps(
        {"op": "zero", "offset": 0, "size": 4096}).encode(),
        headers={"Content-Type": "application/json"})
    assert status == 403
    # one transfer per volume
    with pytest.raises(RpcError) as e:
        await d.start(img, vol, "upload")
    assert e.value.code == 203
    await d.c.call("cancelTransfer", transferId=t["transferId"])
    # no upload under a prepared image (a VM reads it); a download is fine
    await d.c.call("prepareImage", sdUUID=d.sd, imgUUID=img, volUUID=vol, purpose="vm")
    try:
        with pytest.raises(RpcError) as e:
            await d.start(img, vol, "upload")
        assert e.value.code == 203 and "prepared" in e.value.message
        t = await d.start(img, vol, "download")
    finally:
        await d.c.call("teardownImage", sdUUID=d.sd, imgUUID=img, volUUID=vol)
    await d.c.call("cancelTransfer", transferId=t["transferId"])
    # a cancelled download's ticket is closed; the volume is kept
    assert d.request(t["url"], "GET", headers={"Range": "bytes=0-4095"})[0] == 403
    assert (await d.info(img, vol))["legality"] == "LEGAL"


def put_file(d: Dom, url: str, path: Path) -> int:
    """PUT a file as it is, in 4 MiB requests (a qcow2 upload of a tool that
    sends the file's bytes); the last status."""
    data = path.read_bytes()
    status = 0
    for start in range(0, len(data), 4 * MiB):
        chunk = data[start:start + 4 * MiB]
        status, body = d.request(url, "PUT", body=chunk, headers={
            "Content-Range": f"bytes {start}-{start + len(chunk) - 1}/*"})
        assert status == 200, body
    return status


async def test_qcow2_file_upload_download(dom: Dom, tmp_path: Path) -> None:
    d = dom
    size = 64 * MiB
    raw = tmp_path / "src.raw"
    make_image(raw, size, [(MiB, 2 * MiB), (40 * MiB, 5 * MiB)])
    src = tmp_path / "src.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", str(raw), str(src))
    img, vol = await d.volume(size)
    t = await d.start(img, vol, "upload", format="qcow2")
    put_file(d, t["url"], src)
    await d.c.call("finalizeTransfer", transferId=t["transferId"])
    info = await d.info(img, vol)
    assert info["legality"] == "LEGAL"
    # cut at the image's end: no room left over
    assert info["apparentSize"] == src.stat().st_size
    t = await d.start(img, vol, "download", format="qcow2")
    status, body = d.request(t["url"], "GET")
    assert status == 200 and len(body) == src.stat().st_size
    out = tmp_path / "out.qcow2"
    out.write_bytes(body)
    qemu_img("compare", "-f", "qcow2", "-F", "qcow2", str(src), str(out))
    await d.c.call("finalizeTransfer", transferId=t["transferId"])


def qcow2_bomb(path: Path, size: int, **fields: int) -> None:
    """A small qcow2 of `size` whose header fields (l1_size,
    refcount_table_clusters) announce tables far larger than the file."""
    qemu_img("create", "-f", "qcow2", str(path), str(size))
    offsets = {"l1_size": (36, ">I"), "refcount_table_clusters": (56, ">I")}
    header = bytearray(path.read_bytes())
    for name, value in fields.items():
        offset, fmt = offsets[name]
        struct.pack_into(fmt, header, offset, value)
    path.write_bytes(header)


@pytest.mark.parametrize("bad", ["backing-outside", "backing-escape", "too-large",
                                 "not-qcow2", "l1-past-end", "l1-too-large",
                                 "refcount-past-end", "refcount-too-large"])
async def test_hostile_qcow2_upload_stays_illegal(dom: Dom, tmp_path: Path, bad: str) -> None:
    """Refused at finalize (484), left ILLEGAL, removed by cancel. The
    bombs: 192 KiB files whose L1 or refcount table (32 MiB, 8 MiB past the
    file's end; 512 MiB, 1 TiB over qemu's own limits) `qemu-img info`
    and `qemu-img check` must not trust."""
    d = dom
    size = 16 * MiB
    src = tmp_path / "bad.qcow2"
    img, vol = new_id(), None
    if bad == "backing-outside":
        outside = tmp_path / "host-secret.raw"
        outside.write_bytes(b"secret" * 1000)
        qemu_img("create", "-f", "qcow2", "-b", str(outside), "-F", "raw", str(src),
                 str(size))
    elif bad == "backing-escape":
        # a layer over a parent in the image: its backing names the parent,
        # but out of the images' directory (only the parent's own name, or a
        # template's ../<image>/<volume>, is a volume of the domain)
        img, parent = await d.volume(size)
        vol, job = new_id(), new_id()
        await d.c.call("createVolume", jobUUID=job, sdUUID=d.sd, imgUUID=img, volUUID=vol,
                       size=size, format="cow", preallocate="sparse", parentVolUUID=parent)
        assert (await d.c.wait_job(job, timeout=60, poll=0.5))["status"] == "done"
        qemu_img("create", "-f", "qcow2", "-u", "-b", f"../../{parent}", "-F", "qcow2",
                 str(src), str(size))
    elif bad == "too-large":
        # a header announcing more than the volume's capacity
        qemu_img("create", "-f", "qcow2", str(src), str(1024 * GiB))
    elif bad == "l1-past-end":
        qcow2_bomb(src, size, l1_size=4 * 1024 * 1024)
    elif bad == "l1-too-large":
        qcow2_bomb(src, size, l1_size=64 * 1024 * 1024)
    elif bad == "refcount-past-end":
        qcow2_bomb(src, size, refcount_table_clusters=128)
    elif bad == "refcount-too-large":
        qcow2_bomb(src, size, refcount_table_clusters=0xffffff)
    else:
        src.write_bytes(os.urandom(MiB))
    if vol is None:
        img, vol = await d.volume(size)
    t = await d.start(img, vol, "upload", format="qcow2")
    put_file(d, t["url"], src)
    with pytest.raises(RpcError) as e:
        await d.c.call("finalizeTransfer", transferId=t["transferId"])
    assert e.value.code == 484, e.value
    if bad.startswith("backing"):
        # refused for its backing file itself, before qemu-img opens it
        assert "the metadata says" in e.value.message, e.value
    assert (await d.info(img, vol))["legality"] == "ILLEGAL"
    got = await d.c.call("getTransfer", transferId=t["transferId"])
    assert got["active"] is False and got["error"]["code"] == 484
    # a failed upload can be cancelled: its volume goes
    got = await d.c.call("cancelTransfer", transferId=t["transferId"])
    assert got["state"] == "cancelled"
    assert vol not in await d.c.call("getVolumesList", sdUUID=d.sd)


async def test_incremental_download_reads_only_changes(dom: Dom, tmp_path: Path) -> None:
    d = dom
    size = 64 * MiB
    disk = tmp_path / "disk.raw"
    make_image(disk, size, [(0, 32 * MiB)])
    img, vol = await d.volume(size)
    t = await upload(d, disk, img, vol)
    await d.c.call("finalizeTransfer", transferId=t["transferId"])
    # the backup point: a persistent bitmap recording the changes from now on
    # (what the engine's backup flow leaves on the disk)
    prepared = await d.c.call("prepareImage", sdUUID=d.sd, imgUUID=img, volUUID=vol,
                              purpose="read")
    qemu_img("bitmap", "--add", prepared["path"], "point1")
    await d.c.call("teardownImage", sdUUID=d.sd, imgUUID=img, volUUID=vol)
    t = await d.start(img, vol, "download")
    full = tmp_path / "full.qcow2"
    await asyncio.to_thread(client.download, t["url"], str(full), d.ca, fmt="qcow2")
    await d.c.call("finalizeTransfer", transferId=t["transferId"])

    # 1% of the disk changes (64 KiB aligned: the bitmap's granularity)
    changes = [(5 * MiB, 256 * 1024), (40 * MiB, 256 * 1024), (63 * MiB, 128 * 1024)]
    changed = sum(n for _, n in changes)
    assert changed == size // 100 // (64 * 1024) * (64 * 1024)
    t = await d.start(img, vol, "upload")
    with open(disk, "r+b") as f:
        for offset, length in changes:
            data = os.urandom(length)
            f.seek(offset)
            f.write(data)
            status, body = d.request(t["url"], "PUT", body=data, headers={
                "Content-Range": f"bytes {offset}-{offset + length - 1}/*"})
            assert status == 200, body
        # and an area of data zeroed: dirty, but nothing to read
        zeroed = (20 * MiB, 512 * 1024)
        f.seek(zeroed[0])
        f.write(bytes(zeroed[1]))
    status, body = d.request(t["url"], "PATCH", body=json.dumps(
        {"op": "zero", "offset": zeroed[0], "size": zeroed[1]}).encode(),
        headers={"Content-Type": "application/json"})
    assert status == 200, body
    await d.c.call("finalizeTransfer", transferId=t["transferId"])

    t = await d.start(img, vol, "download", dirty="point1")
    status, body = d.request(t["url"], "GET", "/extents?context=dirty")
    assert status == 200, body
    # as imageio reports them: a dirty extent says whether it reads as zeroes
    dirty = [(e["start"], e["length"], e["zero"]) for e in json.loads(body) if e["dirty"]]
    assert dirty == sorted([(o, n, False) for o, n in changes] + [(*zeroed, True)])
    inc = tmp_path / "inc.qcow2"
    await asyncio.to_thread(client.download, t["url"], str(inc), d.ca, fmt="qcow2",
                            incremental=True, backing_file=str(full), backing_format="qcow2")
    done = await d.c.call("finalizeTransfer", transferId=t["transferId"])
    # the restored chain is the disk; the bytes read are the changed data
    # (the zeroed area is zeroed by the client, not read)
    qemu_img("compare", str(disk), str(inc))
    assert done["transferred"] == changed, done
    # a transfer without dirty has no dirty extents
    t = await d.start(img, vol, "download")
    assert d.request(t["url"], "GET", "/extents?context=dirty")[0] == 404
    await d.c.call("finalizeTransfer", transferId=t["transferId"])


def qemu_nbd_of(vol: str) -> list[int]:
    """Pids of qemu-nbd processes serving volume `vol`."""
    import psutil

    out = []
    for p in psutil.process_iter(["name", "cmdline"]):
        if p.info["name"] == "qemu-nbd" and any(vol in a for a in p.info["cmdline"] or ()):
            out.append(p.pid)
    return out


async def open_upload_and_download(agent: AgentProcess, fs: Any) -> tuple[
        dict[str, str], str, str, str, str, str, dict[str, Any], dict[str, Any]]:
    """A new localfs domain on `fs` with two volumes, an upload open on one
    (1 MiB written) and a download on the other: (connection, sdUUID, img,
    vol, kept_img, kept, upload, download)."""
    async with agent.client() as c:
        conn, sd = await xfer_domain(c, fs)
        d = Dom(agent, c, sd)
        img, vol = await d.volume(16 * MiB)
        kept_img, kept = await d.volume(16 * MiB)
        up = await d.start(img, vol, "upload")
        status, _ = d.request(up["url"], "PUT", body=os.urandom(MiB),
                              headers={"Content-Range": f"bytes 0-{MiB - 1}/*"})
        assert status == 200
        down = await d.start(kept_img, kept, "download")
    return conn, sd, img, vol, kept_img, kept, up, down


async def test_agent_killed_mid_upload_leaves_nothing(
        make_fs_mount: Callable[..., Any], agent_factory: Callable[..., AgentProcess],
        tmp_path: Path) -> None:
    """kill -9 with an upload and a download open: their qemu-nbd end with
    the agent; after a restart both transfer jobs are failed as interrupted,
    the upload's ILLEGAL volume is removed (its ticket died, nobody can
    finish it), and the download's volume is LEGAL, not prepared, not
    leased (a new transfer takes it)."""
    fs = make_fs_mount("ext4", size=256 * MiB)
    agent = agent_factory(tmp_path / "state")
    conn, sd, img, vol, kept_img, kept, up, down = await open_upload_and_download(agent, fs)
    async with agent.client() as c:
        d = Dom(agent, c, sd)
        assert d.request(down["url"], "GET", headers={"Range": "bytes=0-4095"})[0] == 206
        assert len(qemu_nbd_of(vol)) == 1 and len(qemu_nbd_of(kept)) == 1
    agent.kill()
    wait_for("the transfers' qemu-nbd to end",
             lambda: not qemu_nbd_of(vol) and not qemu_nbd_of(kept), timeout=10)
    agent = agent_factory(agent.state_dir, port=agent.port)
    async with agent.client() as c:
        d = Dom(agent, c, sd)
        jobs = await c.call("getJobs", jobUUIDs=[up["transferId"], down["transferId"]])
        assert len(jobs) == 2, jobs
        for job in jobs.values():
            assert job["status"] == "failed" and job["error"]["code"] == 2106, job
        assert img not in await c.call("getImagesList", sdUUID=sd)
        assert (await d.info(kept_img, kept))["legality"] == "LEGAL"
        t = await d.start(kept_img, kept, "upload")
        await c.call("cancelTransfer", transferId=t["transferId"])
        assert kept_img not in await c.call("getImagesList", sdUUID=sd)
        await c.call("formatStorageDomain", sdUUID=sd)
        await c.call("disconnectStorageServer", domType="localfs", connectionParams=[conn])


async def job_statuses(q: asyncio.Queue[dict[str, Any]], job: str) -> list[dict[str, Any]]:
    """The job.status notifications of one job until it ended."""
    seen: list[dict[str, Any]] = []
    while not seen or seen[-1]["status"] not in ("done", "failed", "aborted"):
        msg = await asyncio.wait_for(q.get(), 30)
        if msg["method"] == "job.status" and msg["params"]["jobUUID"] == job:
            seen.append(msg["params"])
    return seen


def statuses(seen: list[dict[str, Any]]) -> list[str]:
    """The statuses in order, each once (progress steps repeat one)."""
    return [s["status"] for i, s in enumerate(seen)
            if i == 0 or seen[i - 1]["status"] != s["status"]]


async def test_transfers_are_jobs(dom: Dom, tmp_path: Path) -> None:
    """A transfer is a job (type transfer, id = transferId): getJobs, job.status
    on every change, progress, abortJob; finalized done, cancelled aborted,
    expired failed."""
    d = dom
    size = 4 * MiB
    img, vol = await d.volume(size)
    async with d.c.notifications() as q:
        t = await d.start(img, vol, "upload")
        tid = t["transferId"]
        job = (await d.c.call("getJobs", jobUUIDs=[tid]))[tid]
        assert job["type"] == "transfer" and job["status"] == "running", job
        assert job["progress"] == 0
        status, body = d.request(t["url"], "PUT", body=os.urandom(MiB),
                                 headers={"Content-Range": f"bytes 0-{MiB - 1}/*"})
        assert status == 200, body
        # a quarter of the volume moved (counted once the request ended,
        # just after its reply)
        deadline = asyncio.get_running_loop().time() + 10
        while (await d.c.call("getJobs", jobUUIDs=[tid]))[tid]["progress"] != 25:
            assert asyncio.get_running_loop().time() < deadline, "no progress 25"
            await asyncio.sleep(0.05)
        await d.c.call("finalizeTransfer", transferId=tid)
        seen = await job_statuses(q, tid)
    assert statuses(seen) == ["pending", "running", "done"], seen
    assert seen[-1]["progress"] == 100 and seen[-1]["result"] == {"transferred": MiB}
    assert tid in await d.c.call("getJobs")

    # cancelTransfer: aborted
    async with d.c.notifications() as q:
        t = await d.start(img, vol, "download")
        await d.c.call("cancelTransfer", transferId=t["transferId"])
        seen = await job_statuses(q, t["transferId"])
    assert statuses(seen) == ["pending", "running", "aborted"], seen
    # abortJob closes the transfer: aborted, its ticket refused
    t = await d.start(img, vol, "download")
    job = await d.c.call("abortJob", jobUUID=t["transferId"])
    assert job["status"] == "aborted", job
    assert (await d.c.call("getTransfer", transferId=t["transferId"]))["state"] == "cancelled"
    assert d.request(t["url"], "OPTIONS")[0] == 403
    # an expired ticket: failed with 481
    t = await d.start(img, vol, "download", inactivityTimeout=1)
    job = await d.c.wait_job(t["transferId"], timeout=30, poll=0.2)
    assert job["status"] == "failed" and job["error"]["code"] == 481, job
    assert (await d.info(img, vol))["legality"] == "LEGAL"


async def test_ticket_limits_from_config(
        make_fs_mount: Callable[..., Any], agent_factory: Callable[..., AgentProcess],
        tmp_path: Path) -> None:
    """[transfers]: a ticket closes at ticket_lifetime however busy; without
    inactivityTimeout a transfer gets inactivity_timeout; more than
    max_inactivity_timeout is refused (1000)."""
    conf = tmp_path / "hostagent.toml"
    conf.write_text("[transfers]\nticket_lifetime = 3\ninactivity_timeout = 30\n"
                    "max_inactivity_timeout = 40\n")
    fs = make_fs_mount("ext4", size=256 * MiB)
    agent = agent_factory(tmp_path / "state", extra_args=("--config", str(conf)))
    async with agent.client() as c:
        conn, sd = await xfer_domain(c, fs)
        d = Dom(agent, c, sd)
        img, vol = await d.volume(4 * MiB)
        with pytest.raises(RpcError) as e:
            await d.start(img, vol, "download", inactivityTimeout=41)
        assert e.value.code == 1000 and "max_inactivity_timeout" in e.value.message
        before = time.time()
        t = await d.start(img, vol, "download")
        assert before + 3 - 1 <= t["expires"] <= time.time() + 3 + 1, t
        got = await c.call("getTransfer", transferId=t["transferId"])
        assert got["inactivityTimeout"] == 30 and got["active"] is True
        # requests all along: the ticket still closes at its lifetime
        deadline = time.monotonic() + 20
        while d.request(t["url"], "GET", headers={"Range": "bytes=0-4095"})[0] == 206:
            assert time.monotonic() < deadline, "the ticket never closed"
        assert time.time() >= t["expires"]
        job = await c.wait_job(t["transferId"], timeout=10, poll=0.2)
        assert job["status"] == "failed" and job["error"]["code"] == 481, job
        assert "expired" in job["error"]["message"], job
        await c.call("formatStorageDomain", sdUUID=sd)
        await c.call("disconnectStorageServer", domType="localfs", connectionParams=[conn])


async def test_agent_stopped_with_upload_open_removes_it(
        make_fs_mount: Callable[..., Any], agent_factory: Callable[..., AgentProcess],
        tmp_path: Path) -> None:
    """SIGTERM with an upload and a download open: the agent exits 0, the
    upload's volume is removed as a cancel would (nobody can finish it once
    its ticket is gone, as after a crash), the download's kept; both jobs
    failed (481, the agent stopped)."""
    fs = make_fs_mount("ext4", size=256 * MiB)
    agent = agent_factory(tmp_path / "state")
    conn, sd, img, vol, kept_img, kept, up, down = await open_upload_and_download(agent, fs)
    assert agent.stop() == 0
    assert not qemu_nbd_of(vol) and not qemu_nbd_of(kept)
    agent = agent_factory(agent.state_dir, port=agent.port)
    async with agent.client() as c:
        d = Dom(agent, c, sd)
        jobs = await c.call("getJobs", jobUUIDs=[up["transferId"], down["transferId"]])
        assert len(jobs) == 2, jobs
        for job in jobs.values():
            assert job["status"] == "failed" and job["error"]["code"] == 481, job
            assert "the agent stopped" in job["error"]["message"], job
        assert img not in await c.call("getImagesList", sdUUID=sd)
        assert (await d.info(kept_img, kept))["legality"] == "LEGAL"
        await c.call("formatStorageDomain", sdUUID=sd)
        await c.call("disconnectStorageServer", domType="localfs", connectionParams=[conn])
