"""Answer lengths for `annotate bench`: `fixed` (one length per task, as before) or `realistic`
(per row, drawn with a seed from a per-task distribution that looks like Florence-2 output).

Where the realistic numbers come from: token arithmetic on the output formats, not a measurement
(no real checkpoint runs here). A box is its label (1-3 BPE tokens) plus 4 `<loc_*>` tokens, so
od on a photo with 3-60 objects writes ~20-400 tokens; a dense region is a short phrase plus 4
locations (~10 tokens), 5-60 regions -> 50-600; a caption is one sentence (10-40 tokens). OCR is
two populations: photos with a few words of signage (5-100) and document pages (300-1000, the
long tail that sets the length of a whole batch). Counts of objects and words are heavy-tailed,
so lengths are drawn log-uniform in their range (most answers short, some long).

Rows draw from `numpy.random.default_rng([seed, image, crc32(task)])`: the same length for the same
(image, task) whatever the batch size, on both sides of the bench.

The engine writes exactly those lengths through decode/forced_lengths.py (the bench's only hook into
the engine: `Engine.forced_lengths`)."""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass


LENGTH_MODES = ("fixed", "realistic")


@dataclass(frozen=True)
class LengthDist:
    """log-uniform in [low, high]; with probability `doc_share`, log-uniform in [doc_low, doc_high] instead."""

    low: int
    high: int
    doc_share: float = 0.0
    doc_low: int = 0
    doc_high: int = 0

    def draw(self, rng) -> int:
        low, high = (self.doc_low, self.doc_high) if self.doc_share and rng.random() < self.doc_share \
            else (self.low, self.high)
        return int(round(math.exp(rng.uniform(math.log(low), math.log(high)))))

    def describe(self) -> str:
        text = f"{self.low}-{self.high}"
        return text + (f" ({self.doc_share:.0%} documents: {self.doc_low}-{self.doc_high})" if self.doc_share else "")


# Per task (CLI name); tasks not listed use OTHER.
REALISTIC = {
    "caption": LengthDist(10, 40),
    "detailed_caption": LengthDist(30, 100),
    "more_detailed_caption": LengthDist(60, 250),
    "od": LengthDist(20, 400),
    "region_proposal": LengthDist(20, 400),
    "dense_region_caption": LengthDist(50, 600),
    "ocr": LengthDist(5, 100, doc_share=0.3, doc_low=300, doc_high=1000),
    "ocr_with_region": LengthDist(20, 200, doc_share=0.3, doc_low=400, doc_high=1000),
}
OTHER = LengthDist(10, 200)


def realistic_length(task: str, image: int, seed: int) -> int:
    import numpy as np

    rng = np.random.default_rng([seed, image, zlib.crc32(task.encode())])  # stable across task lists
    return REALISTIC.get(task, OTHER).draw(rng)


def draw_lengths(mode: str, tasks: list[str], images: int, fixed: dict[str, int], seed: int = 0) -> list[dict[str, int]]:
    """[image][task] -> exact new tokens for that answer."""
    if mode == "fixed":
        return [dict(fixed) for _ in range(images)]
    if mode != "realistic":
        raise ValueError(f"lengths must be one of {LENGTH_MODES}, not {mode!r}")
    return [{t: realistic_length(t, i, seed) for t in tasks} for i in range(images)]
