"""A volume's dirty bitmaps (a snapshot layer's create carries its parent's,
a merge checks its volumes'): a qcow2 header without the bitmaps extension
answers none with no qemu-img run; with it, or a header that cannot tell,
qemu-img info is asked as before."""

from __future__ import annotations

import json
import struct
import uuid
from pathlib import Path

import pytest

from storage import qcow2
from storage.domains import merge
from storage.fileio import IOPool
from storage.metadata import BLANK_UUID, VolumeMetadata
from tests.unit.fakerun import FakeRunner

INFO = {"format": "qcow2", "virtual-size": 1 << 30, "filename": "v",
        "format-specific": {"type": "qcow2", "data": {"bitmaps": [
            {"name": "b1", "flags": ["auto"], "granularity": 65536},
            {"name": "b2", "flags": ["in-use"], "granularity": 65536}]}}}


class Pieces:
    def __init__(self) -> None:
        self.runner = FakeRunner(lambda argv: (0, json.dumps(INFO), ""))


class Volumes:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.io = IOPool("t")

    def volume_path(self, img: str, vol: str) -> str:
        return str(self.path)


def volume(fmt: str = "COW") -> VolumeMetadata:
    return VolumeMetadata(domain=str(uuid.uuid4()), image=str(uuid.uuid4()),
                          uuid=str(uuid.uuid4()), parent=BLANK_UUID, format=fmt,
                          allocation="SPARSE", voltype="LEAF", capacity=1 << 30,
                          legality="LEGAL", generation=1)


def image(path: Path, extra: bytes = b"") -> Path:
    """The agent's own empty qcow2 image (qcow2.layout), written buffered;
    `extra`: bytes over the start of its extensions."""
    with open(path, "wb") as f:
        for offset, data in qcow2.layout(1 << 30, "base", "qcow2"):
            f.seek(offset)
            f.write(data)
        if extra:
            f.seek(qcow2.HEADER_LENGTH)
            f.write(extra)
    return path


async def test_no_qemu_img_without_the_bitmaps_extension(tmp_path: Path) -> None:
    dm, vols = Pieces(), Volumes(image(tmp_path / "v"))
    try:
        assert await merge.bitmap_names(dm, vols, volume()) == ((), ())    # type: ignore[arg-type]
        assert dm.runner.calls == []
        assert await merge.bitmap_names(dm, vols, volume("RAW")) == ((), ())  # type: ignore[arg-type]
        assert dm.runner.calls == []
    finally:
        vols.io.close()


@pytest.mark.parametrize("header", ["bitmaps extension", "cannot tell"])
async def test_qemu_img_asked_when_the_header_may_hold_bitmaps(tmp_path: Path,
                                                               header: str) -> None:
    # the bitmaps extension alone (its contents are qemu-img's to read), or
    # a header that is no qcow2 one
    path = (image(tmp_path / "v", struct.pack(">IIII", 0x23852875, 0, 0, 0))
            if header != "cannot tell" else tmp_path / "v")
    if header == "cannot tell":
        path.write_bytes(b"\0" * 4096)
    head = path.read_bytes()[:qcow2.HEAD_READ]
    assert qcow2.has_bitmaps(head) is (True if header != "cannot tell" else None)
    dm, vols = Pieces(), Volumes(path)
    try:
        got = await merge.bitmap_names(dm, vols, volume())     # type: ignore[arg-type]
        assert got == (("b1",), ("b2",))
        [call] = dm.runner.calls
        assert "info" in call.argv and str(path) in call.argv
    finally:
        vols.io.close()
