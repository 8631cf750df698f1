"""COCO detection/segmentation JSON: one annotations.json; file_name is the image key (relative to
the input root), image ids are the 1-based rank of the key among all keys of the run, so they are
the same in every export of the same run whatever --task or --classes say."""

from __future__ import annotations

import json
import shutil

from exporters.base import Export, KeyRanks, exportable, no_instances
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
    """annotations.json written as it is read: info and categories, then each image as its rows come
    (its id counted on the way), its annotations going to a side file that is appended at the end.
    Memory does not grow with the dataset (README, "Export memory")."""
    ex = Export.start("coco", run, out, opts, DETECTION_DEFAULTS)
    summary, tasks = ex.summary, ex.tasks
    vocab = build_vocab(run, tasks, opts, summary)
    ids = KeyRanks(run.iter_image_keys())  # all tasks: ids are stable across exports
    dest, side = out.path("annotations.json"), out.path(".annotations.part")
    n_images = n_anns = 0
    try:
        with open(dest, "w", encoding="utf-8") as fh, open(side, "w+", encoding="utf-8") as anns:
            head = {"info": {"description": f"florence-annotate export of {run.folder}", "tasks": tasks},
                    "categories": [{"id": i + 1, "name": n, "supercategory": ""} for i, n in enumerate(vocab.names)]}
            fh.write(json.dumps(head, ensure_ascii=False)[:-1] + ', "images": [')
            records = labelled(run, tasks, vocab, opts, summary)
            for img, kept in exportable(records, summary, is_safe_key, no_instances if opts.skip_empty else None):
                iid = ids.rank(img.key)
                record = {"id": iid, "file_name": img.key, "width": img.width, "height": img.height}
                fh.write((", " if n_images else "") + json.dumps(record, ensure_ascii=False))
                n_images += 1
                for cls, inst in kept:
                    n_anns += 1
                    anns.write((", " if n_anns > 1 else "") + json.dumps(coco_annotation(n_anns, iid, cls + 1, inst),
                                                                        ensure_ascii=False))
            fh.write('], "annotations": [')
            anns.seek(0)
            shutil.copyfileobj(anns, fh, 1 << 20)
            fh.write("]}")
    finally:
        side.unlink(missing_ok=True)
    summary.images, summary.instances = n_images, n_anns
    return summary
