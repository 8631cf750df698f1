"""The decoding scheduler's static KV cache (scheduler.py): one slot per row in flight, each with
its own self-attention K/V up to the longest answer allowed and its decoder ids so far; one
cross-attention K/V per job (prompt), shared by its k beam rows; and the head reshapes the
decoder step uses. Each row's position and max_new are also kept on the host (numpy), updated by
the same methods, so a step never reads them back from the device."""

from __future__ import annotations

import numpy as np
import torch


def heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[n, T, D] -> [n, H, T, hd]"""
    return x.view(x.shape[0], x.shape[1], -1, head_dim).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[n, H, T, hd] -> [n, T, D]"""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)


def copy_rows(x: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
    """x[dst] := x[src] along dim 0 (x may be a view: a slice of the cache's positions). The rows
    are gathered first, so a row both read and written is read before it is overwritten. Why
    index_select + index_copy_ rather than `x[dst] = x[src]`: on a strided slice, advanced indexing
    copies element by element on CPU, about twice as slow (768 rows x 35 of 161 positions: 3.2 vs
    1.5 ms per K/V tensor, one thread)."""
    x.index_copy_(0, dst, x.index_select(0, src))


class SlotCache:
    """The static per-slot state (see module doc): `slots` rows of `positions` self-attention entries
    and decoder ids / log p, and per job (`width` consecutive rows: a job's beams) `prompt_len`
    cross-attention entries, stored once for its k beams (they all read the same prompt). Grows
    (rarely: a longer prompt or answer limit than any before) by copying into a larger one; a
    persistent scheduler keeps it between batches."""

    def __init__(self, decoder, slots: int, positions: int, prompt_len: int, width: int = 1):
        self.decoder = decoder
        w = decoder.embed_tokens.weight
        self.device = w.device
        layer = decoder.layers[0].self_attn
        heads, hd = layer.embed_dim // layer.head_dim, layer.head_dim
        self.slots, self.positions, self.prompt_len, self.width = slots, positions, prompt_len, width
        jobs = -(-slots // width)
        shape_self, shape_cross = (slots, heads, positions, hd), (jobs, heads, prompt_len, hd)
        n = len(decoder.layers)
        self.k = [torch.zeros(shape_self, dtype=w.dtype, device=self.device) for _ in range(n)]
        self.v = [torch.zeros(shape_self, dtype=w.dtype, device=self.device) for _ in range(n)]
        self.ck = [torch.zeros(shape_cross, dtype=w.dtype, device=self.device) for _ in range(n)]
        self.cv = [torch.zeros(shape_cross, dtype=w.dtype, device=self.device) for _ in range(n)]
        self.cross_mask = torch.zeros((jobs, prompt_len), dtype=torch.bool, device=self.device)
        self.pos = torch.zeros(slots, dtype=torch.long, device=self.device)  # next position to write, per slot
        # per slot: its decoder sequence (start token, then the tokens chosen; ids[r, pos[r]] is the next
        # input), the raw log p of each chosen token, and the row's min / max new tokens
        self.ids = torch.zeros((slots, positions), dtype=torch.long, device=self.device)
        self.lps = torch.zeros((slots, positions), dtype=torch.float32, device=self.device)
        self.min_new = torch.zeros(slots, dtype=torch.long, device=self.device)
        self.max_new = torch.zeros(slots, dtype=torch.long, device=self.device)
        self.host_pos = np.zeros(slots, dtype=np.int64)  # == pos, on the host
        self.host_max_new = np.zeros(slots, dtype=np.int64)  # == max_new, on the host

    def per_row(self) -> list[torch.Tensor]:
        return [self.pos, self.ids, self.lps, self.min_new, self.max_new]

    @classmethod
    def fit(cls, cache: "SlotCache | None", decoder, slots: int, used: int, positions: int, prompt_len: int,
            width: int = 1) -> "SlotCache":
        """`cache` if it holds `slots` x `positions` x `prompt_len`, else a larger one with its first
        `used` slots (used // width jobs) copied over."""
        if cache is not None and cache.slots >= slots and cache.positions >= positions \
                and cache.prompt_len >= prompt_len:
            return cache
        if cache is not None:
            slots, positions = max(slots, cache.slots), max(positions, cache.positions)
            prompt_len = max(prompt_len, cache.prompt_len)
        new = cls(decoder, slots, positions, prompt_len, width)
        if cache is not None and used:
            jobs = used // width
            for dst, src in ((new.k, cache.k), (new.v, cache.v)):
                for d, s in zip(dst, src):
                    d[:used, :, :cache.positions] = s[:used]
            for dst, src in ((new.ck, cache.ck), (new.cv, cache.cv)):
                for d, s in zip(dst, src):
                    d[:jobs, :, :cache.prompt_len] = s[:jobs]
            new.cross_mask[:jobs, :cache.prompt_len] = cache.cross_mask[:jobs]
            for d, s in zip(new.per_row(), cache.per_row()):
                if d.dim() == 2:
                    d[:used, :cache.positions] = s[:used]
                else:
                    d[:used] = s[:used]
            new.host_pos[:used], new.host_max_new[:used] = cache.host_pos[:used], cache.host_max_new[:used]
        return new

    def admit(self, first: int, states: torch.Tensor, mask: torch.Tensor, start: int, min_new: list[int],
              max_new: list[int]) -> None:
        """Encoder states [m, L, D] of m new jobs into slots [first, first + m * width) (`first` a
        multiple of width): their cross K/V once per job, their rows' sequences = the start token."""
        m, length = states.shape[:2]
        k = self.width
        end, job = first + m * k, first // k
        self.cross_mask[job:job + m] = False
        self.cross_mask[job:job + m, :length] = mask.bool()
        self.pos[first:end] = 0
        self.ids[first:end, 0] = start
        self.min_new[first:end] = torch.tensor(min_new, device=self.device).repeat_interleave(k)
        self.max_new[first:end] = torch.tensor(max_new, device=self.device).repeat_interleave(k)
        self.host_pos[first:end] = 0
        self.host_max_new[first:end] = np.repeat(max_new, k)
        for i, layer in enumerate(self.decoder.layers):
            xa = layer.encoder_attn
            self.ck[i][job:job + m, :, :length] = heads(xa.k_proj(states), xa.head_dim)
            self.cv[i][job:job + m, :, :length] = heads(xa.v_proj(states), xa.head_dim)

    def advance(self, n: int) -> None:
        self.pos[:n] += 1
        self.host_pos[:n] += 1

    def reorder(self, source: np.ndarray) -> None:
        """Beam search: row r's self-attention K/V, ids and log p := row source[r]'s, for the rows
        [0, len(source)) (host indices: a new beam continues an old beam of its job, at the same
        position; only rows whose source differs are copied)."""
        dst = np.flatnonzero(source != np.arange(len(source)))
        if not len(dst):
            return
        t = int(self.host_pos[dst].max())
        dst, src = torch.as_tensor(dst, device=self.device), torch.as_tensor(source[dst], device=self.device)
        for caches in (self.k, self.v):
            for c in caches:
                copy_rows(c[:, :, :t], src, dst)
        copy_rows(self.ids[:, :t + 1], src, dst)
        copy_rows(self.lps[:, :t + 1], src, dst)

    def move(self, src: list[int], dst: list[int]) -> None:
        """Jobs src's rows and cross K/V into jobs dst's (finished ones; the two lists are disjoint),
        all of them in one batched copy per tensor: an event, but one whose ops do not grow with
        the jobs that end together."""
        k = self.width
        rows_src = (np.asarray(src)[:, None] * k + np.arange(k)).ravel()
        rows_dst = (np.asarray(dst)[:, None] * k + np.arange(k)).ravel()
        t = int(self.host_pos[rows_src].max())
        at_src, at_dst = (torch.as_tensor(r, device=self.device) for r in (rows_src, rows_dst))
        for caches in (self.k, self.v):
            for c in caches:
                copy_rows(c[:, :, :t], at_src, at_dst)
        jobs_src, jobs_dst = (torch.as_tensor(j, device=self.device) for j in (src, dst))
        for state in [*self.ck, *self.cv, self.cross_mask]:
            state[jobs_dst] = state[jobs_src]
        for state in self.per_row():
            state[at_dst] = state[at_src]
        for state in (self.host_pos, self.host_max_new):
            state[rows_dst] = state[rows_src]
