"""What differs between a file and an LV holding a volume is asked of the domain
(storage/domains/holding.py), and a volume's format has one type (VolumeFormat):
the answers the copy, snapshot and hibernation flows used to compute by type checks."""

from __future__ import annotations

import pytest

from storage.domains.blockdomain import BlockDomain
from storage.domains.filedomain import FileDomain
from storage.domains.holding import LVHolding, VolumeHolding
from storage.metadata import FORMATS, VolumeFormat, VolumeMetadata

MiB = 1 << 20


def _md(fmt: str) -> VolumeMetadata:
    return VolumeMetadata(domain="sd", image="img", uuid="vol", parent="", format=fmt,
                          allocation="SPARSE", voltype="LEAF", capacity=10 * MiB,
                          legality="LEGAL", generation=0, state="READY")


class _LV(LVHolding):
    extent_size = 128 * MiB


@pytest.mark.parametrize(("name", "fmt", "wire", "qemu"), [
    ("cow", VolumeFormat.COW, "cow", "qcow2"),
    ("COW", VolumeFormat.COW, "cow", "qcow2"),
    ("raw", VolumeFormat.RAW, "raw", "raw"),
    ("RAW", VolumeFormat.RAW, "raw", "raw"),
])
def test_volume_format(name: str, fmt: VolumeFormat, wire: str, qemu: str) -> None:
    assert VolumeFormat.of(name) is fmt
    assert (fmt.wire, fmt.qemu) == (wire, qemu)
    # stored as the plain string VDSM writes
    assert fmt == fmt.value == FORMATS[wire]


def test_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="QCOW2"):
        VolumeFormat.of("qcow2")


def test_a_file_grows_as_written() -> None:
    f = VolumeHolding()
    assert f.zeroed_when_made(_md("RAW")) and f.zeroed_when_made(_md("COW"))
    assert f.space_for("raw", 10 * MiB, 3 * MiB) == 3 * MiB
    assert f.initial_size(5 * MiB) is None
    assert (f.layer_space(), f.memory_allocation(), f.volumes_are_devices) == (
        MiB, "sparse", False)


def test_an_lv_is_allocated_up_front() -> None:
    lv = _LV()
    # a raw LV holds what its extents held before; a cow LV reads zeros
    assert not lv.zeroed_when_made(_md("RAW"))
    assert lv.zeroed_when_made(_md("COW"))
    assert lv.space_for("raw", 10 * MiB, 3 * MiB) == 10 * MiB
    assert lv.space_for("RAW", 10 * MiB, 3 * MiB) == 10 * MiB
    assert lv.space_for("cow", 10 * MiB, 3 * MiB) == 3 * MiB
    assert lv.initial_size(5 * MiB) == 5 * MiB
    assert (lv.layer_space(), lv.memory_allocation(), lv.volumes_are_devices) == (
        128 * MiB, "preallocated", True)


def test_the_domains_hold_volumes_their_way() -> None:
    assert issubclass(BlockDomain, LVHolding)
    assert issubclass(FileDomain, VolumeHolding) and not issubclass(FileDomain, LVHolding)
