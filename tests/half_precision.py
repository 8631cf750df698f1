"""When two decodings of one prompt may differ: exact equality in float32, a failable near-tie rule
in bfloat16 (ANNOTATE_RUN_DTYPE=bfloat16, tests/conftest.py).

Why a rule at all: in bf16 a row's logits depend on the batch it is computed in (another matmul
blocking, another rounding of every activation), so where two tokens are nearly tied the choice can
flip, and the answers part from that token on. That is allowed, and nothing else:

- greedy: the two decodings are identical up to their first differing token i, and at step i the
  REFERENCE's own (processed, float32) logits show a near tie between its token and the other's:
  gap = s[ref_i] - s[other_i] <= 2 * NOISE_ULPS * ulp_bf16(scale), scale = max |logit| of that row.
- beams: the reference is the scheduler's beam search at batch 1, recorded step by step (its top 2k
  candidates, their scores, which ran on). From the parting token on: at the first step where the
  reference dropped the other answer's prefix, that prefix was within bound of a candidate across
  the cut (the k beams that run on, or the top k where an ending counts); if the reference kept it
  to the end, its own answer's prefix sat within bound of a cut at some step, or the final choice
  between the two hypotheses was within bound. Anything else fails.

The bound. bf16 keeps 8 significant bits: one ulp at |x| is 2 ** (floor(log2 |x|) - 7), 0.03125 at a
logit of 7. Every logit of a row is a dot product of the same rounded hidden state, so its error is
on the scale of the row's largest logit, not of its own value (a logit near 0 is no more exact).
NOISE_ULPS bounds one logit's error in those ulps: the lm_head output is itself rounded to bf16 (half
an ulp), plus what batching changes upstream. Measured on random:tiny (README, "Tests in bf16"): the
greedy ties that flipped between batched and batch-1 decoding were 0 or 1 ulp apart, never more, so
a gap of 2 ulps between two tokens of one row (1 per logit) is the bound: twice what was seen. A
real fault parts further from a tie: a token replaced with one far down the row, or the self-attention
K/V rounded through float8, fail (tests/test_half_precision.py). A beam score is a running sum of log
p: two candidates that share a prefix up to step p and part after it carry independent errors from p
on, each step's log p off by up to 2 x NOISE (logit + normaliser), so 4 x the sum over those steps,
divided by the length penalty for finished hypotheses."""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass, field

import torch

from conftest import RUN_DTYPE, model_inputs

EXACT = RUN_DTYPE == "float32"  # float32: decodings must be identical, token for token
NOISE_ULPS = 1.0


def bf16_ulp(x: float) -> float:
    """The spacing of bf16 numbers at |x| (8 significant bits)."""
    x = max(abs(x), 2.0 ** -126)
    return 2.0 ** (math.floor(math.log2(x)) - 7)


def noise(scale: float) -> float:
    """Bound on one logit's error in a row whose largest |logit| is `scale`."""
    return NOISE_ULPS * bf16_ulp(scale)


def parting(a, b) -> int | None:
    """Index of the first token where two id sequences differ (len of the shorter when one is a
    prefix of the other); None when equal."""
    a, b = list(a), list(b)
    if a == b:
        return None
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


@dataclass(frozen=True)
class Verdict:
    ok: bool  # the two decodings may differ (or do not)
    detail: str  # the evidence: where they part, the gap, the bound


@dataclass
class GreedyRef:
    """One prompt's reference greedy decoding: its ids (after the decoder start token) and, per
    step, its processed float32 scores [V] (generate's output_scores)."""

    ids: tuple[int, ...]
    scores: list[torch.Tensor]

    def verdict(self, other) -> Verdict:
        """Whether `other` may differ from this reference, and the evidence."""
        i = parting(self.ids, other)
        if i is None:
            return Verdict(True, "identical")
        if i >= min(len(self.ids), len(other)) or i >= len(self.scores):
            return Verdict(False, f"one answer is a strict prefix of the other at {i}: not a tie")
        s = self.scores[i]
        x, y = self.ids[i], other[i]
        finite = s[torch.isfinite(s)]
        scale = float(finite.abs().max()) if finite.numel() else 0.0
        gap, bound = float(s[x] - s[y]), 2 * noise(scale)
        detail = (f"greedy, parted at token {i}: reference {x} ({float(s[x]):.4f}) vs {y} ({float(s[y]):.4f}), "
                  f"gap {gap:.4f} = {gap / bf16_ulp(scale):.2f} ulp at scale {scale:.3f}, bound {bound:.4f}")
        return Verdict(math.isfinite(gap) and gap <= bound, detail)


