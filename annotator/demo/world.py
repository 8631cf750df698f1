"""The synthetic world: scenes of coloured shapes and pages of printed words, drawn with their ground
truth. It is the demo model's training data, the README's sample folder and the tests' fixtures.

    annotate samples OUT --n 50 --seed 0 --kind mixed

writes OUT/*.png, OUT/ground_truth.json (COCO; categories named as the demo model names them, e.g.
"red circle") and OUT/texts.jsonl ({"image", "caption", "ocr", "ocr_regions"}). Everything is drawn
from one seed, so the same call gives the same files byte for byte.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from annotator.tasks import TASKS

SHAPES = ("circle", "square", "triangle", "star")
COLOURS = {"red": (215, 40, 40), "green": (30, 160, 60), "blue": (40, 80, 220), "yellow": (235, 195, 20),
           "purple": (140, 50, 180)}
CATEGORIES = [f"{c} {s}" for c in COLOURS for s in SHAPES]  # COCO ids are positions + 1
BACKGROUNDS = ("flat", "gradient", "noise")
SHIFTED_BACKGROUNDS = ("stripes",)  # never in the demo model's training data: the pseudo-label loop's shift
KINDS = ("scenes", "documents", "mixed", "pages")
NUMBERS = ("a", "two", "three", "four", "five", "six", "seven", "eight")
WORDS = ("the", "of", "and", "to", "in", "is", "for", "on", "with", "as", "by", "at", "from", "total", "date",
         "invoice", "order", "number", "price", "amount", "paid", "due", "item", "name", "address", "city",
         "phone", "email", "page", "report", "summary", "result", "model", "image", "label", "table", "figure",
         "data", "train", "test", "score", "box", "text", "line", "word", "red", "green", "blue", "yellow",
         "purple", "circle", "square", "star", "triangle", "north", "south", "east", "west", "main", "street",
         "road", "station", "market", "open", "closed", "daily", "monday", "friday", "sunday", "january", "march",
         "june", "october", "coffee", "tea", "bread", "milk", "apple", "water", "paper", "river", "house",
         "garden", "school", "office", "hotel", "room", "floor", "door", "exit", "entry", "stop", "left", "right",
         "small", "large", "new", "old", "first", "last", "next", "free", "sale", "only", "one", "two", "three",
         "four", "five", "ten", "hundred")


@dataclass
class Drawn:
    """One drawn image and everything that is true about it."""
    image: Image.Image
    kind: str  # "scene" | "document"
    objects: list[tuple[str, list[float]]] = field(default_factory=list)  # (category, [x1, y1, x2, y2]) pixels
    lines: list[tuple[str, list[float]]] = field(default_factory=list)  # (text, [x1, y1, ..., x4, y4]) pixels

    @property
    def caption(self) -> str:
        if self.kind == "document":
            return "a page of text"
        return describe([c for c, _ in self.objects])

    @property
    def ocr(self) -> str:
        return "\n".join(t for t, _ in self.lines)


def describe(categories: list[str]) -> str:
    """["red circle", "red circle", "blue square"] -> "two red circles and a blue square" (most first)."""
    counts: dict[str, int] = {}
    for c in categories:
        counts[c] = counts.get(c, 0) + 1
    parts = [f"{NUMBERS[n - 1]} {c}{'s' if n > 1 else ''}" for c, n in sorted(counts.items(), key=lambda x: (-x[1], x[0]))]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def vocabulary() -> list[str]:
    """Every word a sample's caption, label or text can hold (the demo tokenizer keeps each whole)."""
    words = set(WORDS) | set(COLOURS) | set(NUMBERS) | {"and", "page", "text"}
    words |= set(SHAPES) | {s + "s" for s in SHAPES} | set(CATEGORIES)
    return sorted(words)


# --------------------------------------------------------------------------- scenes

