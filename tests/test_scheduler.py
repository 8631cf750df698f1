"""The continuous-batching scheduler on the tiny random model with mixed answer lengths: its
greedy and beam-search answers are token for token those of `generate` and of the
one-image-one-prompt loop, while rows end early and their slots are refilled."""

import copy
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from annotator.config import GenerationSettings, TaskInputs
from annotator.decode.engine import Engine
from annotator.decode.forced_lengths import ForcedLengths
from annotator.decode.scheduler import supports, unsupported_reason
from annotator.decode.stream import BatchStream
from annotator.tasks import parse_task_list
from conftest import model_inputs
from half_precision import EXACT, Captured, Decoded, capture_ids, same_answers
from test_engine import SCORE_REL, batches, make_images, make_items

SPEC = "caption,od,ocr"
MAX_NEW = 30


@pytest.fixture(scope="module")
def eos_lm(tiny_lm):
    """tiny_lm with a stronger </s> row in the (tied) output embedding: the random model then ends
    about half its answers early, at different steps, instead of always running to the limit."""
    lm = copy.copy(tiny_lm)
    lm.model = copy.deepcopy(tiny_lm.model)
    with torch.no_grad():
        lm.model.lm_head.weight[lm.model.generation_config.eos_token_id] *= 14
    return lm


def annotate(lm, items, gen, max_prompts, scheduler, batch_size=5, forced=None, stream=False):
    """Rows of every batch, in item order; `stream`: through one engine stream (batches join)."""
    engine = Engine(lm, parse_task_list(SPEC), TaskInputs(), gen, max_prompts=max_prompts)
    engine.use_scheduler = scheduler
    engine.forced_lengths = forced and ForcedLengths(forced)
    ids = capture_ids(engine)
    if stream:
        order = {(it.key, t): n for n, (it, t) in enumerate((it, t) for it in items for t in it.tasks)}
        rows = sorted((r for rows in engine.annotate_stream(batches(items, batch_size)) for r in rows),
                      key=lambda r: order[(r.image, r.task)])
    else:
        rows = [r for b in batches(items, batch_size) for r in engine.annotate(b)]
    return Decoded(rows, ids), engine.decode_stats


def key(rows):
    return [(r.image, r.task, r.raw, r.truncated) for r in rows]


def _answer(ids, lm) -> tuple[int, ...]:
    """generate's ids after the decoder start token, up to </s>, without padding (as the engine's)."""
    tok = lm.processor.tokenizer
    ids = ids[:ids.index(tok.eos_token_id) + 1] if tok.eos_token_id in ids else ids
    while ids and ids[-1] == tok.pad_token_id:
        ids = ids[:-1]
    return tuple(ids)


def agree(lm, items, gen, label, forced=None, **runs) -> set:
    """float32: key() equal in every run; bf16: the near-tie rule against the batch-1 reference
    (half_precision.py). The (image, task) rows identical in every run."""
    return same_answers(lm, make_images(len(items)), items, gen, runs, key, forced, label)


@pytest.mark.parametrize("num_beams", [1, 2, 3])
def test_scheduler_equals_generate_and_the_reference_loop(eos_lm, num_beams):
    gen = GenerationSettings(num_beams=num_beams, max_new_tokens=MAX_NEW)
    items = make_items(eos_lm, SPEC.split(","))
    sched, stats = annotate(eos_lm, items, gen, max_prompts=4, scheduler=True)  # 15 prompts through 4 x k slots
    plain, _ = annotate(eos_lm, items, gen, max_prompts=4, scheduler=False)
    same = agree(eos_lm, items, gen, f"scheduler vs generate, beams {num_beams}", sched=sched, plain=plain)
    ended = [r for r in sched if not r.truncated]
    assert 3 <= len(ended) < len(sched), "mixed lengths: some rows must end early, some run to the limit"
    assert len({len(r.raw) for r in ended}) > 1
    assert stats.useful < MAX_NEW * len(sched)  # finished rows left their slots
    if num_beams == 1:  # (a beam job may search on after its best hypothesis ended: less)
        assert stats.efficiency == 1.0
    for a, b in zip(sched, plain):  # confidence from in-step log p == the teacher-forced pass, to float noise
        if (a.image, a.task) not in same:
            continue
        assert (a.text_score is None) == (b.text_score is None)
        if a.text_score is not None:
            assert a.text_score == pytest.approx(b.text_score, rel=SCORE_REL)

    rng = np.random.default_rng(0)  # the images of make_items, through processor -> generate, batch 1
    tokens = {t.name: t.token for t in parse_task_list(SPEC)}
    loop = {}
    for i in range(len(items)):
        im = Image.fromarray(rng.integers(0, 255, (40 + 13 * i, 90 - 7 * i, 3), dtype=np.uint8))
        for row in (r for r in sched if r.image == f"img{i}.png"):
            inputs = model_inputs(eos_lm, text=tokens[row.task], images=im)
            ids = eos_lm.model.generate(**inputs, max_new_tokens=MAX_NEW, num_beams=num_beams, do_sample=False)
            loop[(row.image, row.task, 0)] = _answer(ids[0, 1:].tolist(), eos_lm)
            if EXACT:
                assert row.raw == eos_lm.processor.batch_decode(ids, skip_special_tokens=False)[0]
    generated = Captured()
    generated.update(loop)
    generated.prompts.update(sched.ids.prompts)  # the reference is built from the prompts
    agree(eos_lm, items, gen, f"scheduler vs the generate loop, beams {num_beams}", sched=sched,
          loop=Decoded(sched, generated))


