"""Drawing annotation rows on an image: boxes, polygons and OCR quads with their labels, in a
colour per label that is the same in every image and run, and a band of caption/OCR text under
it. Used by `annotate preview` (preview.py); the colours are exporters/colors.py's, shared with the review exporters."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, ImageOps

from annotator.outdir.table import OK
from exporters.colors import label_color


# --- drawing ------------------------------------------------------------------------------------
def _text_fill(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    lum = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    return (0, 0, 0) if lum > 140 else (255, 255, 255)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow < 10.1 or no FreeType: the fixed bitmap font
        return ImageFont.load_default()


@dataclass
class Style:
    """Line width and font size follow the drawn image's size: readable on a 64 px thumbnail
    and on a 4000 px photo alike."""

    line: int
    font_size: int

    @classmethod
    def for_size(cls, w: int, h: int) -> "Style":
        side = max(w, h, 1)
        return cls(line=max(1, round(side / 250)), font_size=max(10, round(side / 45)))


@dataclass
class Instance:
    label: str
    score: float | None = None


def _label_at(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, rgb, font, size: tuple[int, int]):
    """A filled tag with the text, above the point if it fits, else just below it; kept inside."""
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
    tw, th = x1 - x0 + 4, y1 - y0 + 4
    x = min(max(0.0, xy[0]), max(0.0, size[0] - tw))
    y = xy[1] - th if xy[1] - th >= 0 else xy[1]
    y = min(max(0.0, y), max(0.0, size[1] - th))
    draw.rectangle([x, y, x + tw, y + th], fill=rgb)
    draw.text((x + 2 - x0, y + 2 - y0), text, fill=_text_fill(rgb), font=font)


def _tag(inst: Instance) -> str:
    return inst.label if inst.score is None else f"{inst.label} {inst.score:.2f}"


def instances_of(row: dict, n: int) -> list[Instance]:
    labels = row.get("labels") or []
    scores = row.get("scores") or []
    out = []
    for i in range(n):
        label = labels[i] if i < len(labels) and labels[i] is not None else row["task"]
        score = scores[i] if i < len(scores) and scores[i] is not None else None
        out.append(Instance(str(label), None if score is None else float(score)))
    return out


def draw_annotations(image: Image.Image, rows: list[dict], sx: float = 1.0, sy: float = 1.0) -> Image.Image:
    """Draw the geometry of `rows` (table rows as dicts) on a copy of `image` (RGB).

    Coordinates are in the row's width x height; sx, sy scale them to `image`. Polygons are
    filled translucently then outlined; boxes and OCR quads are outlined; each instance gets a
    tag "label score" in its label's colour."""
    base = image.convert("RGBA")
    style = Style.for_size(*base.size)
    font = _font(style.font_size)
    overlay = Image.new("RGBA", base.size, (0, 0, 0, 0))
    fill = ImageDraw.Draw(overlay)
    tags: list[tuple[tuple[float, float], str, tuple[int, int, int]]] = []
    outlines: list[tuple[str, list, tuple[int, int, int]]] = []

    def pts(flat) -> list[tuple[float, float]]:
        return [(float(flat[i]) * sx, float(flat[i + 1]) * sy) for i in range(0, len(flat) - 1, 2)]

    for row in rows:
        if row.get("status") not in (None, OK):
            continue
        polygons = row.get("polygons") or []
        boxes = row.get("bboxes") or []
        quads = row.get("quad_boxes") or []
        if polygons:  # region_to_segmentation keeps its source boxes in bboxes: the polygons are the answer
            for inst, polys in zip(instances_of(row, len(polygons)), polygons):
                rgb = label_color(inst.label)
                shapes = [pts(p) for p in (polys or []) if p is not None and len(p) >= 6]
                for shape in shapes:
                    fill.polygon(shape, fill=rgb + (90,))
                    outlines.append(("poly", shape, rgb))
                if shapes:
                    top = min(shapes, key=lambda s: min(y for _, y in s))
                    tags.append((min(top, key=lambda p: (p[1], p[0])), _tag(inst), rgb))
        elif boxes:
            for inst, box in zip(instances_of(row, len(boxes)), boxes):
                if box is None or len(box) < 4:
                    continue
                rgb = label_color(inst.label)
                x0, y0, x1, y1 = (float(v) for v in box[:4])
                x0, x1 = sorted((x0 * sx, x1 * sx))
                y0, y1 = sorted((y0 * sy, y1 * sy))
                outlines.append(("box", [x0, y0, x1, y1], rgb))
                tags.append(((x0, y0), _tag(inst), rgb))
        for inst, quad in zip(instances_of(row, len(quads)), quads):
            if quad is None or len(quad) < 8:
                continue
            rgb = label_color(inst.label)
            shape = pts(quad[:8])
            fill.polygon(shape, fill=rgb + (40,))
            outlines.append(("poly", shape, rgb))
            tags.append((min(shape, key=lambda p: (p[1], p[0])), _tag(inst), rgb))

    out = Image.alpha_composite(base, overlay)
    draw = ImageDraw.Draw(out)
    for kind, geom, rgb in outlines:
        if kind == "box":
            draw.rectangle(geom, outline=rgb, width=style.line)
        else:
            draw.line(geom + geom[:1], fill=rgb, width=style.line, joint="curve")
    for xy, text, rgb in tags:  # tags last: no outline crosses a label
        _label_at(draw, xy, text, rgb, font, out.size)
    return out.convert("RGB")


