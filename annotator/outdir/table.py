"""The annotation table: its schema (the only place columns are defined), the atomic part
writer, which (image, task) pairs a folder already holds, and the run manifest."""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

import pyarrow as pa
import pyarrow.compute as pc  # not loaded by `import pyarrow` alone
import pyarrow.parquet as pq

SCHEMA_VERSION = 2  # 2: `source` column and manifest `sources` (keys.py)
MANIFEST = "manifest.json"
PART_GLOB = "part-*.parquet"

_box = pa.list_(pa.float32())
SCHEMA = pa.schema(
    [
        pa.field("image", pa.string(), nullable=False),
        pa.field("source", pa.string()),  # id of the input the image came from (manifest `sources`)
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("task", pa.string(), nullable=False),
        pa.field("prompt", pa.string()),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
        pa.field("raw", pa.string()),
        pa.field("text", pa.string()),
        pa.field("bboxes", pa.list_(_box)),
        pa.field("labels", pa.list_(pa.string())),
        pa.field("polygons", pa.list_(pa.list_(_box))),
        pa.field("quad_boxes", pa.list_(_box)),
        pa.field("scores", pa.list_(pa.float32())),
        pa.field("text_score", pa.float32()),
        pa.field("truncated", pa.bool_()),
        # Added with tiling (answers/tile_merge.py): tiles merged into the row, 0 = whole image only. Parts
        # written before it lack the column; scan_parts reads it there as null. No SCHEMA_VERSION
        # bump (nor for text_score): the version makes older readers refuse a folder, for changes
        # they would misread (2: keys carry a source); an added column misleads no reader.
        pa.field("tiles", pa.int16()),
    ],
    metadata={"florence_annotate_schema": str(SCHEMA_VERSION)},
)

OK, ERROR = "ok", "error"


@dataclass
class Annotation:
    """One row of the table: one image x one task. The one row type: the engine makes them, the
    writer stores them, the exporters read them back (read_rows)."""

    image: str
    task: str
    status: str = OK
    width: int | None = None
    height: int | None = None
    prompt: str | None = None
    error: str | None = None
    raw: str | None = None
    text: str | None = None
    bboxes: list[list[float]] | None = None
    labels: list[str] | None = None
    polygons: list[list[list[float]]] | None = None
    quad_boxes: list[list[float]] | None = None
    scores: list[float] | None = None
    text_score: float | None = None
    truncated: bool = False
    tiles: int = 0
    source: str | None = None

    @classmethod
    def failed(cls, image: str, task: str, error: str, width=None, height=None, prompt=None) -> "Annotation":
        return cls(image=image, task=task, status=ERROR, error=error, width=width, height=height, prompt=prompt)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_table_atomic(table: pa.Table, dest: Path) -> None:
    """Write to a hidden temp file, fsync, then rename: readers never see a half file."""
    tmp = dest.with_name(f".tmp-{uuid.uuid4().hex}-{dest.name}")
    try:
        with open(tmp, "wb") as fh:
            pq.write_table(table, fh, compression="zstd")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(dest.parent)


def rows_to_table(rows: Iterable[Annotation]) -> pa.Table:
    return pa.Table.from_pylist([asdict(r) for r in rows], schema=SCHEMA)


class PartWriter:
    """Buffers rows and flushes them as numbered part files every `every_rows` rows or
    `every_seconds` seconds. The rank is in every file name so several workers can share
    one folder; a random suffix keeps re-runs from ever reusing a name."""

    def __init__(self, out_dir: Path, rank: int = 0, every_rows: int = 1000, every_seconds: float = 60.0):
        self.out_dir = Path(out_dir)
        self.rank = rank
        self.every_rows = every_rows
        self.every_seconds = every_seconds
        self._rows: list[Annotation] = []
        self._last_flush = time.monotonic()
        self._seq = 0
        self._run_id = uuid.uuid4().hex[:8]
        self.parts_written = 0
        self.rows_written = 0

    def add(self, rows: Iterable[Annotation]) -> None:
        self._rows.extend(rows)
        due = time.monotonic() - self._last_flush >= self.every_seconds
        if len(self._rows) >= self.every_rows or (due and self._rows):
            self.flush()

    def flush(self) -> None:
        self._last_flush = time.monotonic()
        if not self._rows:
            return
        dest = self.out_dir / f"part-r{self.rank:04d}-{self._run_id}-{self._seq:06d}.parquet"
        # Take the rows out of the buffer before writing: a Ctrl-C that lands after the rename
        # must not leave them buffered for the `finally: flush()` to write a second time.
        rows, self._rows = self._rows, []
        try:
            write_table_atomic(rows_to_table(rows), dest)
        except BaseException:
            if not dest.exists():  # not written (names are never reused): keep them for the next flush
                self._rows = rows + self._rows
            raise
        self._seq += 1
        self.parts_written += 1
        self.rows_written += len(rows)


