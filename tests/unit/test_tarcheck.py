"""The streaming tar validator against real tars made by tarfile, fed in
chunks of every size, and against each kind of hostile member."""

import io
import tarfile
import uuid
from typing import Any

import pytest

from ovfstore.tarcheck import Member, TarChecker, TarRejected

LIMIT = 1 << 20


def make_tar(members: list[Any], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tar.addfile(m, io.BytesIO(b"x" * m.size) if m.isreg() else None)
            else:
                name, data = m
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def check(data: bytes, chunk: int = 4096, member_limit: int = LIMIT,
          total_limit: int = 10 * LIMIT) -> list[Member]:
    c = TarChecker(member_limit, total_limit)
    for i in range(0, len(data), chunk):
        c.feed(data[i:i + chunk])
    return c.close()


def ovf(n: int = 100) -> tuple[str, bytes]:
    return f"{uuid.uuid4()}.ovf", b"<ovf/>" * n


@pytest.mark.parametrize("chunk", [1, 7, 512, 513, 4096, 1 << 20])
@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT])
def test_good_tar_any_chunking(chunk: int, fmt: int) -> None:
    a, b = ovf(10), ovf(3000)
    data = make_tar([a, b, ("info.json", b"{}"), ("metadata.json", b"{}")], fmt)
    members = check(data, chunk)
    assert [(m.name, m.size) for m in members] == [(a[0], len(a[1])), (b[0], len(b[1])),
                                                   ("info.json", 2), ("metadata.json", 2)]


def special(name: str, kind: bytes, **kw: Any) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    for k, v in kw.items():
        setattr(info, k, v)
    return info


U = "abcdef01-2345-4789-abcd-ef0123456789"


@pytest.mark.parametrize("member, reason", [
    (special(f"{U}.ovf", tarfile.SYMTYPE, linkname="/etc/passwd"), "symbolic link"),
    (special(f"{U}.ovf", tarfile.LNKTYPE, linkname="x"), "hard link"),
    (special(f"{U}.ovf", tarfile.CHRTYPE, devmajor=1, devminor=3), "character device"),
    (special(f"{U}.ovf", tarfile.BLKTYPE, devmajor=8, devminor=0), "block device"),
    (special("dir", tarfile.DIRTYPE), "directory"),
    (special(f"{U}.ovf", tarfile.FIFOTYPE), "FIFO"),
    (("../x.ovf", b"a"), "leaves the archive"),
    ((f"../{U}.ovf", b"a"), "leaves the archive"),
    (("/etc/x.ovf", b"a"), "absolute"),
    ((f"/{U}.ovf", b"a"), "absolute"),
    (("vm.ovf", b"a"), r"is not <uuid>\.ovf"),
    ((f"sub/{U}.ovf", b"a"), r"is not <uuid>\.ovf"),
    ((f"{U.upper()}.ovf", b"a"), r"is not <uuid>\.ovf"),
    ((f"{U}.ovf", b"a" * (LIMIT + 1)), "over the limit"),
])
def test_hostile_members_refused(member: Any, reason: str) -> None:
    data = make_tar([ovf(), member])
    with pytest.raises(TarRejected, match=reason):
        check(data)


def test_total_limit_and_duplicates() -> None:
    a, b = ovf(200), ovf(200)
    with pytest.raises(TarRejected, match="add up"):
        check(make_tar([a, b]), total_limit=len(a[1]) + 10)
    with pytest.raises(TarRejected, match="twice"):
        check(make_tar([a, a]))


def test_long_name_via_pax_is_checked() -> None:
    long = "a" * 150 + ".ovf"
    with pytest.raises(TarRejected, match=r"is not <uuid>\.ovf"):
        check(make_tar([(long, b"x")], tarfile.PAX_FORMAT))
    with pytest.raises(TarRejected, match="GNU long name"):
        check(make_tar([(long, b"x")], tarfile.GNU_FORMAT))


def test_truncated_and_trailing_garbage() -> None:
    data = make_tar([ovf(500)])
    with pytest.raises(TarRejected, match="truncated"):
        check(data[:1024])
    with pytest.raises(TarRejected, match="truncated"):
        check(data[:512 + 1000])   # inside the member's data
    with pytest.raises(TarRejected, match="after the end"):
        check(data + b"junk")
    assert check(data + b"\0" * 10240)


def test_corrupt_header_and_not_a_tar() -> None:
    data = bytearray(make_tar([ovf()]))
    data[10] ^= 0xFF
    with pytest.raises(TarRejected, match="checksum"):
        check(bytes(data))
    with pytest.raises(TarRejected):
        check(b"hello world" * 100)
    with pytest.raises(TarRejected, match="no members"):
        check(b"\0" * 1024)


def test_many_members_checked_in_linear_time() -> None:
    # duplicate names were once found by scanning every earlier member:
    # 30,000 members took about half a minute; a set keeps it under a second
    import time

    names = [f"{uuid.uuid4()}.ovf" for _ in range(30_000)]
    data = make_tar([(n, b"") for n in names])
    start = time.monotonic()
    assert len(check(data, chunk=256 * 1024, total_limit=LIMIT)) == 30_000
    assert time.monotonic() - start < 5
    with pytest.raises(TarRejected, match="twice"):
        check(make_tar([(n, b"") for n in [*names[:2000], names[0]]]), chunk=256 * 1024)
