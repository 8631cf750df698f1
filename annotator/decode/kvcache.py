"""The decoding scheduler's static KV cache (scheduler.py): one slot per row in flight, each with
its own self-attention K/V up to the longest answer allowed and its prompt's cross-attention K/V,
and the head reshapes the decoder step uses."""

from __future__ import annotations

import torch


def heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[n, T, D] -> [n, H, T, hd]"""
    return x.view(x.shape[0], x.shape[1], -1, head_dim).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[n, H, T, hd] -> [n, T, D]"""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)


class SlotCache:
    """The static per-slot KV cache (see module doc): `slots` rows of `positions` self-attention and
    `prompt_len` cross-attention entries. Grows (rarely: a longer prompt or answer limit than any
    before) by copying into a larger one; a persistent scheduler keeps it between batches."""

    def __init__(self, decoder, slots: int, positions: int, prompt_len: int):
        self.decoder = decoder
        w = decoder.embed_tokens.weight
        self.device = w.device
        layer = decoder.layers[0].self_attn
        heads, hd = layer.embed_dim // layer.head_dim, layer.head_dim
        self.slots, self.positions, self.prompt_len = slots, positions, prompt_len
        shape_self, shape_cross = (slots, heads, positions, hd), (slots, heads, prompt_len, hd)
        n = len(decoder.layers)
        self.k = [torch.zeros(shape_self, dtype=w.dtype, device=self.device) for _ in range(n)]
        self.v = [torch.zeros(shape_self, dtype=w.dtype, device=self.device) for _ in range(n)]
        self.ck = [torch.zeros(shape_cross, dtype=w.dtype, device=self.device) for _ in range(n)]
        self.cv = [torch.zeros(shape_cross, dtype=w.dtype, device=self.device) for _ in range(n)]
        self.cross_mask = torch.zeros((slots, prompt_len), dtype=torch.bool, device=self.device)
        self.pos = torch.zeros(slots, dtype=torch.long, device=self.device)  # next position to write, per slot

    @classmethod
    def fit(cls, cache: "SlotCache | None", decoder, slots: int, used: int, positions: int, prompt_len: int) -> "SlotCache":
        """`cache` if it holds `slots` x `positions` x `prompt_len`, else a larger one with its first
        `used` slots copied over."""
        if cache is not None and cache.slots >= slots and cache.positions >= positions \
                and cache.prompt_len >= prompt_len:
            return cache
        if cache is not None:
            slots, positions = max(slots, cache.slots), max(positions, cache.positions)
            prompt_len = max(prompt_len, cache.prompt_len)
        new = cls(decoder, slots, positions, prompt_len)
        if cache is not None and used:
            for dst, src in ((new.k, cache.k), (new.v, cache.v)):
                for d, s in zip(dst, src):
                    d[:used, :, :cache.positions] = s[:used]
            for dst, src in ((new.ck, cache.ck), (new.cv, cache.cv)):
                for d, s in zip(dst, src):
                    d[:used, :, :cache.prompt_len] = s[:used]
            new.cross_mask[:used, :cache.prompt_len] = cache.cross_mask[:used]
            new.pos[:used] = cache.pos[:used]
        return new

    def admit(self, first: int, states: torch.Tensor, mask: torch.Tensor, repeat: int = 1) -> None:
        """Encoder states [m, L, D] of new jobs into slots [first, first + m * repeat), `repeat` rows
        per job (its beams): their cross K/V, computed once per job."""
        m, length = states.shape[:2]
        end = first + m * repeat
        self.cross_mask[first:end] = False
        self.cross_mask[first:end, :length] = mask.bool().repeat_interleave(repeat, 0)
        self.pos[first:end] = 0
        for i, layer in enumerate(self.decoder.layers):
            xa = layer.encoder_attn
            self.ck[i][first:end, :, :length] = heads(xa.k_proj(states), xa.head_dim).repeat_interleave(repeat, 0)
            self.cv[i][first:end, :, :length] = heads(xa.v_proj(states), xa.head_dim).repeat_interleave(repeat, 0)

    def advance(self, n: int) -> None:
        self.pos[:n] += 1

    def reorder(self, source: list[int]) -> None:
        """Beam search: slot r's self-attention K/V := slot source[r]'s, for the rows [0, len(source))
        (a new beam continues an old beam of its job; only rows whose source differs are copied)."""
        dst = [r for r, s in enumerate(source) if s != r]
        if not dst:
            return
        src = torch.tensor([source[r] for r in dst], device=self.device)
        dst_t = torch.tensor(dst, device=self.device)
        t = int(self.pos[dst_t].max())
        for caches in (self.k, self.v):
            for c in caches:
                c[dst_t, :, :t] = c[src, :, :t]  # the right side is gathered first: no overwrite-before-read

    def move(self, src: int, dst: int) -> None:
        """Slot src's row into slot dst (dst's row has finished)."""
        t = int(self.pos[src])
        for caches in (self.k, self.v):
            for c in caches:
                c[dst, :, :t] = c[src, :, :t]
        for caches in (self.ck, self.cv):
            for c in caches:
                c[dst] = c[src]
        self.cross_mask[dst] = self.cross_mask[src]
        self.pos[dst] = self.pos[src]