def part_files(out_dir: Path) -> list[Path]:
    return sorted(Path(out_dir).glob(PART_GLOB))


def scan_parts(parts: list[Path]):
    """All parts as one polars LazyFrame with today's columns: parts written before a column was
    added (e.g. `tiles`) read it as null instead of failing the scan."""
    import polars as pl  # lazily: the run path does not need it

    schema = pl.from_arrow(SCHEMA.empty_table()).schema
    return pl.scan_parquet([str(p) for p in parts], schema=schema, missing_columns="insert", extra_columns="ignore")


def conform(table: pa.Table) -> pa.Table:
    """A part's table in today's schema: columns it predates are added as nulls."""
    for f in SCHEMA:
        if f.name not in table.column_names:
            table = table.append_column(f, pa.nulls(table.num_rows, f.type))
    return table.select(SCHEMA.names).cast(SCHEMA)


def read_rows(parts: list[Path], where=None):
    """The table as readers see it: one row per (image, task), sorted by key; an ok row wins
    over error rows for the same key (a retried error can leave both). A polars LazyFrame.
    `where` (a polars expression on `image`) narrows the rows before the sort: exporters read a
    large folder one key range at a time, so the sort never holds the whole table."""
    import polars as pl

    scan = scan_parts(parts)  # old parts without later columns read them as null
    return (
        (scan if where is None else scan.filter(where))
        .with_columns((pl.col("status") != OK).alias("_not_ok"))
        .sort(["image", "task", "_not_ok"])
        .unique(subset=["image", "task"], keep="first", maintain_order=True)
        .drop("_not_ok")
    )


def read_status(out_dir: Path) -> dict[tuple[str, str], str]:
    """(image, task) -> status for every row already written in the folder."""
    parts = part_files(out_dir)
    if not parts:
        return {}
    df = read_rows(parts).select("image", "task", "status").collect()
    return {(image, task): status for image, task, status in df.iter_rows()}


def drop_error_rows(out_dir: Path, keys: set[tuple[str, str]] | None = None) -> int:
    """For --retry-errors: rewrite each part without its error rows (atomically), so the
    retried rows replace them instead of sitting next to them. Only rows whose (image, task)
    is in `keys` are dropped (all when None): errors of tasks or images this run will not
    redo stay. Returns rows dropped."""
    dropped = 0
    for part in part_files(out_dir):
        t = pq.read_table(part)
        if not t.num_rows:
            continue
        is_error = pc.not_equal(t.column("status"), OK)
        if keys is not None:
            pairs = zip(t.column("image").to_pylist(), t.column("task").to_pylist())
            is_error = pc.and_(is_error, pa.array([p in keys for p in pairs], pa.bool_()))
        n_err = pc.sum(is_error).as_py() or 0
        if not n_err:
            continue
        dropped += n_err
        kept = t.filter(pc.invert(is_error))
        if kept.num_rows:
            write_table_atomic(conform(kept), part)
        else:
            part.unlink()
    return dropped


@dataclass
class Manifest:
    """What produced the folder. `identity` is what must match for a resume to be sound."""

    identity: dict
    package_version: str
    inputs: list[str]
    tasks: list[str]
    started: str
    finished: str | None = None
    counts: dict = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    sources: list = field(default_factory=list)  # keys.Source as dicts: id, root, prefix, legacy
    runtime: dict = field(default_factory=dict)  # dtype and attention actually used (not "auto")
    input_lists: list[str] = field(default_factory=list)  # --input-list files (sources.read_list)
    path_column: str | None = None
    follow_symlinks: bool = False  # some run into the folder followed links out of its inputs (exports may too)

    def save(self, out_dir: Path) -> None:
        dest = Path(out_dir) / MANIFEST
        tmp = dest.with_name(f".tmp-{uuid.uuid4().hex}-{MANIFEST}")
        tmp.write_text(json.dumps(asdict(self), indent=2, sort_keys=True))
        os.replace(tmp, dest)

    @classmethod
    def load(cls, out_dir: Path) -> "Manifest | None":
        path = Path(out_dir) / MANIFEST
        if not path.exists():
            return None
        data = json.loads(path.read_text())
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)