def background(rng: np.random.Generator, w: int, h: int, style: str) -> Image.Image:
    base = rng.integers(150, 250, 3).astype(np.float32)
    if style == "flat":
        arr = np.broadcast_to(base, (h, w, 3))
    elif style == "gradient":
        other = rng.integers(120, 250, 3).astype(np.float32)
        t = np.linspace(0, 1, h if rng.random() < 0.5 else w, dtype=np.float32)
        t = t[:, None, None] if len(t) == h else t[None, :, None]
        arr = np.broadcast_to(base * (1 - t) + other * t, (h, w, 3))
    elif style == "noise":
        arr = base + rng.normal(0, 18, (h, w, 1)).astype(np.float32)
    elif style == "stripes":  # the shift: diagonal stripes, the dark ones at 85% (at 45% the demo model saw nothing else)
        period = max(8, min(w, h) // int(rng.integers(8, 16)))
        yy, xx = np.mgrid[0:h, 0:w]
        arr = np.where((((xx + yy) // period) % 2 == 0)[..., None], base, base * 0.85)
    else:
        raise ValueError(f"unknown background {style!r}")
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def shape_points(shape: str, x: float, y: float, s: float, rng: np.random.Generator) -> list[tuple[float, float]]:
    """The polygon of a shape whose bounding box is (x, y, x + s, y + s) (a circle is drawn as an ellipse)."""
    if shape == "square":
        return [(x, y), (x + s, y), (x + s, y + s), (x, y + s)]
    if shape == "triangle":
        return [(x + s / 2, y), (x + s, y + s), (x, y + s)]
    if shape == "star":
        pts = []
        for k in range(10):
            r = s / 2 if k % 2 == 0 else s / 5
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((x + s / 2 + r * math.cos(a), y + s / 2 + r * math.sin(a)))
        return pts
    raise ValueError(shape)


def scene(rng: np.random.Generator, backgrounds=BACKGROUNDS, size_range=(0.05, 0.5), max_objects: int = 8) -> Drawn:
    """1-8 shapes from 16 px (or `size_range[0]` of the short side, if larger) up to half the short
    side, on a random canvas of 300-1600 px a side; overlaps allowed, but no shape covers more than
    a third of another."""
    w, h = (int(v) for v in rng.integers(300, 1601, 2))
    im = background(rng, w, h, str(rng.choice(backgrounds)))
    draw = ImageDraw.Draw(im)
    short = min(w, h)
    lo, hi = max(16, size_range[0] * short), size_range[1] * short
    objects: list[tuple[str, list[float]]] = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        for _try in range(20):
            s = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
            x, y = float(rng.uniform(0, w - s)), float(rng.uniform(0, h - s))
            box = [x, y, x + s, y + s]
            if all(_covered(box, b) < 1 / 3 and _covered(b, box) < 1 / 3 for _, b in objects):
                break
        else:
            continue
        colour, shape = str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES))
        fill = tuple(int(v) for v in np.clip(np.array(COLOURS[colour]) + rng.integers(-15, 16, 3), 0, 255))
        if shape == "circle":
            draw.ellipse(box, fill=fill)
        else:
            draw.polygon(shape_points(shape, x, y, s, rng), fill=fill)
        objects.append((f"{colour} {shape}", box))
    return Drawn(im, "scene", objects=objects)


def _covered(a: list[float], b: list[float]) -> float:
    """Share of box a's area that box b covers."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    return iw * ih / max(1e-9, (a[2] - a[0]) * (a[3] - a[1]))


# --------------------------------------------------------------------------- documents

def document(rng: np.random.Generator, max_lines: int = 6) -> Drawn:
    """A page of 2-`max_lines` lines of 1-4 words in Pillow's own font (it ships with Pillow, nothing to install)."""
    w, h = (int(v) for v in rng.integers(300, 1001, 2))
    paper = tuple(int(v) for v in rng.integers(225, 256, 3))
    im = Image.new("RGB", (w, h), paper)
    draw = ImageDraw.Draw(im)
    ink = tuple(int(v) for v in rng.integers(0, 70, 3))
    y = float(rng.uniform(0.03, 0.12) * h)
    lines: list[tuple[str, list[float]]] = []
    for _ in range(int(rng.integers(2, max_lines + 1))):
        size = int(max(w, h) * rng.uniform(0.045, 0.08))
        text = " ".join(str(rng.choice(WORDS)) for _ in range(int(rng.integers(1, 5))))
        x = float(rng.uniform(0.03, 0.2) * w)
        width = ImageFont.load_default(size=size).getlength(text)
        size = max(10, min(size, int(size * (w - x - 8) / width)))  # a line always fits the page's width
        font = ImageFont.load_default(size=size)
        x0, y0, x1, y1 = font.getbbox(text)
        if x + x1 > w - 4 or y + y1 > h - 4:
            break
        draw.text((x, y), text, fill=ink, font=font)
        bx1, by1, bx2, by2 = x + x0, y + y0, x + x1, y + y1
        lines.append((text, [bx1, by1, bx2, by1, bx2, by2, bx1, by2]))
        y += (y1 - y0) * float(rng.uniform(1.4, 2.2))
    return Drawn(im, "document", lines=lines)


def page(rng: np.random.Generator) -> Drawn:
    """A long, dense page (`--kind pages`, never in the demo model's training data): a 600-1000 x
    1000-1800 px canvas filled with lines of 1-4 words at 22-32 px, so that a tile of the model's
    input size holds text of a `documents` page's scale while the whole page, downscaled, does not."""
    w, h = int(rng.integers(600, 1001)), int(rng.integers(1000, 1801))
    im = Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(225, 256, 3)))
    draw = ImageDraw.Draw(im)
    ink = tuple(int(v) for v in rng.integers(0, 70, 3))
    y, lines = float(rng.uniform(0.02, 0.05) * h), []
    while True:
        size = int(rng.integers(22, 33))
        font = ImageFont.load_default(size=size)
        text = " ".join(str(rng.choice(WORDS)) for _ in range(int(rng.integers(1, 5))))
        x0, y0, x1, y1 = font.getbbox(text)
        x = min(float(rng.uniform(0.03, 0.25) * w), w - 8 - x1)
        if y + y1 > h - 0.03 * h:
            break
        draw.text((x, y), text, fill=ink, font=font)
        lines.append((text, [x + x0, y + y0, x + x1, y + y0, x + x1, y + y1, x + x0, y + y1]))
        y += size * float(rng.uniform(1.4, 2.2))
    return Drawn(im, "document", lines=lines)


