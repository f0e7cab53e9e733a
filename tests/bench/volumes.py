"""File domain volumes: createVolume latency per kind beside a bare
`qemu-img create` of the same kind on the same storage, and getVolumesList
time as the domain grows from 100 to 5,000 volumes.

The large domains are populated directly on storage in the agent's format
(metadata file + sparse data file, as createVolume leaves them) so that the
listing is measured, not 5,000 qemu-img runs.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from storage.metadata import BLANK_UUID, VolumeMetadata
from tests.agentproc import AgentProcess
from tests.bench.common import drop_localfs_domain, localfs_domain, median, save, table

MiB = 1024**2
KINDS = [("raw", "sparse"), ("raw", "preallocated"), ("cow", "sparse"), ("cow", "preallocated")]
QEMU = {("raw", "sparse"): ["-f", "raw"],
        ("raw", "preallocated"): ["-f", "raw", "-o", "preallocation=falloc"],
        ("cow", "sparse"): ["-f", "qcow2", "-o", "compat=1.1"],
        ("cow", "preallocated"): ["-f", "qcow2", "-o", "compat=1.1,preallocation=falloc"]}


def new_id() -> str:
    return str(uuid.uuid4())


def populate(root: Path, sd: str, count: int, per_image: int = 5) -> None:
    images = root / "images"
    img = new_id()
    for i in range(count):
        if i % per_image == 0:
            img = new_id()
            (images / img).mkdir()
        vol = new_id()
        md = VolumeMetadata(domain=sd, image=img, uuid=vol, parent=BLANK_UUID, format="RAW",
                            allocation="SPARSE", voltype="LEAF", capacity=MiB,
                            legality="LEGAL", generation=1)
        (images / img / f"{vol}.meta").write_bytes(md.encode())
        with open(images / img / vol, "wb") as f:
            f.truncate(MiB)


async def _bench(work: Path, runs: int, sizes: list[int]) -> dict[str, Any]:
    data = work / "data"
    data.mkdir()
    agent = AgentProcess(work / "state").start()
    try:
        async with agent.client() as c:
            conn, sd, root = await localfs_domain(c, data)
            create: dict[str, dict[str, float]] = {}
            bare_dir = data / "bare"
            bare_dir.mkdir()
            for fmt, prealloc in KINDS:
                agent_ms, bare_ms = [], []
                for _ in range(runs):
                    job = new_id()
                    t = time.perf_counter()
                    await c.call("createVolume", jobUUID=job, sdUUID=sd, imgUUID=new_id(),
                                 volUUID=new_id(), size=1024 * MiB, format=fmt,
                                 preallocate=prealloc)
                    done = await c.wait_job(job, timeout=120, poll=0.2)
                    agent_ms.append(1000 * (time.perf_counter() - t))
                    assert done["status"] == "done", done
                    t = time.perf_counter()
                    subprocess.run(["qemu-img", "create", "-q", *QEMU[(fmt, prealloc)],
                                    str(bare_dir / new_id()), str(1024 * MiB)], check=True)
                    bare_ms.append(1000 * (time.perf_counter() - t))
                create[f"{fmt}/{prealloc}"] = {"agent_ms": median(agent_ms),
                                               "qemu_img_ms": median(bare_ms)}
            listing: dict[int, float] = {}
            have = len(await c.call("getVolumesList", sdUUID=sd))
            for size in sizes:
                populate(root, sd, size - have)
                have = size
                times = []
                for _ in range(runs):
                    t = time.perf_counter()
                    vols = await c.call("getVolumesList", sdUUID=sd)
                    times.append(1000 * (time.perf_counter() - t))
                assert len(vols) == size, (len(vols), size)
                listing[size] = median(times)
            await drop_localfs_domain(c, conn, sd)
    finally:
        agent.stop()
    return {"create": create, "list_ms": listing}


def run(runs: int = 5, sizes: list[int] | None = None) -> dict[str, Any]:
    sizes = sizes or [100, 1000, 5000]
    # On the disk the tests use (not tmpfs): what an agent on local storage sees.
    with tempfile.TemporaryDirectory(prefix="bench-volumes-", dir="/var/tmp") as tmp:
        os.chmod(tmp, 0o755)
        result = asyncio.run(_bench(Path(tmp), runs, sizes))
    result["params"] = {"runs": runs, "sizes": sizes, "storage": "localfs on /var/tmp"}
    save("volumes", result)
    return result


def report(r: dict[str, Any]) -> str:
    rows = [[kind, v["agent_ms"], v["qemu_img_ms"], v["agent_ms"] / v["qemu_img_ms"]]
            for kind, v in r["create"].items()]
    lines = [f"createVolume 1 GiB, median of {r['params']['runs']} "
             f"({r['params']['storage']})",
             table(rows, ["kind", "agent ms", "qemu-img create ms", "ratio"]), ""]
    sizes = sorted(r["list_ms"], key=int)
    first = r["list_ms"][sizes[0]]
    rows = [[int(s), r["list_ms"][s], r["list_ms"][s] / int(s) * 1000,
             r["list_ms"][s] / first] for s in sizes]
    lines += ["getVolumesList on a file domain",
              table(rows, ["volumes", "ms per call", "us per volume", f"x vs {sizes[0]}"])]
    return "\n".join(lines)
