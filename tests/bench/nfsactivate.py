"""activateStorageDomain of an NFS domain of many volumes, in the lab guest
(knfsd on loopback, NFS 4.2): its garbage collection reads every volume's
metadata afresh over NFS, with no directory stamps to trust (another host
may have written). Beside it, in the same run: getVolumesList (it reads
every file too on NFS) and a bare Python pass that lists the images and
reads every `.meta` through the same mount.

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
    return (f"An NFS 4.2 domain of {r['count']} volumes in the lab guest, medians of "
            f"{RUNS - 1} (after a first run)\n"
            + table(rows, ["volumes", "activate ms", "getVolumesList ms",
                           "bare read of every .meta ms", "activate / bare"]))


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
            await c.call("formatStorageDomain", sdUUID=sd)
            await c.call("disconnectStorageServer", domType="nfs", connectionParams=[conn])
        return {"count": count, "activate_ms": round(median(activate[1:]), 1),
                "list_ms": round(median(listing[1:]), 1),
                "bare_read_ms": round(median(bare[1:]), 1),
                "runs": {"activate_ms": activate, "list_ms": listing, "bare_read_ms": bare}}
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
