"""Synthetic run folders for the exporter tests: small PIL images under an input root, part files
written by annotator.outdir.table.PartWriter, and a manifest.json naming the root (as `annotate run` does)."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from annotator.outdir.table import Annotation, PartWriter

# key -> (width, height); two files named cat.jpg in different folders, a unicode name, a document
IMAGES = {
    "a/cat.jpg": (200, 100),
    "b/cat.jpg": (160, 120),
    "b/CAT.png": (64, 48),
    "doc.png": (300, 200),
    "ü/straße.png": (80, 60),
    "bad.jpg": (10, 10),
}


def write_images(root: Path, images: dict[str, tuple[int, int]] = IMAGES) -> None:
    for i, (key, (w, h)) in enumerate(sorted(images.items())):
        p = root / key
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (w, h), (40 * i % 256, 90, 200)).save(p)


def ok(image, task, **kw) -> Annotation:
    w, h = IMAGES.get(image, (100, 100))
    kw.setdefault("width", w)
    kw.setdefault("height", h)
    return Annotation(image=image, task=task, status="ok", **kw)


def standard_rows() -> list[list[Annotation]]:
    """Rows in two parts: the second part retries an error row of the first."""
    part1 = [
        ok("a/cat.jpg", "od", prompt="<OD>", bboxes=[[10, 10, 60, 50], [100, 20, 190, 90]], labels=["cat", "Dogs"]),
        Annotation.failed("b/cat.jpg", "od", "CUDA out of memory", 160, 120, "<OD>"),
        ok("b/CAT.png", "od", prompt="<OD>", bboxes=[[-5, -5, 30, 40], [20, 20, 20, 40]], labels=["cats", "car"]),
        ok("doc.png", "od", prompt="<OD>", bboxes=[], labels=[]),
        ok("ü/straße.png", "od", prompt="<OD>", bboxes=[[5, 5, 70, 55], [1, 1, 9, 9]], labels=["Straßenbahn", "dog"]),
        Annotation.failed("bad.jpg", "od", "cannot identify image file"),
        Annotation.failed("bad.jpg", "caption", "cannot identify image file"),
        ok("a/cat.jpg", "caption", prompt="<CAPTION>", text="A cat next to a dog."),
        ok("doc.png", "ocr", prompt="<OCR>", text="INVOICE 42\nTotal: 7 EUR"),
        ok("doc.png", "ocr_with_region", prompt="<OCR_WITH_REGION>",
           quad_boxes=[[10, 10, 120, 10, 120, 30, 10, 30], [10, 150, 200, 150, 200, 175, 10, 175]],
           labels=["INVOICE 42", "Total: 7 EUR"]),
        ok("a/cat.jpg", "region_to_segmentation", prompt="<REGION_TO_SEGMENTATION><loc_50><loc_100><loc_300><loc_500>",
           bboxes=[[10, 10, 60, 50], [100, 20, 190, 90]],
           polygons=[[[12, 12, 58, 12, 58, 48, 12, 48]], [[100, 20, 140, 20, 140, 60], [150, 60, 190, 60, 190, 90, 150, 90]]],
           labels=["cat", "dog"]),
        ok("b/cat.jpg", "open_vocabulary_detection", prompt="<OPEN_VOCABULARY_DETECTION>car",
           polygons=[[[10, 10, 80, 10, 80, 60, 10, 60]]], labels=["car"], scores=[0.9]),
    ]
    part2 = [
        ok("b/cat.jpg", "od", prompt="<OD>", bboxes=[[0, 0, 159, 119], [30, 30, 200, 200]], labels=["car", "car"],
           scores=[0.95, 0.2]),
    ]
    return [part1, part2]


def make_run(tmp_path: Path, parts: list[list[Annotation]] | None = None, images: dict | None = None,
             manifest: dict | None = None) -> tuple[Path, Path]:
    """-> (annotations folder, image root)."""
    root = tmp_path / "images"
    write_images(root, images or IMAGES)
    ann = tmp_path / "annotations"
    ann.mkdir()
    for rows in parts if parts is not None else standard_rows():
        w = PartWriter(ann)
        w.add(rows)
        w.flush()
    m = {"inputs": [str(root.resolve())], "schema_version": 1, "tasks": [], "identity": {},
         "package_version": "0.1.0", "started": "2025-01-01T00:00:00"}
    m.update(manifest or {})
    (ann / "manifest.json").write_text(json.dumps(m))
    return ann, root
