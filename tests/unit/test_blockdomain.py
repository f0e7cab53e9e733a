"""Block domain pieces without root: slot copies (torn A, B wins), slot
allocation from MD_ tags, sizes rounded to extents, and the LV/slot sequence
of a new volume against a fake LVM (the metadata "LV" a plain file): its
slot written first, then its LV made with its final tags."""

from __future__ import annotations

import errno
import json
import os
import threading
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from storage import commands, lvm, qcow2
from storage.domains import blockdomain as bd
from storage.domains import slots
from storage.errors import HostAgentError, InvalidParameter
from storage.fileio import IOPool
from storage.metadata import BLANK_UUID, DomainMetadata, MetadataError, VolumeMetadata
from storage.thin import ThinPolicy
from tests.unit.fakerun import FakeRunner

SD = "1b4e28ba-2fa1-4d3b-a3f5-ef19b5a7633b"
IMG = "6f1c2d1e-5a4b-4c3d-9e8f-0a1b2c3d4e5f"
V1 = "0d3c8d7e-1111-4c3d-9e8f-0a1b2c3d4e5f"
V2 = "0d3c8d7e-2222-4c3d-9e8f-0a1b2c3d4e5f"
V3 = "0d3c8d7e-3333-4c3d-9e8f-0a1b2c3d4e5f"
MiB = 1 << 20


def vol(uuid: str = V1, **kw: Any) -> VolumeMetadata:
    base: dict[str, Any] = dict(domain=SD, image=IMG, uuid=uuid, parent=BLANK_UUID,
                                format="RAW", allocation="SPARSE", voltype="LEAF",
                                capacity=10 * MiB, legality="ILLEGAL", ctime=1700000000)
    base.update(kw)
    return VolumeMetadata(**base)


# ---- two copies per slot ----------------------------------------------------------------

def test_both_valid_a_wins() -> None:
    old, new = vol(generation=1), vol(generation=2)
    data = bd.encode_copy(new.encode()) + bd.encode_copy(old.encode())
    assert bd.decode_slot(data, VolumeMetadata.decode) == new


def test_torn_a_b_wins() -> None:
    old, new = vol(generation=1), vol(generation=2, description="x" * 300)
    a_old, a_new = bd.encode_copy(old.encode()), bd.encode_copy(new.encode())
    # a crash after the first 512 byte sector of copy A reached the disk
    torn = a_new[:512] + a_old[512:]
    assert bd.decode_slot(torn + a_old, VolumeMetadata.decode) == old
    # a torn copy A that is all zeros past the sector
    assert bd.decode_slot(a_new[:512].ljust(bd.COPY_SIZE, b"\0") + a_old,
                          VolumeMetadata.decode) == old


def test_neither_valid() -> None:
    with pytest.raises(MetadataError, match=r"copy A.*copy B"):
        bd.decode_slot(bytes(bd.SLOT_SIZE), VolumeMetadata.decode)
    garbage = b"\xff" * bd.SLOT_SIZE
    with pytest.raises(MetadataError):
        bd.decode_slot(garbage, DomainMetadata.decode)


def test_copy_too_large() -> None:
    with pytest.raises(InvalidParameter):
        bd.encode_copy(b"x" * (bd.COPY_SIZE + 1))
    assert len(bd.encode_copy(b"abc")) == bd.COPY_SIZE


def test_write_read_slot_file(tmp_path: Path) -> None:
    path = tmp_path / "metadata"
    path.write_bytes(bytes(4 * bd.SLOT_SIZE))
    try:
        slots.write_slot(str(path), 2, bd.encode_copy(vol().encode()))
    except OSError as e:
        if e.errno == errno.EINVAL:
            pytest.skip("no O_DIRECT on this file system")
        raise
    raw = path.read_bytes()
    assert raw[2 * bd.SLOT_SIZE:2 * bd.SLOT_SIZE + bd.COPY_SIZE] == \
        raw[2 * bd.SLOT_SIZE + bd.COPY_SIZE:3 * bd.SLOT_SIZE]
    read = slots.read_slots(str(path), [1, 2])
    assert bd.decode_slot(read[2], VolumeMetadata.decode) == vol()
    with pytest.raises(MetadataError):
        bd.decode_slot(read[1], VolumeMetadata.decode)


# ---- tags, slots, sizes ------------------------------------------------------------------

def test_free_slot_lowest_unreferenced() -> None:
    assert bd.free_slot([], 10) == 1
    tags = [["IU_a", "MD_1"], ["MD_3", "PU_x"], ["MD_bad"], []]
    assert bd.free_slot(tags, 10) == 2
    assert bd.free_slot([["MD_1"], ["MD_2"]], 3) is None


