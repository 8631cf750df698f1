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
caches are copied among its own rows each step, and its k slots free up together when it ends;
admission needs k free slots. Greedy is the case k = 1 (argmax, as generate's greedy search).

Only the logits rules written here (forced <s> first, forced </s> last, per-row min/max lengths;
for beams the model's length_penalty and early_stopping); anything else in the model's generation
config -> `supports()` is False and the engine keeps its `generate` path."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from .beams import Beams, BeamSettings, apply_rules, candidates
from .kvcache import SlotCache, heads, merge_heads
from .scores import LocBins, chosen_logprobs, logprobs_of

# generation_config rules that shape greedy logits and that this module does not implement: each
# must keep its no-op value. (It implements decoder_start/bos/eos/pad ids and forced_bos/forced_eos;
# num_beams and do_sample are the engine's own settings, passed explicitly, so they do not count.)
UNSUPPORTED = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0,
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


def supports(generation_config) -> bool:
    """True when greedy decoding and beam search with this config are exactly what `DecodeScheduler` does."""
    return all(getattr(generation_config, key, default) in (default, None) for key, default in UNSUPPORTED.items())


def unsupported_reason(generation_config) -> str | None:
    """Why `DecodeScheduler` cannot decode with this config (the first rule it does not implement), or None."""
    for key, default in UNSUPPORTED.items():
        value = getattr(generation_config, key, default)
        if value not in (default, None):
            return f"{key}={value!r} is not implemented by the decode scheduler"
    return None


class DecodeScheduler:
    """A persistent decoding loop: `submit` jobs at any time (e.g. the prompts of the next batch of
    images while long answers of the last one still run), `step` until `busy` is False. Jobs are
    admitted in submission order whenever a slot is free; their prompts are encoded (`encode`) on
    admission, so memory holds at most `max_rows` encoder outputs."""

    RAGGED_WASTE = 2.0  # self-attention per row once the padded reads exceed this x the real ones

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
        self.forced_bos, self.forced_eos = gc.forced_bos_token_id, gc.forced_eos_token_id
        self.waiting: deque[Job] = deque()
        self.rows: list[Job] = []  # jobs in flight; job j holds the packed slots [j * width, (j + 1) * width)
        self.ids: list[list[int]] = []  # greedy: per job, its ids so far
        self.lps: list[list[float]] = []  # greedy: their log p
        self.beams: list[Beams] = []  # beam search: per job, its beams
        self.cache: SlotCache | None = None
        self.tokens = torch.empty(0, dtype=torch.long)

    def kv_bytes_per_row(self, max_new: int, prompt_len: int) -> int:
        """Self (max_new + 1 positions) and cross (prompt_len) K and V, every decoder layer."""
        cfg = self.decoder.config
        itemsize = self.decoder.embed_tokens.weight.element_size()
        return 2 * len(self.decoder.layers) * cfg.d_model * (max_new + 1 + prompt_len) * itemsize

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
        self.rows, self.ids, self.lps, self.beams, self.waiting, self.cache = [], [], [], [], deque(), None
        return jobs

    @torch.inference_mode()
    def step(self) -> list[tuple[Job, Answer]]:
        """Admit waiting jobs into free slots, run one decoder step, return the jobs that ended."""
        self._admit()
        if not self.rows:
            return []
        cache, n = self.cache, len(self.rows) * self.width
        logits = self._step(cache, self.tokens, n)  # [n, V]
        if self.stats is not None:  # in prompts (jobs): a beam job's k rows scale both terms of efficiency alike
            self.stats.steps += 1
            self.stats.row_steps += len(self.rows)
            self.stats.slot_steps += self.capacity
        cache.advance(n)
        done = self._greedy(logits) if self.width == 1 else self._beam(logits)
        finished = []
        for j, answer in reversed(done):  # highest first: moving the last job down never moves a finished one
            finished.append((self.rows[j], answer))
            self._retire(j)
        return finished[::-1]

    def _greedy(self, logits: torch.Tensor) -> list[tuple[int, Answer]]:
        """Each row's next token; the rows that ended, with their answers."""
        chosen = self._choose(logits, self.rows, [len(x) for x in self.ids])
        chosen_list = chosen.tolist()
        if self.scores:
            lp = chosen_logprobs(logits, chosen, self.locs)
        done = []
        for r, token in enumerate(chosen_list):
            self.ids[r].append(token)
            if self.scores:
                self.lps[r].append(lp[r])
            if token == self.eos or len(self.ids[r]) >= self.rows[r].max_new:
                ids = self.ids[r]
                done.append((r, Answer(ids, ids[-1] == self.eos, self.lps[r] if self.scores else None)))
        self.tokens = chosen
        return done

    def _beam(self, logits: torch.Tensor) -> list[tuple[int, Answer]]:
        """Beam search step of every job (beams.py): its k rows' caches reordered to the beams they
        continue, the jobs that ended with their best hypothesis."""
        k, vocab = self.width, logits.shape[-1]
        running = torch.stack([b.running for b in self.beams]).to(logits.device)
        rules = [(b.generated, job.min_new, job.max_new) for b, job in zip(self.beams, self.rows)]
        vals, index, raw = candidates(logits, running, rules, k, self.eos, self.forced_bos, self.forced_eos)
        lps = None
        if self.scores:  # raw log p of every candidate token, under the logits of the beam it extends
            rows = (index // vocab + torch.arange(len(self.rows), device=index.device)[:, None] * k).flatten()
            lps = logprobs_of(raw, (index % vocab).flatten(), self.locs, rows=rows)
        vals, index = vals.cpu(), index.tolist()
        source, tokens, done = [], [], []
        for j, beams in enumerate(self.beams):
            origin = beams.advance(vals[j], index[j], vocab, lps and lps[j * 2 * k:(j + 1) * 2 * k])
            source += [j * k + b for b in origin]
            tokens += beams.tokens()
            if beams.ended:
                ids, lp = beams.best()
                done.append((j, Answer(ids, bool(ids) and ids[-1] == self.eos, lp)))
        self.cache.reorder(source)
        self.tokens = torch.tensor(tokens, dtype=torch.long, device=self.cache.device)
        return done

    def _retire(self, j: int) -> None:
        """Job j has ended: the last job's rows move into its slots, so rows stay packed."""
        k, last = self.width, len(self.rows) - 1
        if j != last:
            for i in range(k):
                self.cache.move(last * k + i, j * k + i)
            self.tokens[j * k:(j + 1) * k] = self.tokens[last * k:(last + 1) * k]
            for state in (self.rows, self.ids, self.lps, self.beams):
                if state:
                    state[j] = state[last]
        for state in (self.rows, self.ids, self.lps, self.beams):
            if state:
                state.pop()
        self.tokens = self.tokens[:last * k]

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
                                max(j.max_new for j in self.rows + new) + 1, states.shape[1])
        self.cache.admit(used, states, mask, repeat=k)
        self.rows += new
        if k == 1:
            self.ids += [[] for _ in new]
            self.lps += [[] for _ in new]
        else:
            self.beams += [Beams(self.beam_settings, j.min_new, j.max_new, self.eos, self.scores) for j in new]
        start = torch.full((len(new) * k,), self.start, dtype=torch.long, device=self.cache.device)
        self.tokens = torch.cat([self.tokens.to(self.cache.device), start])
        if self.stats is not None:
            self.stats.calls += 1  # admissions: prompt encodings batched together

    def _choose(self, logits: torch.Tensor, jobs: list[Job], generated: list[int]) -> torch.Tensor:
        """Greedy next token per row, after the rules generate applies (see module doc)."""
        logits = logits.clone()
        for r, (job, g) in enumerate(zip(jobs, generated)):
            apply_rules(logits[r:r + 1], g, job.min_new, job.max_new, self.eos, self.forced_bos, self.forced_eos)
        return logits.argmax(-1)

    def _step(self, cache: SlotCache, tokens: torch.Tensor, n: int) -> torch.Tensor:
        """One decoder step for the rows in slots [0, n): tokens [n] at positions cache.pos[:n] -> logits [n, V]."""
        dec = self.decoder
        pos = cache.pos[:n]
        h = dec.embed_tokens(tokens[:, None]) + dec.embed_positions.weight[pos + dec.embed_positions.offset][:, None]
        h = dec.layernorm_embedding(h)  # [n, 1, D]
        lengths = (pos + 1).tolist()  # keys each row attends to
        t = max(lengths)
        # One masked attention over [n, t] reads every row's K/V up to the longest row; when rows
        # differ a lot (a 900-token page beside fresh captions, as soon as batches join) that is
        # mostly padding, and one attention per row over its own length reads far fewer bytes.
        ragged = n * t > self.RAGGED_WASTE * sum(lengths)
        self_mask = None if ragged else \
            (torch.arange(t, device=pos.device)[None, :] <= pos[:, None])[:, None, None, :]  # [n, 1, 1, t]
        w = self.width  # a job's k beams share its prompt: their k queries read its cross K/V once
        cross_mask = cache.cross_mask[:n:w, None, None, :]  # [J, 1, 1, L]
        rows = torch.arange(n, device=pos.device)
        for i, layer in enumerate(dec.layers):
            att = layer.self_attn
            q, k, v = (heads(p(h), att.head_dim) for p in (att.q_proj, att.k_proj, att.v_proj))  # [n, H, 1, hd]
            cache.k[i][rows, :, pos] = k[:, :, 0]
            cache.v[i][rows, :, pos] = v[:, :, 0]
            if ragged:
                o = torch.cat([F.scaled_dot_product_attention(q[r:r + 1], cache.k[i][r:r + 1, :, :m],
                                                              cache.v[i][r:r + 1, :, :m], scale=att.scaling)
                               for r, m in enumerate(lengths)])
            else:
                o = F.scaled_dot_product_attention(q, cache.k[i][:n, :, :t], cache.v[i][:n, :, :t], self_mask,
                                                   scale=att.scaling)
            h = layer.self_attn_layer_norm(h + att.out_proj(merge_heads(o)))
            xa = layer.encoder_attn
            q = heads(xa.q_proj(h), xa.head_dim)
            q = q.view(n // w, w, *q.shape[1:]).transpose(1, 2).flatten(2, 3)  # [n, H, 1, hd] -> [J, H, k, hd]
            o = F.scaled_dot_product_attention(q, cache.ck[i][:n:w], cache.cv[i][:n:w], cross_mask, scale=xa.scaling)
            o = o.view(n // w, o.shape[1], w, 1, o.shape[-1]).transpose(1, 2).flatten(0, 1)  # -> [n, H, 1, hd]
            h = layer.encoder_attn_layer_norm(h + xa.out_proj(merge_heads(o)))
            h = layer.final_layer_norm(h + layer.fc2(layer.activation_fn(layer.fc1(h))))
        return self.model.lm_head(h[:, 0])


def rows_for_memory(device: torch.device, bytes_per_row: int, cap: int, share: float = 0.5) -> int:
    """The cap on rows in flight, lowered on GPU so the KV cache takes at most `share` of free memory."""
    if device.type != "cuda":
        return cap
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, min(cap, int(free * share) // bytes_per_row))
