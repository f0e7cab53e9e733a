"""qemu-img wrapper: create, info, measure, check, convert, commit, rebase,
compare, resize, bitmap, map.

Every call is an argv list through the shared runner with a timeout; JSON
output (`--output json`) is parsed and checked here. Images that may be
hostile (anything read from storage another host or a user wrote) are
inspected under resource limits (prlimit: address space and CPU time), so
a crafted header cannot make `qemu-img info` eat the host.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from storage import commands
from storage.errors import GeneralException

# Limits for inspecting untrusted images (as OpenStack does for the same reason).
INSPECT_AS_BYTES = 1 << 30
INSPECT_CPU_SECONDS = 30

QCOW2_OPTIONS = ("compat=1.1",)

ProgressFn = Callable[[float], None]


class QemuImgError(GeneralException):
    template = "qemu-img {op} failed: {reason}"


def _fail(op: str, e: commands.CommandError) -> QemuImgError:
    return QemuImgError(op=op, reason=e.err_text.strip().splitlines()[-1] if e.err_text.strip()
                        else f"rc={e.rc}")


async def _run_long(op: str, argv: list[str], timeout: float, progress: ProgressFn | None,
                    runner: commands.Runner) -> None:
    """A command that copies data: with `progress`, it was given -p and its
    percentage is reported."""
    try:
        if progress is not None:
            await commands.run_with_progress(argv, timeout=timeout, progress=progress,
                                             runner=runner)
        else:
            await runner(argv, timeout=timeout)
    except commands.CommandError as e:
        raise _fail(op, e) from None


def _limited(argv: list[str]) -> list[str]:
    return ["prlimit", f"--as={INSPECT_AS_BYTES}", f"--cpu={INSPECT_CPU_SECONDS}", "--", *argv]


@dataclass(frozen=True)
class ImageInfo:
    filename: str
    format: str
    virtual_size: int
    actual_size: int
    backing_filename: str | None
    backing_format: str | None
    cluster_size: int | None
    dirty: bool
    bitmaps: tuple[str, ...]
    raw: dict[str, Any]
    # flagged in-use on storage: the process that had them open for writing
    # died (a killed qemu-img commit or bitmap), so they no longer know what
    # changed; qemu refuses to read or merge them
    inconsistent_bitmaps: tuple[str, ...] = ()

    @classmethod
    def parse(cls, d: dict[str, Any]) -> ImageInfo:
        try:
            specific = (d.get("format-specific") or {}).get("data") or {}
            return cls(filename=str(d["filename"]), format=str(d["format"]),
                       virtual_size=int(d["virtual-size"]),
                       actual_size=int(d.get("actual-size", 0)),
                       backing_filename=d.get("backing-filename"),
                       backing_format=d.get("backing-filename-format"),
                       cluster_size=d.get("cluster-size"),
                       dirty=bool(d.get("dirty-flag", False)),
                       bitmaps=tuple(b["name"] for b in specific.get("bitmaps", ())),
                       raw=d,
                       inconsistent_bitmaps=tuple(
                           b["name"] for b in specific.get("bitmaps", ())
                           if "in-use" in b.get("flags", ())))
        except (KeyError, TypeError, ValueError) as e:
            raise QemuImgError(op="info", reason=f"unexpected output: {e}") from None


async def info(path: str | Path, *, fmt: str | None = None, backing_chain: bool = False,
               force_share: bool = True, timeout: float = 60,
               runner: commands.Runner = commands.run) -> list[ImageInfo]:
    """`qemu-img info` of path (and its backing chain, top first)."""
    argv = ["qemu-img", "info", "--output", "json"]
    if fmt:
        argv += ["-f", fmt]
    if backing_chain:
        argv.append("--backing-chain")
    if force_share:
        argv.append("-U")
    argv.append(str(path))
    try:
        r = await runner(_limited(argv), timeout=timeout)
    except commands.CommandError as e:
        raise _fail("info", e) from None
    try:
        data = json.loads(r.out)
    except ValueError as e:
        raise QemuImgError(op="info", reason=f"bad JSON: {e}") from None
    items = data if isinstance(data, list) else [data]
    return [ImageInfo.parse(i) for i in items]


async def create(path: str | Path, fmt: str, size: int | None = None, *,
                 backing: str | None = None, backing_fmt: str | None = None,
                 preallocation: str | None = None, unsafe: bool = False,
                 options: Sequence[str] = (), timeout: float = 600,
                 runner: commands.Runner = commands.run) -> None:
    argv = ["qemu-img", "create", "-q", "-f", fmt]
    opts = list(options)
    if fmt == "qcow2":
        opts = [*QCOW2_OPTIONS, *opts]
    if preallocation:
        opts.append(f"preallocation={preallocation}")
    if opts:
        argv += ["-o", ",".join(opts)]
    if backing:
        argv += ["-b", backing, "-F", backing_fmt or "qcow2"]
        if unsafe:
            argv.append("-u")
    argv.append(str(path))
    if size is not None:
        argv.append(str(size))
    try:
        await runner(argv, timeout=timeout)
    except commands.CommandError as e:
        raise _fail("create", e) from None


async def measure(*, size: int | None = None, path: str | Path | None = None,
                  src_fmt: str | None = None, dst_fmt: str = "qcow2", backing: bool = True,
                  block: bool = False, timeout: float = 60,
                  runner: commands.Runner = commands.run) -> dict[str, int]:
    """{'required': bytes, 'fully-allocated': bytes, 'bitmaps': bytes} for
    converting path (or a new image of `size`) to dst_fmt: with its backing
    chain collapsed, or with backing=False the qcow2 image's own data only
    (`block`: path is a block device)."""
    argv = ["qemu-img", "measure", "--output", "json", "-O", dst_fmt]
    if dst_fmt == "qcow2":
        argv += ["-o", ",".join(QCOW2_OPTIONS)]
    if path is not None and not backing and src_fmt == "qcow2":
        # As VDSM does: open the image with no backing ("backing": null).
        # `-o backing_file=...` is no way to get one layer: qemu-img then
        # counts the target fully allocated.
        argv.append("json:" + json.dumps({
            "driver": "qcow2", "backing": None,
            "file": {"driver": "host_device" if block else "file", "filename": str(path)}}))
    elif path is not None:
        if src_fmt:
            argv += ["-f", src_fmt]
        argv.append(str(path))
    else:
        argv += ["--size", str(size)]
    try:
        r = await runner(_limited(argv) if path is not None else argv, timeout=timeout)
        data = json.loads(r.out)
        return {"required": int(data["required"]),
                "fully-allocated": int(data["fully-allocated"]),
                # qcow2 targets (compat=1.1): room for the persistent bitmaps,
                # which qemu-img counts in neither figure
                "bitmaps": int(data.get("bitmaps", 0))}
    except commands.CommandError as e:
        raise _fail("measure", e) from None
    except (ValueError, KeyError) as e:
        raise QemuImgError(op="measure", reason=f"unexpected output: {e}") from None


async def check(path: str | Path, *, fmt: str = "qcow2", timeout: float = 600,
                runner: commands.Runner = commands.run) -> dict[str, Any]:
    """`qemu-img check` as JSON; raises if the image is corrupt."""
    argv = ["qemu-img", "check", "--output", "json", "-f", fmt, str(path)]
    # 2: corruptions, 3: leaks only (harmless), 63: format has no check
    r = await runner(_limited(argv), timeout=timeout, check=False)
    if r.rc == 63:
        return {"check-errors": 0, "unsupported": True}
    try:
        data: dict[str, Any] = json.loads(r.out) if r.out.strip() else {}
    except ValueError:
        data = {}
    if r.rc not in (0, 3) or data.get("corruptions", 0):
        raise QemuImgError(op="check", reason=r.err_text.strip() or
                           f"{data.get('corruptions', '?')} corruptions")
    return data


async def convert(src: str | Path, dst: str | Path, *, src_fmt: str, dst_fmt: str,
                  src_cache: str = "none", dst_cache: str = "none", create: bool = True,
                  target_is_zero: bool = False, unordered: bool = False,
                  preallocation: str | None = None, backing: str | None = None,
                  backing_fmt: str | None = None, bitmaps: bool = False,
                  options: Sequence[str] = (), progress: ProgressFn | None = None,
                  timeout: float = 24 * 3600,
                  runner: commands.Runner = commands.run) -> None:
    """qemu-img convert with cache modes (default: O_DIRECT on both sides).
    With create=False the target exists (-n): e.g. a prepared LV."""
    argv = ["qemu-img", "convert", "-f", src_fmt, "-O", dst_fmt, "-t", dst_cache,
            "-T", src_cache]
    if progress is not None:
        argv.append("-p")
    if unordered:
        argv.append("-W")
    if not create:
        argv.append("-n")
    if target_is_zero:
        argv.append("--target-is-zero")
    if bitmaps:
        argv.append("--bitmaps")
    opts = list(options)
    if dst_fmt == "qcow2" and create:
        opts = [*QCOW2_OPTIONS, *opts]
    if preallocation and create:
        opts.append(f"preallocation={preallocation}")
    if opts:
        argv += ["-o", ",".join(opts)]
    if backing:
        argv += ["-B", backing, "-F", backing_fmt or "qcow2"]
    argv += [str(src), str(dst)]
    await _run_long("convert", argv, timeout, progress, runner)


async def commit(top: str | Path, *, base: str | Path | None = None, fmt: str = "qcow2",
                 drop: bool = False, progress: ProgressFn | None = None,
                 timeout: float = 24 * 3600, runner: commands.Runner = commands.run) -> None:
    argv = ["qemu-img", "commit", "-f", fmt, "-t", "none"]
    if base is not None:
        argv += ["-b", str(base)]
    if drop:
        argv.append("-d")
    if progress is not None:
        argv.append("-p")
    argv.append(str(top))
    await _run_long("commit", argv, timeout, progress, runner)


async def rebase(path: str | Path, backing: str, *, backing_fmt: str = "qcow2",
                 unsafe: bool = True, timeout: float = 3600,
                 runner: commands.Runner = commands.run) -> None:
    argv = ["qemu-img", "rebase", "-f", "qcow2", "-t", "none", "-T", "none"]
    if unsafe:
        argv.append("-u")
    argv += ["-b", backing, "-F", backing_fmt, str(path)]
    try:
        await runner(argv, timeout=timeout)
    except commands.CommandError as e:
        raise _fail("rebase", e) from None


async def compare(a: str | Path, b: str | Path, *, fmt_a: str | None = None,
                  fmt_b: str | None = None, strict: bool = False, timeout: float = 24 * 3600,
                  cache: str = "none", runner: commands.Runner = commands.run) -> bool:
    """True if the guest-visible contents are equal (rc 0), False if they
    differ (rc 1); errors raise."""
    argv = ["qemu-img", "compare", "-q", "-T", cache]
    if fmt_a:
        argv += ["-f", fmt_a]
    if fmt_b:
        argv += ["-F", fmt_b]
    if strict:
        argv.append("-s")
    argv += [str(a), str(b)]
    r = await runner(argv, timeout=timeout, check=False)
    if r.rc in (0, 1):
        return r.rc == 0
    raise QemuImgError(op="compare", reason=r.err_text.strip() or f"rc={r.rc}")


async def resize(path: str | Path, size: int, *, fmt: str, preallocation: str | None = None,
                 timeout: float = 600, runner: commands.Runner = commands.run) -> None:
    argv = ["qemu-img", "resize", "-q", "-f", fmt]
    if preallocation:
        argv.append(f"--preallocation={preallocation}")
    argv += [str(path), str(size)]
    try:
        await runner(argv, timeout=timeout)
    except commands.CommandError as e:
        raise _fail("resize", e) from None


async def bitmap(path: str | Path, name: str, *, action: str, fmt: str = "qcow2",
                 source: str | None = None, source_fmt: str | None = None,
                 timeout: float = 600, runner: commands.Runner = commands.run) -> None:
    """action: add, remove, clear, enable, disable, merge (from `source`'s
    bitmap of that name, or this image's)."""
    if action not in ("add", "remove", "clear", "enable", "disable", "merge"):
        raise ValueError(f"unknown bitmap action {action}")
    argv = ["qemu-img", "bitmap", "-f", fmt, f"--{action}"]
    if action == "merge":
        argv[-1:] = ["--merge", name]
        if source:
            argv += ["-b", source, "-F", source_fmt or "qcow2"]
    argv += [str(path), name]
    try:
        await runner(argv, timeout=timeout)
    except commands.CommandError as e:
        raise _fail("bitmap", e) from None


async def map_(path: str | Path, *, fmt: str, timeout: float = 600,
               runner: commands.Runner = commands.run) -> list[dict[str, Any]]:
    argv = ["qemu-img", "map", "--output", "json", "-f", fmt, "-U", str(path)]
    try:
        r = await runner(_limited(argv), timeout=timeout)
        return list(json.loads(r.out))
    except commands.CommandError as e:
        raise _fail("map", e) from None
    except ValueError as e:
        raise QemuImgError(op="map", reason=f"bad JSON: {e}") from None


def _slice_opts(path: str | Path, fmt: str, offset: int, length: int) -> str:
    """--image-opts for bytes offset..offset+length of an image's guest view
    (a raw slice over the image; commas in paths doubled, as QemuOpts wants)."""
    p = str(path).replace(",", ",,")
    proto = "host_device" if str(path).startswith("/dev/") else "file"
    return (f"driver=raw,offset={offset},size={length},file.driver={fmt},"
            f"file.file.driver={proto},file.file.filename={p}")


async def copy_extents(src: str | Path, dst: str | Path, extents: Sequence[tuple[int, int]], *,
                       src_fmt: str, dst_fmt: str, cache: str = "none",
                       progress: ProgressFn | None = None, timeout: float = 24 * 3600,
                       runner: commands.Runner = commands.run) -> None:
    """Copy these areas of src's guest view into the same areas of dst (an
    existing image, e.g. a qcow2 layer over an earlier copy): what an
    incremental backup writes."""
    total = sum(length for _, length in extents) or 1
    done = 0
    for offset, length in extents:
        argv = ["qemu-img", "convert", "-n", "-t", cache, "-T", cache,
                "--image-opts", _slice_opts(src, src_fmt, offset, length),
                "--target-image-opts", _slice_opts(dst, dst_fmt, offset, length)]
        try:
            await runner(argv, timeout=timeout)
        except commands.CommandError as e:
            raise _fail("convert", e) from None
        done += length
        if progress is not None:
            progress(100 * done / total)
