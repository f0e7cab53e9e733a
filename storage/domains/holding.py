"""How a kind of domain holds a volume: a file (VolumeHolding, the default
of every Domain) or a logical volume (LVHolding, BlockDomain's). The flows
that make volumes ask the domain, they never check its type."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from storage.domains.vgdevices import LunPaths
from storage.errors import InvalidParameter
from storage.metadata import VolumeFormat, VolumeMetadata

log = logging.getLogger("storage.domains")

MiB = 1 << 20


class VolumeHolding:
    """A volume is a file: it reads as zeros when made and grows as it is
    written."""

    # a volume's path is a block device (qemu's host_device), not a file
    volumes_are_devices = False

    def zeroed_when_made(self, md: VolumeMetadata) -> bool:
        """Whether a new volume reads as zeros (a copy into it skips them)."""
        return True

    def space_for(self, fmt: str, capacity: int, data: int) -> int:
        """The space a new volume of `fmt` (raw, cow) holding `data` bytes
        takes here."""
        return data

    def initial_size(self, estimate: int) -> int | None:
        """The initial size a new cow volume expected to hold `estimate`
        bytes is made with; None: it grows as it is written."""
        return None

    def layer_space(self) -> int:
        """The space a new, empty snapshot layer takes."""
        return MiB

    def memory_allocation(self) -> str:
        """How a hibernated VM's memory volumes are allocated."""
        return "sparse"

    async def cache_mode(self) -> str:
        """qemu-img's cache mode on the domain: "none" (O_DIRECT)."""
        return "none"

    def location(self) -> dict[str, Any]:
        """Where the domain is, for its info."""
        return {}

    # A file domain has no LUNs (BlockDomain's are in vgdevices.LUNs).
    if TYPE_CHECKING:
        @property
        def uuid(self) -> str: ...

    async def mark_wipe(self, vols: list[VolumeMetadata]) -> None:
        """Have the volumes' data zeroed when they are removed (delete with
        wipe), by whoever removes them, also garbage collection after a
        crash: called before they are marked REMOVING. File domains: as VDSM
        ("won't be zeroed"), nothing: a file's blocks go back to the file
        system, which never hands out their old contents."""
        log.info("Domain %s: wipe ignored, a file domain (volumes %s)", self.uuid,
                 ", ".join(v.uuid for v in vols))

    async def add_devices(self, guids: Sequence[str], paths: LunPaths, *,
                          timeout: float) -> None:
        """Add LUNs to the domain (block domains); `paths` finds their
        devices on this host."""
        raise InvalidParameter(field="sdUUID", reason=f"domain {self.uuid} is not a block "
                                                      "domain: it has no LUNs")

    async def resize_device(self, guid: str, paths: LunPaths, *, timeout: float) -> int:
        """Use the new size of a LUN of the domain that grew (block domains);
        the PV's size after."""
        raise InvalidParameter(field="sdUUID", reason=f"domain {self.uuid} is not a block "
                                                      "domain: it has no LUNs")


class LVHolding(VolumeHolding):
    """A volume is an LV: allocated up front in extents, holding what those
    extents held before (raw) until written; a cow LV is made at an initial
    size and extended ahead of its writer."""

    extent_size: int
    volumes_are_devices = True

    def zeroed_when_made(self, md: VolumeMetadata) -> bool:
        return md.format != VolumeFormat.RAW   # a qcow2 header makes a cow LV read zeros

    def space_for(self, fmt: str, capacity: int, data: int) -> int:
        return capacity if VolumeFormat.of(fmt) is VolumeFormat.RAW else data

    def initial_size(self, estimate: int) -> int | None:
        return estimate

    def layer_space(self) -> int:
        return self.extent_size

    def memory_allocation(self) -> str:
        return "preallocated"
