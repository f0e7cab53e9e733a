"""A block domain's LVs and their tags: which LV is a volume, of which
image and parent, and which metadata slot holds it (blockdomain.py's
layout). Pure: no LVM command runs here."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from storage import lvm
from storage.domains.slots import DOMAIN_SLOT
from storage.domains.vgdevices import WIPE
from storage.ids import is_uuid
from storage.metadata import BLANK_UUID, VolumeMetadata

VG_TAG = "HOSTAGENT_SD"
INITIALIZING = "INITIALIZING"
IMAGE_PREFIX = "IU_"
PARENT_PREFIX = "PU_"
SLOT_PREFIX = "MD_"

METADATA_LV = "metadata"
IDS_LV = "ids"
LEASES_LV = "leases"
SPECIAL_LVS = (METADATA_LV, IDS_LV, LEASES_LV)


def round_up(size: int, unit: int) -> int:
    return (size + unit - 1) // unit * unit


def parse_tags(tags: Iterable[str]) -> dict[str, str]:
    """{IU_, PU_, MD_: value} of an LV's tags, and INITIALIZING, WIPE if
    tagged so."""
    out = {}
    for tag in tags:
        if tag in (INITIALIZING, WIPE):
            out[tag] = ""
            continue
        for prefix in (IMAGE_PREFIX, PARENT_PREFIX, SLOT_PREFIX):
            if tag.startswith(prefix):
                out[prefix] = tag[len(prefix):]
    return out


def slot_of(tags: Iterable[str]) -> int | None:
    value = parse_tags(tags).get(SLOT_PREFIX)
    if value is None or not value.isdigit():
        return None
    return int(value)


def free_slot(tag_lists: Iterable[Iterable[str]], slots: int) -> int | None:
    """The lowest volume slot (1..slots-1) no LV's MD_ tag refers to; None
    when all are taken."""
    used = {s for tags in tag_lists if (s := slot_of(tags)) is not None}
    for n in range(DOMAIN_SLOT + 1, slots):
        if n not in used:
            return n
    return None


def volume_tags(md: VolumeMetadata, slot: int) -> list[str]:
    return [f"{IMAGE_PREFIX}{md.image}", f"{PARENT_PREFIX}{md.parent or BLANK_UUID}",
            f"{SLOT_PREFIX}{slot}"]




@dataclass(frozen=True)
class VolumeLV:
    """A volume's LV as the VG report shows it."""

    name: str
    image: str
    parent: str
    slot: int | None
    initializing: bool
    size: int
    active: bool | None
    wipe: bool = False

    @classmethod
    def from_lv(cls, lv: lvm.LV) -> VolumeLV | None:
        """None for LVs that are not volumes (special or foreign ones)."""
        if lv.name in SPECIAL_LVS or not is_uuid(lv.name):
            return None
        tags = parse_tags(lv.tags)
        if IMAGE_PREFIX not in tags:
            return None
        return cls(name=lv.name, image=tags[IMAGE_PREFIX],
                   parent=tags.get(PARENT_PREFIX, BLANK_UUID), slot=slot_of(lv.tags),
                   initializing=INITIALIZING in tags, size=lv.size, active=lv.active,
                   wipe=WIPE in tags)
