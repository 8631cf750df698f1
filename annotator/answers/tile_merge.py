"""Merging tiled answers: instances found on tiles, mapped to image pixels, merged with the
whole image's into one row (merge_row). Pure functions over small dataclasses, tested on scripted rows.

Three steps, the same for boxes, polygons and OCR quads:
1. join: an object cut by a tile border is seen twice, each part touching the border of its
   tile ("cut"). Two parts of one label whose cut sides face each other and that line up on the
   other axis become one instance (their union); repeated, so a corner object of four tiles joins.
2. suppress (NMS): uncut before cut, then by score, then by area. An instance is dropped when it
   overlaps a kept one of the same group (IoU), or when it is cut and lies inside a kept one
   (a fragment of a large object the whole image saw entire).
3. OCR only: the survivors in reading order (rows top to bottom, left to right in a row).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from annotator.answers.parse import bounds, iou
from annotator.inputs.tiles import TileBox
from annotator.model.sequence import LOC_TOKEN
from annotator.outdir.table import OK, Annotation
from annotator.tasks import TASKS, Output

SIDES = ("left", "top", "right", "bottom")
FACING = {"right": "left", "bottom": "top"}  # a cut on a's right meets a cut on b's left
NMS_IOU = 0.5  # same group and this much overlap: one object seen twice
FRAGMENT_IOS = 0.7  # a cut instance this much inside a kept one is a fragment of it
LINE_UP = 0.5  # two parts of a cut object overlap this much on the axis along the cut
MIN_TEXT_OVERLAP = 3  # characters two parts of a cut text line must share to be spliced there


@dataclass
class Instance:
    """One box, polygon instance or OCR line, in image pixels."""

    box: list[float]  # xyxy bounds
    label: str
    score: float | None
    shape: list  # what the row stores: a box, the instance's polygons, or a quad
    cut: frozenset[str] = frozenset()  # sides that touch a tile border inside the image
    tiles: frozenset[int] = field(default_factory=frozenset)  # tiles it came from; empty: whole image

    @property
    def area(self) -> float:
        return max(0.0, self.box[2] - self.box[0]) * max(0.0, self.box[3] - self.box[1])


def ios(a: list[float], b: list[float]) -> float:
    """Intersection over the smaller box: 1.0 when one lies inside the other."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    small = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return ix * iy / small if small > 0 else 0.0


def _interval_iou(a0: float, a1: float, b0: float, b1: float) -> float:
    inter = max(0.0, min(a1, b1) - max(a0, b0))
    union = max(a1, b1) - min(a0, b0)
    return inter / union if union > 0 else 0.0


# --------------------------------------------------------------------------- 1. join cut parts
def _joinable(a: Instance, b: Instance, tol: float, by_label: bool, facing: dict[str, str]) -> bool:
    if (by_label and a.label != b.label) or not (a.tiles and b.tiles) or a.tiles & b.tiles:
        return False
    for near, far in facing.items():
        for p, q in ((a, b), (b, a)):
            if near not in p.cut or far not in q.cut:
                continue
            if near == "right":  # p left of q, cut on a vertical border: rows must line up
                touching = p.box[2] >= q.box[0] - tol
                lined_up = _interval_iou(p.box[1], p.box[3], q.box[1], q.box[3]) >= LINE_UP
            else:  # p above q, cut on a horizontal border: columns must line up
                touching = p.box[3] >= q.box[1] - tol
                lined_up = _interval_iou(p.box[0], p.box[2], q.box[0], q.box[2]) >= LINE_UP
            if touching and lined_up:
                return True
    return False


def splice_text(a: str, b: str) -> str:
    """Text of a line cut in two, `a` the left part: the overlap band was read by both tiles,
    so the end of `a` repeats the start of `b`; splice there, else join with a space."""
    for k in range(min(len(a), len(b)), MIN_TEXT_OVERLAP - 1, -1):
        if a.endswith(b[:k]):
            return a + b[k:]
    return f"{a} {b}".strip()


