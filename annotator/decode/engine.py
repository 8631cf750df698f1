"""The per-device loop body: one batch of images -> vision features once -> for each task a
batched generate -> parse -> Annotation rows.

The engine does the model work: vision features, prompts, the text encoder, the generate path and
token scores. What runs when, across batches and through the decode scheduler, is the stream's
(stream.py); answers become rows in assemble.py.

Shapes: B images per batch, N image tokens (577 at 768px), D model width, P prompts of a task."""

from __future__ import annotations

import logging
import weakref
from typing import Iterable, Iterator

import torch
from transformers.modeling_outputs import BaseModelOutput

from annotator.answers.assemble import Assembler, Generation, Request
from annotator.config import GenerationSettings, TaskInputs
from annotator.inputs.images import Batch, describe_error
from annotator.model.load import LoadedModel, free_cache, is_oom
from annotator.model.sequence import PromptCache, loc_tokens, pad_right
from annotator.decode.forced_lengths import ForcedLengths
from annotator.decode.scheduler import DecodeStats, unsupported_reason
from annotator.answers.confidence import LocBins, chosen_logprobs
from annotator.model.cpu_kernels import use_onednn_linear
from annotator.outdir.table import Annotation
from annotator.decode.stream import BatchStream
from annotator.tasks import Input, Task, plan_sources, task_waves

log = logging.getLogger(__name__)


