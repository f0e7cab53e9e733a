"""A new block volume's first bytes (a qcow2 header, a raw volume's zeroed
first MiB) written straight onto its PV at its LV's first extent, without
activating the LV (issue 21: the activation and deactivation were most of
a createVolume above a bare `lvcreate -an`).

Why this is safe:
- the LV is new and inactive on every host: made under the domain lease,
  no host has its device-mapper table, nobody can have it open;
- the bytes go only into its own first extent, found in the VG metadata
  LVM committed under that lease (its checksum checked), on the PV whose
  label carries the UUID the metadata names;
- O_DIRECT and fsync: no page cache of the PV holds stale bytes (a direct
  write drops the range's cached pages), and a later activation makes a
  new dm device, which reads the disk;
- a crash before the write leaves a volume that is not committed (its
  slot ILLEGAL), which the removal of half-made volumes takes as before.
Anything not as expected (text not found or not parsed, a first segment
that is not one plain stripe or is shorter than the write, the PV not seen
here) returns None: the caller activates the LV and writes through it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from storage import lvm, lvmlabel, qcow2
from storage.domains.slots import zero

log = logging.getLogger("storage.domains")

MiB = 1 << 20
ALIGN = 4096        # O_DIRECT on 512 and 4096-byte devices


@dataclass(frozen=True)
class Placement:
    """An LV's first segment: `length` bytes from byte `offset` of `device`."""
    device: str
    offset: int
    length: int


class UnknownPV(LookupError):
    """The metadata places the LV on a PV this host's PV list lacks."""


def locate(vg: str, lv: str, pvs: Sequence[lvm.PV]) -> Placement | None:
    """Where LV `lv` of VG `vg` starts on this host's devices, from the
    VG metadata committed on the first of `pvs` with a metadata area;
    None (and a debug log saying why) when it cannot tell. Raises
    UnknownPV when the LV lies on a PV not in `pvs`. Blocking I/O."""
    found = _find(vg, lv, pvs)
    if isinstance(found, str):
        log.debug("LV %s/%s: writing through its activation: %s", vg, lv, found)
        return None
    return found


def _find(vg: str, lv: str, pvs: Sequence[lvm.PV]) -> Placement | str:
    source = next((pv for pv in pvs if pv.mda_count), None)
    if source is None:
        return "no PV with a metadata area"
    md = lvmlabel.read_device_metadata(source.name)
    if md is None:
        return f"no committed metadata text found on {source.name}"
    try:
        extent = lvmlabel.first_extent(md.text, vg, lv)
    except lvmlabel.Unexpected as e:
        return str(e)
    if extent is None:
        return "not in the committed metadata"
    pv = next((pv for pv in pvs if pv.uuid.replace("-", "") == extent.pv_uuid), None)
    if pv is None:
        raise UnknownPV(extent.pv_uuid)
    # the device must still be that PV (a name can come back for another device)
    if lvmlabel.read_device_uuid(pv.name) != extent.pv_uuid:
        return f"{pv.name} does not carry PV {extent.pv_uuid}"
    if extent.offset % ALIGN or extent.length % ALIGN:
        return f"first segment at {extent.offset} not 4 KiB aligned"
    return Placement(pv.name, extent.offset, extent.length)


def first_bytes(fmt: str, capacity: int, backing: str | None = None,
                backing_fmt: str | None = None) -> int:
    """How many bytes from its start a new volume's data takes: a raw
    volume's first MiB zeroed (extents of deleted volumes are reused: no
    stale header shows through), a cow volume's empty qcow2 image."""
    if fmt == "RAW":
        return min(MiB, -(-capacity // ALIGN) * ALIGN)
    return qcow2.written(capacity, backing, backing_fmt)


def write_first(path: str, offset: int, fmt: str, capacity: int,
                backing: str | None = None, backing_fmt: str | None = None) -> None:
    """Write a new volume's first bytes (`first_bytes` of them) at byte
    `offset` of `path`: its LV, or its PV at its first extent. O_DIRECT,
    fsync'd. Blocking I/O."""
    if fmt == "RAW":
        zero(path, offset, first_bytes(fmt, capacity))
    else:
        # qemu-img create's bytes without its process (issue 21)
        qcow2.write_image(path, capacity, backing, backing_fmt, offset=offset)