def test_slots_do_not_change_answers(eos_lm):
    gen = GenerationSettings(num_beams=1, max_new_tokens=MAX_NEW, scores=False)
    items = make_items(eos_lm, SPEC.split(","))
    one, _ = annotate(eos_lm, items, gen, max_prompts=1, scheduler=True, batch_size=1)
    many, stats = annotate(eos_lm, items, gen, max_prompts=6, scheduler=True)
    agree(eos_lm, items, gen, "slots", one=one, many=many)
    assert stats.occupancy < 1.0  # the last rows of a batch run with free slots (no next batch joins)


@pytest.mark.parametrize("num_beams,scheduler", [(1, True), (2, True), (3, True), (2, False)])
def test_forced_lengths_are_exact_per_row(tiny_lm, num_beams, scheduler):
    """The bench's per-row lengths: exactly n new tokens for every (image, task), greedy and beams;
    through the scheduler, the tokens of the bench's reference (batch 1, min = max = n)."""
    gen = GenerationSettings(num_beams=num_beams, max_new_tokens=12, scores=False)
    items = make_items(tiny_lm, SPEC.split(","), n=3)
    lengths = {(f"img{i}.png", t): 2 + (3 * i + len(t)) % 9 for i in range(3) for t in SPEC.split(",")}
    rows, stats = annotate(tiny_lm, items, gen, max_prompts=4, scheduler=scheduler, batch_size=3,
                           forced=lambda k, t: lengths[(k, t)])
    for t in SPEC.split(","):
        assert stats.tokens[t] == sum(n for (_, task), n in lengths.items() if task == t)
    assert all(r.truncated for r in rows)
    if not scheduler:
        assert stats.efficiency < 1.0  # generate: beams run each task's chunk to its longest row
        return
    assert stats.efficiency == 1.0
    rng, tokens = np.random.default_rng(0), {t.name: t.token for t in parse_task_list(SPEC)}
    loop = Captured()
    loop.prompts.update(rows.ids.prompts)
    for i in range(3):
        im = Image.fromarray(rng.integers(0, 255, (40 + 13 * i, 90 - 7 * i, 3), dtype=np.uint8))
        for row in (r for r in rows if r.image == f"img{i}.png"):
            n = lengths[(row.image, row.task)]
            inputs = model_inputs(tiny_lm, text=tokens[row.task], images=im)
            ids = tiny_lm.model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, num_beams=num_beams,
                                         do_sample=False)
            loop[(row.image, row.task, 0)] = _answer(ids[0, 1:].tolist(), tiny_lm)
            if EXACT:
                assert row.raw == tiny_lm.processor.batch_decode(ids, skip_special_tokens=False)[0]
    agree(tiny_lm, items, gen, f"forced lengths, beams {num_beams}", forced=lambda k, t: lengths[(k, t)],
          sched=rows, loop=Decoded(rows, loop))


