"""storage/nbd.py with a fake spawner (qemu-nbd) and a fake runner (qemu-img map):
the bitmap's dirty areas, and the export ended whatever happens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from storage import nbd
from storage.errors import InvalidParameter
from tests.unit.fakerun import FakeChild, FakeRunner, FakeSpawner, table

MAP = json.dumps([
    {"start": 0, "length": 65536, "data": False},
    {"start": 65536, "length": 131072, "data": True},
    {"start": 196608, "length": 65536, "data": False},
])


def exporting(argv: list[str]) -> FakeChild:
    """qemu-nbd that makes its socket and serves until killed."""
    Path(argv[argv.index("--socket") + 1]).touch()
    return FakeChild(argv)


async def test_dirty_extents() -> None:
    spawner = FakeSpawner(exporting)
    runner = FakeRunner(table((["qemu-img", "map"], (0, MAP, ""))))
    dirty = await nbd.dirty_extents("/dom/img/vol", "bm-1", runner=runner, spawner=spawner)
    assert dirty == [(0, 65536), (196608, 65536)]
    [child] = spawner.children
    assert child.argv[:2] == ["qemu-nbd", "--read-only"]
    assert child.argv[child.argv.index("--bitmap") + 1] == "bm-1"
    sock = child.argv[child.argv.index("--socket") + 1]
    [argv] = runner.argvs("qemu-img")
    assert f"server.path={sock}" in argv[-1]
    assert "x-dirty-bitmap=qemu:dirty-bitmap:bm-1" in argv[-1]
    # the export is ended and its socket directory removed
    assert child.killed and child.closed
    assert not Path(sock).parent.exists()


async def test_export_that_fails_is_an_error() -> None:
    spawner = FakeSpawner(lambda argv: FakeChild(argv, rc=1, err=b"no bitmap 'bm-1'\n"))
    runner = FakeRunner()
    with pytest.raises(nbd.NbdError, match="export failed: no bitmap 'bm-1'"):
        await nbd.dirty_extents("/dom/img/vol", "bm-1", runner=runner, spawner=spawner)
    assert runner.calls == []
    assert spawner.children[0].closed


async def test_map_that_fails_ends_the_export() -> None:
    spawner = FakeSpawner(exporting)
    runner = FakeRunner(table((["qemu-img", "map"], (1, "", "Could not open"))))
    with pytest.raises(nbd.NbdError, match="map failed: Could not open"):
        await nbd.dirty_extents("/dom/img/vol", "bm-1", runner=runner, spawner=spawner)
    assert spawner.children[0].killed and spawner.children[0].closed


async def test_bitmap_name_is_checked() -> None:
    spawner = FakeSpawner(exporting)
    with pytest.raises(InvalidParameter, match="must not start with '-'"):
        await nbd.dirty_extents("/dom/img/vol", "-bm", spawner=spawner)
    assert spawner.children == []
