"""kill -9 the agent at random points of a live snapshot (snapshotImages of
two disks, on two domains, that a VM writes through NBD while the agent
switches it; tests/integration/crashharness).

After each restart: both disks are on their new layers or neither (the
restarted agent asked the writer, tests/integration/test_live_snapshot_file
has the VM); a new layer exists, LEGAL, exactly when the VM writes it;
nothing half-made is left, in storage or in the VM (no overlay opened and
not switched onto); the next trial's snapshot starts from the layer the VM
writes (the agent's record of it is right). Throughout, the writers never
fail; at the end each chain reads every write and no layer was written
after the VM left it."""

from __future__ import annotations

import json
import random
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from rpc.client import Client
from storage.domains.writers import layer_nodes
from storage.qmp import QMPClient
from tests.agentproc import AgentProcess
from tests.integration.crashharness import (
    Aim,
    CrashTrials,
    Job,
    Kill,
    check_invariants,
    done,
    localfs_domains,
    new_id,
)
from tests.integration.storagefixtures import FsMount
from tests.integration.test_live_snapshot_file import (
    VM,
    Writer,
    blocks_written,
    read_raw,
    sha256,
    vm_factory,
)
from tests.polling import until

MiB = 1 << 20
GiB = 1 << 30
DISKS = 2
vm_factory = vm_factory     # the fixture, under its name here


async def vm_nodes(vm: VM) -> dict[str, dict[str, Any]]:
    async with QMPClient(vm.qmp_test) as mon:
        return {n["node-name"]: n for n in
                await mon.execute("query-named-block-nodes", {"flat": True})}


def written_nodes(graph: dict[str, Any]) -> set[str]:
    """The nodes the VM's exports write (each one's root)."""
    names = {n["id"]: n.get("name") for n in graph["nodes"]}
    backends = {n["id"] for n in graph["nodes"] if n["type"] == "block-backend"}
    return {str(names[e["child"]]) for e in graph["edges"]
            if e["name"] == "root" and e["parent"] in backends}


async def vm_writes(vm: VM) -> set[str]:
    async with QMPClient(vm.qmp_test) as mon:
        return written_nodes(await mon.execute("x-debug-query-block-graph"))


