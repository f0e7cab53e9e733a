"""SVG charts of the benchmark results (bench-results/*.json), written with
no plotting library: the agent against the bare tool or the physical limit
measured in the same run.

    python -m tests.bench.plot      # bench-results/*.svg (CHARTS)
"""

from __future__ import annotations

import json
from html import escape
from pathlib import Path
from typing import Any

from tests.bench.common import RESULTS

COLORS = ("#3465a4", "#b0b0b0", "#73a12e")


def bars(title: str, groups: list[tuple[str, list[tuple[str, float]]]], unit: str) -> str:
    """Horizontal bars: one group per measurement, one bar per contender."""
    width, left, bar_h, gap = 760, 230, 16, 14
    top = 40
    peak = max((v for _, items in groups for _, v in items), default=1.0) or 1.0
    y = top
    parts = []
    for name, items in groups:
        parts.append(f'<text x="8" y="{y + 12}" font-size="13" font-weight="bold">'
                     f'{escape(name)}</text>')
        y += 18
        for i, (label, value) in enumerate(items):
            w = (width - left - 120) * value / peak
            parts.append(f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{bar_h - 2}" '
                         f'fill="{COLORS[i % len(COLORS)]}"/>')
            parts.append(f'<text x="{left - 6}" y="{y + bar_h - 4}" font-size="11" '
                         f'text-anchor="end">{escape(label)}</text>')
            parts.append(f'<text x="{left + w + 6:.1f}" y="{y + bar_h - 4}" font-size="11">'
                         f'{value:,.0f} {escape(unit)}</text>')
            y += bar_h
        y += gap
    height = y + 10
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'font-family="sans-serif"><rect width="100%" height="100%" fill="white"/>'
            f'<text x="8" y="22" font-size="15">{escape(title)}</text>'
            + "".join(parts) + "</svg>\n")


def _load(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return None


def throughput_groups() -> list[tuple[str, list[tuple[str, float]]]]:
    groups: list[tuple[str, list[tuple[str, float]]]] = []
    copy = _load("copy")
    if copy:
        f = copy["full_2g"]
        groups.append(("copyImage 2 GiB raw", [("copyImage", f["agent_mib_s"]),
                                               ("qemu-img convert", f["qemu_img_mib_s"])]))
    ovf = _load("ovf")
    if ovf:
        items = [(label, float(ovf[key])) for label, key in
                 (("agent upload", "agent_mib_s"), ("imageio server", "imageio_mib_s"),
                  ("dd (fsync)", "dd_mib_s"),
                  ("bare TLS sink", "bare_mib_s")) if key in ovf]
        if items:
            groups.append(("OVF upload 1 GiB", items))
    return groups


def block_create_groups() -> list[tuple[str, list[tuple[str, float]]]]:
    r = _load("blockvolumes")
    if not r:
        return []
    return [(f"createVolume 1 GiB {kind}", [("agent", v["agent_ms"]),
                                              ("bare lvcreate -an", v["lvcreate_ms"])])
            for kind, v in r.get("create", {}).items()]


def block_scale_groups() -> list[tuple[str, list[tuple[str, float]]]]:
    r = _load("blockscale")
    if not r:
        return []
    return [(f"{s['count']} volumes", [("createVolume p50", s["create_p50_ms"]),
                                       ("bare lvcreate -an", s["lvcreate_ms"]),
                                       ("getVolumesList", s["list_ms"])])
            for s in r["steps"]]


def load_verb_groups() -> list[tuple[str, list[tuple[str, float]]]]:
    r = _load("load")
    if not r:
        return []
    return [(verb, [("p50", d["p50_ms"]), ("p99", d["p99_ms"])])
            for verb, d in r["verbs"].items() if d.get("count")]


def ping_groups() -> list[tuple[str, list[tuple[str, float]]]]:
    r = _load("ping")
    if not r:
        return []
    names = (("agent", "agent"), ("jsonrpcserver floor", "floor"), ("bare aiohttp", "bare"))
    return [(label, [("CPU us/req", r[key]["server_cpu_us_per_req"]),
                     ("p99 ms x10", 10 * r[key]["p99_ms"])])
            for label, key in names if key in r]


CHARTS = (
    ("throughput.svg", "Throughput: the agent beside the bare tool (MiB/s, median)",
     throughput_groups, "MiB/s"),
    ("blockcreate.svg", "Block createVolume beside a bare lvcreate, same guest (ms, median)",
     block_create_groups, "ms"),
    ("blockscale.svg", "One block domain filling up: time per create and listing (ms)",
     block_scale_groups, "ms"),
    ("load-verbs.svg", "Latency per verb under load: 64 HTTP + 500 WebSocket clients (ms)",
     load_verb_groups, "ms"),
    ("ping.svg", "ping, 64 mTLS clients: server CPU per request (us) and p99 (ms x10)",
     ping_groups, "us"),
)


def write_all() -> list[Path]:
    out = []
    for name, title, groups_of, unit in CHARTS:
        groups = groups_of()
        if groups:
            path = RESULTS / name
            path.write_text(bars(title, groups, unit))
            out.append(path)
    return out


if __name__ == "__main__":
    for p in write_all():
        print(p)
