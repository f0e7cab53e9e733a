"""The two-slot OVF store on a plain file: upload, replace, refusals leave
the stored tar unchanged, a torn header copy falls back, ranged reads.
Uploads come the two ways a transport gives them: read on the loop (the
main port) and read in the transport's thread (the data listener)."""

import asyncio
import hashlib
import io
import os
import tarfile
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from ovfstore import pipeline
from ovfstore.pipeline import UploadError
from ovfstore.store import DATA_OFFSET, HEADER_SIZE, Header, OvfStore, volume_size
from ovfstore.tarcheck import Member
from storage.errors import ResourceTimeout
from storage.fileio import IOPool

SLOT = 4 << 20


def make_tar(n: int = 3, size: int = 5000) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for _ in range(n):
            info = tarfile.TarInfo(f"{uuid.uuid4()}.ovf")
            data = os.urandom(size)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


async def chunks(data: bytes, size: int = 65536) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i:i + size]


class ThreadBody:
    """A body its transport reads in a thread of its own, as the OVF data
    listener's connection does (ovfstore.store.ThreadedBody): never past
    the size the store asks for."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0
        self.threads: set[str] = set()

    def _read(self, buf: memoryview) -> int:
        self.threads.add(threading.current_thread().name)
        n = min(len(buf), len(self.data) - self.pos)
        buf[:n] = self.data[self.pos:self.pos + n]
        self.pos += n
        return n

    async def readinto(self, buf: memoryview) -> int:
        raise AssertionError("a threaded body is pumped, not read on the loop")

    async def pump(self, fill: Callable[[Callable[[memoryview], int]], int]) -> int:
        return await asyncio.to_thread(fill, self._read)


async def upload(store: OvfStore, via: str, data: bytes, size: int, *, member_limit: int,
                 sha256: str | None = None) -> tuple[Header, list[Member]]:
    if via == "loop":
        return await store.write(chunks(data, 100_003), size, member_limit=member_limit,
                                 sha256=sha256)
    body = ThreadBody(data)
    try:
        return await store.receive(body, size, member_limit=member_limit, sha256=sha256)
    finally:
        assert body.threads and threading.main_thread().name not in body.threads


VIA = pytest.mark.parametrize("via", ["loop", "thread"])


@pytest.fixture
def store(tmp_path: Path) -> Iterator[OvfStore]:
    path = tmp_path / "ovfstore"
    with open(path, "wb") as f:
        f.truncate(volume_size(SLOT))
    pool = IOPool("test", timeout=30)
    yield OvfStore(path, SLOT, pool)
    pool.close()


async def read_all(store: OvfStore, start: int = 0, end: int | None = None) -> bytes:
    return b"".join([c async for c in store.read(start, end)])


async def test_empty_store(store: OvfStore) -> None:
    h = await store.header()
    assert h.generation == 0 and h.size == 0
    assert await read_all(store) == b""


async def test_upload_replace_and_ranges(store: OvfStore) -> None:
    first = make_tar(3, 3 * 1024 * 1024 // 3)   # over the 1 MiB buffer
    h1, members = await store.write(chunks(first), len(first), member_limit=SLOT)
    assert h1.generation == 1 and h1.size == len(first) and len(members) == 3
    assert h1.sha256 == hashlib.sha256(first).hexdigest()
    assert await read_all(store) == first
    assert await read_all(store, 1000, 5000) == first[1000:5000]
    assert await read_all(store, len(first) - 10) == first[-10:]
    second = make_tar(1, 100)
    h2, _ = await store.write(chunks(second, 7), len(second), member_limit=SLOT,
                              sha256=hashlib.sha256(second).hexdigest())
    assert h2.generation == 2 and h2.slot != h1.slot
    assert await read_all(store) == second


@pytest.mark.parametrize("via, mangle, reason", [
    ("loop", lambda d: (d, len(d) + 100), "ended after"),
    ("thread", lambda d: (d, len(d) + 100), "ended after"),
    ("loop", lambda d: (d + b"\0" * 512, len(d)), "longer than"),
    ("loop", lambda d: (d[:1500], 1500), "truncated"),
    ("thread", lambda d: (d[:1500], 1500), "truncated"),
])
async def test_refused_upload_keeps_old_tar(
        store: OvfStore, via: str, mangle: Callable[[bytes], tuple[bytes, int]],
        reason: str) -> None:
    old = make_tar()
    await store.write(chunks(old), len(old), member_limit=SLOT)
    body, size = mangle(make_tar())
    with pytest.raises(UploadError, match=reason):
        await upload(store, via, body, size, member_limit=SLOT)
    h = await store.header()
    assert h.generation == 1 and await read_all(store) == old


@VIA
async def test_wrong_sha_and_bad_member_keep_old_tar(store: OvfStore, via: str) -> None:
    old = make_tar()
    await store.write(chunks(old), len(old), member_limit=SLOT)
    new = make_tar()
    with pytest.raises(UploadError, match="sha256"):
        await upload(store, via, new, len(new), member_limit=SLOT, sha256="0" * 64)
    with pytest.raises(UploadError, match="over the limit"):
        await upload(store, via, new, len(new), member_limit=100)
    assert await read_all(store) == old


async def test_torn_header_copy_falls_back(store: OvfStore) -> None:
    a = make_tar()
    await store.write(chunks(a), len(a), member_limit=SLOT)
    b = make_tar()
    await store.write(chunks(b), len(b), member_limit=SLOT)
    # a crash while writing copy A of the next switch: A is garbage, B holds gen 2
    with open(store.path, "r+b") as f:
        f.write(b"\xff" * 100)
    h = await store.header()
    assert h.generation == 2 and await read_all(store) == b
    # both copies gone: an empty store, not garbage
    with open(store.path, "r+b") as f:
        f.write(b"\xff" * (2 * HEADER_SIZE))
    assert (await store.header()).generation == 0


async def test_too_large_for_slot(store: OvfStore) -> None:
    with pytest.raises(UploadError, match="do not fit"):
        await store.write(chunks(b""), SLOT + 1, member_limit=SLOT)
    assert DATA_OFFSET % 4096 == 0


@VIA
async def test_upload_through_every_buffer_of_the_pipeline(tmp_path: Path, via: str) -> None:
    # more than all the buffers hold, in odd-sized chunks, with an unaligned
    # tail: each buffer is reused, hashed in order and written at its place
    from ovfstore.pipeline import BUFFER_SIZE, PIPELINE

    slot = (PIPELINE * 2 + 2) * BUFFER_SIZE
    path = tmp_path / "ovfstore"
    with open(path, "wb") as f:
        f.truncate(volume_size(slot))
    pool = IOPool("test", timeout=30)
    try:
        store = OvfStore(path, slot, pool)
        body = make_tar(2, PIPELINE * BUFFER_SIZE + 12345)
        if len(body) % 4096 == 0:
            body += bytes(512)   # zeros after the end-of-archive marker are allowed
        assert len(body) % 4096 and len(body) > PIPELINE * BUFFER_SIZE * 2
        h, _ = await upload(store, via, body, len(body), member_limit=slot,
                            sha256=hashlib.sha256(body).hexdigest())
        assert h.sha256 == hashlib.sha256(body).hexdigest()
        assert await read_all(store) == body
        assert await read_all(store, BUFFER_SIZE - 7, 3 * BUFFER_SIZE + 5) == \
            body[BUFFER_SIZE - 7:3 * BUFFER_SIZE + 5]
    finally:
        pool.close()


@VIA
async def test_storage_write_error_is_an_upload_error(via: str) -> None:
    # /dev/full refuses every write (ENOSPC): reported as a failed write,
    # not taken for a client that went away
    pool = IOPool("test", timeout=30)
    try:
        store = OvfStore(Path("/dev/full"), SLOT, pool)
        body = make_tar()
        with pytest.raises(UploadError, match="writing the OVF store failed"):
            await upload(store, via, body, len(body), member_limit=SLOT)
    finally:
        pool.close()


async def hung_store(tmp_path: Path) -> tuple[Path, IOPool, OvfStore, bytes]:
    """A store on a file with a tar in it, whose pool's deadline is short
    (0.5 s): the tests of storage hanging under an upload."""
    path = tmp_path / "ovfstore"
    with open(path, "wb") as f:
        f.truncate(volume_size(SLOT))
    pool = IOPool("test", timeout=0.5)
    store = OvfStore(path, SLOT, pool)
    first = make_tar()
    await store.write(chunks(first), len(first), member_limit=SLOT)
    return path, pool, store, first


@VIA
async def test_hung_storage_write_times_out_and_keeps_old_tar(
        tmp_path: Path, via: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that never returns (hung storage) fails the upload within
    the domain's I/O deadline (851), the stored tar unchanged; the next
    upload is taken."""
    path, pool, store, old = await hung_store(tmp_path)
    hang, gone = threading.Event(), threading.Event()

    def hung(fd: int, data: memoryview, offset: int) -> None:
        hang.wait()
        gone.set()      # storage that answers at last: nothing written (fd closed)

    monkeypatch.setattr(pipeline, "_pwrite_all", hung)
    new = make_tar(3, 300_000)
    try:
        with pytest.raises(ResourceTimeout, match=r"did not finish in 0\.5 s"):
            await upload(store, via, new, len(new), member_limit=SLOT)
    finally:
        hang.set()
    assert await asyncio.to_thread(gone.wait, 10)
    await asyncio.wait_for(pool.settled(f"the OVF store {path}"), 10)
    monkeypatch.undo()
    assert (await store.header()).generation == 1 and await read_all(store) == old
    again = make_tar(1, 100)
    h, _ = await store.write(chunks(again), len(again), member_limit=SLOT)
    assert h.generation == 2 and await read_all(store) == again
    pool.close()


