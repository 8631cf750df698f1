"""Beam search for the decode scheduler: transformers' `_beam_search` (generation/utils.py, 5.x)
at batch size 1 per job, so each job keeps its own length limits and ends on its own step, run
for every job in flight at once as tensor operations (no Python loop per job and step).

A job with k beams holds k consecutive decoding slots. Each step:
  1. `candidates` (all jobs at once, on the device): log_softmax of the raw logits, the logits
     rules (logits_rules.py: repetition penalty, no-repeat n-grams over each beam's own sequence,
     min_new -> no </s>, forced <s> first, forced </s> last), plus each beam's running score, then
     the top 2k of the job's k x vocab continuations (as generate: 2 x beams, so at least k of them
     do not end);
  2. `BeamSearch.advance` (all jobs at once, in float32 like generate): the k best unfinished
     candidates run on; candidates among the top k that end (</s> or the length limit) enter the
     job's k finished hypotheses, scored sum(log p) / length ** length_penalty; a job ends when
     generate's stopping rule says so (early_stopping False / True / "never").
The running beams' ids and self-attention caches are reordered to the beams they continue (rows of
the same job only; the cross-attention K/V is stored once per job, kvcache.py). Only the finished
hypotheses are kept as Python lists, copied when one ends (rare next to steps).

The answer is the best finished hypothesis, and its per-token log p (scores) are the raw model
log p of each token along that hypothesis, recorded as the beams grow (what the generate path's
teacher-forced re-scoring gives, to float noise)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from annotator.decode.kvcache import SlotCache
from annotator.decode.logits_rules import Known, LogitsRules

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


def candidates(logits: torch.Tensor, running: torch.Tensor, rules: LogitsRules, cache: SlotCache, a: int, b: int,
               scores: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [J*k, V] of J jobs' beams (the rows [a, b) of `cache`), running scores [J, k] (float32)
    -> top 2k accumulated log p [J, 2k], their indices into k*V, and (scores) each row's log softmax
    normalizer [J*k]: raw log p = logits - it (scores.logprobs_tensor's shift)."""
    logits = logits.float()
    logp = torch.log_softmax(logits, -1)
    # read before the rules and running scores go into logp in place (no copy of [rows, V] per step)
    shift = logits[:, 0] - logp[:, 0] if scores else None
    rules.apply(logp, cache.ids[a:b], cache.pos[a:b], cache.min_new[a:b], cache.max_new[a:b],
                Known(cache.host_pos[a:b], cache.host_max_new[a:b]))
    jobs, k, vocab = running.shape[0], running.shape[1], logp.shape[-1]
    acc = logp.view(jobs, k, vocab).add_(running[:, :, None])
    vals, index = torch.topk(acc.view(jobs, k * vocab), k=2 * k)
    return vals, index, shift


