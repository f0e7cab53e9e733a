"""Data the lab tests write into volumes, made once on the host.

A guest writes to the host's disk at about 40 MiB/s: making a 2 GiB source
there cost a thin test about 65 s of its guest's time in every run. The
runner (tests/lab/run.sh) makes it on the host before the guest boots
(`python -m tests.lab.labdata`, a few seconds, kept under the checkout's
git-ignored build/ between runs); a guest only reads it. A guest run
without it (pytest called in the guest by hand) makes its own copy.

    python -m tests.lab.labdata     # make build/lab-data/source.raw if missing
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

MiB = 1024**2
GiB = 1024**3
BLOCK = 64 * MiB
SOURCE_SIZE = 2 * GiB
SOURCE = Path(__file__).resolve().parents[2] / "build" / "lab-data" / "source.raw"


def make_source(path: Path, size: int) -> Path:
    """`size` bytes of non-zero data, no two 4 KiB blocks of a 64 MiB
    stretch alike and each stretch unlike the others (a random block
    rotated by a different number of 4 KiB pages): a write landing in the
    wrong place shows in the comparison. Written under a temporary name
    and renamed: the name holds a whole source or nothing."""
    base = os.urandom(BLOCK)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    with open(tmp, "wb") as f:
        for i in range(size // BLOCK):
            cut = i * 4096 + 512
            f.write(base[cut:] + base[:cut])
    os.replace(tmp, path)
    return path


def source(size: int, scratch: Path) -> Path:
    """A source of at least `size` bytes (a test uses its first `size`): the
    host-made one, or one made in `scratch` when there is none."""
    if size <= SOURCE_SIZE and SOURCE.exists() and SOURCE.stat().st_size == SOURCE_SIZE:
        return SOURCE
    return make_source(scratch / "source.raw", size)


def main() -> None:
    SOURCE.parent.mkdir(parents=True, exist_ok=True)
    # two guests' runners start at once (make test): one makes it
    with open(SOURCE.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (SOURCE.exists() and SOURCE.stat().st_size == SOURCE_SIZE):
            make_source(SOURCE, SOURCE_SIZE)


if __name__ == "__main__":
    main()
