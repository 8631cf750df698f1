"""--tta flip: every batch is also run mirrored left to right, and the box answers of the two passes are
merged per image and task (union): the plain pass's boxes, each scored by the better of its own score
and that of a same-label mirrored box over it (IoU >= 0.5), plus the mirrored boxes that match none.

Why: on the striped shift the demo model finds different objects in an image and in its mirror; the
union at --min-score 0.7 holds 1.5-2.4 times the true boxes of one pass at about the same precision (README,
"The pseudo-label loop, on a shift"). Only tasks that answer boxes of the whole image (Task.mirrorable:
od, dense region captions, region proposals) run mirrored; the others keep their one pass."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable, Iterator

import torch

from annotator.answers.parse import iou
from annotator.inputs.images import Batch
from annotator.outdir.table import OK, Annotation
from annotator.tasks import TASKS

AGREE_IOU = 0.5


def mirror_box(box: list[float], width: int) -> list[float]:
    x1, y1, x2, y2 = box
    return [width - x2, y1, width - x1, y2]


def merge_flipped(plain: Annotation, mirrored: Annotation) -> tuple[Annotation, int]:
    """The union of a row and its mirrored pass's row (boxes already in the mirror's coordinates),
    in reading order (top to bottom, then left to right): -> (row, boxes the mirror added)."""
    if mirrored.status != OK or not mirrored.bboxes or plain.status != OK or plain.width is None:
        return plain, 0
    boxes = [mirror_box(b, plain.width) for b in mirrored.bboxes]
    m_labels = mirrored.labels or [""] * len(boxes)
    m_scores = mirrored.scores
    items = list(zip(plain.bboxes or [], plain.labels or [""] * len(plain.bboxes or []),
                     plain.scores if plain.scores is not None else [None] * len(plain.bboxes or [])))
    merged, added = [], 0
    for box, label, score in items:
        agree = [m_scores[j] for j, (b, lab) in enumerate(zip(boxes, m_labels))
                 if m_scores is not None and lab == label and iou(box, b) >= AGREE_IOU]
        merged.append((box, label, max([score, *agree]) if score is not None else score))
    for j, (box, label) in enumerate(zip(boxes, m_labels)):
        if not any(lab == label and iou(box, b) >= AGREE_IOU for b, lab, _ in items):
            merged.append((box, label, m_scores[j] if m_scores is not None else None))
            added += 1
    merged.sort(key=lambda m: (m[0][1], m[0][0]))
    unscored = any(s is None for _, _, s in merged)  # a pass without scores: its boxes stay, the row is unscored
    return replace(plain, bboxes=[m[0] for m in merged], labels=[m[1] for m in merged],
                   scores=None if unscored else [m[2] for m in merged],
                   truncated=plain.truncated or mirrored.truncated), added


MIRRORED = "\x00mirrored"  # appended to a mirrored item's key while it is decoded: no path or URL holds a NUL


@dataclass
class _Pending:
    """One batch of the stream, until both of its passes are back."""

    mirrored: bool  # a mirrored pass follows (some image has a mirrorable task)
    plain: list[Annotation] | None = None
    flipped: list[Annotation] | None = None

    @property
    def done(self) -> bool:
        return self.plain is not None and (self.flipped is not None or not self.mirrored)


class FlipAnnotator:
    """Engine.annotate_stream with a mirrored second pass per batch, merged (see merge_flipped)."""

    def __init__(self, engine):
        self.engine = engine

    def mirrored(self, batch: Batch) -> Batch | None:
        """The batch's images flipped (a flip of the processed pixels is the processed flip of the
        image), with only their mirrorable tasks, keys marked MIRRORED; None when nothing is left to run."""
        keep = [i for i, it in enumerate(batch.items) if any(TASKS[t].mirrorable for t in it.tasks)]
        if not keep or batch.pixel_values is None:
            return None
        items = [replace(batch.items[i], key=batch.items[i].key + MIRRORED,
                         pixel_values=batch.items[i].pixel_values.flip(-1),
                         tasks=tuple(t for t in batch.items[i].tasks if TASKS[t].mirrorable)) for i in keep]
        return Batch(items, torch.stack([it.pixel_values for it in items]), [])

    def merge(self, rows: list[Annotation], flipped: list[Annotation]) -> list[Annotation]:
        second = {(r.image.removesuffix(MIRRORED), r.task): r for r in flipped}
        out, added = [], 0
        for row in rows:
            other = second.get((row.image, row.task))
            merged, n = merge_flipped(row, other) if other is not None else (row, 0)
            out.append(merged)
            added += n
        self.engine.count("tta_flip_images", len({r.image for r in flipped}))
        self.engine.count("tta_flip_boxes_added", added)
        return out

    def annotate(self, batch: Batch) -> list[Annotation]:
        """One batch, merged (through annotate_stream: one path)."""
        return [row for rows in self.annotate_stream([batch]) for row in rows]

    def annotate_stream(self, batches: Iterable[Batch]) -> Iterator[list[Annotation]]:
        """Both passes through the engine's one stream, each mirrored batch right behind its plain one,
        so they decode beside each other and beside the next batches (continuous batching), not one
        after the other. The stream returns batches as they finish, in any order: a batch's rows are
        merged and yielded once both of its passes are back (found by their image keys)."""
        pending: dict[int, _Pending] = {}
        owner: dict[str, int] = {}  # image key -> its batch, while the batch is pending

        def fed() -> Iterator[Batch]:
            for i, batch in enumerate(batches):
                mirrored = self.mirrored(batch)
                pending[i] = _Pending(mirrored is not None)
                owner.update((key, i) for key in [it.key for it in batch.items] + [f.key for f in batch.failures])
                yield batch
                if mirrored is not None:
                    yield mirrored

        for rows in self.engine.annotate_stream(fed()):
            if not rows:
                yield rows
                continue
            first = rows[0].image
            i = owner[first.removesuffix(MIRRORED)]
            if first.endswith(MIRRORED):
                pending[i].flipped = rows
            else:
                pending[i].plain = rows
            if pending[i].done:
                p = pending.pop(i)
                for key in {r.image for r in p.plain}:
                    owner.pop(key, None)
                yield p.plain if not p.mirrored else self.merge(p.plain, p.flipped)
