"""storage/qcow2.py against qemu-img create on real block devices: the
same bytes wherever qemu-img writes, over a device full of random bytes (a
reused LV), with and without a backing file; the image checks clean and
takes data."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from storage import qcow2
from tests.conftest import require_tools

MiB = 1 << 20
BACKING = "0d3c8d7e-1111-4c3d-9e8f-0a1b2c3d4e5f"
CASES = [(1 * MiB, None, None), (10 * MiB + 512, None, None), (1 << 30, None, None),
         (1 << 30, BACKING, "qcow2"), (100 << 30, BACKING, "raw"), (5 * 10**12, None, None)]


def random_device(loop_device: Callable[..., Path], sector_size: int) -> Path:
    dev = loop_device(size=8 * MiB, sector_size=sector_size)
    with open(dev, "wb") as f:
        f.write(os.urandom(8 * MiB))
    return dev


def qemu_img(*args: str) -> str:
    return subprocess.run(["qemu-img", *args], check=True, capture_output=True,
                          text=True).stdout


@pytest.mark.parametrize("sector_size", [512, 4096])
@pytest.mark.parametrize("size, backing, fmt", CASES)
def test_same_bytes_as_qemu_img_create(loop_device: Callable[..., Path], sector_size: int,
                                       size: int, backing: str | None,
                                       fmt: str | None) -> None:
    require_tools("qemu-img", "qemu-io")
    theirs = random_device(loop_device, sector_size)
    ours = random_device(loop_device, sector_size)
    argv = ["create", "-q", "-f", "qcow2", "-o", "compat=1.1"]
    if backing:
        argv += ["-b", backing, "-F", str(fmt), "-u"]
    qemu_img(*argv, str(theirs), str(size))
    qcow2.write_image(str(ours), size, backing, fmt)

    written = max(offset + len(data) for offset, data in qcow2.layout(size, backing, fmt))
    assert theirs.read_bytes()[:written] == ours.read_bytes()[:written]
    info = json.loads(qemu_img("info", "--output", "json", "-U", str(ours)))
    assert (info["format"], info["virtual-size"]) == ("qcow2", size), info
    assert info.get("backing-filename") == backing, info
    if backing is None:
        check = json.loads(qemu_img("check", "--output", "json", str(ours)))
        assert check["check-errors"] == 0 and "corruptions" not in check, check
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 1M",
                        "-c", "read -P 0x5a 0 1M", str(ours)], check=True, capture_output=True)
        check = json.loads(qemu_img("check", "--output", "json", str(ours)))
        assert check["allocated-clusters"] == 16 and check["check-errors"] == 0, check


def test_sizes_it_does_not_make() -> None:
    for size in (0, 1000, qcow2.MAX_SIZE + 512):
        with pytest.raises(ValueError, match="not a positive multiple of 512"):
            qcow2.layout(size)


def test_has_bitmaps_reads_what_qemu_img_wrote(tmp_path: Path) -> None:
    """The header's extensions say whether an image may hold persistent
    bitmaps (a snapshot layer's create asks of its parent, a merge of its
    volumes): as qemu-img info reports them, for images qemu-img made, the
    agent's own, and what no header can tell (None: ask qemu-img)."""
    def head(path: Path) -> bytes:
        with open(path, "rb") as f:
            return f.read(qcow2.HEAD_READ)

    def made(name: str, *args: str) -> Path:
        path = tmp_path / name
        qemu_img("create", "-q", "-f", "qcow2", *args, str(path), "1G")
        return path

    base = made("base", "-o", "compat=1.1")
    layer = made("layer", "-o", "compat=1.1", "-b", "base", "-F", "qcow2")
    old = made("old", "-o", "compat=0.10")
    marked = made("marked", "-o", "compat=1.1", "-b", "base", "-F", "qcow2")
    qemu_img("bitmap", "--add", str(marked), "b1")
    removed = made("removed", "-o", "compat=1.1")     # its last bitmap removed
    qemu_img("bitmap", "--add", str(removed), "b1")
    qemu_img("bitmap", "--remove", str(removed), "b1")
    ours = tmp_path / "ours"
    ours.write_bytes(b"")
    qcow2.write_image(str(ours), 1 << 30, "base", "qcow2")
    for path, expect in ((base, False), (layer, False), (old, False), (marked, True),
                         (removed, False), (ours, False)):
        info = json.loads(qemu_img("info", "--output", "json", "-U", str(path)))
        bitmaps = info.get("format-specific", {}).get("data", {}).get("bitmaps", [])
        assert qcow2.has_bitmaps(head(path)) is expect, (path.name, info)
        assert bool(bitmaps) is expect, (path.name, info)
    raw = tmp_path / "raw"
    raw.write_bytes(os.urandom(4096))
    assert qcow2.has_bitmaps(head(raw)) is None
    assert qcow2.has_bitmaps(head(base)[:100]) is None          # cut before the extensions
