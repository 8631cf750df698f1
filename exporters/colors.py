"""The colour of a label: the same in every image and run, in the preview and in the review tools (Label Studio, CVAT)."""

from __future__ import annotations

import colorsys
import hashlib


def label_color(label: str) -> tuple[int, int, int]:
    """The same label gets the same colour in every image and every run (md5, not hash())."""
    h = int.from_bytes(hashlib.md5(label.encode("utf-8", "surrogatepass")).digest()[:4], "big")
    hue = (h % 360) / 360.0
    sat = 0.75 + ((h >> 9) % 25) / 100.0
    val = 0.85 + ((h >> 17) % 15) / 100.0
    r, g, b = colorsys.hsv_to_rgb(hue, sat, val)
    return int(r * 255), int(g * 255), int(b * 255)
