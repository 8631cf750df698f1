"""Beam search for the decode scheduler: transformers' `_beam_search` (generation/utils.py, 5.x)
at batch size 1, per job, so each job keeps its own length limits and ends on its own step.

A job with k beams holds k consecutive decoding slots. Each step:
  1. `candidates` (all jobs at once, on the device): log_softmax of the raw logits, the logits
     rules (min_new -> no </s>; forced <s> first; forced </s> last), plus each beam's running
     score, then the top 2k of the job's k x vocab continuations (as generate: 2 x beams, so at
     least k of them do not end);
  2. `Beams.advance` (per job, on the CPU, in float32 like generate): the k best unfinished
     candidates run on; candidates among the top k that end (</s> or the length limit) enter the
     job's k finished hypotheses, scored sum(log p) / length ** length_penalty; the job ends when
     generate's stopping rule says so (early_stopping False / True / "never").
The scheduler then copies each new beam's self-attention cache from the beam it continues (rows
of the same job only; cross-attention K/V are the same for all k beams of a job).

The answer is the best finished hypothesis, and its per-token log p (scores) are the raw model
log p of each token along that hypothesis, recorded as the beams grow (what the generate path's
teacher-forced re-scoring gives, to float noise)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

NEG = -1.0e9  # generate's "never pick this" score offset


@dataclass(frozen=True)
class BeamSettings:
    num_beams: int
    length_penalty: float = 1.0
    early_stopping: bool | str = False  # True: stop once k hypotheses end; "never": canonical beam search

    @classmethod
    def of(cls, num_beams: int, generation_config) -> "BeamSettings":
        """The model's own length_penalty / early_stopping (generate's defaults when unset)."""
        lp = getattr(generation_config, "length_penalty", None)
        es = getattr(generation_config, "early_stopping", None)
        return cls(num_beams, 1.0 if lp is None else float(lp), False if es is None else es)


def candidates(logits: torch.Tensor, running: torch.Tensor, rules: list[tuple[int, int, int]], k: int, eos: int,
               forced_bos: int | None, forced_eos: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [J*k, V] of J jobs' beams, running scores [J, k] (float32), rules[j] = (tokens
    generated, min_new, max_new) -> top 2k accumulated log p [J, 2k], their indices into k*V, and
    the raw log_softmax [J*k, V] (for scores)."""
    raw = torch.log_softmax(logits.float(), -1)
    ruled = [(j, g, min_new, max_new) for j, (g, min_new, max_new) in enumerate(rules)
             if g < min_new or (g == 0 and forced_bos is not None) or (g == max_new - 1 and forced_eos is not None)]
    logp = raw.clone() if ruled else raw
    for j, g, min_new, max_new in ruled:
        apply_rules(logp[j * k:(j + 1) * k], g, min_new, max_new, eos, forced_bos, forced_eos)
    vocab = logp.shape[-1]
    acc = logp.view(len(rules), k, vocab) + running[:, :, None]
    vals, index = torch.topk(acc.view(len(rules), k * vocab), k=2 * k)
    return vals, index, raw


def apply_rules(x: torch.Tensor, generated: int, min_new: int, max_new: int, eos: int,
                forced_bos: int | None, forced_eos: int | None) -> None:
    """generate's logits processors, in its order, on the rows `x` [r, V] of one job (in place):
    no </s> before min_new; <s> forced first; </s> forced last (it wins when both apply, as the
    later processor does in generate). Shared by greedy (scheduler._choose) and beam search."""
    if generated < min_new:
        x[:, eos] = -float("inf")
    if generated == 0 and forced_bos is not None:
        x[:] = -float("inf")
        x[:, forced_bos] = 0
    if generated == max_new - 1 and forced_eos is not None:
        x[:] = -float("inf")
        x[:, forced_eos] = 0


