"""LVM's reports (`lvm pvs/vgs/lvs --reportformat json`) as frozen rows:
what storage/lvm.py's commands return and cache."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from storage.errors import LVMCommandError


@dataclass(frozen=True, slots=True)
class PV:
    name: str
    uuid: str
    vg_name: str
    vg_uuid: str
    size: int
    free: int
    pe_start: int
    dev_size: int
    pe_count: int
    pe_alloc_count: int
    mda_count: int
    mda_size: int
    mda_free: int
    tags: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class VG:
    name: str
    uuid: str
    attr: str
    size: int
    free: int
    extent_size: int
    extent_count: int
    free_count: int
    tags: tuple[str, ...]
    pv_count: int
    lv_count: int
    mda_size: int
    mda_free: int

    @property
    def partial(self) -> bool:
        """A PV of the VG is missing."""
        return len(self.attr) > 3 and self.attr[3] == "p"


@dataclass(frozen=True, slots=True)
class LV:
    name: str
    vg_name: str
    uuid: str
    size: int
    tags: tuple[str, ...]
    attr: str
    # None when LVM cannot tell (activation=0: attr is "-wi-XX----")
    active: bool | None
    opened: bool | None
    path: str


def _split_tags(value: str) -> tuple[str, ...]:
    return tuple(t for t in value.split(",") if t)


def _attr_flag(attr: str, index: int, on: str) -> bool | None:
    if len(attr) <= index or attr[index] == "X":
        return None
    return attr[index] == on


def _parse_pv(r: Mapping[str, str]) -> PV:
    return PV(name=r["pv_name"], uuid=r["pv_uuid"], vg_name=r["vg_name"], vg_uuid=r["vg_uuid"],
              size=int(r["pv_size"]), free=int(r["pv_free"]), pe_start=int(r["pe_start"]),
              dev_size=int(r["dev_size"]), pe_count=int(r["pv_pe_count"]),
              pe_alloc_count=int(r["pv_pe_alloc_count"]), mda_count=int(r["pv_mda_count"]),
              mda_size=int(r["pv_mda_size"] or 0), mda_free=int(r["pv_mda_free"] or 0),
              tags=_split_tags(r["pv_tags"]))


def _parse_vg(r: Mapping[str, str]) -> VG:
    return VG(name=r["vg_name"], uuid=r["vg_uuid"], attr=r["vg_attr"], size=int(r["vg_size"]),
              free=int(r["vg_free"]), extent_size=int(r["vg_extent_size"]),
              extent_count=int(r["vg_extent_count"]), free_count=int(r["vg_free_count"]),
              tags=_split_tags(r["vg_tags"]), pv_count=int(r["pv_count"]),
              lv_count=int(r["lv_count"]), mda_size=int(r["vg_mda_size"]),
              mda_free=int(r["vg_mda_free"]))


def _parse_lv(r: Mapping[str, str]) -> LV:
    attr = r["lv_attr"]
    if r["lv_active"] == "unknown":
        active: bool | None = None
    else:
        active = _attr_flag(attr, 4, "a")
    return LV(name=r["lv_name"], vg_name=r["vg_name"], uuid=r["lv_uuid"], size=int(r["lv_size"]),
              tags=_split_tags(r["lv_tags"]), attr=attr, active=active,
              opened=_attr_flag(attr, 5, "o"), path=r["lv_path"])


T = TypeVar("T")


def parse_report(out: bytes | str, kind: str, parse: Callable[[Mapping[str, str]], T]) -> list[T]:
    """Rows of `lvm {kind}s --reportformat json` parsed with `parse`."""
    try:
        reports = json.loads(out)["report"]
        if not isinstance(reports, list):
            raise TypeError("'report' is not a list")
        rows = [row for report in reports for row in report[kind]]
        return [parse(row) for row in rows]
    except (ValueError, KeyError, TypeError) as e:
        raise LVMCommandError(reason=f"unexpected {kind}s output: {e!r}") from None


def parse_pvs(out: bytes | str) -> list[PV]:
    return parse_report(out, "pv", _parse_pv)


def parse_vgs(out: bytes | str) -> list[VG]:
    return parse_report(out, "vg", _parse_vg)


def parse_lvs(out: bytes | str) -> list[LV]:
    return parse_report(out, "lv", _parse_lv)
