"""ConnectionManager logic on localfs (no root): records, in-use refusals."""

import asyncio
import json
import uuid

import pytest

from storage.connections import ConnectionManager
from storage.connections.filebased import LocalfsBackend, escape_spec
from storage.errors import ResourceInUse
from storage.locks import LockManager


@pytest.fixture
async def manager(tmp_path):
    m = ConnectionManager(tmp_path / "state", tmp_path / "root", LockManager(), io_timeout=10)
    await m.start()
    return m


async def test_record_is_private_and_password_masked(manager, tmp_path):
    data = tmp_path / "d"
    data.mkdir()
    cid = str(uuid.uuid4())
    [st] = await manager.connect("localfs", [{"id": cid, "connection": str(data)}])
    assert st["status"] == 0
    record = tmp_path / "state" / "connections" / f"{cid}.json"
    assert record.stat().st_mode & 0o777 == 0o600
    assert json.loads(record.read_text())["owned"]["link"].endswith(escape_spec(str(data)))
    conn = manager.get(cid)
    conn.params["password"] = "hunter2"
    assert manager.list()[0]["params"]["password"] == "********"


async def test_in_use_refuses_disconnect_and_update(manager, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    cid = str(uuid.uuid4())
    await manager.connect("localfs", [{"id": cid, "connection": str(a)}])
    manager.in_use = lambda conn_id: conn_id == cid
    [st] = await manager.disconnect("localfs", [{"id": cid, "connection": str(a)}])
    assert st["status"] == ResourceInUse.code
    with pytest.raises(ResourceInUse):
        await manager.update("localfs", {"id": cid, "connection": str(b)})
    assert manager.get(cid).params["connection"] == str(a)
    manager.in_use = lambda conn_id: False
    [st] = await manager.disconnect("localfs", [{"id": cid, "connection": str(a)}])
    assert st["status"] == 0


async def test_concurrent_connects_of_one_target_make_one_connection(manager, tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    ids = [str(uuid.uuid4()) for _ in range(5)]
    results = await manager.connect("localfs", [{"id": i, "connection": str(d)} for i in ids])
    assert sorted(r["status"] for r in results) == [0, 2103, 2103, 2103, 2103]
    assert len(manager.list()) == 1


class _Flaky(LocalfsBackend):
    """A localfs backend whose connect of a path ending in "bad" fails with a bug
    (not a HostAgentError) once the other connect has started, and lets that one
    go on only after the failure."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.started = asyncio.Event()
        self.go = asyncio.Event()

    async def connect(self, conn, save):
        if conn.params["connection"].endswith("bad"):
            await self.started.wait()
            asyncio.get_running_loop().call_soon(self.go.set)
            raise RuntimeError("a bug")
        self.started.set()
        await self.go.wait()
        await super().connect(conn, save)


async def test_an_unexpected_error_fails_only_its_connection(tmp_path, caplog):
    state, root = tmp_path / "state", tmp_path / "root"
    flaky = _Flaky(root, state / "tmp", mount_timeout=10, io_timeout=10)
    m = ConnectionManager(state, root, LockManager(), io_timeout=10,
                          backends={"localfs": flaky})
    await m.start()
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.mkdir()
    bad.mkdir()
    gid, bid = str(uuid.uuid4()), str(uuid.uuid4())
    results = await m.connect("localfs", [{"id": bid, "connection": str(bad)},
                                          {"id": gid, "connection": str(good)}])
    assert [(r["id"], r["status"]) for r in results] == [(bid, 100), (gid, 0)]
    assert "unexpected error" in results[0]["message"]
    assert "a bug" not in results[0]["message"]
    # the other one ended before the call answered, and is connected
    assert [c["id"] for c in m.list()] == [gid]
    assert any(r.exc_info and "a bug" in str(r.exc_info[1]) and bid in r.getMessage()
               for r in caplog.records)