class Beams:
    """One job's beam search state, after transformers' `_beam_search` with batch size 1."""

    def __init__(self, settings: BeamSettings, min_new: int, max_new: int, eos: int, scores: bool):
        k = self.k = settings.num_beams
        self.settings, self.min_new, self.max_new, self.eos, self.scoring = settings, min_new, max_new, eos, scores
        self.generated = 0
        self.seqs: list[list[int]] = [[] for _ in range(k)]  # running beams' ids
        self.lps: list[list[float]] = [[] for _ in range(k)]  # their raw log p per token (scores)
        self.running = torch.full((k,), NEG)  # first beam 0, the others never picked from (generate's start)
        self.running[0] = 0.0
        # the k best finished hypotheses (placeholders until real ones arrive: flags False)
        self.done_scores = torch.full((k,), NEG)
        self.done_flags = torch.zeros(k, dtype=torch.bool)
        self.done_seqs: list[list[int]] = [[] for _ in range(k)]
        self.done_lps: list[list[float]] = [[] for _ in range(k)]
        self.improvable = True  # generate's is_early_stop_heuristic_unsatisfied
        self.ended = False

    def advance(self, vals: torch.Tensor, index: list[int], vocab: int, lps: list[float] | None) -> list[int]:
        """One step from the job's top-2k candidates (vals [2k] float32 on CPU, flat indices into
        k*vocab, their raw log p) -> for each new running beam, the beam it continues."""
        k, s = self.k, self.settings
        beam = [i // vocab for i in index]
        tok = [i % vocab for i in index]
        seqs = [self.seqs[b] + [t] for b, t in zip(beam, tok)]
        lp = [self.lps[b] + [x] for b, x in zip(beam, lps)] if self.scoring else [[] for _ in index]
        length = self.generated + 1  # tokens generated, this one included
        hits = torch.tensor([t == self.eos or length >= self.max_new for t in tok])
        # e. the k best candidates that did not end run on
        run_scores = vals + hits.to(torch.float32) * NEG
        keep = torch.topk(run_scores, k=k)[1].tolist()
        # f. candidates among the top k that ended join the finished hypotheses, if good enough
        top = torch.zeros(2 * k, dtype=torch.bool)
        top[:k] = True
        did = hits & top
        final = vals / (length ** s.length_penalty)
        final = final + (bool(self.done_flags.all()) and s.early_stopping is True) * NEG
        final = final + (not self.improvable) * NEG
        final = final + (~did).to(torch.float32) * NEG
        merged = torch.cat([self.done_scores, final])
        best = torch.topk(merged, k=k)[1].tolist()
        all_seqs, all_lps = self.done_seqs + seqs, self.done_lps + lp
        self.done_scores = merged[best]
        self.done_flags = torch.cat([self.done_flags, did])[best]
        self.done_seqs, self.done_lps = [all_seqs[i] for i in best], [all_lps[i] for i in best]
        self.seqs, self.lps, self.running = [seqs[i] for i in keep], [lp[i] for i in keep], run_scores[keep]
        self.generated = length
        # g. generate's stopping rule for the job
        hypothetical = self.max_new if s.early_stopping == "never" and s.length_penalty > 0.0 else length
        best_running = self.running[:1] / (hypothetical ** s.length_penalty)
        worst_done = torch.where(self.done_flags, self.done_scores.min(), torch.tensor(NEG))
        self.improvable = self.improvable and bool((best_running > worst_done).any())
        full = bool(self.done_flags.all()) and s.early_stopping is True
        self.ended = not self.improvable or full or bool(hits.all())
        return [beam[i] for i in keep]

    def tokens(self) -> list[int]:
        """The running beams' last tokens: the next step's input."""
        return [seq[-1] for seq in self.seqs]

    def best(self) -> tuple[list[int], list[float] | None]:
        """The answer: the best finished hypothesis (generate's sequences[0])."""
        return self.done_seqs[0], self.done_lps[0] if self.scoring else None
