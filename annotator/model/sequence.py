"""The model's input sequence, and how locations are written in it: the one place that says what
Florence-2's text encoder reads.

    <image>*N  <s>  prompt words  </s>  <pad>...      (N image tokens: 577 at 768px)

`annotate run` (engine.py) and `annotate finetune` both build their prompts and padding here, so
training and annotation feed the model the same inputs; a test holds them to it.

Locations are `<loc_0>`..`<loc_999>`: 1000 bins per axis, x against the width, y against the height.
Prompts that carry a box (region_* tasks) and training targets (exporters) quantise them here, and
the parser, the scorer and the tile merge find them with the pattern here."""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where tensors are made: the exporters read this module without it
    import torch

BINS = 1000  # Florence-2: <loc_0>..<loc_999> per axis
LOC_PREFIX = "<loc_"
LOC_PATTERN = r"<loc_\d+>"  # one location token, for patterns built from it
LOC_TOKEN = re.compile(LOC_PATTERN)
LOC_TOKENS = [f"<loc_{i}>" for i in range(BINS)]  # in vocabulary order
DOCVQA_TOKEN = "<DocVQA>"  # not a Florence-2 task token: the model reads it as the literal text "<DocVQA>"


# Florence-2's extra vocabulary, in the order of the published tokenizer.
FLORENCE_TOKENS = [
    "<od>", "</od>", "<ocr>", "</ocr>", "<cap>", "</cap>", "<ncap>", "</ncap>", "<dcap>", "</dcap>",
    "<grounding>", "</grounding>", "<seg>", "</seg>", "<sep>", "<region_cap>", "</region_cap>",
    "<region_to_desciption>", "</region_to_desciption>", "<proposal>", "</proposal>", "<poly>", "</poly>", "<and>",
] + LOC_TOKENS

# The parse rules the published checkpoints ship in processor_config.json.
POST_PROCESSOR_CONFIG = {
    "ocr": {"PATTERN": r"(.+?)" + r"<loc_(\d+)>" * 8, "AREA_THRESHOLD": 0.0},  # a text line and its quad
    "phrase_grounding": {"banned_grounding_tokens": ["the image"]},
    "pure_text": {},
    "description_with_bboxes": {},
    "description_with_polygons": {},
    "polygons": {},
    "bboxes": {},
    "description_with_bboxes_or_polygons": {},
}


# --------------------------------------------------------------------------- prompts

def prompt_words(processor, prompt: str) -> str:
    """The words the encoder reads. Florence-2 task tokens become their sentences
    ("<OD>" -> "Locate the objects in the image."); a DocVQA prompt stays literal, because
    _construct_prompts would raise on a question that happens to contain a task token such as "<OCR>"."""
    if prompt.startswith(DOCVQA_TOKEN):
        return prompt
    return processor._construct_prompts([prompt])[0]


def prompt_ids(processor, prompt: str) -> list[int]:
    """Token ids of `<image>*N <s> prompt-in-words </s>`: what the processor gives for (text, image)."""
    tok = processor.tokenizer
    text = tok.image_token * processor.num_image_tokens + tok.bos_token + prompt_words(processor, prompt) + tok.eos_token
    return tok(text, add_special_tokens=False)["input_ids"]


class PromptCache:
    """prompt_ids, cached: most prompts repeat for every image. Region prompts (one per box)
    rarely repeat, so the cache is emptied when it grows large: memory stays flat."""

    def __init__(self, processor, limit: int = 4096):
        self.processor, self.limit = processor, limit
        self._ids: dict[str, list[int]] = {}

    def __call__(self, prompt: str) -> list[int]:
        ids = self._ids.get(prompt)
        if ids is None:
            ids = prompt_ids(self.processor, prompt)
            if len(self._ids) >= self.limit:
                self._ids.clear()
            self._ids[prompt] = ids
        return ids


def pad_right(seqs: list[list[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences -> (ids [n, L] padded on the right with `value`, mask [n, L]: 1 on real tokens).

    Right, never left: the encoder's positions ignore the mask, so left padding would shift the
    N image positions of the shorter prompts."""
    import torch

    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), value, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, :len(seq)] = 1
    return ids, mask


# --------------------------------------------------------------------------- locations

def quantize(coord: float, size: float) -> int:
    """Florence-2's BoxQuantizer/CoordinatesQuantizer ('floor' mode): bin = floor(c / (size/1000)),
    clamped to [0, 999]. Its processor maps a bin back to (bin + 0.5) * size / 1000."""
    return int(min(max(math.floor(coord / (size / BINS)), 0), BINS - 1))


def dequantize(bin_: int, size: float) -> float:
    return (bin_ + 0.5) * size / BINS


def loc_tokens(flat, width: float, height: float) -> str:
    """[x1, y1, x2, y2, ...] (pixels) -> '<loc_a><loc_b>...' with x against width, y against height."""
    return "".join(LOC_TOKENS[quantize(v, width if i % 2 == 0 else height)] for i, v in enumerate(flat))


_BOX_INSTANCE = re.compile(r"([^<]*)((?:" + LOC_PATTERN + r"){4})")


def mirror_boxes(target: str, labelled: bool = False) -> str | None:
    """A box target ('label<loc_x1><loc_y1><loc_x2><loc_y2>...') as it reads for the image flipped
    left to right: x -> 999 - x, x1 and x2 swapped (a pixel in bin b lands in bin 999 - b, whatever
    the width). None when the target does not read as whole boxes (locations in runs other than 4, text
    after the last box). Whether a task's targets are boxes at all (OCR quads are 8 locations, two of
    them 4 + 4) is the task table's to say: finetune/data.py asks it first. labelled: every box must
    come with a label (od), so that an 8-location quad never reads as two boxes."""
    parts = _BOX_INSTANCE.findall(target)
    if not parts or "".join(label + locs for label, locs in parts) != target:
        return None
    if labelled and not all(label.strip() for label, _ in parts):
        return None
    out = []
    for label, locs in parts:
        x1, y1, x2, y2 = (int(v) for v in re.findall(r"\d+", locs))
        out.append(label + "".join(LOC_TOKENS[b] for b in (BINS - 1 - x2, y1, BINS - 1 - x1, y2)))
    return "".join(out)
