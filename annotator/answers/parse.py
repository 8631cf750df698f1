"""Generated text -> the table's typed columns, through the processor's own post-processing.

Coordinates come back in original-image pixels (the processor de-quantizes with the size we
pass). Pure functions of (task, text, size), tested with scripted generations."""

from __future__ import annotations

import re
from dataclasses import dataclass

from annotator.model.sequence import LOC_TOKEN
from annotator.tasks import Output, Task

_SPECIAL = ("<s>", "</s>", "<pad>")


@dataclass
class Parsed:
    """The answer-bearing columns of one generation."""

    text: str | None = None
    bboxes: list[list[float]] | None = None
    labels: list[str] | None = None
    polygons: list[list[list[float]]] | None = None
    quad_boxes: list[list[float]] | None = None
    scores: list[float] | None = None  # one per instance, aligned with the filled list
    text_score: float | None = None  # text answers


def clean_raw(text: str) -> str:
    """The raw column: generated text with special and location tokens, minus padding."""
    return text.replace("<pad>", "")


def plain_text(text: str) -> str:
    """Text answer without special or location tokens (region_to_category answers 'car<loc_..>...')."""
    for tok in _SPECIAL:
        text = text.replace(tok, "")
    return LOC_TOKEN.sub("", text).strip()


def _floats(rows) -> list[list[float]]:
    return [[float(v) for v in row] for row in rows]


def parse_generation(processor, task: Task, text: str, size: tuple[int, int]) -> Parsed:
    """Parse one generated string for `task` on an image of `size` = (width, height)."""
    if task.output is Output.TEXT:
        return Parsed(text=plain_text(text))
    answer = processor.post_process_generation(text, task=task.token, image_size=size)[task.token]
    if task.output is Output.BOXES:
        return Parsed(bboxes=_floats(answer["bboxes"]), labels=list(answer["labels"]))
    if task.output is Output.POLYGONS:
        return Parsed(polygons=[_floats(p) for p in answer["polygons"]], labels=list(answer["labels"]))
    if task.output is Output.QUADS:
        return Parsed(quad_boxes=_floats(answer["quad_boxes"]), labels=list(answer["labels"]))
    if task.output is Output.BOXES_OR_POLYGONS:
        # The processor answers with polygons only when the model emitted <poly>, all or nothing.
        if answer["polygons"]:
            return Parsed(polygons=[_floats(p) for p in answer["polygons"]], labels=list(answer["polygons_labels"]))
        return Parsed(bboxes=_floats(answer["bboxes"]), labels=list(answer["bboxes_labels"]))
    raise ValueError(f"no parser for output kind {task.output}")


# --------------------------------------------------------------------------- pseudo-label quality

DUPLICATE_IOU = 0.9  # same label and this much overlap: a generation loop repeating itself
# A label made only of location-token pieces ("loc_150>", "<loc_3"): the model wrote coordinates where
# a name belongs, and the parser took the leftovers for a label. It must never become a class.
_LOC_FRAGMENTS = re.compile(r"[\s<>/]*(?:loc_\d*[\s<>/]*)+")


def is_location_fragment(label: str) -> bool:
    return bool(label) and _LOC_FRAGMENTS.fullmatch(label) is not None


# A location token or the piece of one the processor's phrase regex left behind ("loc_3>", "<loc_9").
_LOC_PIECE = re.compile(r"<?/?loc_\d*>?")
_TAGS = re.compile(r"<[^<>]*>")


def repair_label(label: str) -> tuple[str, bool]:
    """A label with location tokens in it -> (the text after the last one, True); else (label, False).
    Such a label is a malformed span: a box or quad with too few or too many coordinates, so the
    parser glued its tokens to the next instance's text ('<loc_784>one one', 'garden<loc_197>gate').
    The text right before an instance's own coordinates is the one that belongs to it; what lies
    before a stray token has lost its geometry. '' (with True) means nothing is left: drop it."""
    pieces = list(_LOC_PIECE.finditer(label or ""))
    if not pieces:
        return label, False
    tail = _TAGS.sub("", label[pieces[-1].end():]).replace("<", "").replace(">", "")
    return " ".join(tail.split()), True


def _bump(stats: dict, name: str, n: int = 1) -> None:
    if n:
        stats[name] = stats.get(name, 0) + n


def bounds(points: list[float]) -> list[float]:
    """[x1, y1, x2, y2, ...] -> their enclosing xyxy box."""
    xs, ys = points[0::2], points[1::2]
    return [min(xs), min(ys), max(xs), max(ys)]


def iou(a: list[float], b: list[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else float(a == b)


def _clip(values: list[float], width: int, height: int) -> list[float]:
    return [min(max(v, 0.0), float(width if i % 2 == 0 else height)) for i, v in enumerate(values)]


def refine(p: Parsed, truncated: bool, width: int, height: int, stats: dict) -> Parsed:
    """Quality rules for one generation's instances (boxes, polygons or quads, with their labels
    and scores): a truncated output loses its last, possibly incomplete instance; coordinates are
    clipped to the image; instances whose label is a location-token fragment, or whose (bounding)
    box has no positive width and height after clipping, are malformed and dropped; repeats of an
    instance (same label, IoU >= DUPLICATE_IOU, the loops generation falls into) are removed.
    Counts go to `stats`."""
    field_name = next((f for f in ("bboxes", "polygons", "quad_boxes") if getattr(p, f)), None)
    if field_name is None:
        return p
    items = getattr(p, field_name)
    labels = p.labels if p.labels is not None and len(p.labels) == len(items) else [""] * len(items)
    scores = p.scores if p.scores is not None and len(p.scores) == len(items) else None
    keep = list(range(len(items)))
    if truncated and keep:
        keep.pop()
        stats["truncated_instances_dropped"] = stats.get("truncated_instances_dropped", 0) + 1
    if field_name == "polygons":
        clipped = [[_clip(poly, width, height) for poly in inst] for inst in items]
        boxes = [bounds([v for poly in inst for v in poly]) if any(inst) else [0, 0, 0, 0] for inst in clipped]
    else:
        clipped = [_clip(b, width, height) for b in items]
        boxes = clipped if field_name == "bboxes" else [bounds(q) for q in clipped]
    stats["coordinates_clipped"] = stats.get("coordinates_clipped", 0) + sum(c != i for c, i in zip(clipped, items))
    kept: list[int] = []
    labels = list(labels)
    for i in keep:
        labels[i], repaired = repair_label(labels[i])
        if repaired and not labels[i]:  # nothing but location tokens (or pieces of them)
            _bump(stats, "malformed_labels_dropped")
            continue
        _bump(stats, "location_tokens_repaired", int(repaired))
        x1, y1, x2, y2 = boxes[i]
        if x2 <= x1 or y2 <= y1:  # inverted or empty: coordinates out of order, or clipped to nothing
            _bump(stats, "empty_boxes_dropped")
            continue
        if any(labels[i] == labels[j] and iou(boxes[i], boxes[j]) >= DUPLICATE_IOU for j in kept):
            stats["duplicates_removed"] = stats.get("duplicates_removed", 0) + 1
            continue
        kept.append(i)
    setattr(p, field_name, [clipped[i] for i in kept])
    if p.labels is not None:
        p.labels = [labels[i] for i in kept]
    if scores is not None:
        p.scores = [scores[i] for i in kept]
    return p