def test_unknown_rules_keep_generate(tiny_lm):
    assert Engine(tiny_lm, parse_task_list("od"), TaskInputs(), GenerationSettings(num_beams=3)).use_scheduler
    assert Engine(tiny_lm, parse_task_list("od"), TaskInputs(), GenerationSettings(num_beams=1)).use_scheduler
    config = copy.deepcopy(tiny_lm.model.generation_config)
    config.num_beams = 3  # the checkpoints' default; the engine passes its own num_beams
    config.early_stopping, config.length_penalty = True, 2.0  # implemented (beams.py)
    assert supports(config)
    assert supports(_with(_with(config, "no_repeat_ngram_size", 3), "repetition_penalty", 1.5))  # logits_rules.py
    for rule, value in (("encoder_no_repeat_ngram_size", 3), ("num_return_sequences", 2), ("min_new_tokens", 5)):
        assert not supports(_with(config, rule, value))
        assert rule in unsupported_reason(_with(config, rule, value))  # said, for the manifest and the log
    assert unsupported_reason(config) is None


def _with(config, rule, value):
    config = copy.deepcopy(config)
    setattr(config, rule, value)
    return config


@pytest.mark.parametrize("early_stopping,length_penalty", [(True, 1.0), ("never", 2.0), (False, -1.0), (True, 0.0)])
def test_beam_settings_of_the_model_are_honoured(eos_lm, early_stopping, length_penalty):
    """generate's beam-search stopping rules and length penalty, from the model's generation
    config: the scheduler's answers are the generate path's for each."""
    lm = copy.copy(eos_lm)
    lm.model = copy.copy(eos_lm.model)  # shares the weights; its own generation config
    lm.model.generation_config = _with(_with(eos_lm.model.generation_config, "early_stopping", early_stopping),
                                       "length_penalty", length_penalty)
    gen = GenerationSettings(num_beams=3, max_new_tokens=MAX_NEW, scores=False)
    items = make_items(lm, SPEC.split(","), n=3)
    sched, _ = annotate(lm, items, gen, max_prompts=2, scheduler=True, batch_size=3, stream=True)
    plain, _ = annotate(lm, items, gen, max_prompts=1, scheduler=False, batch_size=1)
    agree(lm, items, gen, f"beam settings {early_stopping} {length_penalty}", sched=sched, plain=plain)


@pytest.mark.parametrize("num_beams", [2])
def test_beams_batched_equal_one_at_a_time_with_mixed_lengths(eos_lm, num_beams):
    """The generate path (kept for generation configs the scheduler does not implement)."""
    gen = GenerationSettings(num_beams=num_beams, max_new_tokens=MAX_NEW, scores=False)
    items = make_items(eos_lm, SPEC.split(","))
    batched, _ = annotate(eos_lm, items, gen, max_prompts=5, scheduler=False)
    single, _ = annotate(eos_lm, items, replace(gen), max_prompts=1, scheduler=False, batch_size=1)
    agree(eos_lm, items, gen, "generate beams batched vs 1", batched=batched, single=single)
    assert any(not r.truncated for r in batched) and any(r.truncated for r in batched)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_oom_halves_the_rows_in_flight_and_changes_nothing(eos_lm, monkeypatch, num_beams):
    from annotator.decode.scheduler import DecodeScheduler

    gen = GenerationSettings(num_beams=num_beams, max_new_tokens=MAX_NEW, scores=False)
    items = make_items(eos_lm, SPEC.split(","))
    expected, _ = annotate(eos_lm, items, gen, max_prompts=15, scheduler=True)
    real, caps = DecodeScheduler.step, []

    def step(self):
        if not caps or caps[-1] != self.capacity:
            caps.append(self.capacity)
        if self.capacity > 4 and len(self.rows) > 4:  # fails once more than 4 prompts are in flight
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self)

    monkeypatch.setattr(DecodeScheduler, "step", step)
    got, _ = annotate(eos_lm, items, gen, max_prompts=15, scheduler=True)
    agree(eos_lm, items, gen, f"OOM halving, beams {num_beams}", expected=expected, got=got)
    assert caps == [15, 7, 3]  # then it fits, and the engine keeps 3