def test_parse_tags_and_volume_lv() -> None:
    def lv(name: str, tags: tuple[str, ...]) -> lvm.LV:
        return lvm.LV(name=name, vg_name=SD, uuid="u", size=MiB, tags=tags, attr="-wi-------",
                      active=False, opened=False, path=f"/dev/{SD}/{name}")

    v = bd.VolumeLV.from_lv(lv(V1, (f"IU_{IMG}", f"PU_{V2}", "MD_7", "INITIALIZING")))
    assert v is not None
    assert (v.image, v.parent, v.slot, v.initializing) == (IMG, V2, 7, True)
    assert bd.VolumeLV.from_lv(lv("metadata", ("IU_x",))) is None
    assert bd.VolumeLV.from_lv(lv(V1, ("OTHER",))) is None
    assert bd.VolumeLV.from_lv(lv("foreign", (f"IU_{IMG}",))) is None


def test_sizes_round_to_extents() -> None:
    ext = 128 * MiB
    assert bd.round_up(1, ext) == ext
    assert bd.round_up(ext, ext) == ext
    assert bd.volume_tags(vol(parent=V2), 5) == [f"IU_{IMG}", f"PU_{V2}", "MD_5"]


# ---- the LV and slot sequence against a fake LVM ----------------------------------------

class FakeLVM:
    """Answers lvm lvs/lvcreate/lvchange/lvremove from an in-memory VG."""

    def __init__(self) -> None:
        self.lvs: dict[str, dict[str, Any]] = {}
        self.ops: list[str] = []
        self.argvs: list[list[str]] = []
        self.fail: str | None = None
        self.fail_after: str | None = None     # the op is done, then fails (cut off)
        self.seq = 0                           # VG metadata changes (its stamp)

    async def __call__(self, argv: Sequence[str], *, timeout: float,
                       check: bool = True, **kwargs: Any) -> commands.CommandResult:
        argv = list(argv)
        if argv[:2] == ["qemu-img", "measure"]:
            self.ops.append("measure")
            size = int(argv[argv.index("--size") + 1])
            out = json.dumps({"required": 393216, "fully-allocated": size + 393216})
            return commands.CommandResult(tuple(argv), 0, out.encode(), b"")
        if argv[0] != "lvm":
            return commands.CommandResult(tuple(argv), 0, b"", b"")
        op, args = argv[1], argv[4:]
        self.argvs.append(argv)
        if op == "lvchange":
            op += " " + " ".join(a for a in args
                                 if a in ("--addtag", "--deltag", "--activate", "--refresh"))
        self.ops.append(op)
        if op == self.fail:
            raise commands.CommandError(argv, 5, b"", b"boom")
        out = b""
        if op == "lvs":
            rows = [{"lv_name": n, "vg_name": SD, "lv_uuid": n, "lv_size": str(lv["size"]),
                     "lv_tags": ",".join(lv["tags"]),
                     "lv_attr": "-wi-a-----" if lv.get("active") else "-wi-------",
                     "lv_active": "", "lv_path": f"/dev/{SD}/{n}"}
                    for n, lv in self.lvs.items()]
            out = json.dumps({"report": [{"lv": rows}]}).encode()
        elif op == "lvchange --activate":
            flag = args[args.index("--activate") + 1]
            for path in args[args.index("--activate") + 2:]:
                self.lvs[path.split("/")[-1]]["active"] = flag == "y"
        elif op != "lvchange --refresh":
            self.seq += 1
            self._change(op, args)
        if op == self.fail_after:
            raise commands.CommandError(argv, 5, b"", b"cut off")
        return commands.CommandResult(tuple(argv), 0, out, b"")

    def _change(self, op: str, args: list[str]) -> None:
        if op == "lvcreate":
            name = args[args.index("--name") + 1]
            tags = [args[i + 1] for i, a in enumerate(args) if a == "--addtag"]
            size = int(args[args.index("--size") + 1].rstrip("b"))
            self.lvs[name] = {"size": size, "tags": tags,
                              "active": args[args.index("--activate") + 1] == "y"}
        elif op.startswith("lvchange"):
            lv = self.lvs[args[-1].split("/")[1]]
            for i, a in enumerate(args):
                if a == "--deltag":
                    lv["tags"].remove(args[i + 1])
                elif a == "--addtag":
                    lv["tags"].append(args[i + 1])
        elif op == "lvextend":
            lv = self.lvs[args[-1].split("/")[1]]
            lv["size"] = int(args[args.index("--size") + 1].rstrip("b"))
        elif op == "lvremove":
            for path in args[1:]:
                del self.lvs[path.split("/")[1]]


class FileBlockDomain(bd.BlockDomain):
    """The metadata LV is a file here."""

    md_file = ""
    stamping = False     # the VG's metadata stamp: the fake's change count

    @property
    def md_path(self) -> str:
        return self.md_file

    async def _metadata_stamp(self) -> bytes | None:
        fake: FakeLVM = self.runner     # type: ignore[assignment]
        return str(fake.seq).encode() if self.stamping else None

    # the "PV" a file: each new LV's first extent at its own MiB of it (the
    # metadata text's parse and the real PV are the host tier's)
    pv_file = ""
    segment = 4 * MiB           # each first segment's length
    placed: list[str]
    lv_files: dict[str, str]    # LVs the fallback activates: files too

    async def _locate(self, vol: str) -> bd.Placement | None:
        if not self.pv_file:
            return None
        self.placed.append(vol)
        return bd.Placement(self.pv_file, len(self.placed) * 4 * MiB, self.segment)

    def volume_path(self, img: str, vol: str) -> str:
        return self.lv_files.get(vol) or super().volume_path(img, vol)


