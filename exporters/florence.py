"""Florence-2 fine-tuning pairs: JSONL lines {"image", "prefix", "suffix"} (the format maestro reads:
<out>/train/annotations.jsonl and <out>/valid/annotations.jsonl with the images beside them).
prefix = task token (+ its input), suffix = the target in Florence-2's own output syntax with
coordinates re-quantized to <loc_0>..<loc_999>, so the processor's parser gives the boxes back
within one quantization bin."""

from __future__ import annotations

import json
import re
from collections import Counter

from annotator.model.sequence import loc_tokens
from annotator.tasks import TASKS, Input, Labels, Output
from exporters.base import Export, exportable
from exporters.classes import ClassVocab
from exporters.files import place_image
from exporters.filtering import image_filter
from exporters.geometry import clip_box, clip_polygon, prompt_input, span_label
from exporters.options import ExportOptions, ExportSummary
from exporters.read import Row, Run
from exporters.registry import register
from exporters.safety import OutDir

SPLIT_DIRS = {"train": "train", "val": "valid"}
_TAG = re.compile(r"<[^<>]*>")


def clean_text(s: str | None) -> str:
    """Label/answer text with any <tag> and stray angle brackets removed: they would break the
    parser's phrase regex ([^<]+) and could forge location tokens."""
    return _TAG.sub("", s or "").replace("<", "").replace(">", "").strip()


def _at(seq, i):
    return seq[i] if seq is not None and i < len(seq) else None


def florence_pairs(row: Row, drops: Counter, vocab: ClassVocab | None = None) -> list[tuple[str, str]]:
    """One row -> [(prefix, suffix)]. Pure; every dropped instance is counted in `drops`. Scores are
    not looked at here: the export's --filter (filtering.py) has already chosen the instances."""
    task = TASKS[row.task]
    w, h = float(row.width or 0), float(row.height or 0)
    token = task.token
    region_task = task.input == Input.REGION  # answers per source box, kept in bboxes + labels/polygons
    if task.output == Output.TEXT and not region_task:
        text = (row.text or "").strip()
        if not text:
            drops["empty target"] += 1
            return []
        return [(token, text)]
    if w <= 0 or h <= 0:
        drops["no image size"] += 1
        return []

    def label_of(i: int) -> str | None:
        label = span_label(_at(row.labels, i) or "", drops)
        if label is None:
            return None
        label = clean_text(label)
        if vocab is not None and task.labels is Labels.CATEGORY:  # --classes applies to category names
            idx = vocab.index(label)
            if idx is None:
                drops["label not in classes"] += 1
                return None
            label = vocab.names[idx]
        return label

    prefix = token + clean_text(prompt_input(row.task, row.prompt))
    if task.output is Output.QUADS:  # ocr_with_region
        return _quad_pairs(row, token, w, h, drops)
    if region_task:  # one training pair per source box
        return _region_pairs(row, task, w, h, label_of, drops)
    if row.polygons:  # referring_expression_segmentation, open_vocabulary_detection with masks
        return _polygon_pairs(row, task, prefix, w, h, label_of, drops)
    # boxes: od, dense_region_caption, region_proposal, caption_to_phrase_grounding, open_vocabulary_detection
    return _box_pairs(row, task, prefix, w, h, label_of, drops)


def _quad_pairs(row: Row, token: str, w: float, h: float, drops: Counter) -> list[tuple[str, str]]:
    """ocr_with_region: every line's text and quad in one target."""
    parts = []
    for i, quad in enumerate(row.quad_boxes or []):
        q = clip_polygon(quad, w, h) if quad is not None and len(quad) == 8 else None
        text = span_label(_at(row.labels, i) or "", drops)
        if text is None:
            continue
        text = clean_text(text)
        if q is None or len(q) != 8 or not text:
            drops["degenerate box" if text else "empty label"] += 1
            continue
        parts.append(text + loc_tokens(q, w, h))
    return [(token, "".join(parts))] if parts else _empty(drops)


def _region_pairs(row: Row, task, w: float, h: float, label_of, drops: Counter) -> list[tuple[str, str]]:
    """region_* tasks: one training pair per source box."""
    pairs: list[tuple[str, str]] = []
    for i, b in _kept_boxes(row, w, h, drops):
        region = task.token + loc_tokens(b, w, h)
        if task.output is Output.POLYGONS:  # region_to_segmentation
            polys = _clipped_polygons(_at(row.polygons, i), w, h)
            if not polys:
                drops["degenerate polygon"] += 1
                continue
            pairs.append((region, "<sep>".join(loc_tokens(p, w, h) for p in polys)))
        else:
            label = label_of(i)
            if not label:
                if label is not None:
                    drops["empty label"] += 1
                continue
            pairs.append((region, label + (loc_tokens(b, w, h) if task.answer_repeats_box else "")))
    return pairs


