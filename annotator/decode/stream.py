"""The engine's stream of batches: vision once per image, then the task waves of each image
group, their prompts decoded by the one decode scheduler (scheduler.py) across batches, or by the
engine's generate path (beam search, --no-scheduler), a wave at a time.

The stream decides what runs when and owns the decoder and the open batches; the engine does
the model work it asks for (vision features, prompts, encoding, generate, rows).

Shapes: B images per batch, N image tokens, D model width."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Iterator, Protocol

import torch

from annotator.answers.assemble import Generation, Request
from annotator.inputs.images import Batch, ImageItem, describe_error
from annotator.model.load import free_cache, is_oom
from annotator.decode.scheduler import DecodeScheduler, Job, rows_for_memory
from annotator.outdir.table import OK, Annotation

log = logging.getLogger(__name__)


class ModelWork(Protocol):
    """What the stream asks of the engine (engine.py): the model work, the task plan, and the
    memory limits both share (prompts in flight, images per vision forward)."""

    lm: Any
    generation: Any
    waves: list
    sources: dict[str, str]
    assembler: Any
    use_scheduler: bool
    decode_stats: Any
    forced_lengths: Any
    locs: Any
    prompt_ids: Callable[[str], list[int]]
    max_prompts: int
    max_images: int | None

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor: ...
    def requests(self, task, i: int, width: int, height: int, source) -> list[Request]: ...
    def encode_requests(self, requests: list[Request], features: torch.Tensor) -> tuple: ...
    def generate(self, requests: list[Request], features: torch.Tensor) -> list: ...
    def halve_prompts(self, in_flight: int) -> None: ...
    def halve_images(self, in_flight: int) -> None: ...


class BatchStream:
    """The engine's one stream (Engine.stream): batches in, each batch's rows out as it finishes."""

    def __init__(self, engine: ModelWork):
        self.engine = engine
        self._decoder: DecodeScheduler | None = None  # made on first use, kept across batches

    @torch.inference_mode()
    def run(self, batches: Iterable[Batch]) -> Iterator[list[Annotation]]:
        """The rows of each batch, a batch at a time, as batches finish (not always in input order).

        On the scheduler path the prompts of the next batches join the decoding while long answers
        of earlier ones still run: a batch is taken from `batches` (vision runs on it, its prompts
        wait for slots) only when a decoding slot would otherwise stay empty. So rows in flight
        stay <= max_prompts, waiting prompts <= one batch's more, and the batches open at once are
        those with a row in flight, plus one. On the generate path each batch is done before the next."""
        source, more = iter(batches), True
        open_: list[_Work] = []
        try:
            while more or open_:
                if more and self._wants_batch():
                    batch = next(source, None)
                    more = batch is not None
                    if more:
                        open_.append(self._start(batch))
                for work in [w for w in open_ if w.finished]:
                    open_.remove(work)
                    yield work.rows()
                if not (more and self._wants_batch()) and open_:
                    if self._decoder is None or not self._decoder.busy:
                        raise RuntimeError("engine: open batches wait on a decoder with nothing to do")
                    self._decode_step()
        finally:
            if open_:  # left early (Ctrl-C, an error, the caller stopped): no stale rows in the next stream
                self._decoder = None

    def _wants_batch(self) -> bool:
        return not self.engine.use_scheduler or self._decoder is None or self._decoder.room > 0

    def _start(self, batch: Batch) -> "_Work":
        """Decode failures become rows, vision runs, and each image group's first wave starts."""
        failed = [Annotation.failed(f.key, t, f"decode failed: {f.error}") for f in batch.failures for t in f.tasks]
        parts = [failed] + (self._vision(batch.items, batch.pixel_values) if batch.items else [])
        for part in parts:
            if isinstance(part, _Group):
                self._advance(part)
        return _Work(parts, len(self.engine.waves))

    def _vision(self, items: list[ImageItem], pixel_values: torch.Tensor) -> list["_Group | list[Annotation]"]:
        """Vision features once per image, `max_images` at a time: image groups, or error rows for
        the images it failed on (in item order)."""
        step = self.engine.max_images or len(items)
        if len(items) > step:
            return [part for s in range(0, len(items), step)
                    for part in self._vision(items[s:s + step], pixel_values[s:s + step])]
        try:
            features = self.engine.image_features(pixel_values)  # [B, N, D]
        except Exception as exc:  # noqa: BLE001 - one image's failure must not stop the others
            free_cache(self.engine.lm.device)
            if len(items) == 1:
                item = items[0]
                return [[Annotation.failed(item.key, t, f"vision encoder failed: {describe_error(exc)}",
                                           item.width, item.height) for t in item.tasks]]
            if is_oom(exc):
                self.engine.halve_images(len(items))
                return self._vision(items, pixel_values)
            log.warning("vision encoder failed on %d images (%s); retrying one by one", len(items), describe_error(exc))
            return [part for i in range(len(items)) for part in self._vision(items[i:i + 1], pixel_values[i:i + 1])]
        return [_Group(items, features, [self._needed(item.tasks) for item in items])]

    def _needed(self, pending: tuple[str, ...]) -> set[str]:
        """Pending tasks plus the producers they read from (re-run on resume; outputs are deterministic)."""
        need, sources = set(pending), self.engine.sources
        for name in pending:
            while name in sources:
                name = sources[name]
                need.add(name)
        return need

    # ------------------------------------------------------------------ waves
    def _advance(self, group: "_Group") -> None:
        """Start the group's next wave: every task of the wave for every image that needs it, in
        shared decoding (decoding is memory-bound: a step costs about the same for 8 prompts as for
        32, and the steps are the longest answer instead of the sum over tasks). On the generate
        path the wave runs here; on the scheduler path its prompts are submitted and
        `_deliver` comes back here once all are answered."""
        while group.wave < len(self.engine.waves):
            group.requests, group.failed = self._wave_requests(group)
            group.results = [None] * len(group.requests)
            if group.requests and self.engine.use_scheduler:
                group.left = len(group.requests)
                self._submit(group)
                return
            if group.requests:
                group.results = self.engine.generate(group.requests, group.features)
            self._finish_wave(group)

    def _wave_requests(self, group: "_Group") -> tuple[list[Request], dict[tuple[int, str], str]]:
        eng = self.engine
        requests: list[Request] = []
        failed: dict[tuple[int, str], str] = {}
        done, items = group.done, group.items
        for task in eng.waves[group.wave]:
            src = eng.sources.get(task.name)
            for i in (i for i, need in enumerate(group.needed) if task.name in need):
                if src and done[(i, src)].status != OK:
                    failed[(i, task.name)] = f"needs {src}, which failed: {done[(i, src)].error}"
                    continue
                requests.extend(eng.requests(task, i, items[i].width, items[i].height, done.get((i, src)) if src else None))
        if eng.forced_lengths:
            requests = [replace(r, forced=eng.forced_lengths(items[r.image].key, r.task)) for r in requests]
        return requests, failed

    def _finish_wave(self, group: "_Group") -> None:
        """The wave's answers -> parsed rows of its tasks."""
        assemble = self.engine.assembler.assemble
        answers: dict[tuple[int, str], list[tuple[Request, Generation | BaseException]]] = {}
        for req, res in zip(group.requests, group.results):
            answers.setdefault((req.image, req.task), []).append((req, res))
        for task in self.engine.waves[group.wave]:
            for i in (i for i, need in enumerate(group.needed) if task.name in need):
                item = group.items[i]
                if (i, task.name) in group.failed:
                    row = Annotation.failed(item.key, task.name, group.failed[(i, task.name)], item.width, item.height)
                else:
                    row = assemble(task, item.key, item.width, item.height, answers.get((i, task.name), []))
                group.done[(i, task.name)] = row
        group.requests, group.results, group.failed = [], [], {}
        group.wave += 1

    # ------------------------------------------------------------------ the decode scheduler
    def _submit(self, group: "_Group") -> None:
        eng, gen = self.engine, self.engine.generation
        self._scheduler().submit([Job(len(eng.prompt_ids(r.prompt)), r.forced, r.forced or gen.max_new_tokens,
                                      tag=(group, i)) for i, r in enumerate(group.requests)])

    def _scheduler(self) -> DecodeScheduler:
        """The engine's one decode scheduler, made on first use; slots = max_prompts, fewer on a GPU
        whose free memory would not hold their KV cache."""
        if self._decoder is None:
            eng = self.engine
            lm, gen = eng.lm, eng.generation
            k = gen.num_beams  # rows per prompt: max_prompts prompts in flight, as on the generate path
            dec = DecodeScheduler(lm.model, eng.max_prompts * k, self._encode_jobs, scores=gen.scores, locs=eng.locs,
                                  num_beams=k)
            per_row = dec.kv_bytes_per_row(gen.max_new_tokens, lm.processor.num_image_tokens + 64)
            dec.max_rows = rows_for_memory(lm.device, per_row, eng.max_prompts * k)
            self._decoder = dec
        return self._decoder

    def _encode_jobs(self, jobs: list[Job]) -> tuple[torch.Tensor, torch.Tensor]:
        """The scheduler's encode: jobs from any groups, their prompts encoded together."""
        requests = [group.requests[i] for group, i in (j.tag for j in jobs)]
        features = torch.stack([group.features[group.requests[i].image] for group, i in (j.tag for j in jobs)])
        _, mask, states = self.engine.encode_requests(requests, features)
        return states, mask

    def _decode_step(self) -> None:
        """One scheduler step; answers go to their groups. A failure takes every unfinished job out
        of the scheduler: on OOM they restart with half the rows in flight, otherwise they go
        through the generate path, which sorts out the prompts that fail."""
        eng, dec = self.engine, self._decoder
        dec.stats = eng.decode_stats  # the bench swaps in fresh counters after its warm-up
        try:
            finished = dec.step()
        except Exception as exc:  # noqa: BLE001 - see docstring
            jobs, self._decoder = dec.unfinished(), None
            if is_oom(exc) and dec.capacity > 1:
                eng.halve_prompts(dec.capacity)
                self._scheduler().submit(jobs)  # the same prompts, restarted from their first token
                return
            free_cache(eng.lm.device)
            log.warning("decode scheduler failed (%s); using generate for its %d prompts", describe_error(exc), len(jobs))
            by_group: dict[int, tuple[_Group, list[int]]] = {}
            for group, i in (j.tag for j in jobs):
                by_group.setdefault(id(group), (group, []))[1].append(i)
            for group, index in by_group.values():
                for i, res in zip(index, eng.generate([group.requests[i] for i in index], group.features)):
                    self._deliver(group, i, res)
            return
        tok = eng.lm.processor.tokenizer
        for job, answer in finished:
            group, i = job.tag
            eng.decode_stats.add_tokens(group.requests[i].task, len(answer.ids))
            text = tok.decode([dec.start] + answer.ids, skip_special_tokens=False)
            self._deliver(group, i, Generation(text, truncated=not answer.ended, ids=tuple(answer.ids),
                                               logprobs=None if answer.logprobs is None else tuple(answer.logprobs)))

    def _deliver(self, group: "_Group", i: int, result: "Generation | BaseException") -> None:
        group.results[i] = result
        group.left -= 1
        if group.left == 0:
            self._finish_wave(group)
            self._advance(group)


