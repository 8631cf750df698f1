"""The shared reader of an annotation folder (see DESIGN.md, "The annotation table").

Lazy with polars: the part files are scanned, deduplicated by (image, task) preferring `ok`
rows (a retried error leaves both rows), sorted by key, and handed to exporters image by image.
The folder is read one key range at a time (ranges.py), so a run with millions of rows is never
all in memory at once: counts and labels are summed over the ranges, images come range by range."""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import polars as pl
import pyarrow.parquet as pq

from annotator.outdir.table import MANIFEST, OK, PART_GLOB, SCHEMA_VERSION, Annotation, part_files, read_rows
from exporters.errors import ExportError
from exporters.ranges import KeyRange, key_ranges
from exporters.safety import is_safe_key

SCHEMA_KEY = b"florence_annotate_schema"
ROW_COLUMNS = ["image", "width", "height", "task", "prompt", "text", "bboxes", "labels", "polygons",
               "quad_boxes", "scores"]


Row = Annotation  # one row type for the whole package (outdir/table.py); exporters see ok rows only


@dataclass
class ImageRows:
    """All ok rows of one image, by task name."""

    key: str
    width: int
    height: int
    rows: dict[str, Row]


def _schema_version(meta: dict | None) -> int:
    raw = (meta or {}).get(SCHEMA_KEY)
    try:
        return int(raw) if raw is not None else SCHEMA_VERSION
    except ValueError:
        return 10**9  # unreadable version: treat as newer than us