class BeamSearch:
    """The beam search state of every job in flight (job j: rows [j*k, (j+1)*k) of the cache), after
    transformers' `_beam_search` with batch size 1 for each."""

    def __init__(self, settings: BeamSettings, eos: int, device: torch.device):
        self.k, self.settings, self.eos, self.device = settings.num_beams, settings, eos, device
        k = self.k
        self.running = torch.empty((0, k), device=device)  # running beams' scores
        self.done_scores = torch.empty((0, k), device=device)  # the k best finished hypotheses per job
        self.done_flags = torch.empty((0, k), dtype=torch.bool, device=device)  # False: a placeholder
        self.improvable = torch.empty(0, dtype=torch.bool, device=device)  # generate's is_early_stop_heuristic_unsatisfied
        self.done_seqs: list[list[list[int]]] = []  # per job, its finished hypotheses' ids
        self.done_lps: list[list[list[float]]] = []  # and their raw log p per token
        self.pow = torch.ones(1, device=device)  # pow[i] = i ** length_penalty, as generate computes it

    def admit(self, m: int) -> None:
        """m new jobs: beam 0 at score 0, the others never picked from (generate's start)."""
        k = self.k
        start = torch.full((m, k), NEG, device=self.device)
        start[:, 0] = 0.0
        self.running = torch.cat([self.running, start])
        self.done_scores = torch.cat([self.done_scores, torch.full((m, k), NEG, device=self.device)])
        self.done_flags = torch.cat([self.done_flags, torch.zeros((m, k), dtype=torch.bool, device=self.device)])
        self.improvable = torch.cat([self.improvable, torch.ones(m, dtype=torch.bool, device=self.device)])
        self.done_seqs += [[[] for _ in range(k)] for _ in range(m)]
        self.done_lps += [[[] for _ in range(k)] for _ in range(m)]

    def move(self, src: list[int], dst: list[int]) -> None:
        """Jobs src's state into jobs dst's (finished ones, disjoint from src); then `truncate` drops the last."""
        at_src, at_dst = (torch.as_tensor(j, device=self.device) for j in (src, dst))
        for state in (self.running, self.done_scores, self.done_flags, self.improvable):
            state[at_dst] = state[at_src]
        for s, d in zip(src, dst):
            self.done_seqs[d], self.done_lps[d] = self.done_seqs[s], self.done_lps[s]

    def truncate(self, jobs: int) -> None:
        self.running, self.done_scores = self.running[:jobs], self.done_scores[:jobs]
        self.done_flags, self.improvable = self.done_flags[:jobs], self.improvable[:jobs]
        del self.done_seqs[jobs:], self.done_lps[jobs:]

    def best(self, j: int) -> tuple[list[int], list[float]]:
        """Job j's answer: its best finished hypothesis (generate's sequences[0]) and its log p."""
        return self.done_seqs[j][0], self.done_lps[j][0]

    def _powers(self, upto: int) -> torch.Tensor:
        if len(self.pow) <= upto:  # Python's float pow, as generate's `length ** length_penalty`
            lp = self.settings.length_penalty
            self.pow = torch.tensor([1.0] + [i ** lp for i in range(1, 2 * upto + 2)], device=self.device)
        return self.pow

    def advance(self, vals: torch.Tensor, index: torch.Tensor, vocab: int, lps: torch.Tensor | None,
                cache: SlotCache, n: int) -> list[int]:
        """One step of every job from its top-2k candidates (vals [J, 2k] float32, indices into k*vocab,
        their raw log p [J, 2k] or None): the running beams continue (cache rows reordered, their new
        token written), finished hypotheses are kept; returns the jobs that ended. All of it is
        tensor work over the jobs, with one read-back per step (which jobs took a finished
        hypothesis or ended, and which beam each row continues); Python only for those events."""
        k, s = self.k, self.settings
        beam, tok = index // vocab, index % vocab
        length = cache.pos[:n:k]  # tokens in the sequence, this step's included (start token + generated)
        max_new = cache.max_new[:n:k]
        powers = self._powers(int(cache.host_max_new[:n].max()))
        hits = (tok == self.eos) | (length >= max_new)[:, None]
        # e. the k best candidates that did not end run on
        run_scores = vals + hits.to(torch.float32) * NEG
        keep = torch.topk(run_scores, k=k)[1]
        # f. candidates among the top k that ended join the finished hypotheses, if good enough
        did = hits.clone()
        did[:, k:] = False
        final = vals / powers[length][:, None]
        final = final + (self.done_flags.all(1) & (s.early_stopping is True))[:, None].to(torch.float32) * NEG
        final = final + (~self.improvable)[:, None].to(torch.float32) * NEG
        final = final + (~did).to(torch.float32) * NEG
        merged = torch.cat([self.done_scores, final], 1)
        best = torch.topk(merged, k=k)[1]
        flags = torch.cat([self.done_flags, did], 1).gather(1, best)
        moved = (flags & (best != torch.arange(k, device=best.device))).any(1)  # a real hypothesis arrived or moved
        done_scores, running = merged.gather(1, best), run_scores.gather(1, keep)
        source = (beam.gather(1, keep) + torch.arange(0, n, k, device=vals.device)[:, None]).flatten()
        # g. generate's stopping rule for each job
        never = s.early_stopping == "never" and s.length_penalty > 0.0
        best_running = running[:, 0] / powers[max_new if never else length]
        worst_done = torch.where(flags, done_scores.min(1, keepdim=True)[0], NEG)
        improvable = self.improvable & (best_running[:, None] > worst_done).any(1)
        ended = ~improvable | (flags.all(1) & (s.early_stopping is True)) | hits.all(1)
        jobs = n // k
        host = torch.cat([moved.to(torch.long), ended.to(torch.long), source]).cpu().numpy()  # the one read-back
        self._keep_hypotheses(np.flatnonzero(host[:jobs]), best, flags, beam, tok, lps, cache)
        self.done_scores, self.done_flags, self.running, self.improvable = done_scores, flags, running, improvable
        cache.reorder(host[2 * jobs:])
        rows, at = torch.arange(n, device=vals.device), cache.pos[:n]
        cache.ids[rows, at] = tok.gather(1, keep).flatten()
        if lps is not None:
            cache.lps[rows, at] = lps.gather(1, keep).flatten()
        return np.flatnonzero(host[jobs:2 * jobs]).tolist()

    def _keep_hypotheses(self, moved: np.ndarray, best: torch.Tensor, flags: torch.Tensor, beam: torch.Tensor,
                         tok: torch.Tensor, lps: torch.Tensor | None, cache: SlotCache) -> None:
        """The finished hypotheses' ids and log p, for the jobs `moved` where a real one arrived or
        moved (`best` indexes [done | candidates]): read from the rows' sequences before they are
        reordered. An event (a hypothesis ends): what it needs comes back in one read, however many
        jobs it concerns."""
        if not len(moved):
            return
        k, m = self.k, len(moved)
        jobs = torch.as_tensor(moved, device=self.device)
        ends = cache.host_pos[moved * k]  # per job: its sequence's length (start token included)
        t = int(ends.max())
        rows = torch.as_tensor((moved[:, None] * k + np.arange(k)).ravel(), device=self.device)
        parts = [best[jobs], flags[jobs], beam[jobs], tok[jobs], lps[jobs] if lps is not None else beam[jobs],
                 cache.ids[rows, 1:t], cache.lps[rows, 1:t]]
        # one float32 tensor (indices and ids < 2 ** 24 are exact in it), one read
        flat = torch.cat([p.to(torch.float32).flatten() for p in parts]).cpu().numpy()
        shapes = [(m, k), (m, k), (m, 2 * k), (m, 2 * k), (m, 2 * k), (m, k, t - 1), (m, k, t - 1)]
        cuts = np.cumsum([0] + [int(np.prod(sh)) for sh in shapes])
        best_h, flags_h, beam_h, tok_h, lps_h, ids_h, seq_lps = (
            flat[a:b].reshape(sh) for a, b, sh in zip(cuts[:-1], cuts[1:], shapes))
        for x, j in enumerate(moved.tolist()):
            old_seqs, old_lps, seqs, lp = self.done_seqs[j], self.done_lps[j], [], []
            end = int(ends[x]) - 1  # generated tokens before this step's
            for i, real in zip(best_h[x].astype(np.int64).tolist(), flags_h[x].tolist()):
                if i < k or not real:
                    seqs.append(old_seqs[i] if i < k else [])
                    lp.append(old_lps[i] if i < k else [])
                    continue
                b = int(beam_h[x, i - k])
                seqs.append(ids_h[x, b, :end].astype(np.int64).tolist() + [int(tok_h[x, i - k])])
                lp.append(seq_lps[x, b, :end].tolist() + [float(lps_h[x, i - k])] if lps is not None else [])
            self.done_seqs[j], self.done_lps[j] = seqs, lp
