"""Confidence for every instance, from the model's own token probabilities.

After generation, one teacher-forced decoder pass over the chosen sequence (the returned beam,
with beams) gives p(token | image, prompt, previous tokens) for each generated token: the raw
model distribution, before logits processors (forced BOS, min length) bend it. An instance's
score is the geometric mean of the probabilities of its tokens: its label and its location
tokens (a box), or all tokens of a polygon or OCR quad; a text answer gets the same over all
its tokens (`text_score`).

Why the geometric mean, not the minimum: it is the per-token-normalized joint probability of
the instance, so long labels and 8-number quads are not punished for their length, while one
very unlikely token still pulls it down hard. The minimum is dominated by location tokens,
whose mass is naturally split between neighbouring bins (a box one bin off is still a good box).

Alignment with the instances the processor parses is done on the same cleaned text
(<s>, </s>, <pad> removed) with the same patterns; where the two disagree on the number of
instances (an edge case of the processor's filters) the scores are left null, never misaligned.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .tasks import Output, Task

_SKIP = {"<s>", "</s>", "<pad>"}
_LOCS = r"(?:<loc_\d+>)"
_BOX = re.compile(_LOCS + "{4}")
_PHRASE_BOXES = re.compile(r"[^<]+" + _LOCS + "{4,}")
_EMPTY_BOXES = re.compile(_LOCS + "{4,}")
_POLY_ANY = r"(?:<loc_\d+>|<sep>|<poly>|</poly>)"
_PHRASE_POLYS = re.compile(r"[^<]+" + _POLY_ANY + "{4,}")
_EMPTY_POLYS = re.compile(_POLY_ANY + "{4,}")
_POLY_INSTANCE = re.compile(r"<poly>.*?</poly>")
_QUAD = re.compile(r".+?" + _LOCS + "{8}")


@dataclass(frozen=True)
class TokenText:
    """Generated tokens as the parser sees them: cleaned text, each token's char span, its log p."""

    text: str
    spans: list[tuple[int, int]]
    logprobs: list[float]

    def score(self, *ranges: tuple[int, int]) -> float | None:
        """Geometric mean of the probabilities of the tokens that overlap any of `ranges`."""
        picked = [lp for (s, e), lp in zip(self.spans, self.logprobs) if any(s < b and e > a for a, b in ranges)]
        return math.exp(sum(picked) / len(picked)) if picked else None


def token_text(tokenizer, ids: list[int], logprobs: list[float]) -> TokenText:
    """`ids`/`logprobs`: the generated tokens after the decoder start token, aligned."""
    special = set(tokenizer.all_special_tokens)
    text, spans, lps = "", [], []
    for tok, lp in zip(tokenizer.convert_ids_to_tokens(ids), logprobs):
        if tok in _SKIP:
            continue
        piece = tok if tok in special or tok.startswith("<loc_") else tokenizer.convert_tokens_to_string([tok])
        spans.append((len(text), len(text) + len(piece)))
        lps.append(lp)
        text += piece
    return TokenText(text, spans, lps)


def text_score(tt: TokenText) -> float | None:
    return tt.score((0, len(tt.text))) if tt.text else None


def instance_scores(task: Task, tt: TokenText) -> list[float | None]:
    """One score per instance, in the order the processor's parser returns instances."""
    kind = task.output
    if kind is Output.BOXES_OR_POLYGONS:  # the processor's description_with_bboxes_or_polygons
        kind, empty_ok = (Output.POLYGONS if "<poly>" in tt.text else Output.BOXES), False
    else:  # region_proposal and the polygon tasks parse with allow_empty_phrase=True (Task.empty_phrase)
        empty_ok = task.empty_phrase
    if kind is Output.BOXES:
        return _box_scores(tt, _EMPTY_BOXES if empty_ok else _PHRASE_BOXES)
    if kind is Output.POLYGONS:
        return _polygon_scores(tt, _EMPTY_POLYS if empty_ok else _PHRASE_POLYS)
    if kind is Output.QUADS:
        return [tt.score(m.span()) for m in _QUAD.finditer(tt.text)]
    return []


def _box_scores(tt: TokenText, phrase_re: re.Pattern) -> list[float | None]:
    out = []
    for phrase in phrase_re.finditer(tt.text):
        label = (phrase.start(), tt.text.index("<loc_", phrase.start()))
        out.extend(tt.score(label, box.span()) for box in _BOX.finditer(tt.text, phrase.start(), phrase.end()))
    return out


def _polygon_scores(tt: TokenText, phrase_re: re.Pattern) -> list[float | None]:
    out = []
    for phrase in phrase_re.finditer(tt.text):
        body = phrase.group()
        if "<poly>" in body and "</poly>" in body:
            out.extend(tt.score((phrase.start() + m.start(), phrase.start() + m.end()))
                       for m in _POLY_INSTANCE.finditer(body))
        else:
            out.append(tt.score(phrase.span()))
    return out
