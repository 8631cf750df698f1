"""The per-device loop body: one batch of images -> vision features once -> for each task a
batched generate -> parse -> Annotation rows.

Shapes: B images per batch, N image tokens (577 at 768px), D model width, P prompts of a task."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Iterable, Iterator

import torch
from transformers.modeling_outputs import BaseModelOutput

from .config import GenerationSettings, TaskInputs
from .images import Batch, ImageItem, describe_error
from .model import LoadedModel
from .sequence import PromptCache, loc_tokens, pad_right
from .lengths import ForcedLengths
from .scheduler import DecodeScheduler, DecodeStats, Job, rows_for_memory, supports
from .parse import Parsed, clean_raw, parse_generation, plain_text, refine
from .scores import LocBins, chosen_logprobs, instance_scores, text_score, token_text
from .speed import use_onednn_linear
from .store import OK, Annotation
from .tasks import Input, Output, Task, plan_sources, task_waves

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Request:
    """One prompt to generate for one image of the batch."""

    image: int  # index into Batch.items
    task: str  # task name
    prompt: str  # task token plus its input, e.g. "<REGION_TO_SEGMENTATION><loc_1><loc_2><loc_8><loc_9>"
    box: tuple[float, ...] | None = None  # region tasks: the source box, in pixels
    label: str | None = None  # region tasks: the source label; OVD with --classes: the class
    forced: int = 0  # bench only: the answer has exactly this many new tokens (0: the model decides)


@dataclass(frozen=True)
class Generation:
    text: str  # decoded, special and location tokens kept
    truncated: bool  # stopped by max_new_tokens, not by </s>
    ids: tuple[int, ...] = ()  # generated token ids after the decoder start token
    logprobs: tuple[float, ...] | None = None  # log p of each of `ids` (None: scoring off)


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


class Engine:
    def __init__(self, lm: LoadedModel, tasks: list[Task], task_inputs: TaskInputs,
                 generation: GenerationSettings, max_prompts: int = 8):
        self.lm = lm
        self.tasks = tasks
        self.inputs = task_inputs
        self.generation = generation
        self.max_prompts = max_prompts  # prompts per generate call; halved on OOM
        self.max_images: int | None = None  # images per vision forward; set (halved) on OOM
        self.sources = plan_sources(tasks, bool(task_inputs.text), bool(task_inputs.classes))
        self.waves = task_waves(tasks, self.sources)
        self.prompt_ids = PromptCache(lm.processor)  # prompt -> `<image>*N <s> words </s>` ids (sequence.py)
        self.stats: dict[str, int] = {}  # quality counters (duplicates removed, ...), see parse.refine
        self.locs = LocBins.of(lm.processor.tokenizer)  # location tokens score with their neighbourhood (scores.py)
        self.forced_lengths: ForcedLengths | None = None  # bench only: exact answer lengths (lengths.py)
        self.decode_stats = DecodeStats()  # decoding work, for the bench's slot efficiency
        # Greedy and beam search go through the continuous-batching scheduler (scheduler.py) when
        # it does exactly what generate would.
        self.use_scheduler = supports(lm.model.generation_config)
        self._decoder: DecodeScheduler | None = None  # made on first use, kept across batches
        if lm.device.type == "cpu":
            use_onednn_linear(lm.model)  # fp32 Linear through oneDNN: 2x the GFLOP/s on AMD CPUs (speed.py)

    # ------------------------------------------------------------------ batches -> rows
    def annotate(self, batch: Batch) -> list[Annotation]:
        """The rows of one batch: decode failures first, then per image its tasks in order."""
        return [row for rows in self.annotate_stream([batch]) for row in rows]

    @torch.inference_mode()
    def annotate_stream(self, batches: Iterable[Batch]) -> Iterator[list[Annotation]]:
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
        return not self.use_scheduler or self._decoder is None or self._decoder.room > 0

    def _start(self, batch: Batch) -> "_Work":
        """Decode failures become rows, vision runs, and each image group's first wave starts."""
        failed = [Annotation.failed(f.key, t, f"decode failed: {f.error}") for f in batch.failures for t in f.tasks]
        parts = [failed] + (self._vision(batch.items, batch.pixel_values) if batch.items else [])
        for part in parts:
            if isinstance(part, _Group):
                self._advance(part)
        return _Work(parts, len(self.waves))

    def _vision(self, items: list[ImageItem], pixel_values: torch.Tensor) -> list["_Group | list[Annotation]"]:
        """Vision features once per image, `max_images` at a time: image groups, or error rows for
        the images it failed on (in item order)."""
        step = self.max_images or len(items)
        if len(items) > step:
            return [part for s in range(0, len(items), step)
                    for part in self._vision(items[s:s + step], pixel_values[s:s + step])]
        try:
            features = self.image_features(pixel_values)  # [B, N, D]
        except Exception as exc:  # noqa: BLE001 - one image's failure must not stop the others
            _free_cache(self.lm.device)
            if len(items) == 1:
                item = items[0]
                return [[Annotation.failed(item.key, t, f"vision encoder failed: {describe_error(exc)}",
                                           item.width, item.height) for t in item.tasks]]
            if is_oom(exc):
                self.max_images = max(1, len(items) // 2)
                log.warning("out of memory encoding %d images; going on with %d", len(items), self.max_images)
                return self._vision(items, pixel_values)
            log.warning("vision encoder failed on %d images (%s); retrying one by one", len(items), describe_error(exc))
            return [part for i in range(len(items)) for part in self._vision(items[i:i + 1], pixel_values[i:i + 1])]
        return [_Group(items, features, [self._needed(item.tasks) for item in items])]

    def take_stats(self) -> dict[str, int]:
        """The quality counters since the last call (see parse.refine), handed over and reset:
        the driver reports them with the batch's rows."""
        stats, self.stats = self.stats, {}
        return stats

    def _needed(self, pending: tuple[str, ...]) -> set[str]:
        """Pending tasks plus the producers they read from (re-run on resume; outputs are deterministic)."""
        need = set(pending)
        for name in pending:
            while name in self.sources:
                name = self.sources[name]
                need.add(name)
        return need

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        lm = self.lm
        pixel_values = pixel_values.to(lm.device, lm.dtype, non_blocking=True)
        return lm.model.get_image_features(pixel_values, return_dict=True).pooler_output

    # ------------------------------------------------------------------ waves
    def _advance(self, group: "_Group") -> None:
        """Start the group's next wave: every task of the wave for every image that needs it, in
        shared decoding (decoding is memory-bound: a step costs about the same for 8 prompts as for
        32, and the steps are the longest answer instead of the sum over tasks). On the generate
        path the wave runs here; on the scheduler path its prompts are submitted and
        `_deliver` comes back here once all are answered."""
        while group.wave < len(self.waves):
            group.requests, group.failed = self._wave_requests(group)
            group.results = [None] * len(group.requests)
            if group.requests and self.use_scheduler:
                group.left = len(group.requests)
                self._submit(group)
                return
            if group.requests:
                group.results = self.generate(group.requests, group.features)
            self._finish_wave(group)

    def _wave_requests(self, group: "_Group") -> tuple[list[Request], dict[tuple[int, str], str]]:
        requests: list[Request] = []
        failed: dict[tuple[int, str], str] = {}
        done, items = group.done, group.items
        for task in self.waves[group.wave]:
            src = self.sources.get(task.name)
            for i in (i for i, need in enumerate(group.needed) if task.name in need):
                if src and done[(i, src)].status != OK:
                    failed[(i, task.name)] = f"needs {src}, which failed: {done[(i, src)].error}"
                    continue
                requests.extend(self.requests(task, i, items[i].width, items[i].height, done.get((i, src)) if src else None))
        if self.forced_lengths:
            requests = [replace(r, forced=self.forced_lengths(items[r.image].key, r.task)) for r in requests]
        return requests, failed

    def _finish_wave(self, group: "_Group") -> None:
        """The wave's answers -> parsed rows of its tasks."""
        answers: dict[tuple[int, str], list[tuple[Request, Generation | BaseException]]] = {}
        for req, res in zip(group.requests, group.results):
            answers.setdefault((req.image, req.task), []).append((req, res))
        for task in self.waves[group.wave]:
            for i in (i for i, need in enumerate(group.needed) if task.name in need):
                item = group.items[i]
                if (i, task.name) in group.failed:
                    row = Annotation.failed(item.key, task.name, group.failed[(i, task.name)], item.width, item.height)
                else:
                    row = self.assemble(task, item.key, item.width, item.height, answers.get((i, task.name), []))
                group.done[(i, task.name)] = row
        group.requests, group.results, group.failed = [], [], {}
        group.wave += 1

    # ------------------------------------------------------------------ the decode scheduler
    def _submit(self, group: "_Group") -> None:
        gen = self.generation
        self._scheduler().submit([Job(len(self.prompt_ids(r.prompt)), r.forced, r.forced or gen.max_new_tokens,
                                      tag=(group, i)) for i, r in enumerate(group.requests)])

    def _scheduler(self) -> DecodeScheduler:
        """The engine's one decode scheduler, made on first use; slots = max_prompts, fewer on a GPU
        whose free memory would not hold their KV cache."""
        if self._decoder is None:
            lm, gen = self.lm, self.generation
            k = gen.num_beams  # rows per prompt: max_prompts prompts in flight, as on the generate path
            dec = DecodeScheduler(lm.model, self.max_prompts * k, self._encode_jobs, scores=gen.scores, locs=self.locs,
                                  num_beams=k)
            per_row = dec.kv_bytes_per_row(gen.max_new_tokens, lm.processor.num_image_tokens + 64)
            dec.max_rows = rows_for_memory(lm.device, per_row, self.max_prompts * k)
            self._decoder = dec
        return self._decoder

    def _encode_jobs(self, jobs: list[Job]) -> tuple[torch.Tensor, torch.Tensor]:
        """The scheduler's encode: jobs from any groups, their prompts encoded together."""
        requests = [group.requests[i] for group, i in (j.tag for j in jobs)]
        features = torch.stack([group.features[group.requests[i].image] for group, i in (j.tag for j in jobs)])
        _, mask, states = self._encode_requests(requests, features)
        return states, mask

    def _decode_step(self) -> None:
        """One scheduler step; answers go to their groups. A failure takes every unfinished job out
        of the scheduler: on OOM they restart with half the rows in flight, otherwise they go
        through the generate path, which sorts out the prompts that fail."""
        dec = self._decoder
        dec.stats = self.decode_stats  # the bench swaps in fresh counters after its warm-up
        try:
            finished = dec.step()
        except Exception as exc:  # noqa: BLE001 - see docstring
            _free_cache(self.lm.device)
            jobs, self._decoder = dec.unfinished(), None
            if is_oom(exc) and dec.capacity > 1:
                self.max_prompts = dec.capacity // 2
                log.warning("out of memory with %d rows in flight; going on with %d", dec.max_rows, self.max_prompts)
                self._scheduler().submit(jobs)  # the same prompts, restarted from their first token
                return
            log.warning("decode scheduler failed (%s); using generate for its %d prompts", describe_error(exc), len(jobs))
            by_group: dict[int, tuple[_Group, list[int]]] = {}
            for group, i in (j.tag for j in jobs):
                by_group.setdefault(id(group), (group, []))[1].append(i)
            for group, index in by_group.values():
                for i, res in zip(index, self.generate([group.requests[i] for i in index], group.features)):
                    self._deliver(group, i, res)
            return
        tok = self.lm.processor.tokenizer
        for job, answer in finished:
            group, i = job.tag
            self.decode_stats.add_tokens(group.requests[i].task, len(answer.ids))
            text = tok.decode([dec.start] + answer.ids, skip_special_tokens=False)
            self._deliver(group, i, Generation(text, truncated=not answer.ended, ids=tuple(answer.ids),
                                               logprobs=None if answer.logprobs is None else tuple(answer.logprobs)))

    def _deliver(self, group: "_Group", i: int, result: "Generation | BaseException") -> None:
        group.results[i] = result
        group.left -= 1
        if group.left == 0:
            self._finish_wave(group)
            self._advance(group)

    # ------------------------------------------------------------------ prompts
    def requests(self, task: Task, i: int, width: int, height: int, source: Annotation | None) -> list[Request]:
        if task.input is Input.NONE:
            return [Request(i, task.name, task.token)]
        if task.input is Input.REGION:
            boxes = source.bboxes or []
            labels = source.labels or [""] * len(boxes)
            return [Request(i, task.name, task.token + loc_tokens(box, width, height), tuple(box), label)
                    for box, label in zip(boxes, labels)]
        if task.input is Input.CLASSES and self.inputs.classes:
            return [Request(i, task.name, task.token + c, label=c) for c in self.inputs.classes]
        text = self.inputs.text if self.inputs.text else (source.text if source else "") or ""
        return [Request(i, task.name, task.token + text)]

    # ------------------------------------------------------------------ generation
    def generate(self, requests: list[Request], features: torch.Tensor) -> list[Generation | BaseException]:
        """The generate path (beam search; greedy without the scheduler): every request,
        `max_prompts` at a time. A failing chunk is retried prompt by prompt so that only the
        offending image gets an error; OOM halves the chunk size."""
        out: list[Generation | BaseException] = []
        for group in self._groups(requests):
            pos = 0
            while pos < len(group):
                chunk = group[pos:pos + self.max_prompts]
                try:
                    out.extend(self._generate_chunk(chunk, features))
                except Exception as exc:  # noqa: BLE001 - sorted out below
                    if is_oom(exc) and len(chunk) > 1:
                        self.max_prompts = max(1, len(chunk) // 2)
                        log.warning("out of memory with %d prompts; going on with %d", len(chunk), self.max_prompts)
                        _free_cache(self.lm.device)
                        continue  # same position, smaller chunk
                    out.extend(self._one_by_one(chunk, features, exc))
                pos += len(chunk)
        return out

    def _groups(self, requests: list[Request]) -> list[list[Request]]:
        """Requests come grouped by task (similar answer lengths side by side) and share generate
        calls; the bench's forced lengths may split them (lengths.ForcedLengths.groups)."""
        if self.forced_lengths:
            return self.forced_lengths.groups(requests, self.generation.num_beams)
        return [requests] if requests else []

    def _one_by_one(self, chunk: list[Request], features, exc: BaseException) -> list[Generation | BaseException]:
        if len(chunk) == 1:
            return [exc]
        log.warning("a batch of %d prompts failed (%s); retrying one by one", len(chunk), describe_error(exc))
        results: list[Generation | BaseException] = []
        for req in chunk:
            try:
                results.extend(self._generate_chunk([req], features))
            except Exception as one:  # noqa: BLE001 - becomes this image's error row
                _free_cache(self.lm.device)
                results.append(one)
        return results

    def _encode_requests(self, chunk: list[Request], features: torch.Tensor):
        """Prompts of the chunk, right padded, with their images' features [P, N, D]
        -> (input_ids [P, L], mask [P, L], encoder states [P, L, D])."""
        lm = self.lm
        input_ids, mask = pad_right([self.prompt_ids(r.prompt) for r in chunk], lm.processor.tokenizer.pad_token_id)
        input_ids, mask = input_ids.to(lm.device), mask.to(lm.device)
        return input_ids, mask, self.encode(input_ids, mask, features)

    def _generate_chunk(self, chunk: list[Request], features: torch.Tensor) -> list[Generation]:
        lm, gen = self.lm, self.generation
        tok = lm.processor.tokenizer
        index = torch.tensor([r.image for r in chunk], device=features.device)
        input_ids, mask, encoded = self._encode_requests(chunk, features.index_select(0, index))  # encoded: [P, L, D]
        forced = self.forced_lengths
        lengths = forced.generate_kwargs(chunk, gen.num_beams, tok.eos_token_id, lm.device) if forced \
            else {"max_new_tokens": gen.max_new_tokens}
        sequences = lm.model.generate(
            # input_ids only tell generate the batch size (and observers the prompt): the encoder
            # is not re-run. A fresh wrapper, because beam search expands it in place.
            input_ids=input_ids, encoder_outputs=BaseModelOutput(last_hidden_state=encoded), attention_mask=mask,
            num_beams=gen.num_beams, do_sample=False, **lengths,
        )  # [P, 1 + T]: decoder start token, then the generated tokens
        texts = tok.batch_decode(sequences, skip_special_tokens=False)
        rows = [_answer_ids(seq[1:].tolist(), tok.eos_token_id, tok.pad_token_id) for seq in sequences]
        if forced and gen.num_beams > 1:  # bench: beams ran to the chunk's longest; cut each row to its length
            rows, texts = forced.cut(chunk, rows, sequences, tok)
        self._count(chunk, [ids for ids, _ in rows], sequences.shape[1] - 1)
        logprobs = self.token_logprobs(encoded, mask, sequences, [len(ids) for ids, _ in rows]) if gen.scores \
            else [None] * len(rows)
        return [Generation(text, truncated=not ended, ids=tuple(ids), logprobs=None if lps is None else tuple(lps))
                for text, (ids, ended), lps in zip(texts, rows, logprobs)]

    def _count(self, chunk: list[Request], answers: list[list[int]], steps: int) -> None:
        """Decoding work of one generate call: every row is computed for every step."""
        stats = self.decode_stats
        stats.calls += 1
        stats.steps += steps
        stats.row_steps += steps * len(chunk)
        stats.slot_steps += steps * max(self.max_prompts, len(chunk))
        for req, ids in zip(chunk, answers):
            stats.add_tokens(req.task, len(ids))

    def encode(self, input_ids: torch.Tensor, mask: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        """The text encoder over `<image>*N` + prompt, the image placeholders replaced by the
        (already computed) image features: what Florence-2's generate does, done here so the
        result can be reused for scoring."""
        model = self.lm.model
        embeds = model.get_input_embeddings()(input_ids)  # [P, L, D]
        placeholders = (input_ids == model.config.image_token_id).unsqueeze(-1).expand_as(embeds)
        embeds = embeds.masked_scatter(placeholders, image_features.to(embeds.dtype))
        return model.get_encoder()(inputs_embeds=embeds, attention_mask=mask, return_dict=True).last_hidden_state

    def token_logprobs(self, encoded: torch.Tensor, mask: torch.Tensor, sequences: torch.Tensor,
                       lengths: list[int]) -> list[list[float]]:
        """log p of each generated token under the model, by one teacher-forced decoder pass
        (cheap next to generation: all positions at once). See scores.py for why."""
        model = self.lm.model
        hidden = model.model(encoder_outputs=BaseModelOutput(last_hidden_state=encoded), attention_mask=mask,
                             decoder_input_ids=sequences[:, :-1], use_cache=False).last_hidden_state  # [P, T, D]
        out = []
        for row, n in enumerate(lengths):  # a row at a time, its own length: [n, vocab] logits stay small
            logits = model.lm_head(hidden[row, :n]).float()
            out.append(chosen_logprobs(logits, sequences[row, 1:n + 1], self.locs))
        return out


    # ------------------------------------------------------------------ rows
    def assemble(self, task: Task, key: str, width: int, height: int,
                 results: list[tuple[Request, Generation | BaseException]]) -> Annotation:
        prompt = "\n".join(req.prompt for req, _ in results) or None
        row = Annotation(image=key, task=task.name, status=OK, width=width, height=height, prompt=prompt)
        errors = [res for _, res in results if isinstance(res, BaseException)]
        if errors:
            row.status, row.error = "error", f"generation failed: {describe_error(errors[0])}"
            return row
        gens = [res for _, res in results]
        row.raw = "\n".join(clean_raw(g.text) for g in gens) if gens else None
        row.truncated = any(g.truncated for g in gens)
        try:
            parsed = self._parse(task, width, height, results)
        except Exception as exc:  # noqa: BLE001 - a parser crash on odd output is this row's error
            row.status, row.error = "error", f"parse failed: {describe_error(exc)}"
            return row
        row.text, row.bboxes, row.labels = parsed.text, parsed.bboxes, parsed.labels
        row.polygons, row.quad_boxes = parsed.polygons, parsed.quad_boxes
        row.scores, row.text_score = parsed.scores, parsed.text_score
        return row

    def parse_one(self, task: Task, gen: Generation, size: tuple[int, int]) -> Parsed:
        """One generation -> columns with aligned scores, after the quality rules."""
        parsed = parse_generation(self.lm.processor, task, gen.text, size)
        tt = self._token_text(gen)
        if tt is not None:
            if task.output is Output.TEXT:
                parsed.text_score = text_score(tt)
            else:
                found = instance_scores(task, tt)
                n = len(parsed.bboxes or parsed.polygons or parsed.quad_boxes or [])
                parsed.scores = found if len(found) == n and None not in found else None
                if parsed.scores is None:  # null rather than misaligned (scores.py); counted, not silent
                    self.stats["scores_not_aligned"] = self.stats.get("scores_not_aligned", 0) + 1
        if task.output is not Output.TEXT:
            parsed = refine(parsed, gen.truncated, size[0], size[1], self.stats)
        return parsed

    def _token_text(self, gen: Generation):
        """The generation's tokens with their log p, as scores.py aligns them (None: scoring off)."""
        return token_text(self.lm.processor.tokenizer, list(gen.ids), list(gen.logprobs)) if gen.logprobs else None

    def _parse(self, task: Task, width: int, height: int, results) -> Parsed:
        size = (width, height)
        if task.input is Input.REGION:
            return self._parse_regions(task, size, results)
        if task.input is Input.CLASSES and self.inputs.classes:
            return self._merge_classes(task, size, results)
        (req, gen), = results
        return self.parse_one(task, gen, size)

    def _merge_classes(self, task: Task, size, results) -> Parsed:
        """One prompt per class: the label is the class asked for, whatever the model wrote."""
        merged = Parsed(labels=[], scores=[])
        for req, gen in results:
            part = self.parse_one(task, gen, size)
            field_name = "polygons" if part.polygons else "bboxes"
            items = getattr(part, field_name) or []
            setattr(merged, field_name, (getattr(merged, field_name) or []) + items)
            merged.labels += [req.label] * len(items)
            merged.scores = None if merged.scores is None or part.scores is None else merged.scores + part.scores
        if merged.bboxes is None and merged.polygons is None:
            merged.bboxes = []
        return merged

    def _parse_regions(self, task: Task, size, results) -> Parsed:
        """One instance per source box: its box, the answer for it, and that answer's score."""
        boxes = [list(req.box) for req, _ in results]
        scores = [text_score(tt) if (tt := self._token_text(gen)) else None for _, gen in results]
        scores = scores if None not in scores else None
        if task.output is Output.POLYGONS:
            polygons = []
            for _, gen in results:
                part = parse_generation(self.lm.processor, task, gen.text, size)
                polygons.append([p for inst in part.polygons for p in inst])  # all parts of this box's mask
            return Parsed(bboxes=boxes, polygons=polygons, labels=[req.label or "" for req, _ in results], scores=scores)
        return Parsed(bboxes=boxes, labels=[plain_text(gen.text) for _, gen in results], scores=scores)


def _answer_ids(ids: list[int], eos: int, pad: int) -> tuple[list[int], bool]:
    """A row's generated ids up to and including </s> (True), or, for a row stopped by its
    length limit, without the padding generate appends once it is done (False)."""
    if eos in ids:
        return ids[:ids.index(eos) + 1], True
    while ids and ids[-1] == pad:
        ids = ids[:-1]
    return ids, False


def _free_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


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
