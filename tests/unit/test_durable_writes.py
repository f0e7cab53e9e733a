"""The agent's state files survive a crash: each is written to a temp file that is
fsynced, renamed over the file, and the directory fsynced after the rename (else the
rename itself can be lost: prepared.json guards disconnects). The syscalls are real;
a journal only watches them."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.host import Host
from storage.connections import ConnectionManager
from storage.connections.base import Connection, RecordStore
from storage.domains import DomainRegistry
from storage.domains.monitor import DomainMonitor
from storage.domains.prepared import PreparedVolumes
from storage.locks import LockManager

Entry = tuple[str, ...]


@pytest.fixture
def journal(monkeypatch: pytest.MonkeyPatch) -> list[Entry]:
    seen: list[Entry] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        seen.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src: str | Path, dst: str | Path) -> None:
        seen.append(("replace", str(src), str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return seen


def assert_durable(journal: list[Entry], path: Path) -> None:
    """The temp file's data was fsynced before it was renamed over path, and
    path's directory fsynced after."""
    renames = [i for i, e in enumerate(journal) if e[0] == "replace" and e[2] == str(path)]
    assert renames, f"{path} was not renamed into place: {journal}"
    i = renames[-1]
    tmp = journal[i][1]
    assert ("fsync", tmp) in journal[:i], f"{tmp} not fsynced before its rename: {journal}"
    assert ("fsync", str(path.parent)) in journal[i + 1:], (
        f"{path.parent} not fsynced after the rename: {journal}")
    assert not Path(tmp).exists()


def _domains(tmp_path: Path) -> DomainRegistry:
    locks = LockManager()
    conns = ConnectionManager(tmp_path, tmp_path / "root", locks)
    return DomainRegistry(tmp_path, conns, locks, PreparedVolumes(tmp_path),
                          DomainMonitor(locks))


@pytest.mark.parametrize(("name", "save", "content"), [
    ("prepared.json", lambda dm: dm.prepared.save(), {"sd/img/vol": {"vm": 1}}),
    ("domains.json", lambda dm: dm._set_active("sd2", True), {"active": ["sd", "sd2"]}),
])
def test_domain_manager_state(tmp_path: Path, journal: list[Entry], name: str,
                              save: Callable[[DomainRegistry], None],
                              content: dict[str, object]) -> None:
    dm = _domains(tmp_path)
    dm.prepared.counts = {"sd/img/vol": {"vm": 1}}
    dm.active = {"sd"}
    save(dm)
    assert_durable(journal, tmp_path / name)
    assert json.loads((tmp_path / name).read_text()) == content


def test_connection_record(tmp_path: Path, journal: list[Entry]) -> None:
    store = RecordStore(tmp_path / "connections")
    conn = Connection(id="c1", type="nfs", params={"spec": "server:/export"})
    store.save(conn)
    path = tmp_path / "connections" / "c1.json"
    assert_durable(journal, path)
    # it may hold CHAP passwords
    assert path.stat().st_mode & 0o777 == 0o600
    assert [c.id for c in store.load()] == ["c1"]


def test_host_id(tmp_path: Path, journal: list[Entry]) -> None:
    host = Host(tmp_path)
    host.load()
    assert_durable(journal, tmp_path / "host_id")
    again = Host(tmp_path)
    again.load()
    assert again.host_id == host.host_id


def test_journal_sees_a_missing_directory_fsync(tmp_path: Path,
                                                journal: list[Entry]) -> None:
    path = tmp_path / "x.json"
    tmp = tmp_path / "x.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, json.dumps({}).encode())
    os.fsync(fd)
    os.close(fd)
    os.replace(tmp, path)
    with pytest.raises(AssertionError, match="not fsynced after the rename"):
        assert_durable(journal, path)