@pytest.fixture
def domain(tmp_path: Path) -> Iterator[FileBlockDomain]:
    path = tmp_path / "metadata"
    path.write_bytes(bytes(16 * bd.SLOT_SIZE))
    try:
        slots.write_slot(str(path), 0, bd.encode_copy(b""))
    except OSError as e:
        if e.errno == errno.EINVAL:
            pytest.skip("no O_DIRECT on this file system")
        raise
    fake = FakeLVM()
    md = DomainMetadata(uuid=SD, name="d", dom_type="iscsi", dom_class="data")
    d = FileBlockDomain(md, lvm.LVM(fake, devices=["/dev/mapper/x"]), IOPool("t"), fake,
                        extent_size=4 * MiB, slots=16)
    d.md_file = str(path)
    d.placed, d.lv_files = [], {}
    try:
        yield d
    finally:
        d.io.close()


async def test_new_volume_sequence(domain: FileBlockDomain) -> None:
    fake: FakeLVM = domain.runner   # type: ignore[assignment]
    await domain.write_volume_md(vol(V1))
    await domain.write_volume_md(vol(V2, format="COW"))
    assert fake.lvs[V1]["tags"] == [f"IU_{IMG}", f"PU_{BLANK_UUID}", "MD_1"]
    assert fake.lvs[V1]["size"] == 12 * MiB           # 10 MiB rounded to extents
    # sparse cow: one chunk (2560 MiB) capped by what 10 MiB of qcow2 can
    # hold (measured: 10 MiB + 384 KiB), in extents
    assert fake.lvs[V2]["tags"][-1] == "MD_2" and fake.lvs[V2]["size"] == 12 * MiB
    # one LVM change per new volume: the LV is made with its final tags
    # (issue 21), after its slot was written; and one report: a name not in
    # the cached report is not asked again before _create_lv's own look
    assert [o for o in fake.ops if o != "lvs"] == ["lvcreate", "measure", "lvcreate"]
    assert fake.ops[:fake.ops.index("lvcreate")] == ["lvs"]
    assert await domain.read_volume_md(IMG, V1) == vol(V1)
    assert [v.uuid for v in await domain.scan()] == [V1, V2]

    # the commit after the data: the LV deactivated, then its slot written,
    # from the report still cached (activation changes no metadata)
    await domain.lvm.deactivate(SD, [V1])
    await domain.write_volume_md(vol(V1, generation=1))
    assert fake.ops[-1] == "lvchange --activate"
    assert (await domain.read_volume_md(IMG, V1)).generation == 1

    # an update rewrites the slot in place; a new parent moves the PU_ tag
    await domain.write_volume_md(vol(V2, format="COW", parent=V1, generation=1))
    assert (await domain.read_volume_md(IMG, V2)).generation == 1
    assert f"PU_{V1}" in fake.lvs[V2]["tags"]

    # removal frees the slot: the next volume takes the lowest one again
    await domain.remove_volume_data(IMG, V1)
    assert V1 not in fake.lvs
    await domain.write_volume_md(vol(V1, generation=3))
    assert "MD_1" in fake.lvs[V1]["tags"]


async def test_no_slot_write_lands_before_a_late_one(
        domain: FileBlockDomain, monkeypatch: pytest.MonkeyPatch) -> None:
    """A slot write that hung past its deadline may still land (storage
    answering at last): no newer write of the slot until it returned, or
    one reported done would be undone by it (tests/unit/test_late_writes.py
    for file domains)."""
    await domain.write_volume_md(vol(V1))
    hang = threading.Event()
    real_write = bd.write_slot
    hung_once: list[bool] = []

    def late_write(path: str, slot: int, copy: bytes) -> None:
        if not hung_once:
            hung_once.append(True)
            hang.wait()
        real_write(path, slot, copy)

    monkeypatch.setattr(bd, "write_slot", late_write)
    domain.io.timeout = 0.3
    try:
        with pytest.raises(HostAgentError, match="did not finish"):
            await domain.write_volume_md(vol(V1, generation=1))
        with pytest.raises(HostAgentError, match=r"earlier write of slot 1 of .* has not"):
            await domain.write_volume_md(vol(V1, generation=2))
        await domain.write_volume_md(vol(V2))       # another slot meanwhile
    finally:
        hang.set()
    await domain.io.settled(f"slot 1 of {domain.md_path}")
    assert (await domain.read_volume_md(IMG, V1)).generation == 1      # it landed
    await domain.write_volume_md(vol(V1, generation=2))
    assert (await domain.read_volume_md(IMG, V1)).generation == 2


