"""What the review formats (labelstudio, cvat) share: their default tasks, one ReviewImage per image
(kept instances with class names, plus the text answers), the lowest-confidence-first order, and
the model version string. Pseudo-labels go to people for correction; the same class, score and
safety rules as the training formats apply, so what is reviewed is what would have been trained on."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

from exporters.colors import label_color
from annotator.tasks import TASKS, Input, Output
from exporters.base import Layout, choose_tasks, count_errors, exportable
from exporters.boxes import DETECTION_DEFAULTS, OCR_TASK, build_vocab, labelled
from exporters.classes import ClassVocab
from exporters.errors import ExportError
from exporters.files import SplitRule
from exporters.geometry import Instance
from exporters.options import ExportOptions, ExportSummary
from exporters.read import Run
from exporters.safety import is_safe_key

# whole-image text answers: reviewed as free text (Label Studio only; CVAT has no place for them)
TEXT_TASKS = tuple(t.name for t in TASKS.values() if t.output == Output.TEXT and t.input != Input.REGION)
ORDERS = ("key", "score")


@dataclass
class ReviewImage:
    key: str
    width: int
    height: int
    split: str
    instances: list[tuple[str, Instance]] = field(default_factory=list)  # (class name, instance)
    texts: dict[str, str] = field(default_factory=dict)  # text task -> answer

    @property
    def min_score(self) -> float | None:
        """The image's least certain instance: what a reviewer should look at first."""
        scores = [inst.score for _, inst in self.instances if inst.score is not None]
        return min(scores) if scores else None


def review_tasks(run: Run, opts: ExportOptions, fmt: str, text: bool) -> list[str]:
    """--task if given, else every detection-like task the run holds plus OCR regions (and the
    text tasks when the format can show them): people review all of it, not only boxes."""
    defaults = DETECTION_DEFAULTS + (OCR_TASK,) + (TEXT_TASKS if text else ())
    tasks = choose_tasks(run, opts, defaults, fmt)
    if not text and any(t in TEXT_TASKS for t in tasks):
        raise ExportError(f"{fmt} has no place for whole-image text answers ({', '.join(TEXT_TASKS)}); "
                          "use --format labelstudio for them")
    return tasks


def review_images(run: Run, tasks: list[str], opts: ExportOptions, summary: ExportSummary) -> Iterator[ReviewImage]:
    """Every image with an ok row of `tasks`, in key order, as it is read: nothing is held but the
    image at hand (the order of --order score is the writer's: ordering.by_score). The summary's
    image, instance and split counts are complete once the stream is."""
    if opts.order not in ORDERS:
        raise ExportError(f"unknown --order {opts.order!r}; one of {', '.join(ORDERS)}")
    summary.tasks = tasks
    count_errors(run, tasks, summary)
    geo_tasks = [t for t in tasks if t not in TEXT_TASKS]
    vocab = build_vocab(run, geo_tasks, opts, summary) if geo_tasks else None
    splits = Layout.split_rule(run.iter_image_keys(tasks), opts.val_fraction)
    return _reviewed(run, tasks, vocab, splits, opts, summary)


def _reviewed(run: Run, tasks: list[str], vocab: ClassVocab | None, splits: SplitRule, opts: ExportOptions,
              summary: ExportSummary) -> Iterator[ReviewImage]:
    stream = labelled(run, tasks, vocab, opts, summary) if vocab else ((img, []) for img in run.images(tasks))

    def texts_of(img) -> dict[str, str]:
        return {t: img.rows[t].text.strip() for t in tasks if t in TEXT_TASKS and t in img.rows
                and (img.rows[t].text or "").strip()}

    empty = (lambda item: not item[1] and not texts_of(item[0])) if opts.skip_empty else None
    for img, kept in exportable(stream, summary, is_safe_key, empty):
        instances = [(vocab.names[i], inst) for i, inst in kept]
        review = ReviewImage(img.key, img.width, img.height, splits.split(img.key), instances, texts_of(img))
        summary.images += 1
        summary.instances += len(instances)
        summary.splits[review.split] += 1
        yield review


def model_version(run: Run) -> str:
    """'model@revision' from the run's manifest: what produced the pre-annotations."""
    ident = run.manifest.get("identity") or {}
    model = ident.get("model") or "florence-annotate"
    return f"{model}@{ident['revision']}" if ident.get("revision") else str(model)


def hex_color(label: str) -> str:
    """The preview gallery's colour for a label, so a class looks the same in both."""
    return "#%02x%02x%02x" % label_color(label)
