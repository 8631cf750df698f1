"""Small pure geometry converters shared by the formats: clip boxes and polygons to the image,
drop degenerate ones, turn table rows into instances. Florence-2's location quantization lives in
annotator/sequence.py (the engine writes region prompts with it)."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

from annotator.answers.parse import repair_label
from annotator.tasks import TASKS, Input, Labels, Output


def clip_box(box, width: float, height: float) -> tuple[float, float, float, float] | None:
    """xyxy box clipped to the image; None when it has no area left (or is malformed)."""
    if box is None or len(box) != 4 or any(v is None or not math.isfinite(v) for v in box):
        return None
    x1, y1, x2, y2 = (float(v) for v in box)
    x1, x2 = sorted((x1, x2))
    y1, y2 = sorted((y1, y2))
    x1, x2 = min(max(x1, 0.0), width), min(max(x2, 0.0), width)
    y1, y2 = min(max(y1, 0.0), height), min(max(y2, 0.0), height)
    if x2 - x1 <= 0 or y2 - y1 <= 0:
        return None
    return (x1, y1, x2, y2)


def polygon_area(flat: list[float]) -> float:
    """Shoelace area of [x1, y1, x2, y2, ...]."""
    xs, ys = flat[0::2], flat[1::2]
    n = len(xs)
    return abs(sum(xs[i] * ys[(i + 1) % n] - xs[(i + 1) % n] * ys[i] for i in range(n))) / 2.0


def clip_polygon(flat, width: float, height: float) -> list[float] | None:
    """Polygon points clamped into the image; None when fewer than 3 points or no area remain."""
    if flat is None:
        return None
    vals = [float(v) for v in flat if v is not None and math.isfinite(v)]
    if len(vals) != len(flat or []):
        return None
    vals = vals[: len(vals) // 2 * 2]
    if len(vals) < 6:
        return None
    out = []
    for x, y in zip(vals[0::2], vals[1::2]):
        out += [min(max(x, 0.0), width), min(max(y, 0.0), height)]
    return out if polygon_area(out) > 0 else None


def polygons_extent(polys: list[list[float]]) -> tuple[float, float, float, float]:
    xs = [v for p in polys for v in p[0::2]]
    ys = [v for p in polys for v in p[1::2]]
    return (min(xs), min(ys), max(xs), max(ys))


def xyxy_to_xywh(box) -> list[float]:
    x1, y1, x2, y2 = box
    return [x1, y1, x2 - x1, y2 - y1]


def xyxy_to_cxcywh_norm(box, width: float, height: float) -> tuple[float, float, float, float]:
    """YOLO: center and size normalized to [0, 1] (the box is already clipped)."""
    x1, y1, x2, y2 = box
    cx, cy = (x1 + x2) / 2 / width, (y1 + y2) / 2 / height
    w, h = (x2 - x1) / width, (y2 - y1) / height
    return tuple(min(max(v, 0.0), 1.0) for v in (cx, cy, w, h))


# --- rows -> instances -------------------------------------------------------------------------
@dataclass
class Instance:
    label: str  # category or phrase; for OCR regions the category is "text" and `text` holds the string
    bbox: tuple[float, float, float, float]  # xyxy, clipped, positive area
    polygons: list[list[float]] = field(default_factory=list)  # clipped, each >= 3 points
    score: float | None = None
    text: str | None = None
    source_box: tuple[float, float, float, float] | None = None  # region tasks: the box the answer is for
    task: str | None = None  # the task that produced it (review formats show it to the reviewer)


def prompt_input(task: str, prompt: str | None) -> str:
    """The text after the task token in a prompt: `<OPEN_VOCABULARY_DETECTION>car` -> 'car'."""
    t = TASKS.get(task)
    if not prompt or t is None or t.input not in (Input.TEXT, Input.CLASSES):
        return ""
    return prompt[len(t.token):].strip() if prompt.startswith(t.token) else prompt.strip()


def _at(seq, i):
    return seq[i] if seq is not None and i < len(seq) else None


def span_label(label: str, drops: Counter) -> str | None:
    """A stored label without location tokens (runs parsed before parse.repair_label may hold
    them): cut to the text after the last one, counted; None (counted dropped) if nothing is left."""
    label, repaired = repair_label(label)
    if repaired and not label:
        drops["label of location tokens"] += 1
        return None
    if repaired:
        drops["labels cut at location tokens (kept)"] += 1
    return label


def row_instances(row, drops: Counter) -> list[Instance]:
    """One row's instances, clipped to its image. Drops (degenerate geometry, bad labels) are
    counted in `drops` by reason (scores are the filters': filtering.py, docvqa.count_questions).
    OCR quads become polygons of category 'text'."""
    w, h = float(row.width or 0), float(row.height or 0)
    if w <= 0 or h <= 0:
        n = max(len(row.bboxes or []), len(row.polygons or []), len(row.quad_boxes or []))
        if n:
            drops["no image size"] += n
        return []
    task = TASKS.get(row.task)
    unlabelled = task is not None and task.labels is Labels.NONE and task.output is not Output.TEXT  # region_proposal
    fallback = prompt_input(row.task, row.prompt) or ("object" if unlabelled else "")
    out: list[Instance] = []
    if row.quad_boxes:
        n, kind = len(row.quad_boxes), "quad"
    elif row.polygons:
        n, kind = len(row.polygons), "polygon"
    else:
        n, kind = len(row.bboxes or []), "box"
    for i in range(n):
        score = _at(row.scores, i)
        label = span_label(_at(row.labels, i) or "", drops)
        if label is None:
            continue
        if kind == "quad":
            poly = clip_polygon(row.quad_boxes[i], w, h)
            if poly is None:
                drops["degenerate box"] += 1
                continue
            out.append(Instance("text", polygons_extent([poly]), [poly], score, label, task=row.task))
            continue
        if kind == "polygon":
            polys = [p for p in (clip_polygon(part, w, h) for part in (row.polygons[i] or [])) if p]
            if not polys:
                drops["degenerate polygon"] += 1
                continue
            bbox = clip_box(polygons_extent(polys), w, h)
            source = clip_box(_at(row.bboxes, i), w, h)
        else:
            polys, source = [], None
            bbox = clip_box(row.bboxes[i], w, h)
        if bbox is None:
            drops["degenerate box"] += 1
            continue
        label = label.strip() or fallback
        if not label:
            drops["empty label"] += 1
            continue
        out.append(Instance(label, bbox, polys, score, source_box=source, task=row.task))
    return out