async def test_failed_lvcreate_leaves_no_lv(domain: FileBlockDomain) -> None:
    fake: FakeLVM = domain.runner   # type: ignore[assignment]
    fake.fail = "lvcreate"
    with pytest.raises(Exception, match="boom"):
        await domain.write_volume_md(vol(V1))
    fake.fail = None
    assert fake.lvs == {}
    assert await domain.scan() == []
    # the slot it wrote is free: the next volume takes it
    await domain.write_volume_md(vol(V2))
    assert "MD_1" in fake.lvs[V2]["tags"]
    assert await domain.read_volume_md(IMG, V2) == vol(V2)


async def test_cut_off_lvcreate_removes_the_lv_it_made(domain: FileBlockDomain) -> None:
    fake: FakeLVM = domain.runner   # type: ignore[assignment]
    fake.fail_after = "lvcreate"     # LVM made the LV, the command did not end well
    with pytest.raises(Exception, match="cut off"):
        await domain.write_volume_md(vol(V1))
    fake.fail_after = None
    assert fake.lvs == {}
    assert slots.read_slots(domain.md_path, [1])[1] == bytes(bd.SLOT_SIZE)


async def test_a_crash_between_slot_and_lvcreate_leaves_a_free_slot(
        domain: FileBlockDomain) -> None:
    fake: FakeLVM = domain.runner   # type: ignore[assignment]
    # what a kill -9 after the slot write leaves: the slot, no LV naming it
    slots.write_slot(domain.md_path, 1, bd.encode_copy(vol(V1).encode()))
    assert await domain.scan() == []
    assert await domain.volume_ids(IMG) == []
    await domain.write_volume_md(vol(V2))
    assert "MD_1" in fake.lvs[V2]["tags"]
    assert [v.uuid for v in await domain.scan()] == [V2]


async def test_initializing_lv_collected(domain: FileBlockDomain) -> None:
    fake: FakeLVM = domain.runner   # type: ignore[assignment]
    # a crash between lvcreate and the slot write: the slot holds nothing valid
    fake.lvs[V1] = {"size": 4 * MiB, "tags": [f"IU_{IMG}", "MD_1", "INITIALIZING"]}
    assert await domain.volume_ids(IMG) == [V1]
    assert await domain.scan() == []
    report = await domain.collect_garbage()
    assert report["removed"] == [f"{IMG}/{V1}"]
    assert fake.lvs == {}
    assert slots.read_slots(domain.md_path, [1])[1] == bytes(bd.SLOT_SIZE)


async def test_census_reads_every_slot_once(domain: FileBlockDomain) -> None:
    """Garbage collection's census of a block domain: one lvs and one read
    of the slots, the same volumes and damaged ones the volume-by-volume
    reads find (a slot holding garbage, an LV with no slot tag)."""
    fake: FakeLVM = domain.runner   # type: ignore[assignment]
    await domain.write_volume_md(vol(V1, state="READY"))
    await domain.write_volume_md(vol(V2, state="CREATING"))
    [slot2] = [int(t[3:]) for t in fake.lvs[V2]["tags"] if t.startswith("MD_")]
    slots.write_slot(domain.md_path, slot2, bd.encode_copy(b"garbage"))
    fake.lvs[V3] = {"size": 4 * MiB, "tags": [f"IU_{IMG}"]}
    reads = []
    real = domain._io

    async def counted(fn: Any, *args: Any, **kw: Any) -> Any:
        reads.append(fn)
        return await real(fn, *args, **kw)
    domain._io = counted   # type: ignore[method-assign]
    census = await domain.census()
    assert reads == [slots.read_slots]
    assert census.images == [IMG]
    assert [v.uuid for v in census.volumes] == [V1]
    assert [d.split(":")[0] for d in census.damaged] == [f"{IMG}/{V2}", f"{IMG}/{V3}"]
    for damaged in (V2, V3):
        with pytest.raises(MetadataError):
            await domain.read_volume_md(IMG, damaged)
    report = await domain.collect_garbage()
    assert report == {"removed": [], "damaged": census.damaged}
    assert sorted(fake.lvs) == [V1, V2, V3]


async def test_image_of_a_volume_in_one_look(domain: FileBlockDomain) -> None:
    """A volume's image from its LV's tags (the generic walk looked at every
    LV once per image); one another host made since the report was cached
    is found by asking LVM again."""
    fake: FakeLVM = domain.runner   # type: ignore[assignment]
    await domain.write_volume_md(vol(V1, state="READY"))
    assert await domain.image_of(V1) == IMG
    assert await domain.image_of(V2) is None
    other = "7a2d3e4f-5a4b-4c3d-9e8f-0a1b2c3d4e5f"
    fake.lvs[V3] = {"size": 4 * MiB, "tags": [f"IU_{other}", "MD_5"]}
    assert await domain.image_of(V3) == other


