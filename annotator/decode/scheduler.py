"""Continuous batching for greedy decoding and beam search: a fixed number of decoding slots, each holding one
answer in flight; when an answer ends its slot is refilled with the next waiting prompt, so a
20-token caption does not keep its slot while a 900-token OCR page is still being written.

Why not `generate`: one `generate` call runs until its longest answer ends and keeps computing
the finished rows (as padding). Here every step computes only the rows still in flight.

The decoder step is BART's (post-LayerNorm), written out so that each row has its own position:
  per slot s: self-attention K/V  [layers][S, H, T, hd]  (T = longest answer allowed + 1)
              cross-attention K/V [layers][S, H, L, hd]  (L = longest prompt, computed once on admission)
Rows in flight are kept packed in slots [0, n): a finished row's slot takes the last row's cache,
so a step works on views of the first n slots, never on copies.

The scheduler is persistent: the engine's stream (stream.py) keeps one and submits the prompts of each new batch of
images as slots free up, so a long answer of one batch decodes beside the prompts of the next ones
(stream.BatchStream) instead of alone.

Beam search (beams.py): a job with k beams holds k consecutive slots, its beams' self-attention
caches are copied among its own rows each step, its prompt's cross-attention K/V is stored once
(not once per beam), and its k slots free up together when it ends; admission needs k free slots.
Greedy is the case k = 1 (argmax, as generate's greedy search).

Each row's decoder sequence lives in the cache (SlotCache.ids), so the logits rules
(logits_rules.py: repetition penalty, no-repeat n-grams, per-row min/max lengths, forced <s> and
</s>; for beams the model's length_penalty and early_stopping) and the bookkeeping of a step are
batched tensor work over all rows, with Python only for the rows that end. Anything else in the
model's generation config -> `unsupported_reason()` names it and the engine keeps its `generate` path."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from annotator.decode import ragged
from annotator.decode.beams import BeamSearch, BeamSettings, candidates
from annotator.decode.kvcache import SlotCache, heads, merge_heads
from annotator.decode.logits_rules import Known, LogitsRules
from annotator.answers.confidence import LocBins, logprobs_tensor

# generation_config rules that shape greedy logits and that this module does not implement: each
# must keep its no-op value. (It implements decoder_start/bos/eos/pad ids, forced_bos/forced_eos,
# repetition_penalty and no_repeat_ngram_size (logits_rules.py); num_beams and do_sample are the
# engine's own settings, passed explicitly, so they do not count.)
UNSUPPORTED = {"encoder_no_repeat_ngram_size": 0,
               "min_length": 0, "bad_words_ids": None, "suppress_tokens": None, "begin_suppress_tokens": None,
               "encoder_repetition_penalty": 1.0, "exponential_decay_length_penalty": None,
               "sequence_bias": None, "renormalize_logits": False, "min_new_tokens": 0,
               # beam search variants beams.py does not implement
               "num_return_sequences": 1, "num_beam_groups": 1, "diversity_penalty": 0.0, "constraints": None,
               "force_words_ids": None, "low_memory": False}


@dataclass
class DecodeStats:
    """Decoding work, for the bench's slot efficiency. Counted in prompts: a beam job's k rows would
    multiply row_steps and useful tokens alike by k, so the efficiency is the same either way."""

    calls: int = 0  # generate calls, or scheduler admissions (prompts encoded together)
    steps: int = 0  # decoder steps
    row_steps: int = 0  # sum over steps of rows computed in that step
    slot_steps: int = 0  # sum over steps of slots available (the cap on rows in flight)
    useful: int = 0  # answer tokens kept
    tokens: dict = field(default_factory=dict)  # task -> answer tokens

    def add_tokens(self, task: str, n: int) -> None:
        self.useful += n
        self.tokens[task] = self.tokens.get(task, 0) + n

    @property
    def efficiency(self) -> float:
        """useful tokens / (decode steps x rows in flight): the work that was not padding."""
        return self.useful / self.row_steps if self.row_steps else 0.0

    @property
    def occupancy(self) -> float:
        """rows in flight / slots, over all steps: what a GPU (cost per step ~ flat in rows) sees."""
        return self.row_steps / self.slot_steps if self.slot_steps else 0.0


@dataclass(frozen=True)
class Job:
    """One prompt to answer."""

    prompt_len: int  # encoder length (image tokens + prompt), for sizing the cross cache
    min_new: int = 0  # no </s> before this many tokens
    max_new: int = 1024  # stop after this many tokens
    tag: Any = field(default=None, compare=False)  # the caller's: which request this job answers


@dataclass
class Answer:
    ids: list[int]  # generated ids after the decoder start token, </s> included when it ended
    ended: bool  # wrote </s> (False: stopped by its length limit)
    logprobs: list[float] | None  # raw model log p of each id (None: scoring off)


# encode(jobs) -> (encoder states [k, L, D], mask [k, L]) of the jobs being admitted
Encode = Callable[[list[Job]], tuple[torch.Tensor, torch.Tensor]]


def unsupported_reason(generation_config) -> str | None:
    """Why the scheduler would not decode exactly as `generate` with this config (e.g.
    "num_return_sequences=2 is not implemented"), or None when it would."""
    for key, default in UNSUPPORTED.items():
        value = getattr(generation_config, key, default)
        if value not in (default, None):
            return f"{key}={value!r} is not implemented by the decode scheduler"
    return None


def supports(generation_config) -> bool:
    """True when greedy decoding and beam search with this config are exactly what `DecodeScheduler` does."""
    return unsupported_reason(generation_config) is None


class DecodeScheduler:
    """A persistent decoding loop: `submit` jobs at any time (e.g. the prompts of the next batch of
    images while long answers of the last one still run), `step` until `busy` is False. Jobs are
    admitted in submission order whenever a slot is free; their prompts are encoded (`encode`) on
    admission, so memory holds at most `max_rows` encoder outputs."""

    # Self-attention by length groups (ragged.py) once the padded reads exceed this x the real ones. A
    # group copies its rows' K/V (index_select) before attending, so it reads and writes its bytes and
    # then reads them again. One attention call on CPU (examples/bench_ragged.py, 48 rows x 12 heads x 64
    # as Florence-2-base's beams): groups lose to the padded read up to about 5x waste (2.5: 58 vs 17
    # ms; 5.6: 24 vs 16) and win from there (10.2: 3.6 vs 16); at random:tiny's width from about 3.5x.
    RAGGED_WASTE = 6.0
    CHUNK_BYTES = 16 << 20  # CPU: vocabulary-sized work in row chunks of at most this many bytes (_chunks)

    def __init__(self, model, max_rows: int, encode: Encode, scores: bool = True, stats: DecodeStats | None = None,
                 locs: LocBins | None = None, num_beams: int = 1):
        self.model = model  # Florence2ForConditionalGeneration
        self.decoder = model.model.language_model.decoder
        self.max_rows = max_rows  # slots: the cap on rows in flight (and on KV-cache bytes, see kv_bytes_per_row)
        self.width = num_beams  # rows per job: 1 greedy, k for beam search (beams.py)
        self.beam_settings = BeamSettings.of(num_beams, model.generation_config)
        self.encode = encode
        self.scores = scores
        self.locs = locs  # how location tokens are scored (scores.chosen_logprobs)
        self.stats = stats
        gc = model.generation_config
        self.start, self.eos = gc.decoder_start_token_id, gc.eos_token_id
        self.rules = LogitsRules.of(gc)
        self.waiting: deque[Job] = deque()
        self.rows: list[Job] = []  # jobs in flight; job j holds the packed slots [j * width, (j + 1) * width)
        self.cache: SlotCache | None = None  # per slot: KV, decoder ids and log p so far (kvcache.py)
        self._row_index = torch.arange(0, device=self.decoder.embed_tokens.weight.device)  # _arange
        self.beams = BeamSearch(self.beam_settings, self.eos, self.decoder.embed_tokens.weight.device) \
            if num_beams > 1 else None

    def kv_bytes_per_row(self, max_new: int, prompt_len: int) -> int:
        """Self (max_new + 1 positions) and, its share of its job's, cross (prompt_len) K and V,
        every decoder layer: a job's k beam rows store the cross K/V once."""
        cfg = self.decoder.config
        itemsize = self.decoder.embed_tokens.weight.element_size()
        return 2 * len(self.decoder.layers) * cfg.d_model * itemsize * (max_new + 1 + -(-prompt_len // self.width))

    def submit(self, jobs: Sequence[Job]) -> None:
        self.waiting.extend(jobs)

    @property
    def busy(self) -> bool:
        return bool(self.rows or self.waiting)

    @property
    def capacity(self) -> int:
        """Jobs in flight at most: max_rows // width (one job even if its beams overflow max_rows)."""
        return max(1, self.max_rows // self.width)

    @property
    def room(self) -> int:
        """Jobs that could start and that no job in flight or waiting fills: > 0 means feed more prompts."""
        return self.capacity - len(self.rows) - len(self.waiting)

    def unfinished(self) -> list[Job]:
        """Every job in flight or waiting, taken out (after a failure: they restart from their first
        token elsewhere; decoding is deterministic, so nothing changes but the work)."""
        jobs = self.rows + list(self.waiting)
        self.rows, self.waiting, self.cache = [], deque(), None
        if self.beams is not None:
            self.beams = BeamSearch(self.beam_settings, self.eos, self.beams.device)
        return jobs

    @torch.inference_mode()
    def step(self) -> list[tuple[Job, Answer]]:
        """Admit waiting jobs into free slots, run one decoder step, return the jobs that ended."""
        self._admit()
        if not self.rows:
            return []
        cache, n = self.cache, len(self.rows) * self.width
        tokens = cache.ids[:n].gather(1, cache.pos[:n, None])[:, 0]  # each row's last token
        hidden = self._step(cache, tokens, n)  # [n, D]
        if self.stats is not None:  # in prompts (jobs): a beam job's k rows scale both terms of efficiency alike
            self.stats.steps += 1
            self.stats.row_steps += len(self.rows)
            self.stats.slot_steps += self.capacity
        cache.advance(n)
        ended = self._greedy(hidden, n) if self.beams is None else self._beam(hidden, n)
        finished = self._answers(ended)
        self._retire(ended)
        return finished

    def _answers(self, ended: list[int]) -> list[tuple[Job, Answer]]:
        """The ended jobs' answers: beams keep them on the host; greedy rows are read back together,
        ids and log p in one transfer (an event step: one read, however many jobs end)."""
        if not ended:
            return []
        if self.beams is not None:
            seqs = [self.beams.best(j) for j in ended]
        else:
            ends = self.cache.host_pos[ended]  # each row's last token (the start token is at 0)
            rows = torch.as_tensor(ended, device=self.cache.device)
            t = int(ends.max()) + 1
            # ids < 2 ** 24 are exact in float32: one tensor, one read
            block = torch.stack([self.cache.ids[rows, 1:t].to(torch.float32), self.cache.lps[rows, 1:t]], 1)
            block = block.cpu().numpy()
            seqs = [(block[i, 0, :e].astype(np.int64).tolist(), block[i, 1, :e].tolist()) for i, e in enumerate(ends)]
        return [(self.rows[j], self._answer(self.rows[j], ids, lps)) for j, (ids, lps) in zip(ended, seqs)]

    def _answer(self, job: Job, ids: list[int], lps: list[float]) -> Answer:
        # With forced_eos (the published config) the last allowed token is a forced </s>: an answer that
        # reached its max_new was cut there, not finished (as the generate path reads it).
        cut = self.rules.forced_eos is not None and len(ids) >= job.max_new
        return Answer(ids, bool(ids) and ids[-1] == self.eos and not cut, lps if self.scores else None)

    def _arange(self, n: int) -> torch.Tensor:
        """0..n-1 on the device, one tensor kept across steps (a view of it, not a new one each step)."""
        if len(self._row_index) < n:
            self._row_index = torch.arange(max(n, self.max_rows), device=self._row_index.device)
        return self._row_index[:n]

    def _chunks(self, n: int, vocab: int) -> list[tuple[int, int]]:
        """Row ranges (whole jobs) for the vocabulary-sized work of a step. On CPU a [rows, V] float
        tensor over a few MB is mmap'ed fresh by malloc and page-faulted in on every step (at 768
        rows the process spent most of its time in the kernel); chunks under that size reuse the
        heap. A GPU's caching allocator reuses memory: one chunk."""
        if self.decoder.embed_tokens.weight.device.type != "cpu":
            return [(0, n)]
        w = self.width
        rows = max(w, self.CHUNK_BYTES // (4 * vocab) // w * w)
        return [(a, min(a + rows, n)) for a in range(0, n, rows)]

    def _greedy(self, hidden: torch.Tensor, n: int) -> list[int]:
        """Each row's next token (generate's rules on the float32 logits, then argmax), written into
        its sequence; the rows that ended (</s> or their length limit), in order."""
        cache, head = self.cache, self.model.lm_head
        rows, at = self._arange(n), cache.pos[:n]
        chosen = torch.empty(n, dtype=torch.long, device=hidden.device)
        for a, b in self._chunks(n, head.out_features):
            logits = head(hidden[a:b]).float()
            raw = torch.log_softmax(logits, -1) if self.scores else None  # before the rules bend the logits
            self.rules.apply(logits, cache.ids[a:b], at[a:b], cache.min_new[a:b], cache.max_new[a:b],
                             Known(cache.host_pos[a:b], cache.host_max_new[a:b]))
            chosen[a:b] = logits.argmax(-1)
            if raw is not None:
                cache.lps[rows[a:b], at[a:b]] = logprobs_tensor(raw, chosen[a:b], self.locs)
        cache.ids[rows, at] = chosen
        ended = ((chosen == self.eos) | (at >= cache.max_new[:n])).cpu().numpy()  # the step's one read-back
        return np.flatnonzero(ended).tolist()

    def _beam(self, hidden: torch.Tensor, n: int) -> list[int]:
        """Beam search step of every job (beams.py): its k rows reordered to the beams they continue;
        the jobs that ended."""
        beams, k, head = self.beams, self.width, self.model.lm_head
        vocab, jobs = head.out_features, n // k
        vals = torch.empty((jobs, 2 * k), device=hidden.device)
        index = torch.empty((jobs, 2 * k), dtype=torch.long, device=hidden.device)
        lps = torch.empty((jobs, 2 * k), device=hidden.device) if self.scores else None
        for a, b in self._chunks(n, vocab):
            ja, jb = a // k, b // k
            logits = head(hidden[a:b]).float()
            v, i, shift = candidates(logits, beams.running[ja:jb], self.rules, self.cache, a, b, self.scores)
            vals[ja:jb], index[ja:jb] = v, i
            if lps is not None:  # raw log p of every candidate token, under the logits of the beam it extends
                rows = (i // vocab + torch.arange(jb - ja, device=i.device)[:, None] * k).flatten()
                lps[ja:jb] = logprobs_tensor(logits, (i % vocab).flatten(), self.locs, rows=rows,
                                             shift=shift).view(i.shape)
        return beams.advance(vals, index, vocab, lps, self.cache, n)

    def _retire(self, ended: list[int]) -> None:
        """Jobs `ended` (ascending) are done: the jobs still running past the first len(rows) - len(ended)
        move into the slots they left (one batched move), so rows stay packed."""
        if not ended:
            return
        keep, gone = len(self.rows) - len(ended), set(ended)
        holes = [j for j in ended if j < keep]
        movers = [j for j in range(keep, len(self.rows)) if j not in gone]  # as many as holes
        if holes:
            self.cache.move(movers, holes)
            if self.beams is not None:
                self.beams.move(movers, holes)
            for src, dst in zip(movers, holes):
                self.rows[dst] = self.rows[src]
        del self.rows[keep:]
        if self.beams is not None:
            self.beams.truncate(keep)

    def _admit(self) -> None:
        """Waiting jobs into the free slots (k = width per job), their prompts encoded together."""
        free = self.capacity - len(self.rows)
        if not self.waiting or free <= 0:
            return
        new = [self.waiting[i] for i in range(min(free, len(self.waiting)))]
        states, mask = self.encode(new)  # before taking them: a failure leaves them waiting
        for _ in new:
            self.waiting.popleft()
        k, used = self.width, len(self.rows) * self.width
        self.cache = SlotCache.fit(self.cache, self.decoder, self.capacity * k, used,
                                   max(j.max_new for j in self.rows + new) + 1, states.shape[1], k)
        self.cache.admit(used, states, mask, self.start, [j.min_new for j in new], [j.max_new for j in new])
        self.rows += new
        if self.beams is not None:
            self.beams.admit(len(new))
        if self.stats is not None:
            self.stats.calls += 1  # admissions: prompt encodings batched together

    def _step(self, cache: SlotCache, tokens: torch.Tensor, n: int) -> torch.Tensor:
        """One decoder step for the rows in slots [0, n): tokens [n] at positions cache.pos[:n] -> the
        last hidden states [n, D] (lm_head runs in chunks: _greedy, _beam)."""
        dec = self.decoder
        pos = cache.pos[:n]
        h = dec.embed_tokens(tokens[:, None]) + dec.embed_positions.weight[pos + dec.embed_positions.offset][:, None]
        h = dec.layernorm_embedding(h)  # [n, 1, D]
        lengths = cache.host_pos[:n] + 1  # keys each row attends to (kept on the host: no read-back)
        t = int(lengths.max())
        # One masked attention over [n, t] reads every row's K/V up to the longest row; when rows
        # differ a lot (a 900-token page beside fresh captions, as soon as batches join) that is
        # mostly padding, and attention by groups of similar length (ragged.py) reads far fewer bytes.
        groups = ragged.plan(lengths, pos.device) if n * t > self.RAGGED_WASTE * int(lengths.sum()) else None
        self_mask = None if groups else \
            (torch.arange(t, device=pos.device)[None, :] <= pos[:, None])[:, None, None, :]  # [n, 1, 1, t]
        w = self.width  # a job's k beams share its prompt: their k queries read its cross K/V once
        cross_mask = cache.cross_mask[:n // w, None, None, :]  # [J, 1, 1, L]
        rows = self._arange(n)
        for i, layer in enumerate(dec.layers):
            att = layer.self_attn
            q, k, v = (heads(p(h), att.head_dim) for p in (att.q_proj, att.k_proj, att.v_proj))  # [n, H, 1, hd]
            cache.k[i][rows, :, pos] = k[:, :, 0]
            cache.v[i][rows, :, pos] = v[:, :, 0]
            if groups:
                o = ragged.attend(q, cache.k[i], cache.v[i], groups, att.scaling)
            else:
                o = F.scaled_dot_product_attention(q, cache.k[i][:n, :, :t], cache.v[i][:n, :, :t], self_mask,
                                                   scale=att.scaling)
            h = layer.self_attn_layer_norm(h + att.out_proj(merge_heads(o)))
            xa = layer.encoder_attn
            q = heads(xa.q_proj(h), xa.head_dim)
            q = q.view(n // w, w, *q.shape[1:]).transpose(1, 2).flatten(2, 3)  # [n, H, 1, hd] -> [J, H, k, hd]
            o = F.scaled_dot_product_attention(q, cache.ck[i][:n // w], cache.cv[i][:n // w], cross_mask,
                                               scale=xa.scaling)
            o = o.view(n // w, o.shape[1], w, 1, o.shape[-1]).transpose(1, 2).flatten(0, 1)  # -> [n, H, 1, hd]
            h = layer.encoder_attn_layer_norm(h + xa.out_proj(merge_heads(o)))
            h = layer.final_layer_norm(h + layer.fc2(layer.activation_fn(layer.fc1(h))))
        return h[:, 0]


def rows_for_memory(device: torch.device, bytes_per_row: int, cap: int, share: float = 0.5) -> int:
    """The cap on rows in flight, lowered on GPU so the KV cache takes at most `share` of free memory."""
    if device.type != "cuda":
        return cap
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, min(cap, int(free * share) // bytes_per_row))