def _polygon_pairs(row: Row, task, prefix: str, w: float, h: float, label_of, drops: Counter) -> list[tuple[str, str]]:
    """referring_expression_segmentation, and open_vocabulary_detection answered with masks."""
    instances = []
    for i, inst in enumerate(row.polygons):
        polys = _clipped_polygons(inst, w, h)
        if not polys:
            drops["degenerate polygon"] += 1
            continue
        label = label_of(i) if task.labels is Labels.CATEGORY else ""  # open_vocabulary_detection
        if label is None:
            continue
        instances.append((label, "<sep>".join(loc_tokens(p, w, h) for p in polys)))
    if not instances:
        return _empty(drops)
    if task.labels is Labels.CATEGORY:  # open_vocabulary_detection: "<label><poly>...</poly>"
        return [(prefix, "".join(f"{lab}<poly>{locs}</poly>" for lab, locs in instances))]
    if len(instances) == 1:
        return [(prefix, instances[0][1])]
    return [(prefix, "".join(f"<poly>{locs}</poly>" for _, locs in instances))]


def _box_pairs(row: Row, task, prefix: str, w: float, h: float, label_of, drops: Counter) -> list[tuple[str, str]]:
    """Boxes and their labels in one target (region_proposal: boxes alone)."""
    parts = []
    for i, b in _kept_boxes(row, w, h, drops):
        label = "" if task.labels is Labels.NONE else label_of(i)  # region_proposal: boxes alone
        if label is None:
            continue
        if not label and task.labels is not Labels.NONE:
            drops["empty label"] += 1
            continue
        parts.append(label + loc_tokens(b, w, h))
    return [(prefix, "".join(parts))] if parts else _empty(drops)


def _kept_boxes(row, w: int, h: int, drops: Counter):
    """(index, clipped box) of the row's boxes that have an area."""
    for i, box in enumerate(row.bboxes or []):
        b = clip_box(box, w, h)
        if b is None:
            drops["degenerate box"] += 1
        else:
            yield i, b


def _clipped_polygons(instance, w: int, h: int) -> list:
    """An instance's polygons clipped to the image; the ones with no area left are dropped."""
    return [p for p in (clip_polygon(x, w, h) for x in (instance or [])) if p]


def _empty(drops: Counter) -> list:
    drops["empty target"] += 1
    return []


@register("florence")
def export_florence(run: Run, out: OutDir, opts: ExportOptions) -> ExportSummary:
    present = sorted(run.ok_tasks(), key=list(TASKS).index)
    ex = Export.start("florence", run, out, opts, tuple(present))
    summary, tasks = ex.summary, ex.tasks
    vocab = ClassVocab.from_spec(opts.classes) if opts.classes is not None else None
    if vocab:
        summary.classes = list(vocab.names)
    layout = ex.layout()

    def open_split(split: str):
        out.mkdir(SPLIT_DIRS[split])
        return open(out.path(SPLIT_DIRS[split], "annotations.jsonl"), "w", encoding="utf-8")

    per_split: Counter = Counter()
    flt = image_filter(opts, summary)
    with ex:
        files = ex.open_splits(SPLIT_DIRS, open_split)
        for img in exportable(run.images(tasks), summary, layout.holds):
            img = flt.apply(img, tasks)
            if img is None:  # the --filter policy left the image out
                continue
            pairs = [p for t in tasks if t in img.rows
                     for p in florence_pairs(img.rows[t], summary.dropped, vocab)]
            if not pairs:
                continue
            src = run.find_image(img.key, summary.dropped)
            if src is None:
                continue
            split, name = layout.split(img.key), layout.name(img.key)
            place_image(src, out.path(SPLIT_DIRS[split], name), opts.copy_images)
            for prefix, suffix in pairs:
                files[split].write(json.dumps({"image": name, "prefix": prefix, "suffix": suffix}, ensure_ascii=False) + "\n")
            per_split[SPLIT_DIRS[split]] += 1
            summary.records += len(pairs)
    return ex.finish(per_split)