@pytest.mark.parametrize("sizes, code, name", [
    ({"/dev/mapper/a": 512, "/dev/mapper/b": 4096}, 517, "VolumeGroupBlockSizeError"),
    ({"/dev/mapper/a": 1024}, 518, "DeviceBlockSizeError"),
])
async def test_block_size_refused_before_anything_is_made(sizes: dict[str, int], code: int,
                                                          name: str) -> None:
    def respond(argv: list[str]) -> tuple[int, str, str]:
        if argv[0] == "blockdev":
            return 0, f"{sizes[argv[-1]]}\n", ""
        return 0, json.dumps({"report": [{"vg": []}]}), ""

    fake = FakeRunner(respond)
    md = DomainMetadata(uuid=SD, name="d", dom_type="iscsi", dom_class="data")
    io = IOPool("t")
    try:
        with pytest.raises(HostAgentError) as e:
            await bd.BlockDomain.create(list(sizes), md, lvm.LVM(fake, devices=list(sizes)),
                                        io, fake)
    finally:
        io.close()
    wire = e.value.to_dict()
    assert (wire["code"], wire["data"]["name"]) == (code, name), wire
    ran = [c.argv for c in fake.calls]
    assert ran and not [a for a in ran if "pvcreate" in a or "vgcreate" in a], ran


async def test_thin_start_sizes(domain: FileBlockDomain) -> None:
    """A sparse cow LV starts at initialSize or one chunk, never past what its
    full capacity needs; no qemu-img measure when the chunk is below the
    capacity (qcow2 always needs more than its capacity when full)."""
    fake: FakeLVM = domain.runner   # type: ignore[assignment]
    domain.thin = ThinPolicy(chunk_size=64 * MiB, watermark_percent=20)
    cases = [(vol(V1, format="COW", capacity=1 << 30), None, 64 * MiB, False),
             (vol(V1, format="COW", capacity=1 << 30), 10 * MiB, 12 * MiB, False),
             (vol(V1, format="COW", capacity=10 * MiB), None, 12 * MiB, True),
             (vol(V1, format="COW", capacity=10 * MiB), 100 * MiB, 12 * MiB, True),
             (vol(V1, format="COW", capacity=1 << 30, allocation="PREALLOCATED"), None,
              (1 << 30) + 4 * MiB, True),
             (vol(V1, capacity=10 * MiB), None, 12 * MiB, False)]
    for md, initial, size, measured in cases:
        fake.ops.clear()
        domain._full_sizes.clear()
        assert await domain.lv_start_size(md, initial) == size, (md, initial)
        assert ("measure" in fake.ops) == measured, (md, initial, fake.ops)


def test_thin_policy() -> None:
    p = ThinPolicy()     # VDSM's defaults
    assert (p.chunk_size, p.margin) == (2560 * MiB, 512 * MiB)
    assert p.threshold(2560 * MiB) == 2048 * MiB
    assert p.threshold(100 * MiB) == 0
    assert p.next_size(2560 * MiB, 2100 * MiB) == 5120 * MiB
    # a writer already far past the LV's end gets the margin beyond it
    assert p.next_size(2560 * MiB, 5000 * MiB) == 5512 * MiB
    ext = 128 * MiB
    assert p.extend_size(1, 10 * ext, ext) == ext
    assert p.extend_size(3 * ext + 1, 10 * ext, ext) == 4 * ext
    assert p.extend_size(100 * ext, 10 * ext, ext) == 10 * ext
    assert p.reduced_size(ext, 100 * ext, ext) == 5 * ext     # 128 + 512 MiB margin
    assert p.reduced_size(99 * ext, 100 * ext, ext) == 100 * ext


async def test_leases_lv_grows_by_many_leases(domain: FileBlockDomain) -> None:
    """A slot past the leases LV's end grows it by LEASES_GROWTH leases at
    once, not by one extent: the next creates need no LVM command for it."""
    fake: FakeLVM = domain.runner   # type: ignore[assignment]
    fake.lvs[bd.LEASES_LV] = {"size": 4 * MiB, "tags": []}
    await domain.write_volume_md(vol(V1))
    res = await domain.volume_lease(IMG, V1)
    slot_bytes = res.geometry.resource_size
    fake.lvs[bd.LEASES_LV]["size"] = res.offset       # its slot is just past the end
    domain._leases_size = None
    fake.ops.clear()
    await domain.make_volume_lease(vol(V1))
    assert fake.ops == ["lvs", "lvextend"]
    want = bd.round_up(res.offset + 64 * slot_bytes, 4 * MiB)
    assert domain._leases_size == want
    fake.ops.clear()
    await domain.write_volume_md(vol(V2))
    await domain.make_volume_lease(vol(V2))
    assert "lvextend" not in fake.ops


async def test_domain_lease_keeps_unchanged_lv_report(domain: FileBlockDomain) -> None:
    """forget_cache (the domain lease taken, a listing) costs no lvs while
    the VG's metadata stamp is unchanged; another host's change (a new
    stamp) makes the next look ask LVM again and see its LV."""
    fake: FakeLVM = domain.runner   # type: ignore[assignment]
    domain.stamping = True
    await domain.write_volume_md(vol(V1))
    assert await domain.image_ids() == [IMG]
    fake.ops.clear()
    domain.forget_cache()
    assert await domain.image_ids() == [IMG]
    assert fake.ops == []

    fake.lvs[V3] = {"size": 4 * MiB, "tags": ["IU_x", "MD_3"]}   # another host's
    fake.seq += 1
    domain.forget_cache()
    assert await domain.image_ids() == sorted([IMG, "x"])
    assert fake.ops == ["lvs"]