@pytest.mark.parametrize("num_beams", [1, 2])
def test_next_batches_join_while_long_answers_run(eos_lm, num_beams):
    """One stream over many batches: prompts of later batches take slots that finished rows free,
    the answers stay those of batch-1 decoding, each batch comes back whole, and batches are pulled
    only when a slot would otherwise stay empty (not all at once)."""
    gen = GenerationSettings(num_beams=num_beams, max_new_tokens=MAX_NEW, scores=False)
    items = make_items(eos_lm, SPEC.split(","))
    one, _ = annotate(eos_lm, items, gen, max_prompts=1, scheduler=False, batch_size=1)
    per_batch, alone = annotate(eos_lm, items, gen, max_prompts=6, scheduler=True, batch_size=2)
    joined, stats = annotate(eos_lm, items, gen, max_prompts=6, scheduler=True, batch_size=2, stream=True)
    agree(eos_lm, items, gen, f"batches join, beams {num_beams}", one=one, joined=joined, per_batch=per_batch)
    assert stats.steps < alone.steps and stats.occupancy > alone.occupancy  # fewer steps: slots stay busy

    # 8 images (4 batches): with 5 (3 batches) whether the last batch is pulled before the first one's
    # longest answer ends hangs on those answers' lengths (in bf16 it is, in float32 not)
    engine = Engine(eos_lm, parse_task_list(SPEC), TaskInputs(), gen, max_prompts=6)
    items = make_items(eos_lm, SPEC.split(","), n=8)
    pulled, seen = [], []

    def source():
        for n, b in enumerate(batches(items, 2)):
            pulled.append(n)
            yield b

    for rows in engine.annotate_stream(source()):
        seen.append((len(pulled), sorted({r.image for r in rows})))
    assert [n for n, _ in seen][0] < 4  # the first batch came back before the last one was pulled
    assert sorted(img for _, imgs in seen for img in imgs) == [it.key for it in items]
    assert all(len(rows) <= 2 for _, rows in seen)  # a batch at a time, whole


def test_a_failing_prompt_in_the_stream_goes_through_generate(eos_lm, monkeypatch):
    """A non-OOM failure inside the scheduler: its unfinished prompts (of any batch) are answered by
    the generate path, the same tokens; later batches use the scheduler again."""
    gen = GenerationSettings(num_beams=1, max_new_tokens=MAX_NEW, scores=False)
    items = make_items(eos_lm, SPEC.split(","))
    expected, _ = annotate(eos_lm, items, gen, max_prompts=1, scheduler=True, batch_size=1)
    real, calls = BatchStream._encode_jobs, []

    def encode_jobs(self, jobs):
        calls.append(len(jobs))
        if len(calls) == 3:
            raise RuntimeError("device fault")
        return real(self, jobs)

    monkeypatch.setattr(BatchStream, "_encode_jobs", encode_jobs)
    got, stats = annotate(eos_lm, items, gen, max_prompts=4, scheduler=True, batch_size=2, stream=True)
    assert len(calls) > 3
    agree(eos_lm, items, gen, "failing prompt to generate", expected=expected, got=got)


@pytest.mark.parametrize("waste", [0.0, float("inf")])
def test_per_row_and_padded_self_attention_give_the_same_answers(eos_lm, monkeypatch, waste):
    """Self-attention over each row's own length (0.0: always) or over the longest row's with a
    mask (inf: never): both are the batch-1 answers, with rows far apart in length (batches join)."""
    from annotator.decode.scheduler import DecodeScheduler

    gen = GenerationSettings(num_beams=1, max_new_tokens=MAX_NEW, scores=False)
    items = make_items(eos_lm, SPEC.split(","))
    one, _ = annotate(eos_lm, items, gen, max_prompts=1, scheduler=False, batch_size=1)
    monkeypatch.setattr(DecodeScheduler, "RAGGED_WASTE", waste)
    got, _ = annotate(eos_lm, items, gen, max_prompts=6, scheduler=True, batch_size=2, stream=True)
    agree(eos_lm, items, gen, f"ragged waste {waste}", one=one, got=got)


def _ruled(lm, **rules):
    """lm (shared weights) with its own generation config carrying `rules`."""
    ruled = copy.copy(lm)
    ruled.model = copy.copy(lm.model)
    config = lm.model.generation_config
    for rule, value in rules.items():
        config = _with(config, rule, value)
    ruled.model.generation_config = config
    return ruled


@pytest.mark.parametrize("rules,num_beams", [({"no_repeat_ngram_size": 3}, 1), ({"no_repeat_ngram_size": 3}, 2),
                                             ({"no_repeat_ngram_size": 3}, 3), ({"repetition_penalty": 1.5}, 1),
                                             ({"repetition_penalty": 1.5}, 3)])