def _union(a: Instance, b: Instance, kind: str) -> Instance:
    box = [min(a.box[0], b.box[0]), min(a.box[1], b.box[1]), max(a.box[2], b.box[2]), max(a.box[3], b.box[3])]
    edge = {"left": 0, "top": 1, "right": 2, "bottom": 3}
    # the union is still cut on a side where that side comes from a cut part
    cut = frozenset(s for p in (a, b) for s in p.cut if p.box[edge[s]] == box[edge[s]])
    if kind == "polygons":
        shape = a.shape + b.shape  # one instance, the polygons of both parts
    elif kind == "quads":
        shape = [box[0], box[1], box[2], box[1], box[2], box[3], box[0], box[3]]
    else:
        shape = box
    label = a.label
    if kind == "quads":
        left, right = (a, b) if a.box[0] <= b.box[0] else (b, a)
        label = splice_text(left.label, right.label)
    scores = [s for s in (a.score, b.score) if s is not None]
    score = max(scores) if len(scores) == 2 else None  # a joined object is as sure as its surest part
    return Instance(box, label, score, shape, cut, a.tiles | b.tiles)


def join_cut(items: list[Instance], kind: str, tol: float, by_label: bool = True) -> list[Instance]:
    # Text lines join only across vertical borders: a line cut through its glyphs by a horizontal
    # border is unreadable in both parts, and the overlap holds it whole in one of the tiles.
    facing = {"right": "left"} if kind == "quads" else FACING
    items = list(items)
    joined = True
    while joined:  # until nothing joins: a corner object takes three joins
        joined = False
        for i in range(len(items)):
            for j in range(i + 1, len(items)):
                if _joinable(items[i], items[j], tol, by_label, facing):
                    items[i] = _union(items[i], items[j], kind)
                    del items[j]
                    joined = True
                    break
            if joined:
                break
    return items


# --------------------------------------------------------------------------- 2. suppress duplicates
def suppress(items: list[Instance], by_label: bool = True, prefer_long_text: bool = False) -> list[Instance]:
    """Greedy NMS with fragments: see the module doc. OCR lines prefer the longer reading."""
    def rank(x: Instance):
        text = -len(x.label) if prefer_long_text else 0
        return (bool(x.cut), text, -(x.score if x.score is not None else 0.0), -x.area)

    kept: list[Instance] = []
    for cand in sorted(items, key=rank):
        same = [k for k in kept if not by_label or k.label == cand.label]
        if any(iou(cand.box, k.box) >= NMS_IOU or (cand.cut and ios(cand.box, k.box) >= FRAGMENT_IOS) for k in same):
            continue
        kept.append(cand)
    return kept


def merge(items: list[Instance], kind: str, tol: float, by_label: bool = True) -> list[Instance]:
    """join, then suppress; kind is "bboxes", "polygons" or "quads"."""
    if kind == "quads":  # OCR lines: any two readings of the same place are duplicates
        return reading_order(suppress(join_cut(items, kind, tol, by_label=False), by_label=False, prefer_long_text=True))
    return suppress(join_cut(items, kind, tol, by_label), by_label)


# --------------------------------------------------------------------------- 3. reading order
def reading_rows(lines: list[Instance]) -> list[list[Instance]]:
    """Rows top to bottom (a line joins a row when its vertical centre falls inside the row's
    first line), left to right within a row. Columns of a multi-column page interleave."""
    rows: list[list[Instance]] = []
    for line in sorted(lines, key=lambda x: (x.box[1] + x.box[3]) / 2):
        centre = (line.box[1] + line.box[3]) / 2
        if rows and rows[-1][0].box[1] <= centre <= rows[-1][0].box[3]:
            rows[-1].append(line)
        else:
            rows.append([line])
    return [sorted(row, key=lambda x: x.box[0]) for row in rows]


def reading_order(lines: list[Instance]) -> list[Instance]:
    return [line for row in reading_rows(lines) for line in row]


def line_text(label: str) -> str:
    """A line's label as `ocr` text: location tokens a malformed line holds ("purple<loc_110>blue
    star", the model's quad cut short) become spaces, as `ocr` on the whole image never shows them."""
    return " ".join(LOC_TOKEN.sub(" ", label).split())


def ocr_text(lines: list[Instance]) -> str:
    """One text: a space between the lines of a row, a newline between rows."""
    rows = [[t for t in (line_text(line.label) for line in row) if t] for row in reading_rows(lines)]
    return "\n".join(" ".join(row) for row in rows if row)


