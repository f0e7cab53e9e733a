"""A file domain's scan (getVolumesList, issue 21): a metadata file whose
bytes did not change since the last full scan is not parsed again, and
what another host wrote since counts at once. On a domain of this host's
own (localfs), an image directory whose times did not move is not read
again at all."""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import replace
from pathlib import Path

import pytest

from storage.domains import filedomain
from storage.domains.filedomain import FileDomain
from storage.fileio import IOPool
from storage.metadata import BLANK_UUID, DomainMetadata, VolumeMetadata


def new_id() -> str:
    return str(uuid.uuid4())


async def make_domain(tmp_path: Path, io: IOPool, count: int) -> tuple[FileDomain,
                                                                          list[VolumeMetadata]]:
    md = DomainMetadata(uuid=new_id(), name="t", dom_type="localfs", dom_class="data",
                        version=5, backup=False)
    domain = await FileDomain.create(tmp_path, md, io)
    vols = []
    for _ in range(count):
        v = VolumeMetadata(domain=md.uuid, image=new_id(), uuid=new_id(), parent=BLANK_UUID,
                           format="RAW", allocation="SPARSE", voltype="LEAF",
                           capacity=1 << 20, legality="LEGAL", generation=0)
        await domain.write_volume_md(v)
        vols.append(v)
    return domain, vols


async def test_a_rescan_parses_only_changed_files(tmp_path: Path, io: IOPool,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    domain, vols = await make_domain(tmp_path, io, 3)
    assert {v.uuid for v in await domain.all_volumes()} == {v.uuid for v in vols}

    decoded = []
    real = VolumeMetadata.decode.__func__   # type: ignore[attr-defined]

    def counting(cls: type[VolumeMetadata], data: bytes) -> VolumeMetadata:
        decoded.append(data)
        return real(cls, data)  # type: ignore[no-any-return]
    monkeypatch.setattr(VolumeMetadata, "decode", classmethod(counting))

    changed = replace(vols[1], generation=1)
    await domain.write_volume_md(changed)
    after = {v.uuid: v for v in await domain.all_volumes()}
    assert len(decoded) == 1
    assert after == {v.uuid: v for v in (vols[0], changed, vols[2])}


async def test_a_rescan_sees_what_another_host_wrote(tmp_path: Path, io: IOPool) -> None:
    domain, vols = await make_domain(tmp_path, io, 3)
    await domain.all_volumes()
    # another host marks one REMOVING, and one file rots in place (same size)
    other = FileDomain(domain.md, domain.root, io)
    await other.write_volume_md(replace(vols[0], state="REMOVING"))
    meta = domain.images / vols[1].image / f"{vols[1].uuid}.meta"
    data = bytearray(meta.read_bytes())
    data[data.index(b"CAP=") + 4] ^= 1
    meta.write_bytes(bytes(data))
    assert [v.uuid for v in await domain.all_volumes()] == [vols[2].uuid]
    assert await domain.image_volumes(vols[0].image) == []




def count_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The metadata files a scan reads, by name."""
    reads: list[str] = []
    real = filedomain._read_meta

    def counting(dir_fd: int, name: str, limit: int = 65536) -> bytes:
        reads.append(name)
        return real(dir_fd, name, limit)
    monkeypatch.setattr(filedomain, "_read_meta", counting)
    return reads


def settled_clock(domain: FileDomain) -> None:
    """The domain's clock a minute ahead: every directory looks settled
    (changed longer than RACY_NS ago), whatever the test just wrote."""
    domain.clock_ns = lambda: time.time_ns() + 60 * 10**9


async def test_an_unchanged_image_directory_is_not_read_again(
        tmp_path: Path, io: IOPool, monkeypatch: pytest.MonkeyPatch) -> None:
    domain, vols = await make_domain(tmp_path, io, 4)
    settled_clock(domain)
    first = await domain.all_volumes()
    reads = count_reads(monkeypatch)
    assert await domain.all_volumes() == first
    assert {v.uuid for v in first} == {v.uuid for v in vols}
    assert reads == []


async def test_a_changed_image_directory_is_read_again(
        tmp_path: Path, io: IOPool, monkeypatch: pytest.MonkeyPatch) -> None:
    domain, vols = await make_domain(tmp_path, io, 3)
    settled_clock(domain)
    await domain.all_volumes()
    stamps = {img: os.stat(domain.images / img).st_ctime_ns for img in
              (v.image for v in vols)}
    reads = count_reads(monkeypatch)
    # another writer: one volume REMOVING (a rename), one more volume in
    # the second image, the third image's volume gone
    other = FileDomain(domain.md, domain.root, io)
    await other.write_volume_md(replace(vols[0], state="REMOVING"))
    added = replace(vols[1], uuid=new_id())
    await other.write_volume_md(added)
    (domain.images / vols[2].image / f"{vols[2].uuid}.meta").unlink()
    for v in vols:   # the kernel moved each directory's times
        assert os.stat(domain.images / v.image).st_ctime_ns != stamps[v.image]
    assert {v.uuid for v in await domain.all_volumes()} == {vols[1].uuid, added.uuid}
    assert sorted(reads) == sorted(f"{v.uuid}.meta" for v in (vols[0], vols[1], added))


async def test_a_domain_on_a_mount_reads_every_file(
        tmp_path: Path, io: IOPool, monkeypatch: pytest.MonkeyPatch) -> None:
    domain, vols = await make_domain(tmp_path, io, 3)
    domain.mountpoint = tmp_path     # NFS, posixfs: other hosts write there
    settled_clock(domain)
    await domain.all_volumes()
    reads = count_reads(monkeypatch)
    await domain.all_volumes()
    assert sorted(reads) == sorted(f"{v.uuid}.meta" for v in vols)


async def test_a_recently_changed_directory_is_read_again(
        tmp_path: Path, io: IOPool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Within RACY_NS of a directory's change its times prove nothing (a
    second change in the same clock tick keeps them): its files are read."""
    domain, vols = await make_domain(tmp_path, io, 2)
    domain.clock_ns = lambda: max(os.stat(domain.images / v.image).st_ctime_ns
                                  for v in vols)
    await domain.all_volumes()
    reads = count_reads(monkeypatch)
    await domain.all_volumes()
    assert sorted(reads) == sorted(f"{v.uuid}.meta" for v in vols)


async def test_all_volume_ids_is_one_trip_to_the_io_thread(tmp_path: Path, io: IOPool,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Every create asks whether its volume exists anywhere in the domain:
    one I/O call for all images, not one per image (1.5 s a create on a
    localfs domain of 10,000 images)."""
    domain, vols = await make_domain(tmp_path, io, 40)
    # what the listing skips: a non-UUID entry, a file where an image would be,
    # a non-volume file in an image
    (domain.images / "not-an-image").mkdir()
    (domain.images / new_id()).write_bytes(b"")
    (domain.images / vols[0].image / "notes.meta").write_bytes(b"")
    calls = 0
    real = io.call

    async def counting(*args: object, **kw: object) -> object:
        nonlocal calls
        calls += 1
        return await real(*args, **kw)   # type: ignore[arg-type]
    monkeypatch.setattr(io, "call", counting)
    assert await domain.all_volume_ids() == {v.uuid for v in vols}
    assert calls == 1