@dataclass
class Candidate:
    seq: tuple[int, ...]  # generated ids, this step's token last
    score: float  # running sum of log p (rules applied), as the beam search ranks it
    ended: bool  # </s> or the length limit
    kept: bool = False  # one of the k beams that run on (ties: as the search's own topk broke them)


@dataclass
class BeamRef:
    """One prompt's reference beam search, recorded step by step (`record_beams`)."""

    ids: tuple[int, ...] = ()
    k: int = 0
    length_penalty: float = 1.0
    steps: list[list[Candidate]] = field(default_factory=list)  # the top 2k candidates, best first
    scales: list[float] = field(default_factory=list)  # per step, max |logit| over the beams' rows

    def pair_bound(self, x: tuple, y: tuple, t: int) -> float:
        p = len(os.path.commonprefix([list(x), list(y)]))
        if p >= t:  # siblings: one row's two logits
            return 2 * noise(self.scales[t])
        return 4 * sum(noise(self.scales[s]) for s in range(p, t + 1))

    def _kept(self, t: int, seq: tuple) -> bool:
        """Whether the reference kept `seq` at step t: one of the k beams that run on, or an ending
        among the top k (a hypothesis)."""
        cands, k = self.steps[t], self.k
        return any(c.seq == seq and (c.kept or (c.ended and n < k)) for n, c in enumerate(cands))

    def _tie(self, t: int, seq: tuple) -> str | None:
        """The candidate `seq` at step t within bound of one on the other side of a cut it lies at:
        the top k of the 2k (where an ending counts), or the k beams that run on."""
        cands, k = self.steps[t], self.k
        running = [c for c in cands if not c.ended]
        cuts = ((cands[:k], cands[k:]),  # an ending among the top k becomes a hypothesis
                ([c for c in running if c.kept], [c for c in running if not c.kept]))  # the beams that run on
        for above, below in cuts:
            mine = [c for c in above + below if c.seq == seq]
            if not mine:
                continue
            for other in (below if mine[0] in above else above):
                hi, lo = (mine[0], other) if mine[0] in above else (other, mine[0])
                bound = self.pair_bound(hi.seq, lo.seq, t)
                if hi.score - lo.score <= bound:
                    return (f"a cut at step {t} within bound: {hi.score:.4f} vs {lo.score:.4f}, gap "
                            f"{hi.score - lo.score:.4f} = {(hi.score - lo.score) / bf16_ulp(self.scales[t]):.2f} ulp "
                            f"at scale {self.scales[t]:.3f}, bound {bound:.4f}")
        return None

    def _final(self, seq: tuple) -> float | None:
        for cands in self.steps:
            for c in cands:
                if c.ended and c.seq == seq:
                    return c.score / len(seq) ** self.length_penalty
        return None

    def verdict(self, other) -> Verdict:
        """`other` (the answer of another run) may differ from the reference's answer a if, from their
        parting token i on: where the reference dropped other's prefix, that prefix was within bound of
        the cut; or, where it kept it to the end, a prefix of a was within bound of a cut at some step
        >= i (the other run dropped it there), or the final choice between the two was within bound."""
        a, b = tuple(self.ids), tuple(other)
        i = parting(a, b)
        if i is None:
            return Verdict(True, "identical")
        where = f"beams, parted at token {i}"
        for t in range(i, min(len(b), len(self.steps))):
            if not self._kept(t, b[:t + 1]):
                tie = self._tie(t, b[:t + 1])
                return Verdict(tie is not None, f"{where}; the reference dropped the other's prefix at step {t}: "
                                                + (tie or "not within bound of the cut"))
        if len(b) > len(self.steps):
            return Verdict(False, f"{where}; the reference stopped before the other answer ended")
        for t in range(i, len(a)):
            tie = self._tie(t, a[:t + 1])
            if tie is not None:
                return Verdict(True, f"{where}; the reference's own answer at {tie}")
        fa, fb = self._final(a), self._final(b)
        p = len(os.path.commonprefix([list(a), list(b)]))
        raw = 4 * sum(noise(self.scales[s]) for s in range(p, min(max(len(a), len(b)), len(self.scales))))
        bound = raw * max(len(a) ** -self.length_penalty, len(b) ** -self.length_penalty)
        ok = fa is not None and fb is not None and abs(fa - fb) <= bound
        return Verdict(ok, f"{where}; final scores {fa} vs {fb}, bound {bound:.4f}"
                           + ("" if ok else "; no cut within bound"))