# --------------------------------------------------------------------------- rows <-> instances (tiles -> one row)
def cut_tolerance(tile: TileBox) -> float:
    """How near a tile border an instance edge counts as cut: a few location bins (1/1000 of the
    tile each) of the model's imprecision."""
    return max(2.0, 0.015 * max(tile.width, tile.height))


def row_kind(task: str, rows: list[Annotation]) -> str:
    out = TASKS[task].output
    if out is Output.QUADS:
        return "quads"
    if out is Output.POLYGONS or (out is Output.BOXES_OR_POLYGONS and any(r.polygons for r in rows)):
        return "polygons"
    return "bboxes"


def instances(row: Annotation, kind: str, tile: TileBox | None, tile_id: int, width: int, height: int) -> list[Instance]:
    """A row's instances in image pixels; a tile's mark the sides where they touch its inner borders."""
    if kind == "polygons" and row.polygons is None and row.bboxes:  # open-vocabulary: boxes among polygons
        shapes = [[[b[0], b[1], b[2], b[1], b[2], b[3], b[0], b[3]]] for b in row.bboxes]
    else:
        shapes = {"bboxes": row.bboxes, "polygons": row.polygons, "quads": row.quad_boxes}[kind] or []
    labels = row.labels if row.labels is not None and len(row.labels) == len(shapes) else [""] * len(shapes)
    scores = row.scores if row.scores is not None and len(row.scores) == len(shapes) else [None] * len(shapes)
    inner = tile.inner_sides(width, height) if tile else {}
    tol = cut_tolerance(tile) if tile else 0.0
    out = []
    for shape, label, score in zip(shapes, labels, scores):
        if tile:
            shape = [tile.to_image(p) for p in shape] if kind == "polygons" else tile.to_image(shape)
        box = bounds([v for p in shape for v in p]) if kind == "polygons" else bounds(shape)
        edge = {"left": box[0], "top": box[1], "right": box[2], "bottom": box[3]}
        cut = frozenset(s for s, at in inner.items() if abs(edge[s] - at) <= tol)
        out.append(Instance(box, label, score, shape, cut, frozenset({tile_id}) if tile else frozenset()))
    return out


def merge_row(whole: Annotation, parts: list[tuple[TileBox, Annotation]]) -> Annotation:
    """The whole image's row with its tiles' rows (same task, or ocr_with_region for ocr) merged in."""
    if whole.status != OK or not parts:
        return whole
    failed = next((r for _, r in parts if r.status != OK), None)
    if failed is not None:  # an error row, so that --retry-errors redoes the image
        return Annotation.failed(whole.image, whole.task, f"tile failed: {failed.error}", whole.width, whole.height,
                                 whole.prompt)
    w, h = whole.width, whole.height
    tol = max(cut_tolerance(b) for b, _ in parts)
    row = replace(whole, tiles=len(parts), truncated=any(r.truncated for _, r in parts))
    if whole.task == "ocr":  # text from the tiles' lines, in reading order
        lines = merge([i for n, (b, r) in enumerate(parts) for i in instances(r, "quads", b, n, w, h)], "quads", tol)
        if lines:  # tiles that read nothing keep the whole image's reading
            row.text = ocr_text(lines)
            scores = [ln.score for ln in lines]
            row.text_score = sum(scores) / len(scores) if None not in scores else None
        return row
    kind = row_kind(whole.task, [whole] + [r for _, r in parts])
    found = instances(whole, kind, None, -1, w, h)
    found += [i for n, (b, r) in enumerate(parts) for i in instances(r, kind, b, n, w, h)]
    kept = merge(found, kind, tol, by_label=not TASKS[whole.task].merge_across_labels)
    row.bboxes = [i.shape for i in kept] if kind == "bboxes" else None
    row.polygons = [i.shape for i in kept] if kind == "polygons" else None
    row.quad_boxes = [i.shape for i in kept] if kind == "quads" else None
    row.labels = [i.label for i in kept]
    scores = [i.score for i in kept]
    row.scores = scores if whole.scores is not None and None not in scores else None
    return row
