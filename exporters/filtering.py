"""Which pseudo-labels an export keeps: one registry of filtering policies over the scores of an image.

Dropping uncertain boxes one by one (`instance`) keeps the image with its confident boxes, so the
target tells the model that the objects it was unsure of are background. `image` and `band` decide
per image instead: an image whose labels are partly uncertain is left out of the training set
rather than taught with holes in it. README, "The pseudo-label loop", has the measured comparison.

A policy sees one image's instance scores (every exported task of the image together, None for an
instance without a score) and answers whether the image stays and which instances do. Text answers
carry no instances and are never filtered here.

Under --min-score, for the training formats, an instance without a score is uncertain, not confident
(the review and evaluation formats keep it, to be looked at): a run stores null scores
for a row whose generation did not parse cleanly (the scores could not be aligned with its instances:
a decoding loop, malformed spans), and on the striped shift those few rows held half of the boxes
`instance` 0.7 used to keep, nearly all of them wrong (README, "The pseudo-label loop")."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

from exporters.errors import ExportError
from exporters.read import ImageRows

INSTANCE_COLUMNS = ("bboxes", "labels", "polygons", "quad_boxes", "scores")  # aligned per instance


@dataclass(frozen=True)
class ScoreFilter:
    """The policy and its thresholds, as the CLI names them."""

    policy: str = "instance"
    min_score: float | None = None  # T_high: an instance at or above it is confident
    low_score: float | None = None  # band: below it an instance is noise (dropped, the image stays)
    max_uncertain: float = 0.0  # image: the share of uncertain instances an image may hold and stay
    trust_unscored: bool = True  # an instance without a score passes --min-score (review formats only)


@dataclass(frozen=True)
class Decision:
    keep_image: bool
    keep: tuple[bool, ...]  # per instance, in the order of the scores given


@dataclass
class FilterCounts:
    """What the filter did, for the export summary and --json."""

    policy: str
    min_score: float | None = None
    low_score: float | None = None
    max_uncertain: float | None = None
    images_kept: int = 0
    images_dropped: int = 0
    instances_kept: int = 0
    instances_dropped: int = 0

    def line(self) -> str:
        return (f"  filter {self.policy} ({describe(self)}): images kept {self.images_kept}, dropped "
                f"{self.images_dropped}; instances kept {self.instances_kept}, dropped {self.instances_dropped}")


Policy = Callable[[list, ScoreFilter], Decision]


@dataclass(frozen=True)
class PolicySpec:
    decide: Policy
    help: str


POLICIES: dict[str, PolicySpec] = {}


def policy(name: str, help: str):
    def deco(fn: Policy) -> Policy:
        POLICIES[name] = PolicySpec(fn, help)
        return fn
    return deco


NO_SCORE = "no score (--min-score needs one)"  # the summary's drop reason: a run with --no-scores, or a garbled row
# Scores are stored as float32: 0.95 reads back as 0.949999988, which must still pass --min-score 0.95.
EPS = 1e-6


BELOW = "score below --min-score"  # the summary's drop reason for a scored instance under it


def confident(score: float | None, min_score: float | None, trust_unscored: bool = False) -> bool:
    """Without --min-score everything is; with it, a score at or above it (None: only where trusted)."""
    if min_score is None:
        return True
    return trust_unscored if score is None else score >= min_score - EPS


def _confident(s, f: ScoreFilter) -> bool:
    return confident(s, f.min_score, f.trust_unscored)


@policy("instance", "drop each instance scored below --min-score; its image stays with the rest")
def _per_instance(scores: list, f: ScoreFilter) -> Decision:
    return Decision(True, tuple(_confident(s, f) for s in scores))


@policy("image", "drop the whole image when more than --max-uncertain of its instances score below "
                 "--min-score (default: any); a kept image loses its uncertain ones")
def _per_image(scores: list, f: ScoreFilter) -> Decision:
    keep = tuple(_confident(s, f) for s in scores)
    uncertain = keep.count(False)
    return Decision(not scores or uncertain / len(scores) <= f.max_uncertain, keep)


@policy("band", "keep instances at or above --min-score, drop those below --low-score as noise, and drop "
                "the whole image when any lies between the two (or has no score)")
def _band(scores: list, f: ScoreFilter) -> Decision:
    keep = tuple(_confident(s, f) for s in scores)
    low = f.low_score if f.low_score is not None else 0.0
    unsure = any(not k and (s is None or s >= low - EPS) for k, s in zip(keep, scores))  # None: untrusted
    return Decision(not unsure, keep)


def describe(c: FilterCounts) -> str:
    if c.min_score is None:
        return "no --min-score: everything kept"
    text = f">= {c.min_score:g} kept"
    if c.policy == "band":
        text += f", < {c.low_score or 0:g} dropped, image dropped if any between"
    elif c.policy == "image":
        text += f", image dropped if over {c.max_uncertain:.0%} of its instances are below"
    return text


# The default per format when --filter is not given. Training formats take the measured best (README,
# "The pseudo-label loop, on a shift"): on the striped shift `band` 0.7/0.3 left 5-9 training pairs
# from 96 images and moved nothing, `instance` 0.7 wrote 26-36 and raised AP50. coco is also read by
# `annotate eval`, which wants every box it was asked for.
TRAINING_DEFAULT = "instance"
FORMAT_DEFAULTS = {"florence": TRAINING_DEFAULT, "yolo": TRAINING_DEFAULT}
OTHER_DEFAULT = "instance"
BAND_LOW = 0.3  # band without --low-score: below this an instance is noise, not a missed object


def resolve(f: ScoreFilter | None, fmt: str, min_score: float | None) -> ScoreFilter:
    """The filter an export applies: the one asked for, else the format's default policy."""
    if f is None:
        f = ScoreFilter(FORMAT_DEFAULTS.get(fmt, OTHER_DEFAULT), min_score)
    f = replace(f, trust_unscored=fmt not in FORMAT_DEFAULTS)  # training formats: a box must show its score
    if f.policy == "band" and f.low_score is None and f.min_score is not None:
        f = replace(f, low_score=min(BAND_LOW, f.min_score))
    if f.policy not in POLICIES:
        raise ExportError(f"unknown --filter {f.policy!r}; one of {', '.join(POLICIES)}")
    if f.low_score is not None and f.min_score is not None and f.low_score > f.min_score:
        raise ExportError(f"--low-score {f.low_score:g} is above --min-score {f.min_score:g}")
    return f