def test_repetition_rules_equal_generate_and_the_batch_1_loop(tiny_lm, rules, num_beams):
    """The published checkpoints' no_repeat_ngram_size=3 and a served recipe's repetition_penalty=1.5:
    the scheduler (prompts joining mid-flight, uneven lengths) == generate batched == batch 1,
    token for token, scores to 1e-4 (bf16: half_precision.py's rule, scores to 1e-2). Without the rule the random model repeats 3-grams / tokens,
    so a scheduler that ignored it would differ (checked: without the rule the answers change)."""
    lm = _ruled(tiny_lm, **rules)
    gen = GenerationSettings(num_beams=num_beams, max_new_tokens=MAX_NEW)
    items = make_items(lm, SPEC.split(","), n=4)
    sched, stats = annotate(lm, items, gen, max_prompts=3, scheduler=True, batch_size=2, stream=True)
    plain, _ = annotate(lm, items, gen, max_prompts=4, scheduler=False, batch_size=2)
    one, _ = annotate(lm, items, gen, max_prompts=1, scheduler=False, batch_size=1)
    assert stats.calls > 1
    same = agree(lm, items, gen, f"rules {rules} beams {num_beams}", one=one, sched=sched, plain=plain)
    for a, b in zip(sched, one):
        if (a.image, a.task) not in same:
            continue
        assert (a.text_score is None) == (b.text_score is None)
        if a.text_score is not None:
            assert a.text_score == pytest.approx(b.text_score, rel=SCORE_REL)
    unruled = _ruled(tiny_lm, no_repeat_ngram_size=0, repetition_penalty=1.0)  # random:tiny carries n-gram 3 itself
    free, _ = annotate(unruled, items, replace(gen, scores=False), max_prompts=3, scheduler=True, batch_size=2,
                       stream=True)
    assert sum(a.raw != b.raw for a, b in zip(free, sched)) >= 3  # the rule binds on these prompts


@pytest.mark.parametrize("early_stopping", [True, False, "never"])
def test_no_repeat_ngrams_with_each_early_stopping(eos_lm, early_stopping):
    """Beams 3 under the published no_repeat_ngram_size=3, rows ending early at different steps:
    the scheduler's answers are the batch-1 generate path's for each early_stopping."""
    lm = _ruled(eos_lm, no_repeat_ngram_size=3, early_stopping=early_stopping)
    gen = GenerationSettings(num_beams=3, max_new_tokens=MAX_NEW, scores=False)
    items = make_items(lm, SPEC.split(","), n=3)
    sched, _ = annotate(lm, items, gen, max_prompts=2, scheduler=True, batch_size=3, stream=True)
    plain, _ = annotate(lm, items, gen, max_prompts=1, scheduler=False, batch_size=1)
    agree(lm, items, gen, f"n-grams, early_stopping {early_stopping}", sched=sched, plain=plain)
    assert any(not r.truncated for r in sched)


def test_a_beam_job_stores_its_cross_attention_once(eos_lm):
    """The cross-attention K/V of a beam job is stored once, not once per beam: 1/k of the bytes."""
    from annotator.decode.scheduler import DecodeScheduler

    gen = GenerationSettings(num_beams=3, max_new_tokens=MAX_NEW, scores=False)
    engine = Engine(eos_lm, parse_task_list(SPEC), TaskInputs(), gen, max_prompts=4)
    rows = [r for b in batches(make_items(eos_lm, SPEC.split(","), n=2), 2) for r in engine.annotate(b)]
    cache = engine.stream._decoder.cache
    assert cache.k[0].shape[0] == 3 * 4 and cache.ck[0].shape[0] == 4  # 4 jobs x 3 beam rows; 4 cross K/V
    greedy = DecodeScheduler(eos_lm.model, 12, None, num_beams=1)
    beams = DecodeScheduler(eos_lm.model, 12, None, num_beams=3)
    per_beam_row, per_greedy_row = beams.kv_bytes_per_row(30, 600), greedy.kv_bytes_per_row(30, 600)
    cross = greedy.kv_bytes_per_row(0, 600) - greedy.kv_bytes_per_row(0, 0)
    assert per_greedy_row - per_beam_row == cross - cross // 3
    assert len(rows) == 6