class Engine:
    def __init__(self, lm: LoadedModel, tasks: list[Task], task_inputs: TaskInputs,
                 generation: GenerationSettings, max_prompts: int = 8):
        self.lm = lm
        self.tasks = tasks
        self.inputs = task_inputs
        self.generation = generation
        self.max_prompts = max_prompts  # prompts per generate call; halved on OOM
        self.max_images: int | None = None  # images per vision forward (None: the whole batch); halved on OOM
        self.sources = plan_sources(tasks, bool(task_inputs.text), bool(task_inputs.classes))
        self.waves = task_waves(tasks, self.sources)
        self.prompt_ids = PromptCache(lm.processor)  # prompt -> `<image>*N <s> words </s>` ids (sequence.py)
        self.assembler = Assembler(lm.processor, task_inputs)  # answers -> rows, and the quality counters
        self.locs = LocBins.of(lm.processor.tokenizer)  # location tokens score with their neighbourhood (confidence.py)
        self.forced_lengths: ForcedLengths | None = None  # bench only: exact answer lengths (forced_lengths.py)
        self.decode_stats = DecodeStats()  # decoding work, for the bench's slot efficiency
        # The run's generation overrides (--no-repeat-ngram-size, ...) go into the model's generation
        # config: both decode paths read their rules from it (see run_generation_config).
        lm.model.generation_config = run_generation_config(lm.model, generation, assign=True)
        # Greedy and beam search go through the continuous-batching scheduler (scheduler.py) when
        # it does exactly what generate would; otherwise the reason is kept (see `decoding`).
        self.generate_reason = unsupported_reason(lm.model.generation_config)
        self.use_scheduler = self.generate_reason is None
        self.stream = BatchStream(self)  # what runs when: vision, task waves, the decode scheduler
        if lm.device.type == "cpu":
            use_onednn_linear(lm.model)  # fp32 Linear through oneDNN: 2x the GFLOP/s on AMD CPUs (cpu_kernels.py)

    @property
    def decoding(self) -> str:
        """The decode path, as the manifest and the run's log say it: "scheduler" or "generate: <why>"."""
        return describe_path(self.generate_reason if self.use_scheduler or self.generate_reason
                             else "the scheduler is turned off")

    # ------------------------------------------------------------------ batches -> rows
    def annotate(self, batch: Batch) -> list[Annotation]:
        """The rows of one batch: decode failures first, then per image its tasks in order."""
        return [row for rows in self.annotate_stream([batch]) for row in rows]

    def annotate_stream(self, batches: Iterable[Batch]) -> Iterator[list[Annotation]]:
        """The rows of each batch, a batch at a time, as batches finish (not always in input order);
        see BatchStream.run (stream.py) for how batches join the decoding."""
        return self.stream.run(batches)

    def take_stats(self) -> dict[str, int]:
        """The quality counters since the last call (see parse.refine), handed over and reset:
        the driver reports them with the batch's rows."""
        return self.assembler.take_stats()

    @property
    def stats(self) -> dict[str, int]:
        """The quality counters so far (the assembler's; tiling adds its own through `count`)."""
        return self.assembler.stats

    def count(self, name: str, n: int) -> None:
        """Add to a quality counter (tiling's: tiles run, rows merged, ...)."""
        if n:
            self.assembler.stats[name] = self.assembler.stats.get(name, 0) + n

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        lm = self.lm
        pixel_values = pixel_values.to(lm.device, lm.dtype, non_blocking=True)
        return lm.model.get_image_features(pixel_values, return_dict=True).pooler_output

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
    def halve_prompts(self, in_flight: int) -> None:
        """Out of memory with `in_flight` prompts decoding: half as many from now on, on either decode
        path (the one writer of max_prompts after construction)."""
        self.max_prompts = max(1, in_flight // 2)
        log.warning("out of memory with %d prompts in flight; going on with %d", in_flight, self.max_prompts)
        free_cache(self.lm.device)

    def halve_images(self, in_flight: int) -> None:
        """Out of memory encoding `in_flight` images: half as many per vision forward from now on."""
        self.max_images = max(1, in_flight // 2)
        log.warning("out of memory encoding %d images; going on with %d", in_flight, self.max_images)

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
                        self.halve_prompts(len(chunk))
                        continue  # same position, smaller chunk
                    out.extend(self._one_by_one(chunk, features, exc))
                pos += len(chunk)
        return out

    def _groups(self, requests: list[Request]) -> list[list[Request]]:
        """Requests come grouped by task (similar answer lengths side by side) and share generate
        calls; the bench's forced lengths may split them (ForcedLengths.groups)."""
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
                free_cache(self.lm.device)
                results.append(one)
        return results

    def encode_requests(self, chunk: list[Request], features: torch.Tensor):
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
        input_ids, mask, encoded = self.encode_requests(chunk, features.index_select(0, index))  # encoded: [P, L, D]
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
        # With forced_eos_token_id (the published checkpoints'), generate writes </s> as the last allowed
        # token: a row that ran to the limit was cut there, not finished.
        cut_at = None if lm.model.generation_config.forced_eos_token_id is None else gen.max_new_tokens
        rows = [_answer_ids(seq[1:].tolist(), tok.eos_token_id, tok.pad_token_id, cut_at) for seq in sequences]
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
        (cheap next to generation: all positions at once). See confidence.py for why."""
        model = self.lm.model
        hidden = model.model(encoder_outputs=BaseModelOutput(last_hidden_state=encoded), attention_mask=mask,
                             decoder_input_ids=sequences[:, :-1], use_cache=False).last_hidden_state  # [P, T, D]
        out = []
        for row, n in enumerate(lengths):  # a row at a time, its own length: [n, vocab] logits stay small
            logits = model.lm_head(hidden[row, :n]).float()
            out.append(chosen_logprobs(logits, sequences[row, 1:n + 1], self.locs))
        return out


_OWN_CONFIGS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> (its own config, the run's)


def run_generation_config(model, generation: GenerationSettings, assign: bool = False):
    """The model's generation config with the run's overrides, always applied to the model's own config:
    a model that served a run with --no-repeat-ngram-size 0 does not keep it for the next run
    in the same process. A config someone set on the model since counts as its own."""
    own, applied = _OWN_CONFIGS.get(model, (None, None))
    if model.generation_config is not applied:
        own = model.generation_config
    config = generation.apply(own)
    if assign:
        _OWN_CONFIGS[model] = (own, config)
    return config


def decoding_path(generation_config) -> str:
    """What an engine decodes a model with this generation config through: "scheduler", or
    "generate: <the rule the scheduler lacks>" (Engine.decoding, before any engine exists)."""
    return describe_path(unsupported_reason(generation_config))


def describe_path(generate_reason: str | None) -> str:
    """The one wording of the path: "scheduler", or "generate: <why the scheduler is not used>"."""
    return "scheduler" if generate_reason is None else f"generate: {generate_reason}"


def _answer_ids(ids: list[int], eos: int, pad: int, cut_at: int | None = None) -> tuple[list[int], bool]:
    """A row's generated ids up to and including </s> (True), or, for a row stopped by its
    length limit, without the padding generate appends once it is done (False). `cut_at`: the
    limit at which generate forces </s> (that </s> marks a cut, not an end)."""
    if eos in ids:
        end = ids.index(eos) + 1
        return ids[:end], end != cut_at
    while ids and ids[-1] == pad:
        ids = ids[:-1]
    return ids, False
