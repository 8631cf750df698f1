"""COCO detection/segmentation JSON: one annotations.json; file_name is the image key (relative to
the input root), image ids are the 1-based rank of the key among all keys of the run, so they are
the same in every export of the same run whatever --task or --classes say."""

from __future__ import annotations

import json

from exporters.base import Export
from exporters.boxes import DETECTION_DEFAULTS, build_vocab, labelled
from exporters.geometry import polygon_area, xyxy_to_xywh
from exporters.options import ExportOptions, ExportSummary
from exporters.read import Run
from exporters.registry import register
from exporters.safety import OutDir, is_safe_key


def coco_annotation(ann_id: int, image_id: int, category_id: int, inst) -> dict:
    """One COCO annotation from a clipped instance (pure; tested alone)."""
    x, y, w, h = xyxy_to_xywh(inst.bbox)
    ann = {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "bbox": [round(v, 2) for v in (x, y, w, h)],
        "iscrowd": 0,
    }
    if inst.polygons:
        ann["segmentation"] = [[round(v, 2) for v in p] for p in inst.polygons]
        ann["area"] = round(sum(polygon_area(p) for p in inst.polygons), 2)
    else:
        ann["area"] = round(w * h, 2)
    if getattr(inst, "score", None) is not None:  # reviewed regions (importers.py) have none
        ann["score"] = round(float(inst.score), 4)
    if inst.text is not None:
        ann["text"] = inst.text
    return ann


@register("coco")
def export_coco(run: Run, out: OutDir, opts: ExportOptions) -> ExportSummary:
    ex = Export.start("coco", run, out, opts, DETECTION_DEFAULTS)
    summary, tasks = ex.summary, ex.tasks
    vocab = build_vocab(run, tasks, opts, summary)
    image_id = {k: i for i, k in enumerate(run.image_keys(), 1)}  # all tasks: stable across exports
    images, annotations = [], []
    for img, kept in labelled(run, tasks, vocab, opts, summary):
        if not is_safe_key(img.key):
            summary.dropped["unsafe image key"] += 1
            continue
        if not kept and opts.skip_empty:
            summary.dropped["empty images skipped"] += 1
            continue
        iid = image_id[img.key]
        images.append({"id": iid, "file_name": img.key, "width": img.width, "height": img.height})
        for cls, inst in kept:
            annotations.append(coco_annotation(len(annotations) + 1, iid, cls + 1, inst))
    data = {
        "info": {"description": f"florence-annotate export of {run.folder}", "tasks": tasks},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": n, "supercategory": ""} for i, n in enumerate(vocab.names)],
    }
    with open(out.path("annotations.json"), "w", encoding="utf-8") as fh:
        json.dump(data, fh, ensure_ascii=False)
    summary.images, summary.instances = len(images), len(annotations)
    return summary