async def test_create_then_commit_lvm_commands(domain: FileBlockDomain,
                                               tmp_path: Path) -> None:
    """A new volume's LVM commands up to its commit: one lvs (under the
    domain lease) and its lvcreate -an; its data goes straight onto its PV
    at its first extent, with no activation; the commit's slot write needs
    no lvs (issue 21)."""
    fake: FakeLVM = domain.runner   # type: ignore[assignment]
    pv = tmp_path / "pv"
    old = os.urandom(16 * MiB)
    pv.write_bytes(old)
    domain.pv_file = str(pv)
    await domain.write_volume_md(vol(V1, capacity=3 * MiB))
    await domain.create_volume_data(vol(V1, capacity=3 * MiB), None, None)
    await domain.write_volume_md(vol(V2, format="COW"))
    await domain.create_volume_data(vol(V2, format="COW", parent=V1), vol(V1), None)
    await domain.write_volume_md(vol(V1, legality="LEGAL", generation=1))
    # reports aside (the second create's lvs: this fake has no stamp), two
    # LVM commands: no lvchange
    assert fake.ops[:2] == ["lvs", "lvcreate"]
    assert [o for o in fake.ops if o not in ("lvs", "measure")] == ["lvcreate", "lvcreate"]
    assert fake.lvs[V1]["active"] is False
    lvcreate = next(a for a in fake.argvs if a[1] == "lvcreate")
    assert lvcreate[lvcreate.index("--activate") + 1] == "n"
    assert lvcreate[lvcreate.index("--zero") + 1] == "n"
    assert (await domain.read_volume_md(IMG, V1)).legality == "LEGAL"
    assert V1 not in domain._made       # once: a later write looks the LV up
    data = pv.read_bytes()
    assert domain.placed == [V1, V2]
    # V1 raw at 4 MiB: its first MiB zero, nothing else touched
    assert data[4 * MiB:5 * MiB] == bytes(MiB) and data[5 * MiB:8 * MiB] == old[5 * MiB:8 * MiB]
    # V2 cow at 8 MiB: the qcow2 image over its parent, by name
    head = data[8 * MiB:8 * MiB + qcow2.CLUSTER]
    assert head.startswith(b"QFI\xfb") and V1.encode() in head
    assert data[:4 * MiB] == old[:4 * MiB] and data[12 * MiB:] == old[12 * MiB:]


@pytest.mark.parametrize("why", ["not located", "segment too short"])
async def test_create_falls_back_to_activation(domain: FileBlockDomain, tmp_path: Path,
                                               why: str) -> None:
    """When the first extent's place is not known or too short for the
    data: the LV is activated, written through, deactivated (as before)."""
    fake: FakeLVM = domain.runner   # type: ignore[assignment]
    pv, lv = tmp_path / "pv", tmp_path / "lv"
    pv.write_bytes(bytes(16 * MiB))
    lv.write_bytes(b"\xff" * 12 * MiB)
    domain.lv_files[V1] = str(lv)
    if why == "segment too short":
        domain.pv_file, domain.segment = str(pv), 64 * 1024
    await domain.write_volume_md(vol(V1, format="COW"))
    await domain.create_volume_data(vol(V1, format="COW"), None, None)
    assert fake.ops == ["lvs", "measure", "lvcreate", "lvchange --activate",
                        "lvchange --activate"]
    assert fake.lvs[V1]["active"] is False
    assert lv.read_bytes().startswith(b"QFI\xfb") and pv.read_bytes() == bytes(16 * MiB)


async def test_creates_in_a_row_need_one_lvs(domain: FileBlockDomain) -> None:
    """Under the domain lease the cached report gets each new LV and the
    VG's new stamp: the next create, after the lease was taken again, runs
    no lvs while nobody else changed the VG; once another host did (its
    stamp differs), it asks LVM and sees that host's slot taken."""
    fake: FakeLVM = domain.runner   # type: ignore[assignment]
    domain.stamping = True
    await domain.write_volume_md(vol(V1))
    domain.forget_cache()
    await domain.write_volume_md(vol(V2))
    assert fake.ops == ["lvs", "lvcreate", "lvcreate"]
    assert fake.lvs[V2]["tags"][-1] == "MD_2"

    fake.lvs["0d3c8d7e-4444-4c3d-9e8f-0a1b2c3d4e5f"] = {"size": 4 * MiB,
                                                        "tags": ["IU_x", "MD_3"]}
    fake.seq += 1                          # another host's change
    domain.forget_cache()
    await domain.write_volume_md(vol(V3))
    assert fake.ops[-2:] == ["lvs", "lvcreate"] and fake.lvs[V3]["tags"][-1] == "MD_4"


