"""Write a small, license-clean sample folder (every image is drawn here, nothing downloaded).

    python examples/make_samples.py examples/images

It covers what real folders contain: photos-like scenes with shapes, a document with text,
an EXIF-rotated JPEG, grayscale, 16-bit, palette-with-alpha, CMYK and a nested subfolder."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def scene(seed: int, size=(640, 480)) -> Image.Image:
    rng = np.random.default_rng(seed)
    w, h = size
    sky = np.linspace(180, 255, h, dtype=np.float32)[:, None, None] * np.array([0.6, 0.8, 1.0])
    im = Image.fromarray(np.broadcast_to(sky, (h, w, 3)).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    draw.rectangle([0, int(h * 0.7), w, h], fill=(90, 140, 70))  # ground
    for _ in range(4):
        x, y = int(rng.integers(0, w - 120)), int(rng.integers(h // 3, h - 100))
        color = tuple(int(c) for c in rng.integers(0, 255, 3))
        if rng.random() < 0.5:
            draw.rectangle([x, y, x + 110, y + 60], fill=color, outline=(0, 0, 0), width=3)  # a "car" body
            draw.ellipse([x + 10, y + 45, x + 35, y + 70], fill=(20, 20, 20))
            draw.ellipse([x + 75, y + 45, x + 100, y + 70], fill=(20, 20, 20))
        else:
            draw.ellipse([x + 40, y, x + 70, y + 30], fill=(230, 190, 160))  # a "person"
            draw.rectangle([x + 42, y + 30, x + 68, y + 90], fill=color)
    return im


def document(size=(600, 800)) -> Image.Image:
    im = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(im)
    lines = ["INVOICE No. 2041", "Date: 2026-11-22", "Item      Qty   Price", "Widget     3    12.50",
             "Gadget     1    99.00", "TOTAL           136.50"]
    for i, line in enumerate(lines):
        draw.text((60, 80 + 60 * i), line, fill="black", font_size=28)
    return im


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "street").mkdir(exist_ok=True)
    scene(1).save(out / "street" / "scene1.jpg", quality=90)
    scene(2, (800, 450)).save(out / "street" / "scene2.png")
    document().save(out / "invoice.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways; viewers (and we) rotate it upright
    scene(3).rotate(90, expand=True).save(out / "rotated.jpg", exif=exif.tobytes())
    scene(4).convert("L").save(out / "gray.png")
    scene(5).convert("CMYK").save(out / "print.tif")
    sixteen = (np.asarray(scene(6).convert("L"), dtype=np.uint16) * 257)
    Image.fromarray(sixteen).save(out / "sixteen_bit.png")
    scene(7).convert("RGBA").convert("P", palette=Image.ADAPTIVE).save(out / "palette.gif")
    print(f"wrote {len(list(out.rglob('*.*')))} images to {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "examples/images"))
