"""The logits processors of transformers' `generate` that the decode scheduler implements, batched
over every row in flight (scheduler.py, greedy; beams.py, beam search).

Each row r has its own decoder sequence ids[r, :length[r]]: the decoder start token, then its own
generated tokens (for beam search: its beam's own history). That is the `input_ids` generate's
processors see for an encoder-decoder model, so the rules see the same. They run in generate's
order (utils._get_logits_processor):
  1. repetition_penalty (RepetitionPenaltyLogitsProcessor): every token already in the sequence,
     the decoder start token included, gets its score divided by the penalty (multiplied when < 0);
  2. no_repeat_ngram_size (NoRepeatNGramLogitsProcessor): a token that would complete an n-gram
     already in the sequence gets -inf;
  3. min new tokens: no </s> before min_new;
  4. forced <s> first; 5. forced </s> last (it wins when both apply, as the later processor does).
Greedy applies them to the float32 logits, beam search to the log_softmax (as generate does; the
penalty then always multiplies). Each is one batched tensor operation over the rows, not a loop
per row: host time per step does not grow with the rows in flight. What the host already knows
(each row's length and limit: `Known`, kept by the scheduler) it passes in, so a step reads
nothing back from the device here; the forced tokens are events (a row's first and last step)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

INF = float("inf")


@dataclass(frozen=True)
class Known:
    """The rows' lengths and max_new as the host keeps them (numpy [n] each, equal to the tensors)."""

    length: np.ndarray
    max_new: np.ndarray

    @classmethod
    def read(cls, length: torch.Tensor, max_new: torch.Tensor) -> "Known":
        """Read back from the device (a sync): for callers that do not keep them."""
        return cls(length.cpu().numpy(), max_new.cpu().numpy())


@dataclass(frozen=True)
class LogitsRules:
    eos: int
    forced_bos: int | None = None
    forced_eos: int | None = None
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0

    @classmethod
    def of(cls, generation_config) -> "LogitsRules":
        gc = generation_config
        penalty, ngram = getattr(gc, "repetition_penalty", None), getattr(gc, "no_repeat_ngram_size", None)
        return cls(gc.eos_token_id, gc.forced_bos_token_id, gc.forced_eos_token_id,
                   1.0 if penalty is None else float(penalty), int(ngram or 0))

    def apply(self, x: torch.Tensor, ids: torch.Tensor, length: torch.Tensor, min_new: torch.Tensor,
              max_new: torch.Tensor, known: Known) -> None:
        """In place on x [n, V] (float32): rows' sequences ids [n, >= max(length)], length [n] (tokens
        so far, the decoder start included), per-row min_new / max_new [n]; `known`: the same
        lengths and max_new on the host (required, so a read-back is the caller's visible choice:
        Known.read)."""
        longest = int(known.length.max()) if len(known.length) else 0
        if self.repetition_penalty != 1.0:
            penalize(x, ids, length, self.repetition_penalty, longest)
        if self.no_repeat_ngram_size > 0:
            ban_ngrams(x, ids, length, self.no_repeat_ngram_size, longest)
        x[:, self.eos].masked_fill_(length - 1 < min_new, -INF)
        if self.forced_bos is not None:
            force(x, np.flatnonzero(known.length == 1), self.forced_bos)
        if self.forced_eos is not None:
            force(x, np.flatnonzero(known.length == known.max_new), self.forced_eos)


def force(x: torch.Tensor, rows: np.ndarray, token: int) -> None:
    """Rows `rows` (host indices) of x can only pick `token` (generate's ForcedBOS/ForcedEOS processors)."""
    if len(rows):
        at = torch.as_tensor(rows, device=x.device)
        x.index_fill_(0, at, -INF)
        x[at, token] = 0


def penalize(x: torch.Tensor, ids: torch.Tensor, length: torch.Tensor, penalty: float, t: int) -> None:
    """RepetitionPenaltyLogitsProcessor on rows of different lengths (t: the longest): positions past
    a row's length point at its decoder start token (always in the sequence), so the scatter writes
    that token's penalized score again, never a stray one."""
    seq = ids[:, :t]
    valid = torch.arange(t, device=ids.device)[None, :] < length[:, None]
    seq = torch.where(valid, seq, seq[:, :1])
    score = x.gather(1, seq)
    x.scatter_(1, seq, torch.where(score < 0, score * penalty, score / penalty))


def ban_ngrams(x: torch.Tensor, ids: torch.Tensor, length: torch.Tensor, n: int, t: int) -> None:
    """NoRepeatNGramLogitsProcessor on rows of different lengths (t: the longest): each row's last
    n-1 tokens are matched against every n-token window of its own sequence; a match bans the
    window's last token. Windows must end inside the row (start <= length - n), as in generate.
    The bans go in as one scatter-min (-inf where a window hits, +inf, a no-op, elsewhere): no
    read-back of which windows hit."""
    if t < n:
        return
    seq = ids[:, :t]
    windows = seq.unfold(1, n, 1)  # [rows, t - n + 1, n], a view
    at = (length[:, None] - (n - 1) + torch.arange(n - 1, device=ids.device)[None, :]).clamp(min=0)
    prefix = seq.gather(1, at)  # [rows, n - 1]: each row's last n - 1 tokens
    starts = torch.arange(windows.shape[1], device=ids.device)
    hit = (windows[..., :-1] == prefix[:, None, :]).all(-1) & (starts[None, :] <= (length - n)[:, None])
    ban = torch.full(hit.shape, INF, dtype=x.dtype, device=x.device).masked_fill_(hit, -INF)
    x.scatter_reduce_(1, windows[..., -1], ban, reduce="amin")