@VIA
async def test_a_late_write_of_hung_storage_never_lands_on_the_next_upload(
        tmp_path: Path, via: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Hung storage that answers at last completes the write in flight
    (the kernel holds the file, as here the duplicated descriptor). The
    failed upload's slot is the next upload's: while that write is out, the
    store refuses uploads (851), and once it returned the next upload and
    the stored tar are whole. Before: the next upload was taken, made
    current, then overwritten by the late write."""
    path, pool, store, old = await hung_store(tmp_path)
    hang, landed = threading.Event(), threading.Event()
    real_write = pipeline._pwrite_all
    calls = 0

    def first_hangs(fd: int, data: memoryview, offset: int) -> None:
        nonlocal calls
        calls += 1
        if calls > 1:
            return real_write(fd, data, offset)
        held = os.dup(fd)          # the file, as a write inside the kernel holds it
        try:
            hang.wait()
            real_write(held, data, offset)
        finally:
            os.close(held)
            landed.set()

    monkeypatch.setattr(pipeline, "_pwrite_all", first_hangs)
    try:
        new = make_tar(3, 300_000)
        with pytest.raises(ResourceTimeout, match=r"did not finish in 0\.5 s"):
            await upload(store, via, new, len(new), member_limit=SLOT)
        other = make_tar(2, 200_000)
        with pytest.raises(ResourceTimeout, match="has not returned from storage"):
            await store.write(chunks(other), len(other), member_limit=SLOT)
        assert (await store.header()).generation == 1 and await read_all(store) == old
    finally:
        hang.set()
    assert await asyncio.to_thread(landed.wait, 10)
    # the writer's thread ends right after the write
    await asyncio.wait_for(pool.settled(f"the OVF store {path}"), 10)
    again = make_tar(2, 200_000)
    h, _ = await upload(store, via, again, len(again), member_limit=SLOT)
    assert h.generation == 2 and await read_all(store) == again
    assert hashlib.sha256(await read_all(store)).hexdigest() == h.sha256
    pool.close()


async def test_a_late_header_write_holds_the_store(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The header switch hung past its deadline: the upload failed (851),
    but storage answering at last makes it current. Until then no upload
    is taken: it would write the slot that header names, under another
    tar's size and sha256."""
    path, pool, store, _ = await hung_store(tmp_path)
    hang = threading.Event()
    real_write = OvfStore._write_header_sync
    hung_once: list[bool] = []

    def late_header(self: OvfStore, header: Header) -> None:
        if not hung_once:
            hung_once.append(True)
            hang.wait()
        real_write(self, header)

    monkeypatch.setattr(OvfStore, "_write_header_sync", late_header)
    second = make_tar(2, 20_000)
    try:
        with pytest.raises(ResourceTimeout, match=r"did not finish in 0\.5 s"):
            await store.write(chunks(second), len(second), member_limit=SLOT)
        third = make_tar(1, 30_000)
        with pytest.raises(ResourceTimeout, match="has not returned from storage"):
            await store.write(chunks(third), len(third), member_limit=SLOT)
    finally:
        hang.set()
    await pool.settled(f"the OVF store {path}")
    assert (await store.header()).generation == 2 and await read_all(store) == second
    fourth = make_tar(1, 40_000)
    h, _ = await store.write(chunks(fourth), len(fourth), member_limit=SLOT)
    assert h.generation == 3 and await read_all(store) == fourth
    pool.close()


async def test_slots_stay_where_they_are_when_the_volume_grows(store: OvfStore) -> None:
    """The slot size is the first upload's, recorded in the header: a store
    whose volume grew afterwards (its capacity says larger slots) still
    reads its current tar, and the next upload does not overwrite it."""
    first, second = make_tar(2, 300_000), make_tar(3, 200_000)
    await store.write(chunks(first), len(first), member_limit=SLOT)
    h2, _ = await store.write(chunks(second), len(second), member_limit=SLOT)
    assert h2.slot == 1 and h2.slot_size == SLOT
    with open(store.path, "r+b") as f:
        f.truncate(volume_size(2 * SLOT))
    grown = OvfStore(store.path, 2 * SLOT, store.io)
    assert await read_all(grown) == second
    third = make_tar(1, 100_000)
    h3, _ = await grown.write(chunks(third), len(third), member_limit=SLOT)
    assert h3.slot == 0 and h3.slot_size == SLOT
    assert await read_all(OvfStore(store.path, 2 * SLOT, store.io)) == third


async def test_refused_upload_gives_its_space_back(store: OvfStore) -> None:
    """What a refused upload wrote into the free slot is freed again."""
    good = make_tar(1, 100_000)
    await store.write(chunks(good), len(good), member_limit=SLOT)
    before = os.stat(store.path).st_blocks
    bad = make_tar(2, 1_500_000)
    with pytest.raises(UploadError):
        await store.write(chunks(bad), len(bad), member_limit=SLOT,
                          sha256="0" * 64)        # refused once all of it is written
    assert os.stat(store.path).st_blocks == before
    assert await read_all(store) == good
