"""Forced answer lengths: how the bench makes the engine (and generate) write exactly n tokens per row."""

from __future__ import annotations

from typing import Callable

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList


class ForcedLengths:
    """Bench only: every answer has exactly its drawn number of new tokens (min = max), so the
    engine and the reference loop do the same decoding work. The engine reads each request's
    length from it (`Engine.forced_lengths`); the scheduler takes per-row limits natively, and
    this class turns them into `generate` arguments for the generate path."""

    def __init__(self, lookup: Callable[[str, str], int]):
        self.lookup = lookup  # (image key, task) -> exact new tokens

    def __call__(self, key: str, task: str) -> int:
        return self.lookup(key, task)

    @staticmethod
    def groups(requests: list, num_beams: int) -> list[list]:
        """Tasks share a generate call, except under beam search, which has no per-row length
        limit: there each task gets its own calls, so a chunk runs to its task's longest only."""
        if num_beams == 1:
            return [requests] if requests else []
        by_task: dict[str, list] = {}
        for req in requests:
            by_task.setdefault(req.task, []).append(req)
        return list(by_task.values())

    @staticmethod
    def generate_kwargs(chunk: list, num_beams: int, eos: int, device) -> dict:
        """One exact length for the chunk, or per-row limits when rows differ (greedy; beam search
        runs to the longest and `cut` shortens each row)."""
        forced = [r.forced for r in chunk]
        if num_beams > 1:
            forced = [max(forced)] * len(forced)
        if len(set(forced)) == 1:
            return {"max_new_tokens": forced[0], "min_new_tokens": forced[0]}
        limits = torch.tensor(forced, device=device)
        return {"max_new_tokens": max(forced), "logits_processor": LogitsProcessorList([RowMinNewTokens(limits, eos)]),
                "stopping_criteria": StoppingCriteriaList([RowMaxNewTokens(limits)])}

    @staticmethod
    def cut(chunk: list, rows: list[tuple[list[int], bool]], sequences, tok) -> tuple[list, list[str]]:
        """Beam rows run to the chunk's longest: each cut to its own length (and counted truncated)."""
        rows = [(ids[:r.forced], False) for r, (ids, _) in zip(chunk, rows)]
        return rows, [tok.decode(sequences[0, :1].tolist() + ids) for ids, _ in rows]


class RowMinNewTokens(LogitsProcessor):
    """No </s> before each row's own minimum (greedy: rows are the prompts)."""

    def __init__(self, limits: torch.Tensor, eos_token_id: int):
        self.limits, self.eos = limits, eos_token_id

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids.shape[1] - 1  # after the decoder start token
        early = self.limits > generated  # [P]
        scores[early, self.eos] = -float("inf")
        return scores


class RowMaxNewTokens(StoppingCriteria):
    """Stop each row at its own maximum (greedy: rows are the prompts)."""

    def __init__(self, limits: torch.Tensor):
        self.limits = limits

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        return self.limits <= input_ids.shape[1] - 1
