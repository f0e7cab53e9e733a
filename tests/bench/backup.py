"""backupVolume, full vs incremental, for a 4 GiB disk (qcow2, fully
written) with 1% changed between backups, on localfs domains on /var/tmp
(a data domain and a backup domain): time per backup and size of what
lands on the backup domain, medians of several rounds."""

from __future__ import annotations

import asyncio
import os
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from tests.agentproc import AgentProcess
from tests.bench.common import drop_localfs_domain, localfs_domain, median, save, table

MiB = 1024**2
GiB = 1024**3
SIZE = 4 * GiB


def new_id() -> str:
    return str(uuid.uuid4())


async def _bench(work: Path, runs: int) -> dict[str, Any]:
    agent = AgentProcess(work / "state").start()
    try:
        async with agent.client() as c:
            async def job(verb: str, **params: Any) -> Any:
                jid = new_id()
                await c.call(verb, jobUUID=jid, **params)
                info = await c.wait_job(jid, timeout=1200, poll=0.05)
                assert info["status"] == "done", info
                return info.get("result")

            sds, conns = [], []
            for name in ("data", "backup"):
                (work / name).mkdir()
                conn, sd, _ = await localfs_domain(c, work / name, name, domClass=name,
                                                   ovfStore=False)
                sds.append(sd)
                conns.append(conn)
            data, backup = sds
            img, vol = new_id(), new_id()
            await job("createVolume", sdUUID=data, imgUUID=img, volUUID=vol, size=SIZE,
                      format="cow", preallocate="sparse")
            path = await c.call("prepareImage", sdUUID=data, imgUUID=img, volUUID=vol,
                                purpose="vm")
            argv = ["qemu-io", "-f", "qcow2"]
            for i in range(SIZE // (256 * MiB)):
                argv += ["-c", f"write -P 0x{i + 1:x} {i * 256 * MiB} {256 * MiB}"]
            subprocess.run([*argv, path["path"]], check=True, capture_output=True)
            await c.call("teardownImage", sdUUID=data, imgUUID=img)

            full_s, full_mib, inc_s, inc_mib = [], [], [], []
            for r in range(runs):
                bimg = new_id()
                full = {"sdUUID": backup, "imgUUID": bimg, "volUUID": new_id()}
                t = time.perf_counter()
                res = await job("backupVolume", src={"sdUUID": data, "imgUUID": img,
                                                     "volUUID": vol}, dst=full,
                                keepSnapshot=False)
                full_s.append(time.perf_counter() - t)
                full_mib.append(res["backup"]["trueSize"] / MiB)
                # change 1% of the disk: 41 MiB in 41 places
                p = await c.call("prepareImage", sdUUID=data, imgUUID=img, volUUID=vol,
                                 purpose="vm")
                argv = ["qemu-io", "-f", "qcow2"]
                for k in range(41):
                    argv += ["-c", f"write -P 0x{(r * 41 + k) % 250 + 1:x} "
                                   f"{k * 100 * MiB} {MiB}"]
                subprocess.run([*argv, p["path"]], check=True, capture_output=True)
                await c.call("teardownImage", sdUUID=data, imgUUID=img)
                inc = {"sdUUID": backup, "imgUUID": bimg, "volUUID": new_id()}
                t = time.perf_counter()
                res = await job("backupVolume", src={"sdUUID": data, "imgUUID": img,
                                                     "volUUID": vol}, dst=inc,
                                keepSnapshot=False, incrementalFrom=full)
                inc_s.append(time.perf_counter() - t)
                inc_mib.append(res["backup"]["trueSize"] / MiB)
                await job("deleteImage", sdUUID=backup, imgUUID=bimg)
            for sd, conn in zip(sds, conns, strict=True):
                await drop_localfs_domain(c, conn, sd)
    finally:
        agent.stop()
    return {"full_s": median(full_s), "full_mib": median(full_mib),
            "incremental_s": median(inc_s), "incremental_mib": median(inc_mib),
            "time_ratio": median(inc_s) / median(full_s),
            "size_ratio": median(inc_mib) / median(full_mib),
            "runs": {"full_s": full_s, "incremental_s": inc_s}}


def run(runs: int = 3) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-backup-", dir="/var/tmp") as tmp:
        os.chmod(tmp, 0o755)
        result = asyncio.run(_bench(Path(tmp), runs))
    result["params"] = {"runs": runs, "disk": "4 GiB qcow2, fully written, 1% changed",
                        "storage": "localfs on /var/tmp"}
    save("backup", result)
    return result


def report(r: dict[str, Any]) -> str:
    rows = [["full", r["full_s"], r["full_mib"]],
            ["incremental (1% changed)", r["incremental_s"], r["incremental_mib"]]]
    return "\n".join([
        f"backupVolume of a {r['params']['disk']}, median of {r['params']['runs']} "
        f"({r['params']['storage']})",
        table(rows, ["backup", "s", "MiB on the backup domain"]),
        f"incremental/full: time {r['time_ratio']:.3f}, size {r['size_ratio']:.4f}"])
