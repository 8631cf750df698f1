"""CVAT for images 1.1: one annotations.xml with the label list in <meta>, one <image> per image
(name = the image key, as CVAT matches uploaded annotations to a task's files by name), boxes as
<box>, masks and OCR lines as <polygon>. Each shape carries attributes `score` (our confidence),
`task` (the Florence-2 task that proposed it) and, for OCR lines, `text`. The parts of one mask
share a group_id, so the importer joins them again. Images are in key order with 0-based ids (CVAT
sorts a task's files by name and numbers its frames from 0), whatever --order says. The images are
linked (or with --copy-images copied) under images/<key>, the layout of CVAT's own dataset export."""

from __future__ import annotations

import shutil
import xml.etree.ElementTree as ET
from datetime import datetime, timezone

from exporters.files import place_image
from exporters.geometry import Instance
from exporters.options import ExportOptions, ExportSummary
from exporters.read import Run
from exporters.registry import register
from exporters.review_common import ReviewImage, hex_color, review_images, review_tasks
from exporters.safety import OutDir, check_key

# (name, CVAT input_type, values) of the attributes every label declares
XML_DECLARATION = "<?xml version='1.0' encoding='utf-8'?>\n"  # as ElementTree.write(xml_declaration=True) writes it
ATTRIBUTES = (("score", "number", "0;1;0.0001"), ("task", "text", ""), ("text", "text", ""))


def _num(v: float) -> str:
    return f"{v:.2f}"


def _attrs(el: ET.Element, inst: Instance) -> None:
    values = {"score": None if inst.score is None else f"{float(inst.score):.4f}", "task": inst.task, "text": inst.text}
    for name, value in values.items():
        if value is not None:
            ET.SubElement(el, "attribute", name=name).text = value


def cvat_shapes(parent: ET.Element, name: str, inst: Instance, group: int) -> None:
    """One instance -> its <box> or <polygon> elements under `parent` (an <image>)."""
    common = {"label": name, "source": "auto", "occluded": "0", "z_order": "0"}
    if not inst.polygons:
        x1, y1, x2, y2 = inst.bbox
        el = ET.SubElement(parent, "box", **common, xtl=_num(x1), ytl=_num(y1), xbr=_num(x2), ybr=_num(y2))
        _attrs(el, inst)
        return
    for poly in inst.polygons:
        points = ";".join(f"{_num(x)},{_num(y)}" for x, y in zip(poly[0::2], poly[1::2]))
        extra = {"group_id": str(group)} if len(inst.polygons) > 1 else {}
        el = ET.SubElement(parent, "polygon", **common, points=points, **extra)
        _attrs(el, inst)


def _meta(root: ET.Element, labels: list[str], size: int) -> None:
    task = ET.SubElement(ET.SubElement(root, "meta"), "task")
    for tag, text in (("id", "0"), ("name", "florence-annotate pre-annotations"), ("size", str(size)),
                      ("mode", "annotation"), ("overlap", "0")):
        ET.SubElement(task, tag).text = text
    xml_labels = ET.SubElement(task, "labels")
    for label in labels:
        el = ET.SubElement(xml_labels, "label")
        ET.SubElement(el, "name").text = label
        ET.SubElement(el, "color").text = hex_color(label)
        ET.SubElement(el, "type").text = "any"
        attrs = ET.SubElement(el, "attributes")
        for name, kind, values in ATTRIBUTES:
            a = ET.SubElement(attrs, "attribute")
            for tag, text in (("name", name), ("mutable", "False"), ("input_type", kind),
                              ("default_value", "0" if kind == "number" else ""), ("values", values)):
                ET.SubElement(a, tag).text = text
    ET.SubElement(root.find("meta"), "dumped").text = datetime.now(timezone.utc).isoformat(timespec="seconds")


def cvat_image(frame: int, img: ReviewImage, group: int) -> tuple[ET.Element, int]:
    """One <image> with its shapes; `group` counts the multi-part masks before it (group ids are
    unique in the document). Returns the element and the new count."""
    el = ET.Element("image", id=str(frame), name=img.key, width=str(img.width), height=str(img.height))
    for name, inst in img.instances:
        group += len(inst.polygons) > 1
        cvat_shapes(el, name, inst, group)
    return el, group


def cvat_head(labels: list[str], size: int) -> bytes:
    """The declaration, <annotations>, <version> and <meta>, indented as the whole document is,
    open for the <image> elements that follow."""
    root = ET.Element("annotations")
    ET.SubElement(root, "version").text = "1.1"
    _meta(root, labels, size)
    ET.indent(root)
    text = ET.tostring(root, encoding="unicode")
    return (XML_DECLARATION + text[:-len("</annotations>")]).encode("utf-8")


def cvat_image_bytes(el: ET.Element) -> bytes:
    """An <image> as it sits in the indented document: one level in, one per line."""
    ET.indent(el, level=1)
    return ("  " + ET.tostring(el, encoding="unicode") + "\n").encode("utf-8")


@register("cvat")
def export_cvat(run: Run, out: OutDir, opts: ExportOptions) -> ExportSummary:
    """annotations.xml written as it is read: the <image> elements go to a side file as they come,
    in key order, and follow the head once the image count (<meta><size>) is known."""
    summary = ExportSummary("cvat", out.root)
    tasks = review_tasks(run, opts, "cvat", text=False)
    dest, side = out.path("annotations.xml"), out.path(".annotations.part")
    group = frames = 0
    try:
        with open(side, "w+b") as body:
            for img in review_images(run, tasks, opts, summary):  # key order, whatever --order says
                el, group = cvat_image(frames, img, group)
                body.write(cvat_image_bytes(el))
                frames += 1
                _place(run, out, opts, img.key, summary)
            with open(dest, "wb") as fh:
                fh.write(cvat_head(summary.classes, frames))
                body.seek(0)
                shutil.copyfileobj(body, fh, 1 << 20)
                fh.write(b"</annotations>")
    finally:
        side.unlink(missing_ok=True)
    summary.splits.clear()  # a CVAT task has no subsets; the importer re-derives the split from the key
    return summary


def _place(run: Run, out: OutDir, opts: ExportOptions, key: str, summary: ExportSummary) -> None:
    """images/<key>: the layout of a CVAT dataset export (and what datumaro loads)."""
    src = run.find_image(key, summary.dropped)
    if src is not None:
        parts = check_key(key).parts
        out.mkdir("images", *parts[:-1])
        place_image(src, out.path("images", *parts), opts.copy_images)