class Run:
    """An annotation folder made by `annotate run`."""

    def __init__(self, folder: Path, image_roots: list[Path] | None = None):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise ExportError(f"annotations folder {self.folder} does not exist; run `annotate run` first or pass its folder")
        self.parts = part_files(self.folder)
        self._ranges: list[KeyRange] | None = None
        if not self.parts:
            raise ExportError(f"annotations folder {self.folder} holds no {PART_GLOB} files; run `annotate run` first")
        self.manifest: dict = {}
        mpath = self.folder / MANIFEST
        if mpath.exists():
            try:
                self.manifest = json.loads(mpath.read_text())
            except (OSError, ValueError) as e:
                raise ExportError(f"cannot read {mpath}: {e}") from None
        version = self.manifest.get("schema_version", SCHEMA_VERSION)
        if not isinstance(version, int) or version > SCHEMA_VERSION:
            raise ExportError(
                f"{self.folder} was written with annotation schema {version}; this version reads up to "
                f"{SCHEMA_VERSION}: upgrade florence-annotate"
            )
        for part in self.parts:
            try:
                meta = pq.read_schema(part).metadata
            except Exception as e:  # corrupt footer, not parquet, ...
                raise ExportError(f"cannot read {part}: {e}") from None
            v = _schema_version(meta)
            if v > SCHEMA_VERSION:
                raise ExportError(
                    f"{part.name} was written with annotation schema {v}; this version reads up to "
                    f"{SCHEMA_VERSION}: upgrade florence-annotate"
                )
        roots = image_roots if image_roots else [Path(p) for p in self.manifest.get("inputs", [])]
        # a single-file input's root is its folder (its key is its file name)
        self.roots = [r.parent if r.is_file() else r for r in roots]
        # inputs whose keys carry a prefix in this folder (annotator/keys.py): `b/x.png` is b's x.png
        self.follow_symlinks = bool(self.manifest.get("follow_symlinks"))  # `annotate run --follow-symlinks`
        self.prefixed = [(s["prefix"], Path(s["root"])) for s in self.manifest.get("sources") or []
                         if s.get("prefix") and not image_roots]

    # --- lazy frames -------------------------------------------------------------------------
    def scan(self) -> pl.LazyFrame:
        """All rows, one per (image, task): an ok row wins over error rows for the same key. The
        whole folder in one sort: for small selections (preview); exporters read by range."""
        return read_rows(self.parts)

    @property
    def ranges(self) -> list[KeyRange]:
        if self._ranges is None:
            self._ranges = key_ranges(self.parts)
        return self._ranges

    def scan_ranges(self) -> Iterator[pl.LazyFrame]:
        """The deduplicated rows, one key range at a time, in key order."""
        for r in self.ranges:
            where = None
            if r.lo is not None:
                where = pl.col("image") >= r.lo
            if r.hi is not None:
                where = pl.col("image") < r.hi if where is None else where & (pl.col("image") < r.hi)
            yield read_rows(r.parts, where)

    def task_counts(self) -> dict[str, Counter]:
        """task -> Counter(status -> rows), after deduplication."""
        out: dict[str, Counter] = {}
        for lf in self.scan_ranges():
            for task, status, n in lf.select("image", "task", "status").group_by(["task", "status"]).len().collect().iter_rows():
                out.setdefault(task, Counter())[status] += n
        return out

    def ok_tasks(self) -> set[str]:
        return {t for t, c in self.task_counts().items() if c.get(OK)}

    def iter_image_keys(self, tasks: list[str] | None = None) -> Iterator[str]:
        """Sorted keys of images with an ok row (for `tasks`, or any task), range by range."""
        for lf in self.scan_ranges():
            lf = lf.filter(pl.col("status") == OK)
            if tasks is not None:
                lf = lf.filter(pl.col("task").is_in(tasks))
            yield from lf.select("image").unique().sort("image").collect()["image"].to_list()

    def image_keys(self, tasks: list[str] | None = None) -> list[str]:
        return list(self.iter_image_keys(tasks))

    def label_counts(self, tasks: list[str], column: str = "labels") -> Counter:
        """Raw label -> number of instances, over the ok rows of `tasks` (computed in polars)."""
        counts: Counter = Counter()
        for lf in self.scan_ranges():
            df = (
                lf.filter((pl.col("status") == OK) & pl.col("task").is_in(tasks))
                .select(pl.col(column).explode().alias("label"))
                .drop_nulls()
                .group_by("label")
                .len()
                .collect()
            )
            counts.update(dict(df.iter_rows()))
        return counts

    def images(self, tasks: list[str], batch_rows: int = 4096) -> Iterator[ImageRows]:
        """Ok rows of `tasks`, grouped by image, in key order (a key lies in one range only)."""
        for lf in self.scan_ranges():
            df = lf.filter((pl.col("status") == OK) & pl.col("task").is_in(tasks)).select(ROW_COLUMNS).collect()
            current: ImageRows | None = None
            for start in range(0, df.height, batch_rows):
                for d in df.slice(start, batch_rows).iter_rows(named=True):
                    row = Row(**d)
                    if current is None or current.key != row.image:
                        if current is not None:
                            yield current
                        current = ImageRows(row.image, row.width or 0, row.height or 0, {})
                    current.rows[row.task] = row
            if current is not None:
                yield current

    # --- image files --------------------------------------------------------------------------
    def find_image(self, key: str, dropped: Counter | None = None) -> Path | None:
        """The image file of a key: the first input root that holds it. Unsafe keys find nothing, nor
        do symlinks that leave their root unless the run followed such links (`annotate run` skips
        them by default: an export must not copy or link what the run refused). A miss is counted
        in `dropped` (an export's summary) when one is given."""
        outside = False
        if is_safe_key(key):  # strings, not Paths, until found: pathlib interns every name it parses
            candidates = [(root, os.path.join(root, key[len(prefix):])) for prefix, root in self.prefixed
                          if key.startswith(prefix)]
            candidates += [(root, os.path.join(root, key)) for root in self.roots]
            for root, p in candidates:
                if os.path.isfile(p):
                    if self.follow_symlinks or _inside(p, root):
                        return Path(p)
                    outside = True
        if dropped is not None:
            dropped["symlink out of its input folder (run with --follow-symlinks)" if outside
                    else "image file not found"] += 1
        return None


def _inside(path: Path, root: Path) -> bool:
    real, base = os.path.realpath(path), os.path.realpath(root)
    return real.startswith(base.rstrip(os.sep) + os.sep)
