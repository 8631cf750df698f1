"""The per-device loop body: one batch of images -> vision features once -> for each task a
batched generate -> parse -> Annotation rows.

Shapes: B images per batch, N image tokens (577 at 768px), D model width, P prompts of a task."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Callable

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.modeling_outputs import BaseModelOutput

from .config import GenerationSettings, TaskInputs
from .images import Batch, ImageItem, describe_error
from .model import LoadedModel
from .sequence import PromptCache, loc_tokens, pad_right
from .scheduler import DecodeScheduler, DecodeStats, Job, rows_for_memory, supports
from .parse import Parsed, clean_raw, parse_generation, plain_text, refine
from .scores import LocBins, chosen_logprobs, instance_scores, text_score, token_text
from .speed import use_onednn_linear
from .store import OK, Annotation
from .tasks import TASKS, Input, Output, Task, plan_sources, task_waves

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
        self.forced_lengths: Callable[[str, str], int] | None = None  # bench: (image key, task) -> exact length
        self.decode_stats = DecodeStats()  # decoding work, for the bench's slot efficiency
        # Greedy decoding goes through the continuous-batching scheduler (scheduler.py) when it
        # does exactly what generate would; beam search keeps the generate path.
        self.use_scheduler = generation.num_beams == 1 and supports(lm.model.generation_config)
        if lm.device.type == "cpu":
            use_onednn_linear(lm.model)  # fp32 Linear through oneDNN: 2x the GFLOP/s on AMD CPUs (speed.py)

    # ------------------------------------------------------------------ batch -> rows
    @torch.inference_mode()
    def annotate(self, batch: Batch) -> list[Annotation]:
        rows = [Annotation.failed(f.key, t, f"decode failed: {f.error}") for f in batch.failures for t in f.tasks]
        if not batch.items:
            return rows
        return rows + self._annotate_items(batch.items, batch.pixel_values)

    def _annotate_items(self, items: list[ImageItem], pixel_values: torch.Tensor) -> list[Annotation]:
        step = self.max_images or len(items)
        if len(items) > step:
            return [row for s in range(0, len(items), step)
                    for row in self._annotate_items(items[s:s + step], pixel_values[s:s + step])]
        try:
            features = self.image_features(pixel_values)  # [B, N, D]
        except Exception as exc:  # noqa: BLE001 - one image's failure must not stop the others
            _free_cache(self.lm.device)
            if len(items) == 1:
                item = items[0]
                return [Annotation.failed(item.key, t, f"vision encoder failed: {describe_error(exc)}",
                                          item.width, item.height) for t in item.tasks]
            if is_oom(exc):
                self.max_images = max(1, len(items) // 2)
                log.warning("out of memory encoding %d images; going on with %d", len(items), self.max_images)
                return self._annotate_items(items, pixel_values)
            log.warning("vision encoder failed on %d images (%s); retrying one by one", len(items), describe_error(exc))
            return [row for i in range(len(items)) for row in self._annotate_items(items[i:i + 1], pixel_values[i:i + 1])]
        needed = [self._needed(item.tasks) for item in items]
        done: dict[tuple[int, str], Annotation] = {}
        for wave in self.waves:
            self._run_wave(wave, needed, items, features, done)
        return [done[(i, t)] for i, item in enumerate(items) for t in item.tasks]

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

    def _run_wave(self, wave: list[Task], needed: list[set[str]], items: list[ImageItem], features: torch.Tensor,
                  done: dict[tuple[int, str], Annotation]) -> None:
        """Every task of the wave for every image that needs it, in shared generate calls:
        decoding is memory-bound, so a step costs about the same for 8 prompts as for 32, and
        the number of steps is the longest answer instead of the sum over tasks."""
        requests: list[Request] = []
        failed: dict[tuple[int, str], str] = {}
        for task in wave:
            src = self.sources.get(task.name)
            for i in (i for i, need in enumerate(needed) if task.name in need):
                if src and done[(i, src)].status != OK:
                    failed[(i, task.name)] = f"needs {src}, which failed: {done[(i, src)].error}"
                    continue
                requests.extend(self.requests(task, i, items[i].width, items[i].height, done.get((i, src)) if src else None))
        if self.forced_lengths:
            requests = [replace(r, forced=self.forced_lengths(items[r.image].key, r.task)) for r in requests]
        results = self.generate(requests, features)
        answers: dict[tuple[int, str], list[tuple[Request, Generation | BaseException]]] = {}
        for req, res in zip(requests, results):
            answers.setdefault((req.image, req.task), []).append((req, res))
        for task in wave:
            for i in (i for i, need in enumerate(needed) if task.name in need):
                item = items[i]
                if (i, task.name) in failed:
                    row = Annotation.failed(item.key, task.name, failed[(i, task.name)], item.width, item.height)
                else:
                    row = self.assemble(task, item.key, item.width, item.height, answers.get((i, task.name), []))
                done[(i, task.name)] = row

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
        """Generate every request, `max_prompts` at a time. A failing chunk is retried prompt by
        prompt so that only the offending image gets an error; OOM halves the chunk size."""
        while self.use_scheduler and requests:
            try:
                return self._schedule(requests, features)
            except Exception as exc:  # noqa: BLE001 - OOM: fewer slots; else generate sorts out the bad rows
                _free_cache(self.lm.device)
                slots = min(self.max_prompts, len(requests))
                if is_oom(exc) and slots > 1:
                    self.max_prompts = slots // 2
                    log.warning("out of memory with %d rows in flight; going on with %d", slots, self.max_prompts)
                    continue
                log.warning("decode scheduler failed (%s); using generate for these prompts", describe_error(exc))
                break
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
        """Requests come grouped by task (similar answer lengths side by side). Tasks share a
        generate call, except when lengths are forced per task (bench) under beam search,
        where generate has no per-row length limit."""
        forced = self.generation.min_new_tokens or self.forced_lengths
        if not (forced and self.generation.num_beams > 1):
            return [requests] if requests else []
        groups: dict[str, list[Request]] = {}
        for req in requests:
            groups.setdefault(req.task, []).append(req)
        return list(groups.values())

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
        """Prompts of the chunk, right padded -> (input_ids [P, L], mask [P, L], encoder states [P, L, D])."""
        lm = self.lm
        input_ids, mask = pad_right([self.prompt_ids(r.prompt) for r in chunk], lm.processor.tokenizer.pad_token_id)
        input_ids, mask = input_ids.to(lm.device), mask.to(lm.device)
        index = torch.tensor([r.image for r in chunk], device=features.device)
        return input_ids, mask, self.encode(input_ids, mask, features.index_select(0, index))

    def _schedule(self, requests: list[Request], features: torch.Tensor) -> list[Generation]:
        """Greedy, all requests of the wave through the continuous-batching scheduler."""
        gen, tok = self.generation, self.lm.processor.tokenizer
        jobs = [Job(len(self.prompt_ids(r.prompt)), r.forced or gen.min_new_tokens.get(TASKS[r.task].token, 0),
                    r.forced or gen.max_new_tokens) for r in requests]
        sched = DecodeScheduler(self.lm.model, self.max_prompts, scores=gen.scores, locs=self.locs)
        per_row = sched.kv_bytes_per_row(max(j.max_new for j in jobs), max(j.prompt_len for j in jobs))
        sched.max_rows = rows_for_memory(self.lm.device, per_row, self.max_prompts)

        def encode(indices: list[int]):
            _, mask, states = self._encode_requests([requests[i] for i in indices], features)
            return states, mask

        answers = sched.run(jobs, encode, self.decode_stats)
        out = []
        for req, a in zip(requests, answers):
            self.decode_stats.add_tokens(req.task, len(a.ids))
            text = tok.decode([sched.start] + a.ids, skip_special_tokens=False)
            out.append(Generation(text, truncated=not a.ended, ids=tuple(a.ids),
                                  logprobs=None if a.logprobs is None else tuple(a.logprobs)))
        return out

    def _generate_chunk(self, chunk: list[Request], features: torch.Tensor) -> list[Generation]:
        lm, gen = self.lm, self.generation
        tok = lm.processor.tokenizer
        input_ids, mask, encoded = self._encode_requests(chunk, features)  # encoded: [P, L, D]
        sequences = lm.model.generate(
            # input_ids only tell generate the batch size (and observers the prompt): the encoder
            # is not re-run. A fresh wrapper, because beam search expands it in place.
            input_ids=input_ids, encoder_outputs=BaseModelOutput(last_hidden_state=encoded), attention_mask=mask,
            num_beams=gen.num_beams, do_sample=False, **self._lengths(chunk),
        )  # [P, 1 + T]: decoder start token, then the generated tokens
        texts = tok.batch_decode(sequences, skip_special_tokens=False)
        rows = [_answer_ids(seq[1:].tolist(), tok.eos_token_id, tok.pad_token_id) for seq in sequences]
        if any(r.forced for r in chunk) and gen.num_beams > 1:  # bench: beams ran to the chunk's longest; cut
            rows = [(ids[:r.forced], False) for r, (ids, _) in zip(chunk, rows)]
            texts = [tok.decode(sequences[0, :1].tolist() + ids) for ids, _ in rows]
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

    def _lengths(self, chunk: list[Request]) -> dict:
        """Length arguments for generate. Forced lengths (bench: equal work on both sides) are
        exact per row: one value for the chunk, or per-row limits when tasks share the call
        (greedy; beam search runs to the longest and `_generate_chunk` cuts each row)."""
        gen = self.generation
        forced = [r.forced or gen.min_new_tokens.get(TASKS[r.task].token, 0) for r in chunk]
        if not any(forced):
            return {"max_new_tokens": gen.max_new_tokens}
        if gen.num_beams > 1:
            forced = [max(forced)] * len(forced)
        if len(set(forced)) == 1:
            return {"max_new_tokens": forced[0], "min_new_tokens": forced[0]}
        limits = torch.tensor(forced, device=self.lm.device)
        return {"max_new_tokens": max(forced), "logits_processor": LogitsProcessorList([RowMinNewTokens(limits, self.lm.processor.tokenizer.eos_token_id)]),
                "stopping_criteria": StoppingCriteriaList([RowMaxNewTokens(limits)])}

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


def _free_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
