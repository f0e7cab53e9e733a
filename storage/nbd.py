"""What a qcow2 persistent dirty bitmap records, read through qemu-nbd.

qemu-img cannot list a bitmap's dirty areas; qemu's NBD server exports
them as the `qemu:dirty-bitmap:<name>` metadata context, which `qemu-img
map` reads with the nbd driver's `x-dirty-bitmap` option. In that mode the
allocation answers are the bitmap's, inverted: a dirty area reads as a hole
("data": false), a clean one as data.

qemu-nbd runs read-only on a private UNIX socket, as our child in its own
process group (started off the event loop, commands.start), and is killed
whatever happens. Tests pass a fake spawner and runner.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from pathlib import Path

from storage import commands
from storage.errors import GeneralException


class NbdError(GeneralException):
    template = "qemu-nbd {op} failed: {reason}"


async def dirty_extents(path: str, bitmap: str, *, fmt: str = "qcow2",
                        timeout: float = 600, runner: commands.Runner = commands.run,
                        spawner: commands.Spawner = commands.start,
                        ) -> list[tuple[int, int]]:
    """(offset, length) of every area the bitmap marks dirty, in order."""
    commands.check_arg(bitmap, "bitmap")
    with tempfile.TemporaryDirectory(prefix="hostagent-nbd-") as tmp:
        sock = Path(tmp) / "nbd.sock"
        proc = await spawner(
            ["qemu-nbd", "--read-only", "--format", fmt, "--bitmap", bitmap,
             "--socket", str(sock), "--export-name", "disk", "--shared", "1", path],
            stderr=True)
        try:
            deadline = time.monotonic() + min(timeout, 30)
            while not sock.exists():   # a socket file: no event to wait on
                if proc.returncode is not None or time.monotonic() > deadline:
                    err = b""
                    if proc.stderr is not None and proc.returncode is not None:
                        err = await proc.stderr.read()
                    raise NbdError(op="export", reason=err.decode(errors="replace").strip()
                                   or "no socket")
                await asyncio.sleep(0.01)
            opts = (f"driver=nbd,server.type=unix,server.path={sock},export=disk,"
                    f"x-dirty-bitmap=qemu:dirty-bitmap:{bitmap}")
            r = await runner(["qemu-img", "map", "--output", "json", "--image-opts",
                                    opts], timeout=timeout)
        except commands.CommandError as e:
            raise NbdError(op="map", reason=e.err_text.strip() or f"rc={e.rc}") from None
        finally:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
            proc.close()
    try:
        extents = json.loads(r.out)
        dirty = [(int(e["start"]), int(e["length"])) for e in extents if not e["data"]]
    except (ValueError, KeyError, TypeError) as e:
        raise NbdError(op="map", reason=f"unexpected output: {e}") from None
    return dirty


def coalesce(extents: list[tuple[int, int]], gap: int) -> list[tuple[int, int]]:
    """Join extents less than `gap` bytes apart: fewer, larger copies (the
    clean bytes between them are copied too, which is harmless)."""
    out: list[tuple[int, int]] = []
    for start, length in sorted(extents):
        if out and start - (out[-1][0] + out[-1][1]) < gap:
            prev_start, prev_len = out[-1]
            out[-1] = (prev_start, max(prev_start + prev_len, start + length) - prev_start)
        else:
            out.append((start, length))
    return out