@dataclass
class _Group:
    """Images of one batch whose vision features were computed together, on their way through the
    task waves (`done` holds the rows of finished waves; the current wave's requests wait for results)."""

    items: list[ImageItem]
    features: torch.Tensor  # [B, N, D]: kept until the last wave ends (later waves and a fallback read them)
    needed: list[set[str]]  # per image: tasks to run (pending + their sources)
    done: dict[tuple[int, str], Annotation] = field(default_factory=dict)
    wave: int = 0  # index into Engine.waves
    requests: list[Request] = field(default_factory=list)  # the current wave's
    results: list = field(default_factory=list)  # per request: Generation | BaseException | None (not yet)
    failed: dict[tuple[int, str], str] = field(default_factory=dict)  # rows of the wave that cannot run
    left: int = 0  # requests of the current wave not answered yet


@dataclass
class _Work:
    """One batch in the stream: row lists (decode and vision failures) and image groups, in item order."""

    parts: list
    waves: int

    @property
    def finished(self) -> bool:
        return all(p.wave >= self.waves for p in self.parts if isinstance(p, _Group))

    def rows(self) -> list[Annotation]:
        out = []
        for part in self.parts:
            out += [part.done[(i, t)] for i, item in enumerate(part.items) for t in item.tasks] \
                if isinstance(part, _Group) else part
        return out
