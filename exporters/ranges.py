"""Key ranges of an annotation folder, so that readers sort one range at a time.

Sorting and deduplicating the whole table at once holds every row in memory (about 4 KB per image
with the polars sort over all columns: 1.5 GB at 400k images). Parts are written in key order by
each worker, so each part covers a narrow range of keys, and its Parquet statistics say which. The
folder is cut at part boundaries into ranges of about `rows` rows; a range is read from the parts
that overlap it only, filtered to its keys, then sorted: memory follows the range, not the folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq

RANGE_ROWS = 50_000  # rows sorted in memory at once


@dataclass(frozen=True)
class PartSpan:
    path: Path
    lo: str  # smallest and largest image key in the part
    hi: str
    rows: int


@dataclass(frozen=True)
class KeyRange:
    """Keys k with lo <= k < hi (None: unbounded), and the parts that may hold them."""

    lo: str | None
    hi: str | None
    parts: list[Path]


def part_span(path: Path) -> PartSpan | None:
    """The key span of a part from its row-group statistics (read from the keys when missing)."""
    md = pq.ParquetFile(path).metadata
    if md.num_rows == 0:
        return None
    col = md.schema.to_arrow_schema().get_field_index("image")
    lows, highs = [], []
    for g in range(md.num_row_groups):
        stats = md.row_group(g).column(col).statistics
        if md.row_group(g).num_rows and (stats is None or not stats.has_min_max or not isinstance(stats.min, str)):
            keys = pq.read_table(path, columns=["image"]).column("image")
            mm = pc.min_max(keys)
            return PartSpan(path, mm["min"].as_py(), mm["max"].as_py(), md.num_rows)
        if md.row_group(g).num_rows:
            lows.append(stats.min)
            highs.append(stats.max)
    return PartSpan(path, min(lows), max(highs), md.num_rows)


def key_ranges(parts: list[Path], rows: int | None = None) -> list[KeyRange]:
    """Consecutive key ranges covering every part's keys, each cut where a part starts once about
    `rows` rows lie before the cut. Parts that overlap a cut are read by both ranges (filtered)."""
    rows = rows or RANGE_ROWS
    spans = sorted((s for s in map(part_span, parts) if s is not None), key=lambda s: s.lo)
    if not spans:  # only empty parts: one range that reads them (and finds no rows)
        return [KeyRange(None, None, list(parts))]
    cuts: list[str] = []
    acc = 0
    for span in spans:
        if acc >= rows and span.lo > (cuts[-1] if cuts else spans[0].lo):
            cuts.append(span.lo)
            acc = 0
        acc += span.rows
    edges: list[str | None] = [None, *cuts, None]
    return [KeyRange(lo, hi, [s.path for s in spans if (hi is None or s.lo < hi) and (lo is None or s.hi >= lo)])
            for lo, hi in zip(edges, edges[1:])]
