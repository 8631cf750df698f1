"""Label Studio pre-annotations: tasks.json (one task per image, its `predictions` holding our
answers) and labeling.xml, the labeling config those predictions refer to, so that a project made
with that config imports tasks.json in one step.

Coordinates are Label Studio's: percent of the image's width and height (0..100). Boxes are
`rectanglelabels`, masks `polygonlabels` (one region per polygon part; the parts of one instance
share an id stem `r7`, `r7p1`, ... so the importer joins them again), OCR lines a `text` polygon
with a per-region `textarea` holding the line, whole-image text answers one `textarea` per task."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator
from urllib.parse import quote

from exporters.errors import ExportError
from exporters.geometry import Instance
from exporters.options import ExportOptions, ExportSummary
from exporters.ordering import by_score
from exporters.read import Run
from exporters.registry import register
from exporters.review_common import TEXT_TASKS, ReviewImage, hex_color, model_version, review_images, review_tasks
from exporters.safety import OutDir

IMAGE = "image"  # the <Image> object tag and the task's data field
BOX, POLY, TRANSCRIPTION = "label", "polygon", "transcription"  # control tag names
PRECISION = 4  # decimals of a percent: 0.01 px on a 10 000 px side


def _pct(v: float, size: float) -> float:
    return round(100.0 * v / size, PRECISION)


def _points(flat: list[float], w: int, h: int) -> list[list[float]]:
    return [[_pct(x, w), _pct(y, h)] for x, y in zip(flat[0::2], flat[1::2])]


def ls_results(rid: str, name: str, inst: Instance, w: int, h: int) -> list[dict]:
    """One instance -> its Label Studio result items (pure; tested alone)."""
    common = {"to_name": IMAGE, "original_width": w, "original_height": h, "image_rotation": 0}
    if inst.score is not None:
        common["score"] = round(float(inst.score), 4)
    if not inst.polygons:
        x1, y1, x2, y2 = inst.bbox
        value = {"x": _pct(x1, w), "y": _pct(y1, h), "width": _pct(x2 - x1, w), "height": _pct(y2 - y1, h),
                 "rotation": 0}
        return [{"id": rid, "from_name": BOX, "type": "rectanglelabels", **common,
                 "value": {**value, "rectanglelabels": [name]}}]
    out = []
    for k, poly in enumerate(inst.polygons):
        pid = rid if k == 0 else f"{rid}p{k}"
        value = {"points": _points(poly, w, h), "closed": True}
        out.append({"id": pid, "from_name": POLY, "type": "polygonlabels", **common,
                    "value": {**value, "polygonlabels": [name]}})
        if inst.text is not None:  # an OCR line: its text belongs to the same region (same id)
            out.append({"id": pid, "from_name": TRANSCRIPTION, "type": "textarea", **common,
                        "value": {**value, "text": [inst.text]}})
    return out


def ls_task(img: ReviewImage, image_url: str, version: str) -> dict:
    results: list[dict] = []
    for n, (name, inst) in enumerate(img.instances):
        results += ls_results(f"r{n}", name, inst, img.width, img.height)
    for task, text in img.texts.items():
        results.append({"id": f"t_{task}", "from_name": task, "to_name": IMAGE, "type": "textarea",
                        "value": {"text": [text]}})
    prediction = {"model_version": version, "result": results}
    if img.min_score is not None:
        prediction["score"] = round(img.min_score, 4)  # Label Studio sorts and filters tasks by it
    data = {IMAGE: image_url, "key": img.key, "width": img.width, "height": img.height, "split": img.split}
    return {"data": data, "predictions": [prediction]}


def labeling_config(labels: list[str], polygons: bool, ocr: bool, text_tasks: list[str]) -> str:
    """The <View> the predictions refer to. Built with ElementTree so labels are escaped."""
    view = ET.Element("View")
    ET.SubElement(view, "Image", name=IMAGE, value=f"${IMAGE}", zoom="true", zoomControl="true")
    if labels:
        names = [(BOX, "RectangleLabels")] + ([(POLY, "PolygonLabels")] if polygons or ocr else [])
        for name, tag in names:
            ctl = ET.SubElement(view, tag, name=name, toName=IMAGE)
            for label in labels:
                ET.SubElement(ctl, "Label", value=label, background=hex_color(label))
    if ocr:
        ET.SubElement(view, "TextArea", name=TRANSCRIPTION, toName=IMAGE, editable="true", perRegion="true",
                      required="false", displayMode="region-list", rows="2", placeholder="text of the line")
    for task in text_tasks:
        ET.SubElement(view, "Header", value=task.replace("_", " "))
        ET.SubElement(view, "TextArea", name=task, toName=IMAGE, editable="true", maxSubmissions="1", rows="3")
    ET.indent(view)
    return ET.tostring(view, encoding="unicode") + "\n"


def image_url(key: str, root: str | None) -> str:
    """data.image: --image-root + the key, URL-quoted when the root is a URL or a query (`?d=`)."""
    if not root:
        return key
    is_url = "://" in root or "?" in root
    return root + (quote(key, safe="/") if is_url else key)


@register("labelstudio")
def export_labelstudio(run: Run, out: OutDir, opts: ExportOptions) -> ExportSummary:
    """tasks.json written as it is read, one task at a time (through ordering.by_score with
    --order score); labeling.xml after it, once the shapes seen are known."""
    summary = ExportSummary("labelstudio", out.root)
    config_out = _check_config_out(opts.config_out, out)
    tasks = review_tasks(run, opts, "labelstudio", text=True)
    images = review_images(run, tasks, opts, summary)
    seen = {"polygons": False}
    version = model_version(run)

    def records() -> Iterator[tuple[float | None, bytes]]:
        for img in images:
            seen["polygons"] = seen["polygons"] or any(inst.polygons for _, inst in img.instances)
            task = ls_task(img, image_url(img.key, opts.image_root), version)
            yield img.min_score, json.dumps(task, ensure_ascii=False).encode("utf-8")

    ordered = by_score(records(), out.root) if opts.order == "score" else (r for _, r in records())
    with open(out.path("tasks.json"), "wb") as fh:
        write_json_array(fh, ordered)
    ocr = "ocr_with_region" in tasks
    # OCR lines are drawn as `text` polygons even when the run found none yet: reviewers add them
    labels = summary.classes + (["text"] if ocr and "text" not in summary.classes else [])
    config = labeling_config(labels, seen["polygons"], ocr, [t for t in tasks if t in TEXT_TASKS])
    out.path("labeling.xml").write_text(config, encoding="utf-8")
    if config_out is not None:
        config_out.write_text(config, encoding="utf-8")
    return summary


def write_json_array(fh: BinaryIO, items: Iterable[bytes]) -> None:
    """A JSON array of already encoded items, as json.dump writes a list: `[a, b]`."""
    fh.write(b"[")
    for n, item in enumerate(items):
        fh.write(b", " + item if n else item)
    fh.write(b"]")


def _check_config_out(path: Path | None, out: OutDir) -> Path | None:
    """--config-out is a path the user named (it may lie outside --out); never clobber a file."""
    if path is None:
        return None
    path = Path(path)
    if path.exists() and out.root not in path.resolve().parents:
        raise ExportError(f"--config-out {path} exists; remove it or choose another name")
    if not path.parent.is_dir():
        raise ExportError(f"--config-out {path}: folder {path.parent} does not exist")
    return path
