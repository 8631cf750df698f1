"""`annotate info`: what a run folder holds, and whether it is complete.

Reads the part files lazily with polars (a folder may hold hundreds of millions of rows);
completeness re-discovers the manifest's inputs and anti-joins every image x task with the
rows present."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import polars as pl

from annotator.outdir.keys import folder_keys
from annotator.inputs.sources import SourceError, discover
from annotator.outdir.table import ERROR, MANIFEST, OK, Manifest, part_files, scan_parts
from annotator.tasks import TASKS


class InfoError(ValueError):
    """The folder is not an annotations folder."""


@dataclass
class Completeness:
    expected: int  # images discovered now x tasks in the manifest
    missing: int  # of those, pairs without any row
    examples: list[str]  # a few missing pairs, "image task"
    stale: int  # rows of images no longer found under the inputs


@dataclass
class RunInfo:
    folder: str
    parts: int
    rows: int
    images: int
    by_task: dict[str, dict[str, int]]  # task -> status -> rows
    top_errors: list[tuple[str, int]]  # message (paths elided) -> rows
    labels: dict[str, list[tuple[str, int]]]  # detection task -> most common labels
    duplicates: int  # (image, task) keys with more than one row
    temp_files: int  # hidden .tmp files a killed run left behind
    scores: dict[str, dict] = field(default_factory=dict)  # task -> score quantiles and per-label medians
    model: str | None = None
    tasks: list[str] = field(default_factory=list)
    started: str | None = None
    finished: str | None = None  # None: the last run was interrupted or is still going
    completeness: Completeness | None = None
    not_checked: str | None = None  # why completeness is unknown
    decoding: str | None = None  # the last run's decode path: "scheduler" or "generate: <why>"

    @property
    def errors(self) -> int:
        return sum(s.get(ERROR, 0) for s in self.by_task.values())

    @property
    def complete(self) -> bool | None:
        return None if self.completeness is None else self.completeness.missing == 0

    def to_dict(self) -> dict:
        return {**asdict(self), "errors": self.errors, "complete": self.complete}

    def lines(self) -> list[str]:
        out = [f"{self.folder}: {self.parts} parts, {self.rows} rows, {self.images} images"]
        if self.model:
            state = f"finished {self.finished}" if self.finished else "did not finish (interrupted, or still running)"
            out.append(f"model: {self.model}  tasks: {', '.join(self.tasks)}  last run: {state}")
        if self.decoding:
            out.append(f"decoding: {self.decoding}")
        out.append("rows by task:")
        width = max((len(t) for t in self.by_task), default=0)
        for task, counts in sorted(self.by_task.items()):
            out.append(f"  {task:<{width}}  ok {counts.get(OK, 0)}  error {counts.get(ERROR, 0)}")
        if self.top_errors:
            out.append("most common errors:")
            out.extend(f"  {n:>6}  {message}" for message, n in self.top_errors)
        for task, labels in sorted(self.labels.items()):
            out.append(f"labels ({task}): " + (", ".join(f"{label} {n}" for label, n in labels) or "none"))
        for task, st in sorted(self.scores.items()):
            q = "  ".join(f"{k} {st[k]:.2f}" for k in ("min", "p25", "median", "p75", "max"))
            by_label = ", ".join(f"{label} {med:.2f} ({n})" for label, med, n in st["labels"])
            out.append(f"scores ({task}): n {st['n']}  {q}" + (f"; median by label: {by_label}" if by_label else ""))
        c = self.completeness
        if c is None:
            out.append(f"complete: unknown ({self.not_checked})")
        elif c.missing == 0:
            out.append(f"complete: yes, all {c.expected} image x task rows are present")
        else:
            out.append(f"complete: no, {c.missing} of {c.expected} image x task rows missing "
                       f"(e.g. {'; '.join(c.examples)}); run the same command again to finish")
        if c is not None and c.stale:
            out.append(f"{c.stale} rows are of images no longer found under the inputs")
        if self.errors:
            out.append(f"{self.errors} rows failed; `annotate run ... --retry-errors` redoes them")
        if self.duplicates:
            out.append(f"warning: {self.duplicates} (image, task) keys have more than one row")
        if self.temp_files:
            out.append(f"{self.temp_files} .tmp files left by killed runs are safe to delete")
        return out


def _counts(df: pl.DataFrame, *keys: str) -> list[tuple]:
    return [tuple(r) for r in df.select(*keys, "len").iter_rows()]


def _score_stats(lf: pl.LazyFrame, top: int) -> dict[str, dict]:
    """Per task: quantiles of instance scores (or text_score for text tasks), and the median
    score of its most common labels: where the doubtful pseudo-labels are."""
    names = lf.collect_schema().names()
    if "scores" not in names:
        return {}
    ok = lf.filter(pl.col("status") == OK)
    inst = (ok.filter(pl.col("scores").is_not_null() & (pl.col("scores").list.len() == pl.col("labels").list.len()))
            .select("task", "labels", pl.col("scores").cast(pl.List(pl.Float64))).explode("labels", "scores"))
    if "text_score" in names:
        text = ok.filter(pl.col("text_score").is_not_null()).select(
            "task", pl.lit(None, pl.String).alias("labels"), pl.col("text_score").cast(pl.Float64).alias("scores"))
        inst = pl.concat([inst, text])
    inst = inst.drop_nulls("scores")
    col = pl.col("scores")
    overall = inst.group_by("task").agg(
        pl.len().alias("n"), col.min().alias("min"), col.quantile(0.25).alias("p25"), col.median().alias("median"),
        col.quantile(0.75).alias("p75"), col.max().alias("max")).collect()
    per_label = (inst.drop_nulls("labels").group_by("task", "labels")
                 .agg(col.median().alias("median"), pl.len().alias("n"))
                 .sort(["task", "n", "labels"], descending=[False, True, False]).collect())
    out = {row["task"]: {**{k: row[k] for k in ("n", "min", "p25", "median", "p75", "max")}, "labels": []}
           for row in overall.iter_rows(named=True)}
    for task, label, median, n in per_label.select("task", "labels", "median", "n").iter_rows():
        if len(out[task]["labels"]) < top:
            out[task]["labels"].append((label, median, n))
    return out


def summarize(folder: Path, top: int = 10, check_complete: bool = True) -> RunInfo:
    folder = Path(folder)
    parts = part_files(folder)
    manifest = Manifest.load(folder)
    if not parts and manifest is None:
        raise InfoError(f"{folder} holds no part files and no {MANIFEST}: not an annotations folder")
    # Columns listed explicitly so an empty folder still has a schema.
    lf = scan_parts(parts) if parts else pl.LazyFrame(
        schema={"image": pl.String, "task": pl.String, "status": pl.String, "error": pl.String,
                "labels": pl.List(pl.String)})
    keys = lf.group_by("image", "task").len().collect()
    by_task: dict[str, dict[str, int]] = {}
    for task, status, n in _counts(lf.group_by("task", "status").len().collect(), "task", "status"):
        by_task.setdefault(task, {})[status] = n
    # Errors quote file paths; elide them so one cause is one line.
    errors = (lf.filter(pl.col("status") != OK)
              .select(pl.col("error").fill_null("(no message)").str.replace_all(r"'[^']*/[^']*'", "<path>"))
              .group_by("error").len().sort(["len", "error"], descending=[True, False]).head(top).collect())
    detection = [t for t in by_task if t in TASKS and TASKS[t].is_detection]
    labels: dict[str, list[tuple[str, int]]] = {t: [] for t in detection}
    if detection:
        hist = (lf.filter(pl.col("task").is_in(detection) & (pl.col("status") == OK))
                .select("task", "labels").explode("labels").drop_nulls("labels")
                .group_by("task", "labels").len()
                .sort(["task", "len", "labels"], descending=[False, True, False]).collect())
        for task, label, n in _counts(hist, "task", "labels"):
            if len(labels[task]) < top:
                labels[task].append((label, n))
    info = RunInfo(
        folder=str(folder), parts=len(parts), rows=int(keys["len"].sum() or 0), images=keys["image"].n_unique(),
        by_task=by_task, top_errors=_counts(errors, "error"), labels=labels, scores=_score_stats(lf, top),
        duplicates=keys.filter(pl.col("len") > 1).height, temp_files=len(list(folder.glob(".tmp-*"))),
    )
    if manifest is None:
        info.not_checked = f"no {MANIFEST}"
        return info
    info.model, info.tasks = manifest.identity.get("model"), manifest.tasks
    info.started, info.finished = manifest.started, manifest.finished
    info.decoding = manifest.runtime.get("decoding")
    if check_complete:
        try:
            found = discover(manifest.inputs, input_lists=manifest.input_lists, path_column=manifest.path_column)
        except (SourceError, OSError) as exc:
            info.not_checked = f"cannot re-discover the inputs: {exc}"
            return info
        info.completeness = _completeness(folder_keys(found, manifest), manifest.tasks, keys.select("image", "task"))
    else:
        info.not_checked = "not checked"
    return info


def _completeness(images: list[str], tasks: list[str], present: pl.DataFrame) -> Completeness:
    found = pl.DataFrame({"image": images}, schema={"image": pl.String})
    expected = found.join(pl.DataFrame({"task": tasks}, schema={"task": pl.String}), how="cross")
    missing = expected.join(present, on=["image", "task"], how="anti")
    stale = present.join(found, on="image", how="anti").height
    examples = [f"{i} {t}" for i, t in missing.head(3).iter_rows()]
    return Completeness(expected=expected.height, missing=missing.height, examples=examples, stale=stale)
