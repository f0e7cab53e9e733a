"""Names of file connections under the storage root: one per spec, reversible,
and connections recorded under VDSM's old naming still found."""

import json
import os
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from storage.connections import ConnectionManager
from storage.connections.base import Connection
from storage.connections.filebased import (
    LocalfsBackend,
    escape_spec,
    legacy_escape_spec,
    unescape_spec,
)
from storage.errors import InvalidParameter, StorageServerConnectionError
from storage.locks import LockManager
from tests.unit.fakerun import FakeRunner

# specs as they come: paths and NFS exports, heavy on the characters escaped
specs = st.text(alphabet=st.sampled_from("/_%:.aZ09-5F"), min_size=1, max_size=24)


@given(specs)
def test_escape_round_trip(spec):
    name = escape_spec(spec)
    assert "/" not in name
    assert unescape_spec(name) == spec


@given(specs, specs)
def test_escape_has_no_collisions(a, b):
    if a != b:
        assert escape_spec(a) != escape_spec(b)


@pytest.mark.parametrize("spec, name", [
    ("/dev/loop0", "_dev_loop0"),                      # as VDSM names it
    ("server:/exports/data", "server:_exports_data"),
    ("/d/x_/y", "_d_x%5F_y"),
    ("/d/x/_y", "_d_x_%5Fy"),
    ("/a%5F", "_a%255F"),
])
def test_escape_examples(spec, name):
    assert escape_spec(spec) == name
    assert unescape_spec(name) == spec


def test_legacy_names_collide():
    # why the naming changed: VDSM's is not one to one
    assert legacy_escape_spec("/d/x_/y") == legacy_escape_spec("/d/x/_y") == "_d_x___y"


@pytest.fixture
async def manager(tmp_path):
    m = ConnectionManager(tmp_path / "state", tmp_path / "root", LockManager(), io_timeout=10)
    await m.start()
    return m


async def test_paths_that_escaped_alike_both_connect(manager, tmp_path):
    a, b = tmp_path / "d" / "x_" / "y", tmp_path / "d" / "x" / "_y"
    a.mkdir(parents=True)
    b.mkdir(parents=True)
    ids = [str(uuid.uuid4()), str(uuid.uuid4())]
    statuses = await manager.connect("localfs", [{"id": ids[0], "connection": str(a)},
                                                 {"id": ids[1], "connection": str(b)}])
    assert [s["status"] for s in statuses] == [0, 0]
    links = [manager.local_path(i) for i in ids]
    assert links[0] != links[1]
    assert [os.readlink(p) for p in links if p is not None] == [str(a), str(b)]


def test_legacy_recorded_link_is_kept(tmp_path):
    root = tmp_path / "root"
    backend = LocalfsBackend(root, tmp_path / "tmp", mount_timeout=5, io_timeout=5)
    spec = "/srv/my_data"
    legacy = root / "_srv_my__data"
    old = Connection(id="a", type="localfs", params={"connection": spec},
                     owned={"link": str(legacy)})
    assert backend.local_path(old) == legacy
    # a record naming some other place is not trusted
    odd = Connection(id="b", type="localfs", params={"connection": spec},
                     owned={"link": str(tmp_path / "elsewhere")})
    assert backend.local_path(odd) == root / "_srv_my%5Fdata"
    new = Connection(id="c", type="localfs", params={"connection": spec})
    assert backend.local_path(new) == root / "_srv_my%5Fdata"


async def test_legacy_mount_point_kept_and_not_shared(tmp_path):
    """A posixfs connection recorded under VDSM's naming before the change is
    mounted again at that same place on start-up; a new connection whose
    name happens to be that legacy name is refused before any mount."""
    state, root = tmp_path / "state", tmp_path / "root"
    legacy = root / "_dev_my__disk"
    (state / "connections").mkdir(parents=True)
    (state / "connections" / "a.json").write_text(json.dumps(
        {"id": "a", "type": "posixfs",
         "params": {"connection": "/dev/my_disk", "vfs_type": "ext4"},
         "owned": {"mount_point": str(legacy), "mounted": True}}))
    runner = FakeRunner()
    manager = ConnectionManager(state, root, LockManager(), io_timeout=10, runner=runner)
    await manager.start()
    assert [c["state"] for c in manager.list()] == ["connected"]
    assert manager.local_path("a") == legacy
    assert [a[-1] for a in runner.argvs("mount")] == [str(legacy)]

    # "/dev/my//disk" is named "_dev_my__disk" now: the legacy name of another
    [st0] = await manager.connect("posixfs", [{"id": "b", "connection": "/dev/my//disk",
                                               "vfs_type": "ext4"}])
    assert st0["status"] == StorageServerConnectionError.code
    assert "connection a" in st0["message"]
    assert len(runner.argvs("mount")) == 1


async def test_spec_too_long_for_a_name_is_refused(manager, tmp_path):
    """A legal 1024-byte spec can escape to more than a file name holds: an
    invalid parameter of that connection, not an unexpected error."""
    d = tmp_path / ("a" * 100) / ("b" * 100) / ("c_" * 40)
    d.mkdir(parents=True)
    assert len(escape_spec(str(d)).encode()) > 255
    ok = tmp_path / "ok"
    ok.mkdir()
    statuses = await manager.connect("localfs", [
        {"id": "long", "connection": str(d)}, {"id": "ok", "connection": str(ok)}])
    assert [s["status"] for s in statuses] == [InvalidParameter.code, 0], statuses
    assert "too long" in statuses[0]["message"]
    assert [c["id"] for c in manager.list()] == ["ok"]
