"""Generations -> Annotation rows: each answer parsed (parse.py), its scores attached (confidence.py),
the quality rules applied (parse.refine), and the answers of a task that asks several prompts
per image merged into one row (one prompt per class, one per source region).

The assembler owns the quality counters those rules add to; the engine hands them to the driver
with the batch's rows (Engine.take_stats)."""

from __future__ import annotations

from dataclasses import dataclass

from annotator.config import TaskInputs
from annotator.inputs.images import describe_error
from annotator.answers.parse import Parsed, clean_raw, parse_generation, plain_text, refine
from annotator.answers.confidence import instance_scores, text_score, token_text
from annotator.outdir.table import OK, Annotation
from annotator.tasks import Input, Output, Task


@dataclass(frozen=True)
class Request:
    """One prompt to generate for one image of the batch."""

    image: int  # index into Batch.items
    task: str  # task name
    prompt: str  # task token plus its input, e.g. "<REGION_TO_SEGMENTATION><loc_1><loc_2><loc_8><loc_9>"
    box: tuple[float, ...] | None = None  # region tasks: the source box, in pixels
    label: str | None = None  # region tasks: the source label; OVD with --classes: the class
    forced: int = 0  # bench only: the answer has exactly this many new tokens (0: the model decides)


@dataclass(frozen=True)
class Generation:
    text: str  # decoded, special and location tokens kept
    truncated: bool  # stopped by max_new_tokens, not by </s>
    ids: tuple[int, ...] = ()  # generated token ids after the decoder start token
    logprobs: tuple[float, ...] | None = None  # log p of each of `ids` (None: scoring off)


class Assembler:
    """A task's (request, generation) pairs of one image -> its Annotation row."""

    def __init__(self, processor, task_inputs: TaskInputs):
        self.processor = processor
        self.inputs = task_inputs
        self.stats: dict[str, int] = {}  # quality counters (duplicates removed, ...), see parse.refine

    def take_stats(self) -> dict[str, int]:
        """The quality counters since the last call, handed over and reset."""
        stats, self.stats = self.stats, {}
        return stats

    def assemble(self, task: Task, key: str, width: int, height: int,
                 results: list[tuple[Request, Generation | BaseException]]) -> Annotation:
        prompt = "\n".join(req.prompt for req, _ in results) or None
        row = Annotation(image=key, task=task.name, status=OK, width=width, height=height, prompt=prompt)
        errors = [res for _, res in results if isinstance(res, BaseException)]
        if errors:
            row.status, row.error = "error", f"generation failed: {describe_error(errors[0])}"
            return row
        gens = [res for _, res in results]
        row.raw = "\n".join(clean_raw(g.text) for g in gens) if gens else None
        row.truncated = any(g.truncated for g in gens)
        try:
            parsed = self._parse(task, width, height, results)
        except Exception as exc:  # noqa: BLE001 - a parser crash on odd output is this row's error
            row.status, row.error = "error", f"parse failed: {describe_error(exc)}"
            return row
        row.text, row.bboxes, row.labels = parsed.text, parsed.bboxes, parsed.labels
        row.polygons, row.quad_boxes = parsed.polygons, parsed.quad_boxes
        row.scores, row.text_score = parsed.scores, parsed.text_score
        return row

    def parse_one(self, task: Task, gen: Generation, size: tuple[int, int]) -> Parsed:
        """One generation -> columns with aligned scores, after the quality rules."""
        parsed = parse_generation(self.processor, task, gen.text, size)
        tt = self._token_text(gen)
        if tt is not None:
            if task.output is Output.TEXT:
                parsed.text_score = text_score(tt)
            else:
                found = instance_scores(task, tt)
                n = len(parsed.bboxes or parsed.polygons or parsed.quad_boxes or [])
                parsed.scores = found if len(found) == n and None not in found else None
                if parsed.scores is None:  # null rather than misaligned (confidence.py); counted, not silent
                    self.stats["scores_not_aligned"] = self.stats.get("scores_not_aligned", 0) + 1
        if task.output is not Output.TEXT:
            parsed = refine(parsed, gen.truncated, size[0], size[1], self.stats)
        return parsed

    def _token_text(self, gen: Generation):
        """The generation's tokens with their log p, as confidence.py aligns them (None: scoring off)."""
        return token_text(self.processor.tokenizer, list(gen.ids), list(gen.logprobs)) if gen.logprobs else None

    def _parse(self, task: Task, width: int, height: int, results) -> Parsed:
        size = (width, height)
        if task.input is Input.REGION:
            return self._parse_regions(task, size, results)
        if task.input is Input.CLASSES and self.inputs.classes:
            return self._merge_classes(task, size, results)
        (req, gen), = results
        return self.parse_one(task, gen, size)

    def _merge_classes(self, task: Task, size, results) -> Parsed:
        """One prompt per class: the label is the class asked for, whatever the model wrote."""
        merged = Parsed(labels=[], scores=[])
        for req, gen in results:
            part = self.parse_one(task, gen, size)
            field_name = "polygons" if part.polygons else "bboxes"
            items = getattr(part, field_name) or []
            setattr(merged, field_name, (getattr(merged, field_name) or []) + items)
            merged.labels += [req.label] * len(items)
            merged.scores = None if merged.scores is None or part.scores is None else merged.scores + part.scores
        if merged.bboxes is None and merged.polygons is None:
            merged.bboxes = []
        return merged

    def _parse_regions(self, task: Task, size, results) -> Parsed:
        """One instance per source box: its box, the answer for it, and that answer's score."""
        boxes = [list(req.box) for req, _ in results]
        scores = [text_score(tt) if (tt := self._token_text(gen)) else None for _, gen in results]
        scores = scores if None not in scores else None
        if task.output is Output.POLYGONS:
            polygons = []
            for _, gen in results:
                part = parse_generation(self.processor, task, gen.text, size)
                polygons.append([p for inst in part.polygons for p in inst])  # all parts of this box's mask
            return Parsed(bboxes=boxes, polygons=polygons, labels=[req.label or "" for req, _ in results], scores=scores)
        return Parsed(bboxes=boxes, labels=[plain_text(gen.text) for _, gen in results], scores=scores)
