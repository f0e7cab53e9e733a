"""Thin provisioning of cow volumes on block domains: how large their LVs
start and how far ahead of the writer they are grown (VDSM's chunk and
watermark), as pure arithmetic on sizes.

A sparse cow volume's LV holds what its writer wrote so far plus free space;
when less than `watermark_percent` of a chunk is free it is grown by a chunk,
never past what the full capacity needs (`qemu-img measure`'s
fully-allocated size).
"""

from __future__ import annotations

from dataclasses import dataclass

MiB = 1 << 20

# VDSM's defaults (irs volume_utilization_chunk_mb = 2560, extend when less
# than 20% of a chunk is free).
DEFAULT_CHUNK_SIZE = 2560 * MiB
DEFAULT_WATERMARK_PERCENT = 20


def round_up(size: int, unit: int) -> int:
    return (size + unit - 1) // unit * unit


@dataclass(frozen=True)
class ThinPolicy:
    chunk_size: int = DEFAULT_CHUNK_SIZE
    watermark_percent: int = DEFAULT_WATERMARK_PERCENT

    @property
    def margin(self) -> int:
        """Free space kept ahead of the writer: below it the LV is grown."""
        return self.chunk_size * self.watermark_percent // 100

    def start_size(self, initial_size: int | None, full: int, extent: int) -> int:
        """The LV of a new sparse cow volume: `initial_size` or one chunk, at
        most `full` (what the whole capacity needs), in whole extents."""
        want = initial_size if initial_size else self.chunk_size
        return max(extent, round_up(min(want, full), extent))

    def extend_size(self, min_size: int, full: int, extent: int) -> int:
        """The LV size an extension to at least `min_size` asks for: whole
        extents, at most what the full capacity needs (rounded up to an
        extent, the least LVM can give)."""
        return max(extent, round_up(min(min_size, full), extent))

    def threshold(self, lv_size: int) -> int:
        """The write offset past which a writer of an LV of `lv_size` needs
        more space (the write threshold armed on its node)."""
        return max(0, lv_size - self.margin)

    def next_size(self, lv_size: int, allocation: int) -> int:
        """Grow by a chunk from the current size, more if the writer is
        already past it (the margin stays free beyond `allocation`)."""
        return max(lv_size + self.chunk_size, allocation + self.margin)

    def reduced_size(self, end_offset: int, full: int, extent: int) -> int:
        """A cow LV shrunk to what it holds (qemu-img check's image-end-offset)
        plus the margin, in whole extents, never past the full capacity."""
        return max(extent, round_up(min(end_offset + self.margin, full), extent))
