"""activateStorageDomain of an NFS domain of many volumes, in the lab guest
(knfsd on loopback, NFS 4.2): its garbage collection reads every volume's
metadata afresh over NFS, with no directory stamps to trust (another host
may have written). Beside it, in the same run: getVolumesList (it reads
every file too on NFS) and a bare Python pass that lists the images and
reads every `.meta` through the same mount. Then createVolume, a base volume
in a new image and a snapshot layer on an image's top, on that domain and
on an empty one beside it on the same export, in turns: what a create
costs for the domain's size (its new id is looked for in every image).

    python -m tests.bench nfsactivate              (2,000 volumes)
    BENCH_NFS_VOLUMES=5000 python -m tests.bench nfsactivate
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from tests.bench.common import machine, median, reactivation_ms, run_in_guest, save, table
from tests.bench.volumelist import bare_read
from tests.bench.volumes import populate

MiB = 1 << 20
RUNS = 6


def run(count: int | None = None) -> dict[str, Any]:
    count = count or int(os.environ.get("BENCH_NFS_VOLUMES", "2000"))
    result = run_in_guest("tests.bench.nfsactivate", str(count), timeout=1800)
    result["machine"] = machine()
    save("nfsactivate", result)
    return result


def report(r: dict[str, Any]) -> str:
    rows = [[r["count"], r["activate_ms"], r["list_ms"], r["bare_read_ms"],
             r["activate_ms"] / r["bare_read_ms"]]]
    creates = [[kind, r["create_ms"][kind]["full"], r["create_ms"][kind]["empty"],
                r["create_ms"][kind]["full"] / r["create_ms"][kind]["empty"]]
               for kind in ("base", "snapshot")]
    return (f"An NFS 4.2 domain of {r['count']} volumes in the lab guest, medians of "
            f"{RUNS - 1} (after a first run)\n"
            + table(rows, ["volumes", "activate ms", "getVolumesList ms",
                           "bare read of every .meta ms", "activate / bare"])
            + f"\ncreateVolume (a job, polled every 5 ms), medians of {RUNS - 1}\n"
            + table(creates, ["kind", f"{r['count']} volumes ms", "empty domain ms",
                              "ratio"]))


async def _create_ms(c: Any, sd: str, img: str, parent: str | None) -> tuple[float, str]:
    """createVolume of 1 MiB: a snapshot layer on `parent` in `img`, or a
    raw base volume (parent None); its ms and the new volume."""
    vol, job = str(uuid.uuid4()), str(uuid.uuid4())
    kind = (dict(format="cow", parentVolUUID=parent) if parent
            else dict(format="raw"))
    t = time.perf_counter()
    await c.call("createVolume", jobUUID=job, sdUUID=sd, imgUUID=img, volUUID=vol,
                 size=MiB, preallocate="sparse", **kind)
    info = await c.wait_job(job, timeout=120, poll=0.005)
    ms = 1000 * (time.perf_counter() - t)
    assert info["status"] == "done", info
    return ms, vol


async def _creates(c: Any, doms: dict[str, str]) -> dict[str, Any]:
    """Base volumes and snapshot layers on each domain ({"full": sd,
    "empty": sd}), in turns."""
    tops = {}
    for name, sd in doms.items():
        img = str(uuid.uuid4())
        tops[name] = (img, (await _create_ms(c, sd, img, None))[1])
    runs: dict[str, dict[str, list[float]]] = {
        k: {"full": [], "empty": []} for k in ("base", "snapshot")}
    for _ in range(RUNS):
        for name, sd in doms.items():
            img, top = tops[name]
            ms, top = await _create_ms(c, sd, img, top)
            tops[name] = (img, top)
            runs["snapshot"][name].append(ms)
            runs["base"][name].append((await _create_ms(c, sd, str(uuid.uuid4()), None))[0])
    return {"create_ms": {k: {n: round(median(v[1:]), 1) for n, v in by.items()}
                          for k, by in runs.items()},
            "create_runs_ms": runs}


async def _guest(count: int, work: Path) -> dict[str, Any]:
    from tests.agentproc import AgentProcess
    from tests.lab import guestlib as g

    steps = g.Cleanup()
    try:
        export = g.LoopFs(work / "export.img", Path("/srv/export"), 1024 * MiB).create()
        steps.push("destroy export", export.destroy)
        export.mountpoint.chmod(0o777)
        nfs = g.NfsServer([export.mountpoint]).start()
        steps.push("stop nfs", nfs.stop)
        agent = AgentProcess(work / "state").start()
        steps.push("stop agent", agent.stop)
        async with agent.client() as c:
            conn = {"id": str(uuid.uuid4()), "connection": "127.0.0.1:/export",
                    "protocol_version": "4.2"}
            await c.call("connectStorageServer", domType="nfs", connectionParams=[conn])
            sd = str(uuid.uuid4())
            info = await c.call("createStorageDomain", sdUUID=sd, domType="nfs", name="bench",
                                connectionId=conn["id"])
            root = Path(info["path"])
            populate(root, sd, count - 1)      # and the OVF store volume
            activate, listing, bare = [], [], []
            for _ in range(RUNS):
                activate.append(await reactivation_ms(c, sd))
                t = time.perf_counter()
                assert len(await c.call("getVolumesList", sdUUID=sd)) == count
                listing.append(1000 * (time.perf_counter() - t))
                t = time.perf_counter()
                await asyncio.to_thread(bare_read, root / "images")
                bare.append(1000 * (time.perf_counter() - t))
            empty = str(uuid.uuid4())
            await c.call("createStorageDomain", sdUUID=empty, domType="nfs", name="empty",
                         connectionId=conn["id"])
            creates = await _creates(c, {"full": sd, "empty": empty})
            for domain in (sd, empty):
                await c.call("formatStorageDomain", sdUUID=domain)
            await c.call("disconnectStorageServer", domType="nfs", connectionParams=[conn])
        return {"count": count, "activate_ms": round(median(activate[1:]), 1),
                "list_ms": round(median(listing[1:]), 1),
                "bare_read_ms": round(median(bare[1:]), 1),
                "runs": {"activate_ms": activate, "list_ms": listing, "bare_read_ms": bare},
                **creates}
    finally:
        steps.run()


def guest_main(count: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-nfsactivate-", dir="/tmp"))
    print(json.dumps(asyncio.run(_guest(count, work))))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--guest"]:
        guest_main(int(sys.argv[2]))
    else:
        print(report(run()))