def image_filter(opts, summary) -> "ImageFilter":
    """The filter of one export (ExportOptions' score_filter and min_score, the summary's format),
    its counts published on the summary."""
    flt = ImageFilter(resolve(opts.score_filter, summary.format, opts.min_score), summary.dropped)
    summary.filter = flt.counts
    return flt


class ImageFilter:
    """Applies one ScoreFilter image by image and counts what it kept and dropped."""

    def __init__(self, f: ScoreFilter, drops=None):
        self.filter = f
        self.drops = drops if drops is not None else {}  # the summary's reason -> count
        self.counts = FilterCounts(f.policy, f.min_score, f.low_score if f.policy == "band" else None,
                                   f.max_uncertain if f.policy == "image" else None)

    def apply(self, img: ImageRows, tasks) -> ImageRows | None:
        """The image with only its kept instances, or None when the policy drops it."""
        rows = {t: r for t, r in img.rows.items() if t in tasks}
        spans, scores = [], []
        for task, row in rows.items():
            n = _instance_count(row)
            got = list(row.scores) if row.scores is not None and len(row.scores) == n else [None] * n
            spans.append((task, len(scores), n))
            scores += got
        d = POLICIES[self.filter.policy].decide(scores, self.filter)
        if not d.keep_image:
            self.counts.images_dropped += 1
            self.counts.instances_dropped += len(scores)
            self._bump(f"image dropped by --filter {self.filter.policy}", len(scores))
            return None
        self.counts.images_kept += 1
        self.counts.instances_kept += sum(d.keep)
        self.counts.instances_dropped += len(scores) - sum(d.keep)
        unscored = sum(not k and s is None for k, s in zip(d.keep, scores))
        self._bump(NO_SCORE, unscored)
        self._bump(BELOW, len(scores) - sum(d.keep) - unscored)
        if all(d.keep):
            return img
        kept_rows = dict(img.rows)
        for task, start, n in spans:
            kept_rows[task] = _subset(rows[task], d.keep[start:start + n])
        return replace(img, rows=kept_rows)


    def _bump(self, reason: str, n: int) -> None:
        if n:
            self.drops[reason] = self.drops.get(reason, 0) + n


def _instance_count(row) -> int:
    """Instances of a row: the length of its geometry column (quads, polygons, else boxes)."""
    for name in ("quad_boxes", "polygons", "bboxes"):
        v = getattr(row, name)
        if v:
            return len(v)
    return 0


def _subset(row, keep: tuple[bool, ...]):
    """The row with only the kept instances in every per-instance column of that length."""
    n = len(keep)
    changes = {}
    for name in INSTANCE_COLUMNS:
        v = getattr(row, name)
        if v is not None and len(v) == n:
            changes[name] = [x for x, k in zip(v, keep) if k]
    return replace(row, **changes)
