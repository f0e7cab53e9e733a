"""Storage connection latency, measured inside the lab guest (real NFS, iSCSI,
multipath): connect and disconnect through the agent per type, beside the
bare tool doing the core of the same work in the same run, and 20 iSCSI
targets logged in in one connectStorageServer call (parallel) vs one call
after another.

    python -m tests.bench connections      (on the host: boots the guest)

The agent does more than the bare tool: an iSCSI connect also writes the
node record, scans the session, waits for udev and for the multipath map
with its path active; a disconnect flushes the map and removes the disks
before it logs out. An NFS connect checks read and write in the mount.
The guest is User-Mode Linux: every process start costs ~50-100 ms there,
so absolute figures are much slower than on a real host; the ratios and
the parallel speed-up are the point.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from tests.bench.common import machine, median, run_in_guest, save, table

MiB = 1 << 20


# ---- host side -------------------------------------------------------------------------

def run(runs: int = 5, targets: int = 20) -> dict[str, Any]:
    summary = run_in_guest("tests.bench.connections", str(runs), str(targets))
    summary["machine"] = machine()
    save("connections", summary)
    return summary


def report(s: dict[str, Any]) -> str:
    p = s["params"]
    rows = []
    for kind in ("localfs", "posixfs", "nfs", "iscsi"):
        r = s["types"][kind]
        rows.append([kind, r["connect_ms"], r["bare_connect_ms"], r["disconnect_ms"],
                     r["bare_disconnect_ms"], r["bare_tool"]])
    par, seq = s["parallel"], s["sequential"]
    lines = [
        f"storage connections in the lab guest (User-Mode Linux, {s['guest_cpus']} vCPU; "
        f"host {s['machine']['cpus']} CPUs), median of {p['runs']} runs, ms",
        table(rows, ["type", "connect", "bare", "disconnect", "bare", "bare tool"]),
        f"\n{p['targets']} iSCSI targets (1 LUN each, multipath), total s:",
        table([["one call (parallel)", par["connect_s"], par["disconnect_s"]],
               ["one call each (sequential)", seq["connect_s"], seq["disconnect_s"]]],
              ["how", "connect", "disconnect"]),
        f"speed-up of the parallel call: connect {seq['connect_s'] / par['connect_s']:.1f}x, "
        f"disconnect {seq['disconnect_s'] / par['disconnect_s']:.1f}x",
    ]
    return "\n".join(lines)


# ---- guest side --------------------------------------------------------------------------

def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


async def _timed(fn: Callable[[], Awaitable[Any]]) -> float:
    t = time.perf_counter()
    await fn()
    return time.perf_counter() - t


def _sh(*argv: str | os.PathLike[str]) -> float:
    t = time.perf_counter()
    subprocess.run([os.fspath(a) for a in argv], check=True, stdin=subprocess.DEVNULL,
                   capture_output=True)
    return time.perf_counter() - t


async def _call_ok(client: Any, verb: str, dom_type: str, params: list[dict[str, Any]]) -> None:
    statuses = await client.call(verb, domType=dom_type, connectionParams=params)
    bad = [st for st in statuses if st["status"] != 0]
    if bad:
        raise RuntimeError(f"{verb} {dom_type}: {bad[:3]}")


async def _measure_type(client: Any, dom_type: str, params: dict[str, Any], runs: int,
                        bare_up: Callable[[], float], bare_down: Callable[[], float],
                        bare_tool: str) -> dict[str, Any]:
    conn, disc, bconn, bdisc = [], [], [], []
    for i in range(runs + 1):   # the first run warms caches up and is dropped
        p = {"id": str(uuid.uuid4()), **params}
        c = await _timed(lambda p=p: _call_ok(client, "connectStorageServer", dom_type, [p]))
        d = await _timed(lambda p=p: _call_ok(client, "disconnectStorageServer", dom_type,
                                              [p]))
        bu = await asyncio.to_thread(bare_up)
        bd = await asyncio.to_thread(bare_down)
        if i:
            conn.append(c)
            disc.append(d)
            bconn.append(bu)
            bdisc.append(bd)
    return {"connect_ms": _ms(median(conn)), "disconnect_ms": _ms(median(disc)),
            "bare_connect_ms": _ms(median(bconn)), "bare_disconnect_ms": _ms(median(bdisc)),
            "bare_tool": bare_tool, "runs": {"connect": conn, "disconnect": disc,
                                             "bare_connect": bconn, "bare_disconnect": bdisc}}


async def _guest(runs: int, ntargets: int, work: Path) -> dict[str, Any]:
    from tests.agentproc import AgentProcess
    from tests.lab import guestlib as g

    steps = g.Cleanup()
    try:
        server = g.iscsi_services(work, steps)
        export = g.LoopFs(work / "export.img", Path("/srv/export"), 256 * MiB).create()
        steps.push("destroy export", export.destroy)
        export.mountpoint.chmod(0o777)
        nfs = g.NfsServer([export.mountpoint]).start()
        steps.push("stop nfs", nfs.stop)
        # posixfs: an unmounted ext4 on a loop device
        posix = g.LoopFs(work / "posix.img", work / "posix-mnt", 128 * MiB).create()
        steps.push("destroy posixfs", posix.destroy)
        g.run("umount", posix.mountpoint)
        local = work / "local"
        local.mkdir()
        bare_mnt = work / "bare"
        bare_mnt.mkdir()

        agent = AgentProcess(work / "agent" / "state")
        agent.log_path = work / "agent.log"
        agent.start(timeout=60)
        steps.push("stop agent", agent.stop)

        target = server.create_target("bench", (64 * MiB,))
        portal = g.PORTALS[0]
        g.run("iscsiadm", "-m", "node", "-T", target.iqn, "-p", portal, "-o", "new")
        steps.push("delete bare node", lambda: g.run_ok(
            "iscsiadm", "-m", "node", "-T", target.iqn, "-p", portal, "-o", "delete"))
        many = [server.create_target(f"bench{i:02d}", (16 * MiB,)) for i in range(ntargets)]

        def bare_iscsi(op: str) -> float:
            return _sh("iscsiadm", "-m", "node", "-T", target.iqn, "-p", portal, op)

        link = work / "bare-link"
        nfs_opts = "soft,nosharecache,timeo=600,retrans=6,vers=4.2"
        cases: list[tuple[str, dict[str, Any], Callable[[], float], Callable[[], float],
                          str]] = [
            ("localfs", {"connection": str(local)},
             lambda: _sh("ln", "-s", local, link), lambda: _sh("rm", link), "ln -s / rm"),
            ("posixfs", {"connection": posix.device, "vfs_type": "ext4"},
             lambda: _sh("mount", "-t", "ext4", posix.device, bare_mnt),
             lambda: _sh("umount", bare_mnt), "mount / umount"),
            ("nfs", {"connection": "127.0.0.1:/export", "protocol_version": "4.2"},
             lambda: _sh("mount", "-t", "nfs", "-o", nfs_opts, "127.0.0.1:/export", bare_mnt),
             lambda: _sh("umount", bare_mnt), "mount -t nfs / umount"),
            ("iscsi", {"connection": portal.split(":")[0], "port": 3260, "iqn": target.iqn},
             lambda: bare_iscsi("--login"), lambda: bare_iscsi("--logout"),
             "iscsiadm --login / --logout"),
        ]
        result: dict[str, Any] = {"types": {}}
        async with agent.client() as client:
            for dom_type, params, up, down, tool in cases:
                result["types"][dom_type] = await _measure_type(client, dom_type, params, runs,
                                                                up, down, tool)

            def many_params() -> list[dict[str, Any]]:
                return [{"id": str(uuid.uuid4()), "connection": portal.split(":")[0],
                         "port": 3260, "iqn": t.iqn} for t in many]

            ps = many_params()
            par_c = await _timed(lambda: _call_ok(client, "connectStorageServer", "iscsi", ps))
            luns = len(await client.call("getDeviceList"))
            par_d = await _timed(lambda: _call_ok(client, "disconnectStorageServer", "iscsi",
                                                  ps))
            ps = many_params()
            seq_c = 0.0
            for p in ps:
                seq_c += await _timed(lambda p=p: _call_ok(client, "connectStorageServer",
                                                           "iscsi", [p]))
            seq_d = 0.0
            for p in ps:
                seq_d += await _timed(lambda p=p: _call_ok(client, "disconnectStorageServer",
                                                           "iscsi", [p]))
        result["parallel"] = {"connect_s": round(par_c, 2), "disconnect_s": round(par_d, 2),
                              "luns_listed": luns}
        result["sequential"] = {"connect_s": round(seq_c, 2), "disconnect_s": round(seq_d, 2)}
        result["params"] = {"runs": runs, "targets": ntargets}
        result["guest_cpus"] = os.cpu_count()
        return result
    finally:
        steps.run()


def guest_main(runs: int, ntargets: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-conn-", dir="/tmp"))
    result = asyncio.run(_guest(runs, ntargets, work))
    print(json.dumps(result))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--guest"]:
        guest_main(int(sys.argv[2]), int(sys.argv[3]))
    else:
        print(report(run()))
