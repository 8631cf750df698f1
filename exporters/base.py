"""What every export format shares, so a format module only turns rows into its records.

As datatrove's DiskWriter owns file naming and rotation for its subclasses, `Export` owns the
steps every format opens with (choose the tasks, count the error rows, fill the summary), the
image layout (safe keys, train/val split, flat file names) and the per-split output handles."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

from annotator.tasks import TASKS, Output, UnknownTask, get_task
from exporters.errors import ExportError
from exporters.files import FlatNames, SplitRule
from exporters.options import ExportOptions, ExportSummary
from exporters.read import Run
from exporters.safety import OutDir, is_safe_key

OCR_TASK = next(t.name for t in TASKS.values() if t.output is Output.QUADS)  # ocr_with_region: --include-ocr


def choose_tasks(run: Run, opts: ExportOptions, defaults: tuple[str, ...], fmt: str) -> list[str]:
    """--task if given (each must have ok rows), else the defaults the run holds."""
    counts = run.task_counts()
    present = {t for t, c in counts.items() if c.get("ok")}
    held = ", ".join(f"{t} ({sum(c.values())} rows, {c.get('ok', 0)} ok)" for t, c in sorted(counts.items()))
    if opts.tasks:
        tasks = []
        for spec in opts.tasks:
            try:
                name = get_task(spec).name
            except UnknownTask as e:
                raise ExportError(str(e)) from None
            if name not in present:
                raise ExportError(f"no ok rows for task {name!r} in {run.folder}; it holds: {held or 'nothing'}")
            if name not in tasks:
                tasks.append(name)
        return tasks
    tasks = [t for t in defaults if t in present]
    if opts.include_ocr and OCR_TASK in present and OCR_TASK not in tasks:
        tasks.append(OCR_TASK)
    if not tasks:
        raise ExportError(
            f"no rows for the tasks {fmt} exports by default ({', '.join(defaults)}) in {run.folder}; "
            f"it holds: {held or 'nothing'}; pick with --task"
        )
    return tasks


def exportable(items: Iterable, summary: ExportSummary, safe: Callable[[str], bool],
               empty: Callable | None = None) -> Iterator:
    """The record preamble of every format, in one place: an image whose key could escape the output
    folder (`safe` is False: not among the layout's names) is dropped and counted, and with
    --skip-empty (`empty` given) so is one with nothing to write. `items`: images, or (image, kept
    instances) pairs (`labelled`); they pass through as they came."""
    for item in items:
        img = item[0] if isinstance(item, tuple) else item
        if not safe(img.key):
            summary.dropped["unsafe image key"] += 1
        elif empty is not None and empty(item):
            summary.dropped["empty images skipped"] += 1
        else:
            yield item


def no_instances(item: tuple) -> bool:
    """An (image, kept instances) pair with nothing to write (--skip-empty)."""
    return not item[1]


def count_errors(run: Run, tasks: list[str], summary: ExportSummary) -> None:
    n = sum(c.get("error", 0) for t, c in run.task_counts().items() if t in tasks)
    if n:
        summary.dropped["error rows"] += n


@dataclass
class Layout:
    """Where each image goes: its split ('train' | 'val', by key hash) and its flat file name, as
    rules rather than tables of every key (memory does not grow with the folder). Keys that could
    escape the output folder have neither (`holds` is False: the caller counts them dropped)."""

    splits: SplitRule
    names: FlatNames

    @classmethod
    def of(cls, keys: Callable[[], Iterable[str]], val_fraction: float) -> "Layout":
        """`keys`: gives the keys in sorted order, once per pass (two passes)."""
        return cls(cls.split_rule(keys(), val_fraction), FlatNames.of(filter(is_safe_key, keys())))

    @staticmethod
    def split_rule(keys: Iterable[str], val_fraction: float) -> SplitRule:
        """The split over the keys an export can hold (the review formats need it without the names)."""
        return SplitRule.of(filter(is_safe_key, keys), val_fraction)

    @staticmethod
    def holds(key: str) -> bool:
        return is_safe_key(key)

    def split(self, key: str) -> str:
        return self.splits.split(key)

    def name(self, key: str) -> str:
        return self.names.name(key)


class KeyRanks:
    """1-based rank of a key in a sorted stream of keys, for keys asked in increasing order: the
    stream is read once, alongside the export, instead of held as a dict of every key."""

    def __init__(self, keys: Iterable[str]):
        self._keys = iter(keys)
        self._rank = 0
        self._key: str | None = None

    def rank(self, key: str) -> int:
        while self._key is None or self._key < key:
            nxt = next(self._keys, None)
            if nxt is None:
                raise ValueError(f"image {key!r} is not among the run's keys")
            self._key, self._rank = nxt, self._rank + 1
        if self._key != key:
            raise ValueError(f"image {key!r} is not among the run's keys")
        return self._rank


@dataclass
class Export:
    """One export in progress: what it reads, where it writes, and the summary it fills."""

    run: Run
    out: OutDir
    opts: ExportOptions
    tasks: list[str]
    summary: ExportSummary
    _handles: dict = field(default_factory=dict)

    @classmethod
    def start(cls, fmt: str, run: Run, out: OutDir, opts: ExportOptions, defaults: tuple[str, ...]) -> "Export":
        summary = ExportSummary(fmt, out.root)
        tasks = choose_tasks(run, opts, defaults, fmt)
        summary.tasks = tasks
        count_errors(run, tasks, summary)
        return cls(run, out, opts, tasks, summary)

    def layout(self) -> Layout:
        """The layout of every image with an ok row of the export's tasks."""
        return Layout.of(lambda: self.run.iter_image_keys(self.tasks), self.opts.val_fraction)

    # --- per-split output handles -------------------------------------------------------------
    def open_splits(self, splits, opener: Callable[[str], object]) -> dict:
        """One handle per split (a file, a Parquet writer), closed by `close` however the export ends."""
        for split in splits:
            self._handles[split] = opener(split)
        return self._handles

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()

    def __enter__(self) -> "Export":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def finish(self, per_split) -> ExportSummary:
        """Images written per split -> the summary's image count and split table."""
        self.summary.images = sum(per_split.values())
        self.summary.splits = per_split
        return self.summary
