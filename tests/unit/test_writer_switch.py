"""storage/domains/writers.switch_writers against a fake QMP monitor: an
error reply to the transaction closes the overlays it opened (nothing was
switched); no reply at all leaves them (the writer may be on them) and says
so (SwitchUncertain), so that no layer a VM may write is removed. What
would fail inside the transaction (a busy bitmap, a block job on the top)
is refused before it; the bitmaps' merges come after the snapshots; a
write that reached an aborted overlay is said."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from storage.domains.writers import (
    Link,
    Switch,
    SwitchUncertain,
    WriterWatch,
    layer_nodes,
    switch_writers,
)
from storage.errors import VolumeIsBusy
from storage.thin import ThinPolicy

GRAPH = {"nodes": [{"id": 1, "type": "block-backend", "name": ""},
                   {"id": 2, "type": "block-driver", "name": "fmt0"},
                   {"id": 3, "type": "block-driver", "name": "file0"}],
         "edges": [{"parent": 1, "child": 2, "name": "root"},
                   {"parent": 2, "child": 3, "name": "file"}]}
NODES = [{"node-name": "fmt0", "drv": "qcow2", "file": "/d/vol"},
         {"node-name": "file0", "drv": "file", "file": "/d/vol",
          "cache": {"direct": True, "no-flush": False}}]


class FakeMonitor:
    """Answers what a switch asks; the transaction as `transaction` says:
    "error" (an error reply) or "silent" (no reply)."""

    def __init__(self, path: Path, transaction: str) -> None:
        self.path = str(path)
        self.transaction = transaction
        self.seen: list[tuple[str, dict[str, Any]]] = []
        self.nodes: list[dict[str, Any]] = json.loads(json.dumps(NODES))
        self.graph: dict[str, Any] = json.loads(json.dumps(GRAPH))
        self.written: dict[str, int] = {}      # node: wr_highest_offset

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._serve(reader, writer)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(json.dumps({"QMP": {"version": {}, "capabilities": []}}).encode() + b"\n")
        while line := await reader.readline():
            msg = json.loads(line)
            cmd, args = msg["execute"], msg.get("arguments", {})
            self.seen.append((cmd, args))
            reply: dict[str, Any] = {"id": msg["id"], "return": {}}
            if cmd == "query-named-block-nodes":
                reply["return"] = self.nodes
            elif cmd == "x-debug-query-block-graph":
                reply["return"] = self.graph
            elif cmd == "query-blockstats":
                reply["return"] = [{"node-name": n, "stats": {"wr_highest_offset": w}}
                                   for n, w in self.written.items()]
            elif cmd == "transaction" and self.transaction != "ok":
                if self.transaction == "silent":
                    continue
                reply = {"id": msg["id"], "error": {"class": "GenericError",
                                                    "desc": "injected"}}
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()


@pytest.fixture
async def monitor(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[FakeMonitor]:
    mon = FakeMonitor(tmp_path / "qmp.sock", request.param)
    server = await asyncio.start_unix_server(mon.serve, mon.path)
    try:
        yield mon
    finally:
        server.close()
        await server.wait_closed()


async def _switch(mon: FakeMonitor, timeout: float = 5) -> None:
    async def size() -> int:
        return 1 << 30

    link = Link(mon.path, retry_interval=0.01, timeout=timeout)
    watch = WriterWatch("sd/img/vol", mon.path, "file0", ThinPolicy(), current=size,
                        extend=lambda _, report=True: size(), link=link).start()
    try:
        await switch_writers([Switch(watch, "disks[0]", "/d/new", "new-vol")])
    finally:
        await watch.stop()


@pytest.mark.parametrize("monitor", ["error"], indirect=True)
async def test_refused_transaction_closes_the_overlays(monitor: FakeMonitor) -> None:
    with pytest.raises(VolumeIsBusy) as e:
        await _switch(monitor)
    assert not isinstance(e.value, SwitchUncertain)
    assert "injected" in e.value.message
    file_node, fmt_node = layer_nodes("new-vol")
    [snap] = [a for c, a in monitor.seen if c == "transaction"]
    assert snap["actions"] == [{"type": "blockdev-snapshot",
                                "data": {"node": "fmt0", "overlay": fmt_node}}]
    assert [a["node-name"] for c, a in monitor.seen if c == "blockdev-del"] == \
        [fmt_node, file_node]


def _bitmap(name: str, **flags: bool) -> dict[str, Any]:
    return {"name": name, "persistent": True, "granularity": 65536, "recording": True,
            "busy": False, "inconsistent": False, **flags}


@pytest.mark.parametrize("monitor", ["ok"], indirect=True)
async def test_bitmap_merges_after_the_snapshots(monitor: FakeMonitor) -> None:
    """A snapshot's prepare holds the old top drained: a merge after it
    sees every write the top took; the adds (which may fail on storage)
    before it. An inconsistent bitmap is not carried (qemu would refuse it)."""
    monitor.nodes[0]["dirty-bitmaps"] = [_bitmap("b1"), _bitmap("bad", inconsistent=True)]
    await _switch(monitor)
    _, fmt_node = layer_nodes("new-vol")
    [snap] = [a for c, a in monitor.seen if c == "transaction"]
    assert [(a["type"], a["data"].get("name") or a["data"].get("target"))
            for a in snap["actions"]] == [("block-dirty-bitmap-add", "b1"),
                                          ("blockdev-snapshot", None),
                                          ("block-dirty-bitmap-merge", "b1")]
    assert snap["actions"][2]["data"] == {"node": fmt_node, "target": "b1",
                                          "bitmaps": [{"node": "fmt0", "name": "b1"}]}


@pytest.mark.parametrize("monitor", ["ok"], indirect=True)
async def test_busy_bitmap_refused_before_the_transaction(monitor: FakeMonitor) -> None:
    monitor.nodes[0]["dirty-bitmaps"] = [_bitmap("pulled", busy=True)]
    await _refused_before(monitor, "pulled")


@pytest.mark.parametrize("monitor", ["ok"], indirect=True)
async def test_block_job_on_the_top_refused_before_the_transaction(
        monitor: FakeMonitor) -> None:
    """qemu 7.2's backup job: its copy-before-write filter between the
    device and the top, the job on the filter."""
    monitor.graph["nodes"] += [{"id": 4, "type": "block-job", "name": "mirror-0"},
                               {"id": 5, "type": "block-driver", "name": "#block5"}]
    monitor.graph["edges"] = [{"parent": 1, "child": 5, "name": "root"},
                              {"parent": 5, "child": 2, "name": "file"},
                              {"parent": 2, "child": 3, "name": "file"},
                              {"parent": 4, "child": 5, "name": "main node"}]
    monitor.nodes[0]["dirty-bitmaps"] = [{"granularity": 65536, "busy": False,
                                          "recording": True, "persistent": False}]
    await _refused_before(monitor, "mirror-0")


async def _refused_before(monitor: FakeMonitor, cause: str) -> None:
    """The switch refused naming the disk and `cause`, before it opened an
    overlay or ran a transaction."""
    with pytest.raises(VolumeIsBusy) as e:
        await _switch(monitor)
    assert "disks[0]" in e.value.message and cause in e.value.message
    assert not [c for c, _ in monitor.seen if c in ("transaction", "blockdev-add")]


@pytest.mark.parametrize("monitor", ["error"], indirect=True)
async def test_write_into_an_aborted_overlay_is_said(
        monitor: FakeMonitor, caplog: pytest.LogCaptureFixture) -> None:
    _, fmt_node = layer_nodes("new-vol")
    monitor.written = {"fmt0": 1 << 20, fmt_node: 8192}
    with caplog.at_level(logging.ERROR, logger="storage.writers"), \
            pytest.raises(VolumeIsBusy) as e:
        await _switch(monitor)
    assert "injected" in e.value.message and "not in the disk" in e.value.message
    assert any("not in the disk" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("monitor", ["silent"], indirect=True)
async def test_unanswered_transaction_keeps_the_overlays(monitor: FakeMonitor) -> None:
    with pytest.raises(SwitchUncertain) as e:
        await _switch(monitor, timeout=0.5)
    assert e.value.code == 203 and "kept" in e.value.message
    assert [c for c, _ in monitor.seen if c == "transaction"] == ["transaction"]
    assert not [c for c, _ in monitor.seen if c == "blockdev-del"]


async def test_resolve_switches_writes_only_what_changed(monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    """At the start, the prepared volumes' record is written only if a cut
    live snapshot was resolved: a start with nothing to resolve wrote it
    each time (a warning at every start on a full state directory)."""
    from types import SimpleNamespace

    from storage.domains import volumes

    saves: list[dict[str, Any]] = []
    writers: dict[str, dict[str, str]] = {"sd/img/a": {"qmpSocket": "/run/a.sock"}}
    prepared = SimpleNamespace(writers=writers,
                               save=lambda: saves.append(json.loads(json.dumps(writers))))
    ops = SimpleNamespace(prepared=prepared, _move_vm=lambda old, new: None)

    async def not_switched(sock: str, node: str) -> bool | None:
        return False
    monkeypatch.setattr(volumes, "switched", not_switched)
    await volumes.VolumeOps.resolve_switches(ops)  # type: ignore[arg-type]
    assert saves == []
    writers["sd/img/b"] = {"qmpSocket": "/run/a.sock", "switchedFrom": "sd/img/a"}
    await volumes.VolumeOps.resolve_switches(ops)  # type: ignore[arg-type]
    assert saves == [{"sd/img/a": {"qmpSocket": "/run/a.sock"}}]
