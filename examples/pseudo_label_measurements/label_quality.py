"""Pseudo-label quality against the unlabelled set's truth (which the loop never uses): per score
threshold, precision and recall of boxes (IoU >= 0.5, same label), and images with any box.

    python examples/pseudo_label_measurements/label_quality.py LABELS_DIR TRUTH_COCO_JSON

LABELS_DIR: an `annotate run --out` folder (its od rows); TRUTH: the scenes' COCO file
(`annotate samples` writes one). Unscored boxes count as score 1.0 (they pass every threshold)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import polars as pl


def iou(a, b) -> float:
    x1, y1, x2, y2 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    inter = max(0, x2 - x1) * max(0, y2 - y1)
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter + 1e-9)


def load(labels: str, truth: str, unscored: float = 1.0):
    """-> ({image: [(label, xyxy)]} of the truth, {image: [(label, xyxy, score)]} of the labels); the
    boxes of an unscored row get `unscored` (1.0: they pass every threshold; 0.0: dropped, as the export does)."""
    coco = json.loads(Path(truth).read_text())
    cats = {c["id"]: c["name"] for c in coco["categories"]}
    names = {i["id"]: i["file_name"] for i in coco["images"]}
    gt = {n: [] for n in names.values()}
    for a in coco["annotations"]:
        x, y, w, h = a["bbox"]
        gt[names[a["image_id"]]].append((cats[a["category_id"]], (x, y, x + w, y + h)))
    rows = pl.read_parquet(sorted(str(p) for p in Path(labels).glob("*.parquet"))).filter(pl.col("task") == "od")
    preds = {}
    for r in rows.iter_rows(named=True):
        boxes, labels_ = r["bboxes"] or [], r["labels"] or []
        scores = r["scores"] if r["scores"] is not None else [unscored] * len(boxes)
        preds[r["image"]] = [(lab, tuple(b), float(s)) for lab, b, s in zip(labels_, boxes, scores)]
    return gt, preds


def match(gt, preds):
    """-> [(image, score, is a true positive)] over all predictions (greedy by score), and the truth count."""
    out = []
    for img, ps in preds.items():
        used = set()
        for lab, box, score in sorted(ps, key=lambda p: -p[2]):
            hit = next((j for j, (gl, gb) in enumerate(gt[img]) if j not in used and gl == lab and iou(box, gb) >= 0.5), None)
            if hit is not None:
                used.add(hit)
            out.append((img, score, hit is not None))
    return out, sum(len(v) for v in gt.values())


if __name__ == "__main__":
    labels_dir, truth_file = sys.argv[1], sys.argv[2]
    gt, preds = load(labels_dir, truth_file)
    m, ngt = match(gt, preds)
    print(f"{labels_dir}: {len(gt)} images, {ngt} true objects ({ngt / len(gt):.1f}/img), {len(m)} predicted boxes")
    for t in (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9):
        kept = [x for x in m if x[1] >= t]
        tp = sum(x[2] for x in kept)
        print(f"  >= {t:.1f}: {len(kept):4d} boxes, precision {tp / max(1, len(kept)):.2f}, recall {tp / ngt:.2f}, "
              f"images with a box {len({x[0] for x in kept})}")
