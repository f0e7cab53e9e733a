"""getVolumesList on a file domain of 5,000 and 10,000 volumes (issue 21):
median time per call and per volume (and the first call, which reads every
file: on a localfs domain the later ones read only the image directories
that changed), beside the I/O floor measured in the same run, in turns: a
bare Python pass that lists the domain's images and reads every volume's
metadata file (what the listing must do to hide
REMOVING volumes). Also activateStorageDomain's median time there (its
garbage collection reads every volume's metadata afresh), and prepareImage
of a clone of a template (its chain reaches into the template's image)
beside the same on the empty domain.

    python -m tests.bench volumelist
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.agentproc import AgentProcess
from tests.bench.blockvolumes import _job
from tests.bench.common import (
    drop_localfs_domain,
    localfs_domain,
    median,
    reactivation_ms,
    save,
    table,
)
from tests.bench.volumes import new_id, populate


def bare_read(images: Path) -> int:
    """The floor: raw open/read/close of each metadata file, no parsing."""
    count = 0
    for img in os.listdir(images):
        dfd = os.open(images / img, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for name in os.listdir(dfd):
                if name.endswith(".meta"):
                    fd = os.open(name, os.O_RDONLY, dir_fd=dfd)
                    try:
                        os.read(fd, 65536)
                    finally:
                        os.close(fd)
                    count += 1
        finally:
            os.close(dfd)
    return count


async def _bench(work: Path, runs: int, sizes: list[int]) -> dict[str, Any]:
    data = work / "data"
    data.mkdir()
    agent = AgentProcess(work / "state").start()
    out: dict[str, dict[str, float]] = {}
    try:
        async with agent.client() as c:
            conn, sd, root = await localfs_domain(c, data)
            # the domain starts with its OVF store volume
            have = len(await c.call("getVolumesList", sdUUID=sd))
            empty_create = await _creates(c, sd, runs)
            template = new_id()
            await _job(c, "createVolume", sdUUID=sd, imgUUID=new_id(), volUUID=template,
                       size=1 << 20, format="raw", preallocate="sparse")
            empty_clone = await _clone_prepares(c, sd, template, runs)
            have += runs + 2
            for size in sizes:
                populate(root, sd, size - have)
                have = size
                agent_ms, bare_ms, activate_ms = [], [], []
                for _ in range(runs):
                    activate_ms.append(await reactivation_ms(c, sd))
                    t = time.perf_counter()
                    vols = await c.call("getVolumesList", sdUUID=sd)
                    agent_ms.append(1000 * (time.perf_counter() - t))
                    assert len(vols) == size, (len(vols), size)
                    t = time.perf_counter()
                    assert bare_read(root / "images") == size, size
                    bare_ms.append(1000 * (time.perf_counter() - t))
                # the first call after populating reads every file (its image
                # directories changed just now); the later ones, on a localfs
                # domain, only what changed since (none here)
                out[str(size)] = {"agent_ms": median(agent_ms[1:]), "agent_first_ms": agent_ms[0],
                                  "bare_read_ms": median(bare_ms),
                                  "activate_ms": median(activate_ms),
                                  # a create asks whether its UUID exists anywhere in
                                  # the domain: how that grows with it
                                  "create_ms": await _creates(c, sd, runs),
                                  "create_empty_ms": empty_create,
                                  # a clone's chain reaches into its template's image
                                  "clone_prepare_ms": await _clone_prepares(c, sd, template,
                                                                            runs),
                                  "clone_prepare_empty_ms": empty_clone}
                have += runs + 1
            await drop_localfs_domain(c, conn, sd)
    finally:
        agent.stop()
    return out


async def _clone_prepares(c: Any, sd: str, template: str, runs: int) -> float:
    """Median ms of `runs` prepareImage (and teardown) of a new clone of
    `template` (a qcow2 volume in an image of its own over the template's)."""
    img, vol = new_id(), new_id()
    await _job(c, "createVolume", sdUUID=sd, imgUUID=img, volUUID=vol, size=1 << 20,
               format="cow", preallocate="sparse", parentVolUUID=template)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        await c.call("prepareImage", sdUUID=sd, imgUUID=img, volUUID=vol, purpose="read")
        times.append(1000 * (time.perf_counter() - t))
        await c.call("teardownImage", sdUUID=sd, imgUUID=img, volUUID=vol)
    return median(times)


async def _creates(c: Any, sd: str, runs: int) -> float:
    """Median ms of `runs` createVolume jobs (1 MiB raw, each a new image)."""
    times = [await _job(c, "createVolume", sdUUID=sd, imgUUID=new_id(), volUUID=new_id(),
                        size=1 << 20, format="raw", preallocate="sparse") for _ in range(runs)]
    return 1000 * median(times)


def run(runs: int = 9, sizes: list[int] | None = None) -> dict[str, Any]:
    sizes = sizes or [5000, 10000]
    with tempfile.TemporaryDirectory(prefix="bench-volumelist-", dir="/var/tmp") as tmp:
        os.chmod(tmp, 0o755)
        result: dict[str, Any] = {"list": asyncio.run(_bench(Path(tmp), runs, sizes))}
    result["params"] = {"runs": runs, "sizes": sizes, "storage": "localfs on /var/tmp"}
    save("volumelist", result)
    return result


def report(r: dict[str, Any]) -> str:
    rows = [[int(s), v["agent_ms"], v["agent_ms"] / int(s) * 1000, v.get("agent_first_ms", "-"),
             v["bare_read_ms"], v["agent_ms"] / v["bare_read_ms"], v.get("create_ms", "-"),
             v.get("create_empty_ms", "-"), v.get("activate_ms", "-"),
             v.get("clone_prepare_ms", "-"), v.get("clone_prepare_empty_ms", "-")]
            for s, v in r["list"].items()]
    return "\n".join([f"getVolumesList on a file domain, median of {r['params']['runs']} "
                      f"({r['params']['storage']}); createVolume there beside one on the "
                      "empty domain",
                      table(rows, ["volumes", "agent ms", "us per volume", "first call ms",
                                   "bare read of every .meta ms", "ratio", "create ms",
                                   "create, empty domain ms", "activate ms",
                                   "clone prepare ms", "clone prepare, empty ms"])])
