"""storage.multipath with a fake runner: raw format parsing, flush outcomes,
waiting for a map's paths against a deadline. No root."""

from __future__ import annotations

import pytest

from storage import commands, multipath
from storage.errors import ResourceTimeout, StorageServerDisconnectionError
from tests.unit.fakerun import FakeRunner, table

W1 = "360000000000000000e00000000010001"
W2 = "360000000000000000e00000000020001"

MAPS = f"""\
mpatha|{W1}|dm-0|2|active
mpathb|{W2}|dm-3|0|active
broken line
"""

PATHS = f"""\
{W1}|sdb|active|ready|running|3:0:0:1|mpatha|8:16
{W1}|sdc|failed|faulty|offline|4:0:0:1|mpatha|8:32
{W2}|sdd|undef|undef|unknown|5:0:0:1|[orphan]|8:48
[undef]|sde|undef|undef|unknown|6:0:0:0|[orphan]|8:64
{W1}|sdf|active|i/o pending|running|7:0:0:1|mpatha|8:80
"""


def test_parse_maps() -> None:
    assert multipath.parse_maps(MAPS) == [
        multipath.Map("mpatha", W1, "dm-0", 2, "active"),
        multipath.Map("mpathb", W2, "dm-3", 0, "active"),
    ]
    assert multipath.parse_maps("") == []


def test_parse_paths() -> None:
    paths = multipath.parse_paths(PATHS)
    assert [p.dev for p in paths] == ["sdb", "sdc", "sdd", "sde", "sdf"]
    sdb, sdc, sdd, sde, sdf = paths
    assert (sdb.map, sdb.lun, sdb.active, sdb.devt) == ("mpatha", 1, True, "8:16")
    assert (sdc.dm_state, sdc.checker, sdc.active) == ("failed", "faulty", False)
    assert sdd.map is None and not sdd.active
    assert sde.wwid == "" and sde.lun == 0
    assert sdf.active   # just added, checker not run yet


async def test_listing_argv() -> None:
    fake = FakeRunner(table((["maps"], (0, MAPS, "")), (["paths"], (0, PATHS, ""))))
    assert len(await multipath.maps(timeout=5, runner=fake)) == 2
    assert len(await multipath.paths(timeout=5, runner=fake)) == 5
    assert fake.argvs() == [["multipathd", "show", "maps", "raw", "format", multipath.MAP_FORMAT],
                            ["multipathd", "show", "paths", "raw", "format",
                             multipath.PATH_FORMAT]]


async def test_flush() -> None:
    fake = FakeRunner()
    await multipath.flush("mpatha", timeout=5, runner=fake)
    assert fake.argvs() == [["multipath", "-f", "mpatha"]]
    in_use = FakeRunner(lambda argv: (1, "", "10.27 | mpatha: map in use"))
    with pytest.raises(StorageServerDisconnectionError) as e:
        await multipath.flush("mpatha", timeout=5, runner=in_use, retry_delays=(0, 0))
    assert e.value.code == 452 and "in use" in e.value.message
    assert len(in_use.calls) == 3
    # open for a moment (udev's blkid after an LV went): the next try flushes
    answers = iter([(1, "", "mpatha: map in use"), (0, "", "")])
    brief = FakeRunner(lambda argv: next(answers))
    await multipath.flush("mpatha", timeout=5, runner=brief, retry_delays=(0, 0))
    assert len(brief.calls) == 2
    gone = FakeRunner(lambda argv: (1, "", "mpatha is not a multipath device"))
    await multipath.flush("mpatha", timeout=5, runner=gone)


async def test_wait_for_paths_polls_until_every_path_is_in_the_map() -> None:
    outputs = iter([
        f"{W1}|sdb|undef|undef|running|3:0:0:1|[orphan]|8:16\n",
        f"{W1}|sdb|active|i/o pending|running|3:0:0:1|mpatha|8:16\n",
        f"{W1}|sdb|active|ready|running|3:0:0:1|mpatha|8:16\n"
        f"{W1}|sdc|active|ready|running|4:0:0:1|mpatha|8:32\n",
    ])
    fake = FakeRunner(lambda argv: (0, next(outputs), ""))
    name = await multipath.wait_for_paths(W1, ["sdb", "sdc"], timeout=5, interval=0.01,
                                          runner=fake)
    assert name == "mpatha" and len(fake.calls) == 3


async def test_wait_for_paths_times_out_with_the_state_seen() -> None:
    fake = FakeRunner(lambda argv: (0, f"{W1}|sdb|failed|faulty|running|3:0:0:1|mpatha|8:16\n",
                                    ""))
    with pytest.raises(ResourceTimeout) as e:
        await multipath.wait_for_paths(W1, ["sdb"], timeout=0.1, interval=0.02, runner=fake)
    assert "sdb:failed/faulty/mpatha" in e.value.message


async def test_wait_map_gone() -> None:
    outputs = iter([MAPS, ""])
    fake = FakeRunner(lambda argv: (0, next(outputs), ""))
    assert await multipath.wait_map_gone(W1, timeout=5, interval=0.01, runner=fake)
    fake = FakeRunner(lambda argv: (0, MAPS, ""))
    assert not await multipath.wait_map_gone(W1, timeout=0.05, interval=0.01, runner=fake)


async def test_multipath_failures_are_467() -> None:
    """VDSM's MultipathSetupError, and still a CommandError for callers."""
    down = FakeRunner(lambda argv: (1, "", "multipathd: cannot connect to socket"))
    for call in (multipath.maps(timeout=5, runner=down), multipath.paths(timeout=5, runner=down),
                 multipath.resize("mpatha", timeout=5, runner=down),
                 multipath.flush("mpatha", timeout=5, runner=down)):
        with pytest.raises(commands.CommandError) as e:
            await call
        wire = e.value.to_dict()
        assert (wire["code"], wire["data"]["name"]) == (467, "MultipathSetupError"), wire
