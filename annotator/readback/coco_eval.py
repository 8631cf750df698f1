"""`annotate eval`: score a COCO export of a run against a ground-truth COCO file with
pycocotools' COCOeval, overall and at a few --min-score thresholds.

Images are matched by `file_name`, categories by name (case-insensitive), so the export and
the ground truth need not share ids. Instances without a score count as score 1.0."""

from __future__ import annotations

import contextlib
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

STAT_NAMES = ["AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large",
              "AR1", "AR10", "AR100", "AR_small", "AR_medium", "AR_large"]


class EvalError(ValueError):
    pass


@dataclass
class EvalReport:
    stats: dict[str, float]
    by_threshold: dict[float, float]  # min score -> AP
    per_class: dict[str, float] = field(default_factory=dict)
    matched_images: int = 0
    unmatched_labels: dict[str, int] = field(default_factory=dict)
    # (score, matched) per predicted box at IoU 0.5 (or --iou), by COCOeval's own matching; a box
    # whose label is not in the ground truth is wrong here, though AP ignores it (unmatched_labels)
    matches: list[tuple[float, bool]] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"images matched: {self.matched_images}"]
        out += [f"{name:<10} {shown(value, 'not computed (no such objects, or another --iou)')}"
                for name, value in self.stats.items()]
        out += ["", "AP by class:"] + [f"  {name:<24} {shown(ap, 'absent from the ground truth')}"
                                       for name, ap in self.per_class.items()]
        out += ["", "AP with --min-score:"] + [f"  >= {t:.2f}   {ap:.3f}" for t, ap in self.by_threshold.items()]
        if self.unmatched_labels:
            out += ["", "predicted labels not in the ground truth (ignored): "
                    + ", ".join(f"{k} ({n})" for k, n in sorted(self.unmatched_labels.items()))]
        return out


def absent(value: float) -> bool:
    """COCOeval's marks for what it did not measure: -1 (no ground truth in that area range, an IoU
    level not evaluated) and our nan (a class with no ground-truth object)."""
    return math.isnan(value) or value < 0


def shown(value: float, why: str) -> str:
    """A figure for people: an unmeasured one says so instead of reading like a failure (nan, -1.000)."""
    return f"  -    ({why})" if absent(value) else f"{value:.3f}"


def json_ready(report: EvalReport) -> dict:
    """The report as JSON: unmeasured figures are null (NaN is not JSON, -1 reads as a score)."""
    from dataclasses import asdict

    data = asdict(report)
    for part in ("stats", "per_class"):
        data[part] = {k: None if absent(v) else v for k, v in data[part].items()}
    return data


def _load(path: Path) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / "annotations.json"
    if not path.exists():
        raise EvalError(f"{path} not found; make it with `annotate export --format coco`")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise EvalError(f"{path} is not JSON: {exc}") from exc


def to_results(pred: dict, gt: dict, report: EvalReport) -> list[dict]:
    """The export's annotations re-keyed to the ground truth's image and category ids."""
    gt_images = {im["file_name"]: im["id"] for im in gt["images"]}
    gt_cats = {c["name"].strip().lower(): c["id"] for c in gt["categories"]}
    pred_images = {im["id"]: gt_images.get(im["file_name"]) for im in pred["images"]}
    pred_cats = {c["id"]: c["name"] for c in pred["categories"]}
    report.matched_images = sum(v is not None for v in pred_images.values())
    results = []
    for ann in pred["annotations"]:
        image_id = pred_images.get(ann["image_id"])
        name = pred_cats.get(ann["category_id"], "")
        cat = gt_cats.get(name.strip().lower())
        if image_id is None:
            continue
        if cat is None:
            report.unmatched_labels[name] = report.unmatched_labels.get(name, 0) + 1
            report.matches.append((float(ann.get("score", 1.0)), False))
            continue
        results.append({"image_id": image_id, "category_id": cat, "bbox": ann["bbox"],
                        "score": float(ann.get("score", 1.0)), **({"segmentation": ann["segmentation"]}
                                                                  if "segmentation" in ann else {})})
    return results


def _cocoeval(gt_coco, results: list[dict], iou_type: str, iou: float | None):
    from pycocotools.cocoeval import COCOeval

    if not results:
        return None
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        dt = gt_coco.loadRes(results)
        ev = COCOeval(gt_coco, dt, iou_type)
        if iou is not None:
            ev.params.iouThrs = np.array([iou])  # an array: summarize() compares against it
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def evaluate(pred_path: Path, gt_path: Path, iou: float | None = None, iou_type: str = "bbox",
             thresholds=(0.0, 0.25, 0.5, 0.75, 0.9)) -> EvalReport:
    return evaluate_data(_load(pred_path), _load(gt_path), iou, iou_type, thresholds)


def evaluate_data(pred: dict, gt: dict, iou: float | None = None, iou_type: str = "bbox",
                  thresholds=(0.0, 0.25, 0.5, 0.75, 0.9)) -> EvalReport:
    """`evaluate` on COCO dicts already in memory."""
    from pycocotools.coco import COCO

    for name, data in (("prediction", pred), ("ground truth", gt)):
        if not {"images", "annotations", "categories"} <= data.keys():
            raise EvalError(f"the {name} file is not COCO (needs images, annotations, categories)")
    with contextlib.redirect_stdout(io.StringIO()):
        gt_coco = COCO()
        gt_coco.dataset = gt
        gt_coco.createIndex()
    report = EvalReport(stats={}, by_threshold={})
    results = to_results(pred, gt, report)
    if iou_type == "segm":
        results = [r for r in results if "segmentation" in r]
    ev = _cocoeval(gt_coco, results, iou_type, iou)
    if ev is None:
        raise EvalError("no prediction matches the ground truth's images and categories "
                        "(images are matched by file_name, categories by name)")
    names = STAT_NAMES if iou is None else [f"AP@{iou:g}"] + STAT_NAMES[1:]
    report.stats = {n: float(v) for n, v in zip(names, ev.stats)}
    report.per_class = _per_class(ev, gt_coco)
    report.matches = sorted(report.matches + _matches(ev, 0.5 if iou is None else iou), key=lambda m: -m[0])
    for t in thresholds:
        kept = [r for r in results if r["score"] >= t]
        sub = _cocoeval(gt_coco, kept, iou_type, iou)
        report.by_threshold[t] = float(sub.stats[0]) if sub is not None else 0.0
    return report


def _matches(ev, iou: float) -> list[tuple[float, bool]]:
    """(score, matched) per judged box at IoU `iou`: COCOeval's greedy matching (by score, within
    an image and category, each ground-truth box once), read from evalImgs (area all; like AP,
    it judges an image's 100 best boxes per category)."""
    t = int(np.argmin(np.abs(ev.params.iouThrs - iou)))
    out = []
    for e in ev.evalImgs:
        if e is not None and e["aRng"] == ev.params.areaRng[0]:
            out += [(float(s), bool(m > 0)) for s, m, ignore in zip(e["dtScores"], e["dtMatches"][t], e["dtIgnore"][t])
                    if not ignore]
    return out


def _per_class(ev, gt_coco) -> dict[str, float]:
    """Mean precision over IoU thresholds and recall points, per category (area all, 100 dets)."""
    precision = ev.eval["precision"]  # [T, R, K, A, M]
    out = {}
    for k, cat_id in enumerate(ev.params.catIds):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        out[gt_coco.cats[cat_id]["name"]] = float(p.mean()) if p.size else float("nan")
    return out
