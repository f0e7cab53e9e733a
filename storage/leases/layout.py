"""Where a domain's leases live on storage, and how big the areas must be.

Both backends use the same places, so a domain can change lock policy
without moving anything:

    file domain  <root>/dom_md/ids                  host ids (one lockspace)
                 <root>/dom_md/leases  offset 0     the domain lease
                 <root>/images/<img>/<vol>.lease    a volume's lease (offset 0)
    block domain /dev/<vg>/ids                      host ids
                 /dev/<vg>/leases  offset 0         the domain lease
                 /dev/<vg>/leases  slot * align     the lease of the volume whose
                                                    metadata slot is `slot` (>= 1)

sanlock lays a lockspace and each resource out in `align` bytes of
`sector` sized blocks; the valid pairs and the host ids each gives are
fixed by sanlock (see GEOMETRIES). The local backend needs no format: it
locks one byte of these same files.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from storage.errors import InvalidParameter

KiB = 1 << 10
MiB = 1 << 20

# (sector size, alignment) -> highest host id sanlock accepts in a lockspace.
GEOMETRIES: dict[tuple[int, int], int] = {
    (512, 1 * MiB): 2000,
    (4096, 1 * MiB): 250,
    (4096, 2 * MiB): 500,
    (4096, 4 * MiB): 1000,
    (4096, 8 * MiB): 2000,
}

# sanlock's name fields are 48 bytes; ':' separates fields in its CLI strings.
NAME_LEN = 48
PATH_LEN = 1024
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,48}$")

DOMAIN_LEASE = "SDM"          # resource name of a domain's metadata lease
LEASE_SUFFIX = ".lease"


@dataclass(frozen=True, slots=True)
class Geometry:
    """Sector size and alignment of a domain's lease areas (its metadata's
    block_size and alignment)."""

    sector_size: int = 512
    alignment: int = MiB

    def __post_init__(self) -> None:
        if (self.sector_size, self.alignment) not in GEOMETRIES:
            raise InvalidParameter(
                field="lease geometry",
                reason=f"sector {self.sector_size} with alignment {self.alignment}; valid: "
                       + ", ".join(f"{s}/{a // MiB}M" for s, a in GEOMETRIES))

    @classmethod
    def for_sector(cls, sector_size: int, max_hosts: int = 250) -> Geometry:
        """The smallest alignment that holds max_hosts host ids."""
        for (sector, align), hosts in sorted(GEOMETRIES.items()):
            if sector == sector_size and hosts >= max_hosts:
                return cls(sector, align)
        raise InvalidParameter(field="max_hosts", reason=f"{max_hosts} hosts do not fit")

    @property
    def max_hosts(self) -> int:
        return GEOMETRIES[(self.sector_size, self.alignment)]

    @property
    def lockspace_size(self) -> int:
        """Bytes one lockspace (every host id's delta lease) takes."""
        return self.alignment

    @property
    def resource_size(self) -> int:
        """Bytes one resource lease takes; resources sit at multiples of it."""
        return self.alignment

    def leases_area_size(self, slots: int) -> int:
        """Bytes of a block domain's leases LV holding slots 0..slots-1."""
        return slots * self.alignment


def check_name(value: str, field: str) -> str:
    if not _NAME_RE.match(value):
        raise InvalidParameter(field=field, reason="1 to 48 of [A-Za-z0-9_.-]")
    return value


def check_path(value: str, field: str) -> str:
    # ':' is allowed (an NFS mount point has one): sanlock's command line
    # takes it escaped (see sanlock.cli_path)
    if (not value.startswith("/") or len(value.encode()) >= PATH_LEN
            or any(c in value for c in "\\\n\r\0 ")):
        raise InvalidParameter(field=field, reason="an absolute path under 1024 bytes "
                                                   "without spaces, backslashes or control "
                                                   "characters")
    return value


@dataclass(frozen=True, slots=True)
class Lockspace:
    """A domain's host id area: the lockspace `name` (the sdUUID) at
    `offset` of `path`."""

    name: str
    path: str
    offset: int = 0
    geometry: Geometry = Geometry()

    def __post_init__(self) -> None:
        check_name(self.name, "lockspace")
        check_path(self.path, "lockspace path")
        if self.offset < 0 or self.offset % self.geometry.alignment:
            raise InvalidParameter(field="lockspace offset",
                                   reason=f"{self.offset} is not a multiple of the alignment")

    def check_host_id(self, host_id: int) -> int:
        if not 1 <= host_id <= self.geometry.max_hosts:
            raise InvalidParameter(field="host_id",
                                   reason=f"{host_id} not in 1..{self.geometry.max_hosts}")
        return host_id


@dataclass(frozen=True, slots=True)
class Resource:
    """One lease: resource `name` in lockspace `lockspace`, stored at
    `offset` of `path`."""

    lockspace: str
    name: str
    path: str
    offset: int = 0
    geometry: Geometry = Geometry()

    def __post_init__(self) -> None:
        check_name(self.lockspace, "lockspace")
        check_name(self.name, "resource")
        check_path(self.path, "resource path")
        if self.offset < 0 or self.offset % self.geometry.alignment:
            raise InvalidParameter(field="resource offset",
                                   reason=f"{self.offset} is not a multiple of the alignment")

    @property
    def key(self) -> tuple[str, str]:
        return (self.lockspace, self.name)

    def __str__(self) -> str:
        return f"{self.lockspace}:{self.name}"


@dataclass(frozen=True, slots=True)
class FileDomainLeases:
    """The lease places of a file domain rooted at `root` (<mount>/<sdUUID>)."""

    sd_uuid: str
    root: Path
    geometry: Geometry = Geometry()

    @property
    def ids_path(self) -> Path:
        return self.root / "dom_md" / "ids"

    @property
    def leases_path(self) -> Path:
        return self.root / "dom_md" / "leases"

    def lockspace(self) -> Lockspace:
        return Lockspace(self.sd_uuid, os.fspath(self.ids_path), 0, self.geometry)

    def domain_resource(self) -> Resource:
        return Resource(self.sd_uuid, DOMAIN_LEASE, os.fspath(self.leases_path), 0,
                        self.geometry)

    def volume_lease_path(self, img: str, vol: str) -> Path:
        return self.root / "images" / img / f"{vol}{LEASE_SUFFIX}"

    def volume_resource(self, img: str, vol: str) -> Resource:
        return Resource(self.sd_uuid, vol, os.fspath(self.volume_lease_path(img, vol)), 0,
                        self.geometry)


@dataclass(frozen=True, slots=True)
class BlockDomainLeases:
    """The lease places of a block domain (VG `sd_uuid`, LVs ids and leases)."""

    sd_uuid: str
    geometry: Geometry = Geometry()
    dev_dir: Path = Path("/dev")

    @property
    def ids_path(self) -> Path:
        return self.dev_dir / self.sd_uuid / "ids"

    @property
    def leases_path(self) -> Path:
        return self.dev_dir / self.sd_uuid / "leases"

    def lockspace(self) -> Lockspace:
        return Lockspace(self.sd_uuid, os.fspath(self.ids_path), 0, self.geometry)

    def domain_resource(self) -> Resource:
        return Resource(self.sd_uuid, DOMAIN_LEASE, os.fspath(self.leases_path), 0,
                        self.geometry)

    def volume_resource(self, vol: str, slot: int) -> Resource:
        """The lease of the volume in metadata slot `slot` (1 and up: slot 0 is
        the domain's own, as in the metadata LV)."""
        if slot < 1:
            raise InvalidParameter(field="slot", reason=f"{slot}: volume slots start at 1")
        return Resource(self.sd_uuid, vol, os.fspath(self.leases_path),
                        slot * self.geometry.alignment, self.geometry)
