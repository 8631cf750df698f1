"""Confidence for every instance, from the model's own token probabilities.

After generation, one teacher-forced decoder pass over the chosen sequence (the returned beam,
with beams) gives p(token | image, prompt, previous tokens) for each generated token: the raw
model distribution, before logits processors (forced BOS, min length) bend it. An instance's
score is the geometric mean of the probabilities of its tokens: its label and its location
tokens (a box), or all tokens of a polygon or OCR quad; a text answer gets the same over all
its tokens (`text_score`).

A location token counts with its neighbourhood: its probability is the mass of the bins within
`LOC_TOLERANCE` of the written one. The raw single-bin probability measures how sure the model is
of one thousandth of the image side, which no box needs: a model that places a box well but
spreads each coordinate over a few neighbouring bins (every small model, and real Florence-2 on
blurry edges) would score far below its precision. Measured on the demo model: with single bins
no box scored above 0.3 although its high-score boxes were right most of the time (README,
"Confidence"). Labels and text tokens keep their own probability.

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

import torch

from annotator.model.sequence import BINS, LOC_PATTERN, LOC_PREFIX, LOC_TOKENS
from annotator.tasks import Output, Task

LOC_TOLERANCE = 5  # bins either side (1000 bins per side: 0.5% of the image side each way)

_SKIP = {"<s>", "</s>", "<pad>"}
_LOCS = f"(?:{LOC_PATTERN})"
_BOX = re.compile(_LOCS + "{4}")
_PHRASE_BOXES = re.compile(r"[^<]+" + _LOCS + "{4,}")
_EMPTY_BOXES = re.compile(_LOCS + "{4,}")
_POLY_ANY = f"(?:{LOC_PATTERN}|<sep>|<poly>|</poly>)"
_PHRASE_POLYS = re.compile(r"[^<]+" + _POLY_ANY + "{4,}")
_EMPTY_POLYS = re.compile(_POLY_ANY + "{4,}")
_POLY_INSTANCE = re.compile(r"<poly>.*?</poly>")
_QUAD = re.compile(r".+?" + _LOCS + "{8}")


@dataclass(frozen=True)
class LocBins:
    """Where the location tokens sit in the vocabulary (they are added as one contiguous run)."""

    first: int  # id of <loc_0>
    count: int = BINS

    @classmethod
    def of(cls, tokenizer) -> LocBins | None:
        ids = tokenizer.convert_tokens_to_ids(LOC_TOKENS[: cls.count])
        contiguous = ids == list(range(ids[0], ids[0] + cls.count)) and ids[0] != tokenizer.unk_token_id
        return cls(ids[0]) if contiguous else None  # no location tokens: every token scores alone


def chosen_logprobs(logits: torch.Tensor, chosen: torch.Tensor, locs: LocBins | None,
                    tolerance: int = LOC_TOLERANCE) -> list[float]:
    """log p of each chosen token under `logits` ([n, vocab], raw model); for a location token,
    log p of the bins within `tolerance` of it. One owner for the engine's scoring pass and the
    scheduler's decoding loop."""
    return logprobs_of(torch.log_softmax(logits.float(), -1), chosen, locs, tolerance)


def logprobs_of(logp: torch.Tensor, chosen: torch.Tensor, locs: LocBins | None, tolerance: int = LOC_TOLERANCE,
                rows: torch.Tensor | None = None) -> list[float]:
    """`chosen_logprobs` from log_softmax(logits) [m, vocab] already computed; `rows` [n]: the row
    of `logp` each chosen token is scored under (default: row i for token i; beam search scores
    2k candidates of a job under its k beams' rows without copying them)."""
    return logprobs_tensor(logp, chosen, locs, tolerance, rows).tolist()


def logprobs_tensor(logp: torch.Tensor, chosen: torch.Tensor, locs: LocBins | None, tolerance: int = LOC_TOLERANCE,
                    rows: torch.Tensor | None = None, shift: torch.Tensor | None = None) -> torch.Tensor:
    """`logprobs_of` as a float32 tensor [n] on logp's device (the decode scheduler keeps it there).
    `shift` [m]: `logp` holds float32 logits, and log p = logits - shift[row] (each row's log
    normalizer): beam search reads the raw log p this way after its rules bent the log_softmax in place."""
    if rows is None:
        rows = torch.arange(len(chosen), device=chosen.device)
    out = logp[rows, chosen]
    if shift is not None:
        out = out - shift[rows]
    if locs is None:
        return out
    # Every row's location window is scored and kept where the token is a location: no read-back of
    # which rows are (one less device->host sync per decoder step; the window is 1000 bins, small next
    # to the vocabulary-sized work of the step).
    rel = chosen - locs.first
    is_loc = (rel >= 0) & (rel < locs.count)
    window = logp[rows, locs.first:locs.first + locs.count]
    mass = (window if shift is None else window - shift[rows, None]).exp().cumsum(-1)
    mass = torch.cat([mass.new_zeros(len(mass), 1), mass], -1)  # mass[:, b] = p(bins < b)
    lo = (rel - tolerance).clamp(min=0, max=locs.count)
    hi = (rel + tolerance + 1).clamp(min=0, max=locs.count)
    near = mass.gather(-1, hi[:, None])[:, 0] - mass.gather(-1, lo[:, None])[:, 0]
    return torch.where(is_loc, near.clamp(min=1e-30, max=1.0).log(), out)


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
        piece = tok if tok in special or tok.startswith(LOC_PREFIX) else tokenizer.convert_tokens_to_string([tok])
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
        label = (phrase.start(), tt.text.index(LOC_PREFIX, phrase.start()))
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
