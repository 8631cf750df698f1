"""Records written in key order, read back lowest score first, in memory that does not grow with
their number: an external merge sort for `--order score`.

Each record's bytes go to a scratch file as they come; only its sort key (no score last, score, then
arrival, which is key order) and where its bytes lie are kept, 33 bytes a record, sorted and
written out in runs of `RUN_ROWS`. Reading merges the runs (heapq.merge, one block of each in
memory) and fetches each record's bytes by offset. A folder that fits one run never touches disk
for its keys."""

from __future__ import annotations

import heapq
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

RUN_ROWS = 1 << 18  # sort keys held at once: 8.6 MB
READ_ROWS = 1 << 10  # keys read at once from each run while merging (as tuples: about 0.2 MB a run)
FAN_IN = 64  # runs merged at once; more are first merged into longer runs, so the merge's memory is bounded
KEY = np.dtype([("missing", "u1"), ("score", "f8"), ("seq", "i8"), ("offset", "i8"), ("size", "i8")])
ORDER = ("missing", "score", "seq")


class ScoreSort:
    """add(score, record) in any order, then iterate: the records lowest score first (None last),
    ties in the order they were added. Its scratch files live in `folder` until close()."""

    def __init__(self, folder: Path, stem: str = ".order", run_rows: int | None = None):
        self._folder, self._stem = Path(folder), stem
        self._data = open(self._folder / f"{stem}.data", "w+b")
        self._keys = np.zeros(run_rows or RUN_ROWS, KEY)
        self._pending = 0  # keys in self._keys not yet in a run file
        self._seq = 0
        self._runs: list[Path] = []
        self._made = 0  # run files made, for their names

    def add(self, score: float | None, record: bytes) -> None:
        if self._pending == len(self._keys):
            self._spill()
        offset = self._data.tell()
        self._data.write(record)
        self._keys[self._pending] = (score is None, 0.0 if score is None else score, self._seq, offset, len(record))
        self._pending += 1
        self._seq += 1

    def _spill(self) -> None:
        path = self._run_path()
        np.sort(self._keys[:self._pending], order=ORDER).tofile(path)
        self._runs.append(path)
        self._pending = 0

    def __iter__(self) -> Iterator[bytes]:
        if self._runs:
            self._spill()
            while len(self._runs) > FAN_IN:
                self._merge_runs()
            keys = heapq.merge(*(_read_run(p) for p in self._runs))
        else:  # one run: sorted in memory
            keys = (tuple(k) for k in np.sort(self._keys[:self._pending], order=ORDER).tolist())
        self._data.flush()
        for _, _, _, offset, size in keys:
            self._data.seek(offset)
            yield self._data.read(size)

    def _run_path(self) -> Path:
        self._made += 1
        return self._folder / f"{self._stem}.run{self._made}"

    def _merge_runs(self) -> None:
        """The first FAN_IN runs -> one longer run at the end of the list."""
        first, self._runs = self._runs[:FAN_IN], self._runs[FAN_IN:]
        path = self._run_path()
        with open(path, "wb") as fh:
            block: list[tuple] = []
            for key in heapq.merge(*(_read_run(p) for p in first)):
                block.append(key)
                if len(block) == READ_ROWS:
                    np.array(block, KEY).tofile(fh)
                    block.clear()
            np.array(block, KEY).tofile(fh)
        for p in first:
            p.unlink()
        self._runs.append(path)

    def close(self) -> None:
        self._data.close()
        for path in [self._folder / f"{self._stem}.data", *self._runs]:
            path.unlink(missing_ok=True)

    def __enter__(self) -> "ScoreSort":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _read_run(path: Path) -> Iterator[tuple]:
    """A run's keys, one block at a time (read, not mapped: mapped pages would stay in the RSS)."""
    with open(path, "rb") as fh:
        while len(block := np.fromfile(fh, KEY, count=READ_ROWS)):
            yield from block.tolist()


def by_score(records: Iterable[tuple[float | None, bytes]], folder: Path) -> Iterator[bytes]:
    """(score, record) pairs in key order -> the records lowest score first, keys breaking ties."""
    with ScoreSort(folder) as order:
        for score, record in records:
            order.add(score, record)
        yield from order
