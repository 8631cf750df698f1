"""Generated text -> the table's typed columns, through the processor's own post-processing.

Coordinates come back in original-image pixels (the processor de-quantizes with the size we
pass). Pure functions of (task, text, size), tested with scripted generations."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .tasks import Output, Task

_LOC = re.compile(r"<loc_\d+>")
_SPECIAL = ("<s>", "</s>", "<pad>")


@dataclass
class Parsed:
    """The answer-bearing columns of one generation."""

    text: str | None = None
    bboxes: list[list[float]] | None = None
    labels: list[str] | None = None
    polygons: list[list[list[float]]] | None = None
    quad_boxes: list[list[float]] | None = None
    extra: dict = field(default_factory=dict)


def clean_raw(text: str) -> str:
    """The raw column: generated text with special and location tokens, minus padding."""
    return text.replace("<pad>", "")


def plain_text(text: str) -> str:
    """Text answer without special or location tokens (region_to_category answers 'car<loc_..>...')."""
    for tok in _SPECIAL:
        text = text.replace(tok, "")
    return _LOC.sub("", text).strip()


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
