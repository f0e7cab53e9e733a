"""ConnectionManager logic on localfs (no root): records, in-use refusals."""

import json
import uuid

import pytest

from storage.connections import ConnectionManager
from storage.connections.filebased import escape_spec
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