async def test_prepare_refreshes_what_is_active_already(domain: FileBlockDomain) -> None:
    """lvchange --activate leaves an LV active already with the mapping it
    had (another host may have extended it since): a prepare's activation
    reloads those, as VDSM's; an LV it activates now needs no reload, and a
    job's use of a chain (refresh=False) runs no refresh."""
    fake: FakeLVM = domain.runner   # type: ignore[assignment]
    await domain.write_volume_md(vol(V1))                 # left active by its create
    await domain.write_volume_md(vol(V2))
    await domain.lvm.deactivate(SD, [V2])
    chain = [vol(V1), vol(V2)]

    async def changes(refresh: bool) -> list[str]:
        fake.ops.clear()
        await domain.activate_volumes(chain, refresh=refresh)
        return [op for op in fake.ops if op != "lvs"]     # a report may be asked

    assert await changes(refresh=False) == ["lvchange --activate"]
    assert await changes(refresh=True) == ["lvchange --activate", "lvchange --refresh"]
    await domain.lvm.deactivate(SD, [V1, V2])
    assert await changes(refresh=True) == ["lvchange --activate"]


# ---- the listing's slot cache (issue 21) ----------------------------------------------

class SlotReads:
    """Counts the slots the domain reads (the metadata LV's I/O)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.slots: list[int] = []

        def counting(path: str, wanted: Sequence[int]) -> dict[int, bytes]:
            self.slots += wanted
            return slots.read_slots(path, wanted)
        monkeypatch.setattr(bd, "read_slots", counting)


async def listing(domain: FileBlockDomain) -> list[str]:
    """What getVolumesList does."""
    domain.forget_cache()
    return [v.uuid for v in await domain.all_volumes(cached=True)]


def other_host_writes(domain: FileBlockDomain, slot: int, md: VolumeMetadata) -> None:
    slots.write_slot(domain.md_path, slot, bd.encode_copy(md.encode()))


async def test_listing_reads_no_slot_while_the_vg_is_unchanged(
        domain: FileBlockDomain, monkeypatch: pytest.MonkeyPatch) -> None:
    """A listing reads the slots once; the next ones, the VG's stamp unchanged,
    read none and run no lvs. This host's own writes are in the cache."""
    fake: FakeLVM = domain.runner   # type: ignore[assignment]
    domain.stamping = True
    await domain.write_volume_md(vol(V1))
    await domain.write_volume_md(vol(V2))
    reads = SlotReads(monkeypatch)
    assert await listing(domain) == [V1, V2]
    fake.ops.clear()
    reads.slots.clear()
    assert await listing(domain) == [V1, V2]
    assert (reads.slots, fake.ops) == ([], [])
    await domain.write_volume_md(vol(V2, description="renamed"))
    assert [v.description for v in await domain.all_volumes(cached=True)] == ["", "renamed"]
    assert reads.slots == []


