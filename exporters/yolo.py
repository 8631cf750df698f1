"""YOLO (ultralytics) layout: data.yaml, images/{train,val}/ (symlinks, or copies with
--copy-images), labels/{train,val}/<stem>.txt with `class cx cy w h` in [0, 1], or with --segments
`class x1 y1 x2 y2 ...` polygons (plain boxes then written as their four corners, since ultralytics
reads a label file as segments when any line is longer than a box)."""

from __future__ import annotations

from collections import Counter

import yaml

from exporters.base import Export, exportable, no_instances
from exporters.boxes import DETECTION_DEFAULTS, build_vocab, labelled
from exporters.files import place_image
from exporters.geometry import Instance, xyxy_to_cxcywh_norm
from exporters.options import ExportOptions, ExportSummary
from exporters.read import Run
from exporters.registry import register
from exporters.safety import OutDir

SPLITS = ("train", "val")


def _fmt(v: float) -> str:
    return f"{min(max(v, 0.0), 1.0):.6f}"


def merge_parts(polys: list[list[float]]) -> list[float]:
    """Several polygon parts of one instance -> one ring, as YOLO allows one polygon per line:
    walk each part back to its start, hop to the next part's start, and come back the same way,
    so the hops are zero-width seams and the filled area is the union of the parts."""
    if len(polys) == 1:
        return list(polys[0])
    ring: list[float] = []
    for p in polys:
        ring += list(p) + list(p[:2])
    for p in reversed(polys[:-1]):
        ring += list(p[:2])
    return ring


def yolo_box_line(cls: int, inst: Instance, width: int, height: int) -> str:
    cx, cy, w, h = xyxy_to_cxcywh_norm(inst.bbox, width, height)
    return " ".join([str(cls), *(_fmt(v) for v in (cx, cy, w, h))])


def yolo_segment_line(cls: int, inst: Instance, width: int, height: int) -> str:
    if inst.polygons:
        ring = merge_parts(inst.polygons)
    else:
        x1, y1, x2, y2 = inst.bbox
        ring = [x1, y1, x2, y1, x2, y2, x1, y2]
    return " ".join([str(cls), *(_fmt(v / (width if i % 2 == 0 else height)) for i, v in enumerate(ring))])


@register("yolo")
def export_yolo(run: Run, out: OutDir, opts: ExportOptions) -> ExportSummary:
    ex = Export.start("yolo", run, out, opts, DETECTION_DEFAULTS)
    summary, tasks = ex.summary, ex.tasks
    vocab = build_vocab(run, tasks, opts, summary)
    layout = ex.layout()
    for split in SPLITS:
        out.mkdir("images", split)
        out.mkdir("labels", split)
    line = yolo_segment_line if opts.segments else yolo_box_line
    per_split: Counter = Counter()
    records = labelled(run, tasks, vocab, opts, summary)
    for img, kept in exportable(records, summary, layout.holds, no_instances if opts.skip_empty else None):
        src = run.find_image(img.key, summary.dropped)
        if src is None:
            continue
        split, name = layout.split(img.key), layout.name(img.key)
        place_image(src, out.path("images", split, name), opts.copy_images)
        stem = name.rsplit(".", 1)[0] if "." in name else name
        lines = [line(cls, inst, img.width, img.height) for cls, inst in kept]
        out.path("labels", split, stem + ".txt").write_text("".join(l + "\n" for l in lines), encoding="utf-8")
        per_split[split] += 1
        summary.instances += len(kept)
    data = {
        "path": str(out.root),
        "train": "images/train",
        "val": "images/val",
        "names": {i: n for i, n in enumerate(vocab.names)},
    }
    out.path("data.yaml").write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return ex.finish(per_split)
