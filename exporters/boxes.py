"""What the box formats (coco, yolo) share: which tasks feed them, the class vocabulary, and the
stream of (image, [(class id, instance)]) with every dropped instance counted."""

from __future__ import annotations

from collections import Counter
from typing import Iterator

from annotator.tasks import BOX_EXPORT_DEFAULTS
from exporters.base import OCR_TASK
from exporters.classes import ClassSpec, ClassVocab, normalize_label
from exporters.filtering import ImageFilter, image_filter, resolve
from exporters.geometry import Instance, row_instances
from exporters.options import ExportOptions, ExportSummary
from exporters.read import ImageRows, Run

# detection-like tasks used when --task is not given (Task.box_export); OCR regions only with --include-ocr
DETECTION_DEFAULTS = BOX_EXPORT_DEFAULTS
TEXT_CLASS = "text"


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
        flt = ImageFilter(resolve(opts.score_filter, summary.format, opts.min_score))  # counts thrown away
        for img in run.images(tasks):
            img = flt.apply(img, tasks)
            for row in (img.rows.values() if img is not None else ()):
                for inst in row_instances(row, scratch):
                    counts[inst.label] += 1
        vocab, _ = ClassVocab.from_counts(counts, opts.min_count)
    summary.classes = list(vocab.names)
    return vocab


def labelled(run: Run, tasks: list[str], vocab: ClassVocab, opts: ExportOptions,
             summary: ExportSummary) -> Iterator[tuple[ImageRows, list[tuple[int, Instance]]]]:
    """Each image with its kept instances and their class ids; drops counted in `summary`. An image
    the --filter policy drops is not yielded at all: it is neither trained on nor a negative."""
    flt = image_filter(opts, summary)
    for img in run.images(tasks):
        img = flt.apply(img, tasks)
        if img is None:
            continue
        kept: list[tuple[int, Instance]] = []
        for task in tasks:
            row = img.rows.get(task)
            if row is None:
                continue
            for inst in row_instances(row, summary.dropped):
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