async def test_listing_sees_another_hosts_create_and_delete(
        domain: FileBlockDomain, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another host writes a slot, then changes the VG (lvcreate, lvremove):
    the new stamp makes the next listing read the slots again."""
    fake: FakeLVM = domain.runner   # type: ignore[assignment]
    domain.stamping = True
    await domain.write_volume_md(vol(V1))
    await domain.write_volume_md(vol(V2))
    assert await listing(domain) == [V1, V2]
    reads = SlotReads(monkeypatch)
    # its create: the slot first, then its LV
    other_host_writes(domain, 3, vol(V3))
    fake.lvs[V3] = {"size": 4 * MiB, "tags": [f"IU_{IMG}", f"PU_{BLANK_UUID}", "MD_3"]}
    fake.seq += 1
    assert await listing(domain) == [V1, V2, V3]
    assert sorted(reads.slots) == [1, 2, 3]
    # its delete of V2: REMOVING, then lvremove; and of V1 only marked so far
    other_host_writes(domain, 2, vol(V2, state="REMOVING"))
    other_host_writes(domain, 1, vol(V1, state="REMOVING"))
    del fake.lvs[V2]
    fake.seq += 1
    assert await listing(domain) == [V3]


async def test_a_slot_change_alone_is_seen_within_the_ttl(
        domain: FileBlockDomain, monkeypatch: pytest.MonkeyPatch) -> None:
    """A slot another host wrote with no VG change after it (a removal whose
    lvremove failed) is read again once the cache's TTL passed; the slot of
    an LV tagged WIPE (its removal under way) on every listing."""
    fake: FakeLVM = domain.runner   # type: ignore[assignment]
    domain.stamping = True
    now = [0.0]
    monkeypatch.setattr(domain._slot_cache, "_clock", lambda: now[0])
    await domain.write_volume_md(vol(V1))
    await domain.write_volume_md(vol(V2))
    assert await listing(domain) == [V1, V2]
    other_host_writes(domain, 1, vol(V1, state="REMOVING"))
    assert await listing(domain) == [V1, V2]           # within the TTL: not read
    now[0] += domain._slot_cache.ttl + 1
    assert await listing(domain) == [V2]

    fake.lvs[V2]["tags"].append(bd.WIPE)              # another host's delete with wipe
    fake.seq += 1
    assert await listing(domain) == [V2]              # (the tag comes before the mark)
    other_host_writes(domain, 2, vol(V2, state="REMOVING"))
    assert await listing(domain) == []


async def test_listing_without_a_stamp_reads_every_slot(
        domain: FileBlockDomain, monkeypatch: pytest.MonkeyPatch) -> None:
    """When the VG's stamp cannot be read, nothing tells that the slots still
    hold: each listing reads them all."""
    await domain.write_volume_md(vol(V1))
    await domain.write_volume_md(vol(V2))
    reads = SlotReads(monkeypatch)
    for _ in range(2):
        reads.slots.clear()
        assert await listing(domain) == [V1, V2]
        assert sorted(reads.slots) == [1, 2]
    other_host_writes(domain, 1, vol(V1, state="REMOVING"))
    assert await listing(domain) == [V2]


def test_slot_cache_parses_changed_bytes_only_and_drops_reads_across_writes() -> None:
    parsed: list[bytes] = []

    def parse(data: bytes) -> VolumeMetadata:
        parsed.append(data)
        return VolumeMetadata.decode(data)

    cache = slots.SlotCache(parse, ttl=60)
    one = bd.encode_copy(vol(V1).encode()) * 2
    gen = cache.generation
    assert cache.to_read([1], b"s1") == [1]
    cache.store({1: one}, b"s1", gen)
    assert cache.decode(1, one).uuid == V1
    assert cache.decode(1, None).uuid == V1 and len(parsed) == 1
    assert cache.to_read([1, 2], b"s1") == [2]
    assert cache.to_read([1], b"s2") == [1]
    # a read that ran across this host's write is not kept
    gen = cache.generation
    two = bd.encode_copy(vol(V1, description="new").encode()) * 2
    cache.wrote(1, two, b"s1")
    cache.store({1: one}, b"s1", gen)
    assert cache.decode(1, None).description == "new"
    cache.advance(b"s1", b"s3")
    assert cache.to_read([1], b"s3") == []


async def test_locate_asks_for_the_pvs_again_once(domain: FileBlockDomain,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A new LV on a PV this host's list lacks (another host added it):
    the PV list is asked again, once; still unknown: no place (the create
    activates the LV instead)."""
    def pv(name: str) -> lvm.PV:
        return lvm.PV(name=name, uuid=name, vg_name=SD, vg_uuid="v", size=0, free=0,
                      pe_start=0, dev_size=0, pe_count=0, pe_alloc_count=0, mda_count=1,
                      mda_size=0, mda_free=0, tags=())

    lists = [[pv("a")], [pv("a"), pv("b")]]
    asked: list[list[str]] = []

    async def pvs(vg: str | None = None) -> list[lvm.PV]:
        return lists.pop(0) if lists else [pv("a")]

    def locate(vg: str, lv: str, known: list[lvm.PV]) -> bd.Placement | None:
        asked.append([p.name for p in known])
        if "b" not in asked[-1]:
            raise bd.UnknownPV("b")
        return bd.Placement("b", 4 * MiB, 4 * MiB)

    monkeypatch.setattr(domain.lvm, "pvs", pvs)
    monkeypatch.setattr(bd, "locate", locate)
    found = await bd.BlockDomain._locate(domain, V1)
    assert found == bd.Placement("b", 4 * MiB, 4 * MiB) and asked == [["a"], ["a", "b"]]
    lists[:] = [[pv("a")], [pv("a")]]
    asked.clear()
    domain._pvs = None
    assert await bd.BlockDomain._locate(domain, V1) is None and asked == [["a"], ["a"]]


async def test_all_volume_ids_walks_the_lvs_once(domain: FileBlockDomain,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Every create asks whether its volume exists: one pass over the VG's
    LVs, not one per image (that was O(volumes²): 5 s a create at 1,000
    volumes in the lab guest)."""
    fake: FakeLVM = domain.runner   # type: ignore[assignment]
    names = {str(uuid.UUID(int=i + 1)) for i in range(200)}
    for i, n in enumerate(sorted(names)):
        fake.lvs[n] = {"size": 4 * MiB, "tags": [f"IU_{uuid.UUID(int=10_000 + i)}",
                                                  f"MD_{i + 1}"]}
    parsed = 0
    from_lv = bd.VolumeLV.from_lv

    def counting(lv: lvm.LV) -> bd.VolumeLV | None:
        nonlocal parsed
        parsed += 1
        return from_lv(lv)
    monkeypatch.setattr(bd.VolumeLV, "from_lv", counting)
    assert await domain.all_volume_ids() == names
    assert parsed == len(names)
    # the same report again: nothing parsed again
    assert len(await domain.image_ids()) == len(names) and parsed == len(names)
    domain.lvm.invalidate(SD)      # a new report: its LVs parsed
    assert await domain.all_volume_ids() == names and parsed == 2 * len(names)
