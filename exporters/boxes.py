"""What the box formats (coco, yolo) share: which tasks feed them, the class vocabulary, and the
stream of (image, [(class id, instance)]) with every dropped instance counted."""

from __future__ import annotations

from collections import Counter
from typing import Iterator

from annotator.tasks import BOX_EXPORT_DEFAULTS, TASKS, Output, UnknownTask, get_task
from exporters.classes import ClassSpec, ClassVocab, normalize_label
from exporters.errors import ExportError
from exporters.geometry import Instance, row_instances
from exporters.options import ExportOptions, ExportSummary
from exporters.read import ImageRows, Run

# detection-like tasks used when --task is not given (Task.box_export); OCR regions only with --include-ocr
DETECTION_DEFAULTS = BOX_EXPORT_DEFAULTS
OCR_TASK = next(t.name for t in TASKS.values() if t.output is Output.QUADS)  # ocr_with_region
TEXT_CLASS = "text"


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


def count_errors(run: Run, tasks: list[str], summary: ExportSummary) -> None:
    n = sum(c.get("error", 0) for t, c in run.task_counts().items() if t in tasks)
    if n:
        summary.dropped["error rows"] += n


def build_vocab(run: Run, tasks: list[str], opts: ExportOptions, summary: ExportSummary) -> ClassVocab:
    """From --classes/--classes-file, or from the labels seen (a first pass over the same
    instances the export will write, so the counts match exactly)."""
    if opts.classes is not None:
        spec = opts.classes
        if OCR_TASK in tasks and ClassVocab.from_spec(spec).index(TEXT_CLASS) is None:
            spec = ClassSpec(spec.entries + ((TEXT_CLASS, ()),))
        vocab = ClassVocab.from_spec(spec)
    else:
        counts: Counter = Counter()
        scratch: Counter = Counter()
        for img in run.images(tasks):
            for row in img.rows.values():
                for inst in row_instances(row, scratch, opts.min_score):
                    counts[inst.label] += 1
        vocab, _ = ClassVocab.from_counts(counts, opts.min_count)
    summary.classes = list(vocab.names)
    return vocab


def labelled(run: Run, tasks: list[str], vocab: ClassVocab, opts: ExportOptions,
             summary: ExportSummary) -> Iterator[tuple[ImageRows, list[tuple[int, Instance]]]]:
    """Each image with its kept instances and their class ids; drops counted in `summary`."""
    for img in run.images(tasks):
        kept: list[tuple[int, Instance]] = []
        for task in tasks:
            row = img.rows.get(task)
            if row is None:
                continue
            for inst in row_instances(row, summary.dropped, opts.min_score):
                idx = vocab.index(inst.label)
                if idx is None:
                    reason = "label below --min-count" if normalize_label(inst.label) in vocab.rare else "label not in classes"
                    summary.dropped[reason] += 1
                    summary.dropped_labels[inst.label] += 1
                    continue
                kept.append((idx, inst))
        yield img, replace_boxes_by_masks(kept, summary.dropped)


def _box_key(idx: int, box) -> tuple:
    return (idx, *(round(v, 1) for v in box))


def replace_boxes_by_masks(kept: list[tuple[int, Instance]], drops: Counter) -> list[tuple[int, Instance]]:
    """A region_to_segmentation mask is the same object as the detection box it was asked for: when
    both are exported, keep the mask and drop the box (same class, same box), or every object
    would be labelled twice."""
    masked = {_box_key(i, inst.source_box) for i, inst in kept if inst.source_box is not None}
    if not masked:
        return kept
    out = []
    for i, inst in kept:
        if inst.source_box is None and not inst.polygons and _box_key(i, inst.bbox) in masked:
            drops["box replaced by its mask"] += 1
            continue
        out.append((i, inst))
    return out
