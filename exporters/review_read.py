"""Reviewed labels back in: a Label Studio JSON export or a CVAT for images 1.1 XML -> one list of
ReviewedImage (pixels, xyxy), then a ground-truth COCO file (for `annotate eval`) or Florence-2
pairs (for `annotate finetune`).

Both files come from outside: keys are checked like the run's keys, geometry is clipped to the
image, and whatever does not parse is counted by reason, never silently lost. Label Studio tasks
nobody annotated are left out (their predictions were never accepted by a person)."""

from __future__ import annotations

import json
import math
import re
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote

from exporters.errors import ExportError
from exporters.geometry import clip_box, clip_polygon, polygons_extent
from exporters.safety import is_safe_key

_PART_ID = re.compile(r"^(r\d+)p\d+$")  # labelstudio.py names polygon parts r7, r7p1, r7p2, ...


@dataclass
class Region:
    label: str
    bbox: tuple[float, float, float, float]  # xyxy pixels, clipped
    polygons: list[list[float]] = field(default_factory=list)
    text: str | None = None  # an OCR line's transcription


@dataclass
class ReviewedImage:
    key: str
    width: int
    height: int
    regions: list[Region] = field(default_factory=list)
    texts: dict[str, str] = field(default_factory=dict)  # text task -> reviewed answer


@dataclass
class Reviewed:
    images: list[ReviewedImage]
    dropped: Counter = field(default_factory=Counter)


# --- Label Studio ---------------------------------------------------------------------------------
def _pick_annotation(task: dict) -> dict | None:
    """The newest annotation that was not skipped ("was_cancelled"); Label Studio lists them oldest first."""
    anns = [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]
    if not anns:
        return None
    return max(enumerate(anns), key=lambda ia: (str(ia[1].get("updated_at") or ""), ia[0]))[1]


def _rect_to_xyxy(v: dict, w: float, h: float) -> tuple[float, float, float, float]:
    """Percent x/y/width/height, rotated by `rotation` degrees about its top-left corner (Label Studio's
    convention) -> the pixel box that holds it."""
    x, y, bw, bh = (float(v[k]) * s / 100.0 for k, s in (("x", w), ("y", h), ("width", w), ("height", h)))
    a = math.radians(float(v.get("rotation") or 0.0))
    c, s = math.cos(a), math.sin(a)
    xs = [x + dx * c - dy * s for dx, dy in ((0, 0), (bw, 0), (bw, bh), (0, bh))]
    ys = [y + dx * s + dy * c for dx, dy in ((0, 0), (bw, 0), (bw, bh), (0, bh))]
    return (min(xs), min(ys), max(xs), max(ys))


def _ls_key(data: dict, image_root: str | None) -> str | None:
    """The image key: data.key as written by the export, else data.image less --image-root (unquoted)."""
    if isinstance(data.get("key"), str):
        return data["key"]
    url = data.get("image")
    if not isinstance(url, str):
        return None
    if image_root and url.startswith(image_root):
        url = url[len(image_root):]
    return unquote(url) if "%" in url else url


def ls_image(task: dict, image_root: str | None, drops: Counter) -> ReviewedImage | None:
    """One Label Studio task -> its reviewed image, or None (counted) when it cannot be used."""
    data = task.get("data") or {}
    key = _ls_key(data, image_root)
    if not key or not is_safe_key(key):
        drops["unsafe or missing image key"] += 1
        return None
    ann = _pick_annotation(task)
    if ann is None:
        drops["task not annotated"] += 1
        return None
    results = [r for r in ann.get("result") or [] if isinstance(r, dict)]
    w = data.get("width") or next((r.get("original_width") for r in results if r.get("original_width")), None)
    h = data.get("height") or next((r.get("original_height") for r in results if r.get("original_height")), None)
    try:
        w, h = int(float(w)), int(float(h))  # "640", 640.0; "wide" or a list is no size
    except (TypeError, ValueError, OverflowError):
        w = h = 0
    if w <= 0 or h <= 0:
        drops["no image size"] += 1
        return None
    img = ReviewedImage(key, w, h)
    regions: dict[str, Region] = {}  # result id (stem) -> region, to join parts and transcriptions
    region_texts: dict[str, str] = {}  # result id -> per-region transcription
    for r in results:
        try:
            _ls_result(r, img, regions, region_texts, drops)
        except (KeyError, TypeError, ValueError):
            drops["unreadable result"] += 1
    for rid, text in region_texts.items():
        m = _PART_ID.match(rid)
        region = regions.get(rid) or (regions.get(m.group(1)) if m else None)
        if region is None:
            drops["transcription without its region"] += 1
        elif region.text is None:
            region.text = text
    img.regions = list(regions.values())
    return img