def text_lines(rows: list[dict]) -> list[tuple[str, str]]:
    """(task, text) of the rows that answer in text: captions, OCR, region_to_* answers."""
    out = []
    for row in rows:
        if row.get("status") == OK and row.get("text"):
            out.append((row["task"], row["text"]))
    return out


def add_text_band(image: Image.Image, lines: list[tuple[str, str]], max_lines: int = 40) -> Image.Image:
    """Captions and OCR text in a white band under the image, wrapped to its width."""
    if not lines:
        return image
    style = Style.for_size(*image.size)
    size = max(12, min(style.font_size, 28))
    font = _font(size)
    chars = max(20, int(image.width / (size * 0.55)))
    wrapped: list[tuple[str, bool]] = []
    for task, text in lines:
        first = True
        for para in str(text).splitlines() or [""]:
            for piece in textwrap.wrap(f"{task}: {para}" if first else para, chars) or [""]:
                wrapped.append((piece, first))
                first = False
    if len(wrapped) > max_lines:
        wrapped = wrapped[: max_lines - 1] + [("…", False)]
    pad, step = size // 2, int(size * 1.3)
    band = Image.new("RGB", (image.width, pad * 2 + step * len(wrapped)), (255, 255, 255))
    draw = ImageDraw.Draw(band)
    for i, (piece, head) in enumerate(wrapped):
        draw.text((pad, pad + i * step), piece, fill=(0, 0, 0) if head else (60, 60, 60), font=font)
    out = Image.new("RGB", (image.width, image.height + band.height), (255, 255, 255))
    out.paste(image, (0, 0))
    out.paste(band, (0, image.height))
    return out


def open_scaled(path: Path, max_side: int, max_pixels: int) -> Image.Image:
    """Decode, EXIF-orient and convert like `annotate run` does, downscaled to max_side."""
    from annotator.inputs.images import to_rgb  # the decoder's own mode handling (16-bit, CMYK, alpha)

    with Image.open(path) as im:
        w, h = im.size
        if w * h > max_pixels:
            raise ValueError(f"image is {w}x{h}, over the preview limit of {max_pixels} pixels")
        im.draft("RGB", (max_side, max_side))  # JPEG: decode at a reduced scale, much faster
        im.seek(0)
        im = to_rgb(ImageOps.exif_transpose(im))
    im.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return im



def fit(image: Image.Image, side: int) -> Image.Image:
    """`image` resized (up or down) so that its longer side is `side`."""
    scale = side / max(image.width, image.height)
    if abs(scale - 1.0) < 1e-6:
        return image.copy()
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC)