@contextlib.contextmanager
def record_beams(refs: list):
    """Record the decode scheduler's beam searches, one job in flight (max_prompts=1): a BeamRef per
    job appended to `refs`, in the order the jobs ran."""
    import annotator.decode.scheduler as scheduler_module
    from annotator.decode.beams import NEG, BeamSearch

    real_candidates, real_advance = scheduler_module.candidates, BeamSearch.advance

    def candidates(logits, running, rules, cache, a, b, scores):
        assert running.shape[0] == 1, "record_beams: one job at a time (max_prompts=1)"
        if int(cache.pos[0]) == 1:  # a new job's first step
            refs.append(BeamRef())
        finite = logits[torch.isfinite(logits)]
        refs[-1].scales.append(float(finite.abs().max()) if finite.numel() else 0.0)
        return real_candidates(logits, running, rules, cache, a, b, scores)

    def advance(self, vals, index, vocab, lps, cache, n):
        ref = refs[-1]
        ref.k, ref.length_penalty = self.k, self.settings.length_penalty
        length, max_new = int(cache.pos[0]), int(cache.max_new[0])
        beam, tok = (index[0] // vocab).tolist(), (index[0] % vocab).tolist()
        ended = [t == self.eos or length >= max_new for t in tok]
        # the beams that run on, by the same topk call as BeamSearch.advance (exact ties broken alike)
        hits = torch.tensor([ended], dtype=torch.float32, device=vals.device)
        keep = set(torch.topk(vals + hits * NEG, k=self.k)[1][0].tolist())
        ref.steps.append([Candidate(tuple(cache.ids[r, 1:length].tolist()) + (t,), float(v), e, n in keep)
                          for n, (r, t, v, e) in enumerate(zip(beam, tok, vals[0].tolist(), ended))])
        ended = real_advance(self, vals, index, vocab, lps, cache, n)
        if ended:
            ref.ids = tuple(self.best(0)[0])
        return ended

    scheduler_module.candidates, BeamSearch.advance = candidates, advance
    try:
        yield refs
    finally:
        scheduler_module.candidates, BeamSearch.advance = real_candidates, real_advance


class Captured(dict):
    """(image key, task, request index) -> generated ids; `.prompts`: the same keys -> prompt."""

    def __init__(self):
        super().__init__()
        self.prompts: dict[tuple[str, str, int], str] = {}


class Decoded(list):
    """A run's rows, with the ids each request generated (`.ids`)."""

    def __init__(self, rows, ids: Captured):
        super().__init__(rows)
        self.ids = ids


def capture_ids(engine) -> Captured:
    """The generated ids of every request the engine assembles into a row."""
    got = Captured()
    real = engine.assembler.assemble

    def assemble(task, key, width, height, results):
        for j, (req, res) in enumerate(results):
            if not isinstance(res, BaseException):
                got[(key, task.name, j)], got.prompts[(key, task.name, j)] = tuple(res.ids), req.prompt
        return real(task, key, width, height, results)

    engine.assembler.assemble = assemble
    return got


def greedy_reference(lm, image, text: str, max_new: int, min_new: int | None = None) -> GreedyRef:
    """processor -> generate, batch 1, greedy: the ids and each step's processed float32 scores."""
    inputs = model_inputs(lm, text=text, images=image)
    extra = {} if min_new is None else {"min_new_tokens": min_new}
    out = lm.model.generate(**inputs, max_new_tokens=max_new, num_beams=1, do_sample=False, output_scores=True,
                            return_dict_in_generate=True, **extra)
    ids = out.sequences[0, 1:].tolist()
    eos = lm.processor.tokenizer.eos_token_id
    ids = ids[:ids.index(eos) + 1] if eos in ids else ids
    return GreedyRef(tuple(ids), [s[0].float() for s in out.scores])


def beam_reference(lm, item, task: str, gen, forced=None) -> dict:
    """The decode scheduler, one job in flight (batch 1), its beam search recorded: (key, task, j) -> BeamRef."""
    from dataclasses import replace

    from annotator.config import TaskInputs
    from annotator.decode.engine import Engine
    from annotator.decode.forced_lengths import ForcedLengths
    from annotator.inputs.images import Batch
    from annotator.tasks import parse_task_list

    engine = Engine(lm, parse_task_list(task), TaskInputs(), replace(gen, scores=False), max_prompts=1)
    engine.use_scheduler = True
    engine.forced_lengths = forced and ForcedLengths(forced)
    ids = capture_ids(engine)
    item = replace(item, tasks=(task,))
    with record_beams([]) as refs:
        engine.annotate(Batch([item], item.pixel_values[None], []))
    keys = sorted(ids, key=lambda k: k[2])
    assert [ids[k] for k in keys] == [r.ids for r in refs], "beam references: one recorded search per request"
    return dict(zip(keys, refs))


def references(lm, images, items, run: Captured, gen, forced=None) -> dict:
    """Each request of `run` -> its batch-1 reference: generate's greedy search on the request's
    prompt, or the scheduler's recorded beam search. `images`: the PIL images of `items`, in order."""
    image = {item.key: (im, item) for im, item in zip(images, items)}
    refs = {}
    for (key, task, j), prompt in run.prompts.items():
        n = forced(key, task) if forced else None
        if gen.num_beams == 1:
            refs[(key, task, j)] = greedy_reference(lm, image[key][0], prompt, n or gen.max_new_tokens, n)
        elif (key, task, j) not in refs:
            refs.update(beam_reference(lm, image[key][1], task, gen, forced))
    return {k: refs[k] for k in run}


def same_answers(lm, images, items, gen, runs: dict[str, Decoded], key, forced=None, label: str = "") -> set:
    """float32: every run's `key(rows)` equal. bf16: every run's ids within the near-tie rule of the
    batch-1 reference. Returns the (image, task) rows whose ids are identical in every run (scores
    compare only there)."""
    first = next(iter(runs.values()))
    if EXACT:
        for name, rows in runs.items():
            assert key(rows) == key(first), name
        return {(r.image, r.task) for r in first}
    parted = Captured()  # requests whose ids differ between runs: only those need a reference
    for k, prompt in first.ids.prompts.items():
        if len({rows.ids.get(k) for rows in runs.values()}) > 1:
            parted[k], parted.prompts[k] = first.ids[k], prompt
    refs = references(lm, images, items, parted, gen, forced)
    agreement(refs, {name: {k: rows.ids[k] for k in parted} for name, rows in runs.items()}, label,
              total=len(first.ids))
    same = {(k[0], k[1]) for k in first.ids} - {(k[0], k[1]) for k in parted}
    for name, rows in runs.items():  # the same rows in the same order; where the ids agree, all of key()
        assert [(r.image, r.task) for r in rows] == [(r.image, r.task) for r in first], name
        assert [k for r, k in zip(rows, key(rows)) if (r.image, r.task) in same] == \
            [k for r, k in zip(first, key(first)) if (r.image, r.task) in same], name
    return same


def agreement(refs: dict, runs: dict[str, dict], label: str = "", total: int | None = None,
              exact: bool = EXACT) -> dict:
    """Every run's ids of every key against the reference: returns counts; fails on a parting that
    is not a near tie. In float32 (`exact`) any parting fails. `total`: requests compared in
    all (those not in `refs` were identical in every run), for the log."""
    counts = {"requests": total, "parted": len(refs), "rows": 0, "identical": 0, "near_tie": 0}
    bad, details = [], []
    for name, ids in runs.items():
        assert ids.keys() == refs.keys(), f"{name}: other keys than the reference"
        for key, other in ids.items():
            counts["rows"] += 1
            if tuple(other) == tuple(refs[key].ids):
                counts["identical"] += 1
                continue
            verdict = Verdict(False, "float32 is the exact mode") if exact else refs[key].verdict(other)
            counts["near_tie"] += verdict.ok
            details.append(f"{name} {key}: {verdict.detail}")
            if not verdict.ok:
                bad.append(details[-1])
    log = os.environ.get("ANNOTATE_AGREEMENT_LOG")
    if log:
        with open(log, "a") as f:
            f.write(json.dumps({"test": label, **counts, "details": details}) + "\n")
    assert not bad, "decodings part away from a near tie:\n" + "\n".join(bad)
    return counts