def _ls_result(r: dict, img: ReviewedImage, regions: dict, texts: dict, drops: Counter) -> None:
    kind, v = r.get("type"), r.get("value") or {}
    rid = str(r.get("id") or "")
    w, h = float(r.get("original_width") or img.width), float(r.get("original_height") or img.height)
    sx, sy = img.width / w, img.height / h  # the result's own size wins; rescale if it differs
    if kind == "textarea":
        text = "\n".join(str(t) for t in v.get("text") or [])
        if "points" in v or "x" in v:  # a per-region transcription: joined to its region by id
            texts[rid] = text
        elif text.strip():  # a whole-image answer: keyed by its control (the task name)
            img.texts[str(r.get("from_name"))] = text.strip()
        return
    if kind not in ("rectanglelabels", "polygonlabels"):
        drops[f"{kind} results ignored"] += 1
        return
    label = (v.get(kind) or [""])[0].strip()
    if not label:
        drops["empty label"] += 1
        return
    if kind == "rectanglelabels":
        x1, y1, x2, y2 = _rect_to_xyxy(v, w, h)
        box = clip_box((x1 * sx, y1 * sy, x2 * sx, y2 * sy), img.width, img.height)
        if box is None:
            drops["degenerate box"] += 1
            return
        regions[rid] = Region(label, box)
        return
    flat = [c for x, y in v["points"] for c in (float(x) * w / 100 * sx, float(y) * h / 100 * sy)]
    poly = clip_polygon(flat, img.width, img.height)
    if poly is None:
        drops["degenerate polygon"] += 1
        return
    m = _PART_ID.match(rid)
    stem = m.group(1) if m and m.group(1) in regions else rid
    if stem in regions and regions[stem].label == label and regions[stem].polygons:
        region = regions[stem]
        region.polygons.append(poly)
        region.bbox = polygons_extent(region.polygons)
    else:
        regions[rid] = Region(label, polygons_extent([poly]), [poly])


def read_labelstudio(path: Path, image_root: str | None = None) -> Reviewed:
    try:
        tasks = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ExportError(f"cannot read {path} as a Label Studio JSON export: {e}") from None
    if isinstance(tasks, dict):
        tasks = [tasks]
    if not isinstance(tasks, list):
        raise ExportError(f"{path} is not a Label Studio JSON export (a list of tasks)")
    out = Reviewed([])
    for task in tasks:
        img = ls_image(task, image_root, out.dropped) if isinstance(task, dict) else None
        if img is not None:
            out.images.append(img)
    return _dedupe(out)


# --- CVAT -----------------------------------------------------------------------------------------
def _cvat_attrs(el: ET.Element) -> dict[str, str]:
    return {a.get("name", ""): a.text or "" for a in el.findall("attribute")}


def cvat_image(el: ET.Element, drops: Counter) -> ReviewedImage | None:
    key = el.get("name") or ""
    try:
        w, h = int(el.get("width", "0")), int(el.get("height", "0"))
    except ValueError:
        w = h = 0
    if not is_safe_key(key) or w <= 0 or h <= 0:
        drops["unsafe image key" if not is_safe_key(key) else "no image size"] += 1
        return None
    img = ReviewedImage(key, w, h)
    groups: dict[tuple[str, str], Region] = {}  # (group_id, label) -> region: parts of one mask
    for shape in el:
        if shape.tag not in ("box", "polygon"):
            if shape.tag != "tag":
                drops[f"{shape.tag} shapes ignored"] += 1
            continue
        label = (shape.get("label") or "").strip()
        text = _cvat_attrs(shape).get("text") or None
        try:
            if shape.tag == "box":
                x1, y1, x2, y2 = (float(shape.get(k)) for k in ("xtl", "ytl", "xbr", "ybr"))
                cx, cy, bw, bh = (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1
                # CVAT rotates a box about its centre, clockwise in degrees
                v = {"x": cx, "y": cy, "width": bw, "height": bh, "rotation": float(shape.get("rotation") or 0)}
                box = clip_box(_centre_box(v), w, h)
                poly = None
            else:
                flat = [float(c) for pair in (shape.get("points") or "").split(";") for c in pair.split(",")]
                poly = clip_polygon(flat, w, h)
                box = polygons_extent([poly]) if poly else None
        except (TypeError, ValueError):
            drops["unreadable shape"] += 1
            continue
        if not label:
            drops["empty label"] += 1
        elif box is None:
            drops["degenerate " + ("box" if shape.tag == "box" else "polygon")] += 1
        elif poly is not None and shape.get("group_id", "0") not in ("", "0") and (shape.get("group_id"), label) in groups:
            region = groups[(shape.get("group_id"), label)]
            region.polygons.append(poly)
            region.bbox = polygons_extent(region.polygons)
        else:
            region = Region(label, box, [poly] if poly else [], text)
            img.regions.append(region)
            if poly is not None and shape.get("group_id", "0") not in ("", "0"):
                groups[(shape.get("group_id"), label)] = region
    return img


def _centre_box(v: dict) -> tuple[float, float, float, float]:
    a = math.radians(v["rotation"])
    c, s = abs(math.cos(a)), abs(math.sin(a))
    hw, hh = (v["width"] * c + v["height"] * s) / 2, (v["width"] * s + v["height"] * c) / 2
    return (v["x"] - hw, v["y"] - hh, v["x"] + hw, v["y"] + hh)


def read_cvat(path: Path) -> Reviewed:
    """Streamed with iterparse: a task with many images is not held as one tree. The standard library's
    expat resolves no external entities and limits entity expansion (billion laughs)."""
    out = Reviewed([])
    try:
        for _, el in ET.iterparse(str(path), events=("end",)):
            if el.tag == "image":
                img = cvat_image(el, out.dropped)
                if img is not None:
                    out.images.append(img)
                el.clear()
            elif el.tag == "track":
                out.dropped["tracks ignored (video)"] += 1
    except (OSError, ET.ParseError) as e:
        raise ExportError(f"cannot read {path} as CVAT for images 1.1 XML: {e}") from None
    return _dedupe(out)


def _dedupe(rev: Reviewed) -> Reviewed:
    """One entry per key, in key order (a task imported twice into Label Studio appears twice)."""
    seen: dict[str, ReviewedImage] = {}
    for img in rev.images:
        if img.key in seen:
            rev.dropped["duplicate image key (later one kept)"] += 1
        seen[img.key] = img
    rev.images = [seen[k] for k in sorted(seen)]
    return rev
