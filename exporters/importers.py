"""`annotate import`: reviewed labels (exporters.review_read) -> a ground-truth COCO file, or Florence-2
pairs in the florence export's layout (train/ and valid/ with annotations.jsonl and the images).
The split is the export's key-hash split, so an image lands in the same split as before review."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

from annotator.tasks import TASKS
from exporters.errors import ExportError
from exporters.files import assign_splits, flat_names, place_image
from exporters.florence import SPLIT_DIRS, florence_pairs
from exporters.coco import coco_annotation
from exporters.options import ExportSummary
from exporters.read import Row
from exporters.review_read import Reviewed, ReviewedImage, read_cvat, read_labelstudio
from exporters.safety import OutDir, check_key

SOURCES = ("labelstudio", "cvat")
TARGETS = ("coco", "florence")


def reviewed_coco(rev: Reviewed, source: str) -> dict:
    """COCO detection JSON; categories by name (eval matches them by name), ids from 1 in key order.
    OCR lines keep their text in `text`; whole-image answers (captions) go in the image's `texts`."""
    names = sorted({r.label for img in rev.images for r in img.regions})
    cat = {n: i for i, n in enumerate(names, 1)}
    images, anns = [], []
    for iid, img in enumerate(rev.images, 1):
        entry = {"id": iid, "file_name": img.key, "width": img.width, "height": img.height}
        if img.texts:
            entry["texts"] = dict(img.texts)
        images.append(entry)
        for r in img.regions:
            anns.append(coco_annotation(len(anns) + 1, iid, cat[r.label], r))
    return {"info": {"description": f"reviewed labels imported from {source}"}, "images": images,
            "annotations": anns, "categories": [{"id": i, "name": n, "supercategory": ""} for n, i in cat.items()]}


def reviewed_rows(img: ReviewedImage) -> list[Row]:
    """An image's reviewed labels as annotation rows, so the florence exporter's own converter
    writes the pairs: regions -> `od`, transcribed lines -> `ocr_with_region`, texts -> their task."""
    size = {"image": img.key, "width": img.width, "height": img.height}
    boxes = [r for r in img.regions if r.text is None]
    lines = [r for r in img.regions if r.text is not None]
    rows = []
    if boxes:
        rows.append(Row(task="od", prompt=TASKS["od"].token, bboxes=[list(r.bbox) for r in boxes],
                        labels=[r.label for r in boxes], **size))
    if lines:
        quads = [r.polygons[0] if len(r.polygons) == 1 and len(r.polygons[0]) == 8 else _corners(r.bbox) for r in lines]
        rows.append(Row(task="ocr_with_region", prompt=TASKS["ocr_with_region"].token, quad_boxes=quads,
                        labels=[r.text for r in lines], **size))
    for task, text in img.texts.items():
        if task in TASKS:
            rows.append(Row(task=task, prompt=TASKS[task].token, text=text, **size))
    return rows


def _corners(b) -> list[float]:
    x1, y1, x2, y2 = b
    return [x1, y1, x2, y1, x2, y2, x1, y2]


def write_florence(rev: Reviewed, out: OutDir, roots: list[Path], val_fraction: float, copy: bool,
                   summary: ExportSummary) -> None:
    keys = [img.key for img in rev.images]
    split_of, names = assign_splits(keys, val_fraction), flat_names(keys)
    files = {}
    for split, d in SPLIT_DIRS.items():
        out.mkdir(d)
        files[split] = open(out.path(d, "annotations.jsonl"), "w", encoding="utf-8")
    try:
        for img in rev.images:
            pairs = [p for row in reviewed_rows(img) for p in florence_pairs(row, summary.dropped)]
            src = _find(img.key, roots)
            if not pairs:
                continue
            if src is None:
                summary.dropped["image file not found"] += 1
                continue
            split, name = split_of[img.key], names[img.key]
            place_image(src, out.path(SPLIT_DIRS[split], name), copy)
            for prefix, suffix in pairs:
                files[split].write(json.dumps({"image": name, "prefix": prefix, "suffix": suffix}, ensure_ascii=False) + "\n")
            summary.splits[SPLIT_DIRS[split]] += 1
            summary.records += len(pairs)
    finally:
        for fh in files.values():
            fh.close()
    summary.images = sum(summary.splits.values())


def _find(key: str, roots: list[Path]) -> Path | None:
    rel = check_key(key)
    return next((r / rel for r in roots if (r / rel).is_file()), None)


def run_import(source: str, path: Path, out: Path, target: str = "coco", image_root: str | None = None,
               images: tuple[Path, ...] = (), val_fraction: float = 0.1, copy_images: bool = False,
               overwrite: bool = False) -> ExportSummary:
    if source not in SOURCES or target not in TARGETS:
        raise ExportError(f"import from {source!r} to {target!r}: sources {SOURCES}, targets {TARGETS}")
    if target == "florence" and not images:
        raise ExportError("--format florence copies or links the images: give their folder with --images")
    rev = read_labelstudio(Path(path), image_root) if source == "labelstudio" else read_cvat(Path(path))
    if not rev.images:
        raise ExportError(f"{path} holds no reviewed image" + (
            f" ({', '.join(f'{k} {n}' for k, n in sorted(rev.dropped.items()))})" if rev.dropped else ""))
    out_dir = OutDir.prepare(Path(out), overwrite)
    summary = ExportSummary(target, out_dir.root, tasks=[f"import {source}"], dropped=Counter(rev.dropped))
    try:
        if target == "coco":
            data = reviewed_coco(rev, source)
            with open(out_dir.path("annotations.json"), "w", encoding="utf-8") as fh:
                json.dump(data, fh, ensure_ascii=False)
            summary.images, summary.instances = len(data["images"]), len(data["annotations"])
            summary.classes = [c["name"] for c in data["categories"]]
        else:
            write_florence(rev, out_dir, [Path(p) for p in images], val_fraction, copy_images, summary)
    except BaseException:
        shutil.rmtree(out_dir.root, ignore_errors=True)
        raise
    return summary
