"""What the CLI hands an exporter, and what the exporter hands back for the summary."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from exporters.classes import ClassSpec
from exporters.filtering import FilterCounts, ScoreFilter


@dataclass(frozen=True)
class ExportOptions:
    tasks: tuple[str, ...] = ()  # empty: the format's default tasks that the run holds
    classes: ClassSpec | None = None  # None: all labels seen, by frequency
    min_count: int = 1
    min_score: float | None = None
    score_filter: ScoreFilter | None = None  # None: the format's default policy over min_score (filtering.py)
    val_fraction: float = 0.1
    copy_images: bool = False
    segments: bool = False
    skip_empty: bool = False
    include_ocr: bool = False
    image_roots: tuple[Path, ...] = ()  # override the manifest's input roots
    # review formats (labelstudio, cvat)
    image_root: str | None = None  # labelstudio: prefix of data.image, e.g. /data/local-files/?d=photos/
    config_out: Path | None = None  # labelstudio: also write the labeling config here
    order: str = "key"  # key | score (lowest-confidence images first)


@dataclass
class ExportSummary:
    format: str
    out: Path
    tasks: list[str] = field(default_factory=list)
    images: int = 0
    instances: int = 0
    records: int = 0  # QA pairs / JSONL lines, for the text formats
    splits: Counter = field(default_factory=Counter)  # split -> images
    classes: list[str] = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)  # reason -> instances or rows dropped
    dropped_labels: Counter = field(default_factory=Counter)  # label -> instances dropped for it
    filter: FilterCounts | None = None  # what the --filter policy kept and dropped (training formats)

    def lines(self) -> list[str]:
        out = [f"{self.format}: wrote {self.out}"]
        what = f"{self.images} images"
        if self.instances:
            what += f", {self.instances} instances"
        if self.records:
            what += f", {self.records} records"
        if self.splits:
            what += " (" + ", ".join(f"{k} {v}" for k, v in sorted(self.splits.items())) + ")"
        out.append(f"  tasks: {', '.join(self.tasks) or '-'}; {what}")
        if self.classes:
            shown = ", ".join(self.classes[:20]) + (f", ... ({len(self.classes)} in all)" if len(self.classes) > 20 else "")
            out.append(f"  classes: {shown}")
        if self.filter is not None and self.filter.min_score is not None:
            out.append(self.filter.line())
        if self.dropped:
            out.append("  dropped: " + ", ".join(f"{reason} {n}" for reason, n in sorted(self.dropped.items())))
        if self.dropped_labels:
            top = ", ".join(f"{lab!r} {n}" for lab, n in self.dropped_labels.most_common(10))
            out.append(f"  most dropped labels: {top}")
        return out