def vm_query_now(vm: VM, cmd: str) -> Any:
    """A query of the VM, blocking (for the harness's phase, called with the
    agent dead)."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(vm.qmp_test)
        f = sock.makefile("rw")

        def reply(cmd: str, args: dict[str, Any] | None = None) -> Any:
            f.write(json.dumps({"execute": cmd, **({"arguments": args} if args else {})})
                    + "\n")
            f.flush()
            while "event" in (msg := json.loads(f.readline())):
                pass
            return msg["return"]

        f.readline()        # the greeting
        reply("qmp_capabilities")
        return reply(cmd)


@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_kill9_during_live_snapshot(make_fs_mount: Callable[..., FsMount],
                                          agent_factory: Callable[..., AgentProcess],
                                          vm_factory: Callable[[list[str]], VM],
                                          tmp_path: Path) -> None:
    rng = random.Random(2029)
    fs = make_fs_mount("ext4", size=2 * GiB)
    agent = agent_factory(tmp_path / "state")
    qmp = str(tmp_path / "qmp.sock")
    async with agent.client() as c:
        doms = await localfs_domains(c, fs.path, [f"sd{i}" for i in range(DISKS)])
        imgs = [new_id() for _ in range(DISKS)]
        tops = [new_id() for _ in range(DISKS)]
        paths = []
        for i, (sd, img, vol) in enumerate(zip(doms.sds, imgs, tops, strict=True)):
            await done(c, "createVolume", sdUUID=sd, imgUUID=img, volUUID=vol, size=GiB,
                       format="cow", preallocate="sparse")
            p = await c.call("prepareImage", sdUUID=sd, imgUUID=img, volUUID=vol,
                             purpose="vm", writer={"qmpSocket": qmp, "nodeName": f"file{i}"})
            paths.append(p["path"])
    vm = vm_factory(paths)
    await until(lambda: Path(vm.nbd).exists(), "the VM's NBD server", timeout=20)
    writers = [Writer(vm.url(i), size=GiB).start() for i in range(DISKS)]
    left: dict[str, str] = {}       # a layer the VM left -> its digest then
    chains: list[list[str]] = [[t] for t in tops]

    def path(i: int, vol: str) -> Path:
        return doms.roots[i] / "images" / imgs[i] / vol

    aims = [0]

    async def start(c: Client) -> Job:
        marks = [w.written + 16 for w in writers]
        await until(lambda: all(w.at_least(m) for w, m in zip(writers, marks, strict=True)),
                    "writes between trials", timeout=30)
        params = {"disks": [{"sdUUID": doms.sds[i], "imgUUID": imgs[i], "volUUID": tops[i],
                             "newVolUUID": new_id()} for i in range(DISKS)]}
        news = [d["newVolUUID"] for d in params["disks"]]
        aims[0] += 1
        if aims[0] % 2:
            aim = Aim("layers made", lambda: all(path(i, v).exists()
                                                 for i, v in enumerate(news)), 0.1)
        else:
            # the short window after the transaction, before the job ends
            aim = Aim("switched", lambda: layer_nodes(news[0])[1] in written_nodes(
                vm_query_now(vm, "x-debug-query-block-graph")), 0.02)
        return Job("snapshotImages", params, doms.roots, data=news, aim=aim)

    async def on_new(news: list[str]) -> list[bool]:
        writes = await vm_writes(vm)
        assert len(writes) == DISKS, writes
        return [layer_nodes(v)[1] in writes for v in news]

    def phase(job: Job) -> str:
        """Where a kill inside the job landed (the agent dead): before or
        after the VM's switch."""
        writes = written_nodes(vm_query_now(vm, "x-debug-query-block-graph"))
        return "switched" if layer_nodes(job.data[0])[1] in writes else "made"

    async def check(c: Client, job: Job, kill: Kill) -> str:
        news: list[str] = job.data
        switched = await on_new(news)
        # all or none
        assert switched == [switched[0]] * DISKS, (switched, kill)
        nodes = await vm_nodes(vm)
        for i, (new, on) in enumerate(zip(news, switched, strict=True)):
            infos = await check_invariants(c, doms.sds[i], doms.roots[i])
            if on:
                assert infos[new]["legality"] == "LEGAL" and infos[new]["parent"] == tops[i]
                left[f"{i}/{tops[i]}"] = sha256(str(path(i, tops[i])))
                tops[i] = new
                chains[i].append(new)
            else:
                assert new not in infos, (kill, infos[new])
                # no overlay left open in the VM
                assert not set(layer_nodes(new)) & set(nodes), (kill, sorted(nodes))
            assert sorted(infos) == sorted(chains[i]), (kill, sorted(infos), chains[i])
        return "switched" if switched[0] else "not switched"

    try:
        trials = CrashTrials("snapshotImages", agent, agent_factory, rng,
                             outcomes=("switched", "not switched"),
                             phases={"made": 3, "switched": 3})
        agent = await trials.run(start, check, phase)
    finally:
        for w in writers:
            await w.stop()
    vm.stop()
    for key, digest in left.items():
        i, vol = key.split("/")
        assert sha256(str(path(int(i), vol))) == digest, f"layer {key} written after the switch"
    for i, w in enumerate(writers):
        data = read_raw(str(path(i, tops[i])), tmp_path / f"chain{i}.raw")
        assert blocks_written(data) == w.written
    print(f"live snapshot trials: chains of {[len(ch) for ch in chains]} layers, "
          f"{[w.written for w in writers]} blocks written, none failed")
    async with agent.client() as c:
        for sd, img in zip(doms.sds, imgs, strict=True):
            await c.call("teardownImage", sdUUID=sd, imgUUID=img)
        await doms.release(c)
