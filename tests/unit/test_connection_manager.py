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


class _Slow(LocalfsBackend):
    """A localfs backend whose check of a path ending in "slow" waits for
    `go`, and of any other passes at once (no checker process: start_wait
    is never what it waits for, however loaded the machine)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.go = asyncio.Event()
        self.waiting = asyncio.Event()

    async def check(self, conn):
        if conn.params["connection"].endswith("slow"):
            self.waiting.set()
            await self.go.wait()
            await super().check(conn)


async def restarted(tmp_path, names, start=True):
    """Connections to directories `names` recorded, then a new manager on the
    same records whose checks of those ending in "slow" wait for its
    backend's `go`, started (unless not `start`) with a start_wait of 1 s:
    (the manager, the ids by name, the ids `came_up` was called with)."""
    state, root = tmp_path / "state", tmp_path / "root"
    ids = {name: str(uuid.uuid4()) for name in names}
    for name in names:
        (tmp_path / name).mkdir()
    first = ConnectionManager(state, root, LockManager(), io_timeout=10)
    await first.start()
    await first.connect("localfs", [{"id": ids[n], "connection": str(tmp_path / n)}
                                    for n in names])
    backend = _Slow(root, state / "tmp", mount_timeout=10, io_timeout=10)
    m = ConnectionManager(state, root, LockManager(), io_timeout=10, start_wait=1.0,
                          backends={"localfs": backend})
    up: list[str] = []

    async def came_up(conn_id: str) -> None:
        up.append(conn_id)
    m.came_up = came_up
    if start:
        await m.start()
    return m, ids, up


async def test_start_does_not_wait_for_a_slow_connection(tmp_path):
    """start() waits start_wait for the recorded connections, then returns;
    one still being checked goes on, and `came_up` is called when it is up
    (the domain registry looks for its domains then)."""
    m, ids, up = await restarted(tmp_path, ["fast", "a-slow", "b-slow"])
    states = {c["id"]: (c["state"], c["message"]) for c in m.list()}
    assert states[ids["fast"]] == ("connected", "")
    for n in ("a-slow", "b-slow"):
        assert states[ids[n]][0] == "disconnected" and "being" in states[ids[n]][1]
    assert up == []          # those up in time: the registry's own scan finds their domains
    late = list(m._background)
    assert len(late) == 2
    m.backends["localfs"].go.set()
    await asyncio.wait_for(asyncio.gather(*late), 60)
    assert not m._background
    states = {c["id"]: c["state"] for c in m.list()}
    assert sorted(up) == sorted([ids["a-slow"], ids["b-slow"]])
    assert all(s == "connected" for s in states.values()), states


async def test_stop_cancels_a_recovery_still_under_way(tmp_path):
    m, _, up = await restarted(tmp_path, ["slow"])
    [task] = m._background
    await m.stop()
    assert task.cancelled() and not m._background and up == []


async def test_stop_after_a_start_cut_short(tmp_path):
    """The agent stopped during its start (systemctl stop while it waits for
    a connection): stop() cancels the recovery that start left under way,
    which would otherwise go on with nobody to end it."""
    m, _, up = await restarted(tmp_path, ["slow"], start=False)
    starting = asyncio.create_task(m.start())
    await m.backends["localfs"].waiting.wait()
    starting.cancel()
    await asyncio.wait([starting])
    [task] = m._background
    await m.stop()
    assert task.cancelled() and not m._background and up == []


@pytest.mark.parametrize("was_there", [True, False])
async def test_connect_looks_for_the_domains_of_a_connection_back_up(tmp_path, was_there):
    """connectStorageServer for a connection that was down (its storage
    gone at the start, then back): the domains on it are looked for
    (`came_up`), as VDSM refreshes its domain cache; not for one that was
    up all along."""
    state, root, store = tmp_path / "state", tmp_path / "root", tmp_path / "store"
    store.mkdir()
    conn = {"id": str(uuid.uuid4()), "connection": str(store)}
    first = ConnectionManager(state, root, LockManager(), io_timeout=10)
    await first.start()
    await first.connect("localfs", [conn])
    if not was_there:
        store.rename(tmp_path / "away")
        store.write_text("not a directory")
    m = ConnectionManager(state, root, LockManager(), io_timeout=10)
    up: list[str] = []

    async def came_up(conn_id: str) -> None:
        up.append(conn_id)
    m.came_up = came_up
    await m.start()
    assert m.get(conn["id"]).state == ("connected" if was_there else "failed")
    if not was_there:
        store.unlink()
        (tmp_path / "away").rename(store)
    [st] = await m.connect("localfs", [conn])
    assert st["status"] == 0, st
    await asyncio.gather(*m._background)
    assert up == ([] if was_there else [conn["id"]])
    await m.stop()