def draw(rng: np.random.Generator, kind: str, backgrounds=BACKGROUNDS) -> Drawn:
    if kind == "mixed":
        kind = "documents" if rng.random() < 0.3 else "scenes"
    if kind == "pages":
        return page(rng)
    return scene(rng, backgrounds) if kind == "scenes" else document(rng)


# --------------------------------------------------------------------------- the folder

def write(out: Path, n: int = 50, seed: int = 0, kind: str = "mixed", backgrounds=BACKGROUNDS) -> dict:
    """Draw `n` images into `out` with ground_truth.json and texts.jsonl; returns counts."""
    if kind not in KINDS:
        raise ValueError(f"--kind must be one of {', '.join(KINDS)}")
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images, annotations, texts = [], [], []
    for i in range(n):
        d = draw(rng, kind, backgrounds)
        name = f"{d.kind}_{seed}_{i:05d}.png"
        d.image.save(out / name)
        images.append({"id": i + 1, "file_name": name, "width": d.image.width, "height": d.image.height})
        for cat, (x1, y1, x2, y2) in d.objects:
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": CATEGORIES.index(cat) + 1,
                                "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                                "area": round((x2 - x1) * (y2 - y1), 2), "iscrowd": 0})
        texts.append({"image": name, "caption": d.caption, "ocr": d.ocr,
                      "ocr_regions": [[[round(v, 2) for v in quad], t] for t, quad in d.lines]})
    coco = {"images": images, "annotations": annotations,
            "categories": [{"id": k + 1, "name": c, "supercategory": c.split()[1]} for k, c in enumerate(CATEGORIES)]}
    (out / "ground_truth.json").write_text(json.dumps(coco, indent=1))
    (out / "texts.jsonl").write_text("".join(json.dumps(t) + "\n" for t in texts))
    return {"images": n, "objects": len(annotations), "text_lines": sum(len(t["ocr_regions"]) for t in texts)}


# --------------------------------------------------------------------------- as Florence-2 answers

def truth_pairs(d: Drawn) -> dict[str, tuple[str, str]]:
    """task name -> (prompt, target): the drawing's ground truth written the way Florence-2 answers,
    with locations quantized exactly as the exporters quantize them. Objects and lines are in reading
    order (top to bottom, then left to right), so one scene has one right answer."""
    from annotator.model.sequence import loc_tokens

    w, h = d.image.size
    token = {name: TASKS[name].token for name in ("ocr", "ocr_with_region", "caption", "od", "caption_to_phrase_grounding")}

    def locs(flat: list[float]) -> str:
        return loc_tokens(flat, w, h)

    if d.kind == "document":
        lines = sorted(d.lines, key=lambda l: (l[1][1], l[1][0]))
        return {"ocr": (token["ocr"], d.ocr),
                "ocr_with_region": (token["ocr_with_region"], "".join(t + locs(q) for t, q in lines)),
                "caption": (token["caption"], d.caption), "od": (token["od"], "")}  # a page holds no shapes
    objects = sorted(d.objects, key=lambda o: (o[1][1], o[1][0]))
    pairs = {"od": (token["od"], "".join(c + locs(b) for c, b in objects)), "caption": (token["caption"], d.caption)}
    if objects:
        phrase = objects[0][0]
        boxes = "".join(locs(b) for c, b in objects if c == phrase)
        pairs["caption_to_phrase_grounding"] = (token["caption_to_phrase_grounding"] + phrase, phrase + boxes)
    return pairs
