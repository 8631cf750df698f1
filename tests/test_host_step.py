"""Host work per decoder step does not grow with the rows in flight (README, "Host time per decoder
step"): counted with examples/bench_host_step.py's dispatch mode on the real DecodeScheduler
(random:tiny, its published rules: no_repeat_ngram_size 3, forced <s>/</s>, scores on), rows of
equal length and rows far apart in length (prompts joined mid-flight), greedy and beams 3.

On a GPU a step's host time is about Python + ops dispatched x launch cost, and a device->host read
stalls the host, so: the same ops at 4 and 32 prompts (a per-row or per-prompt Python loop would add
ops per row), and at most one read-back per step (the rows that ended: only the device knows).
Fails on b9f9896 (main before this): ragged steps 180 -> 351 ops (greedy) and 350 -> 854 (beams 3)
at 4 -> 32 prompts, 10 and 13 syncs per step."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

SPEC = importlib.util.spec_from_file_location(
    "bench_host_step", Path(__file__).parents[1] / "examples" / "bench_host_step.py")
bench = importlib.util.module_from_spec(SPEC)
sys.modules[SPEC.name] = bench  # its dataclasses look their module up
SPEC.loader.exec_module(bench)


@pytest.mark.parametrize("beams", [1, 3])
def test_ops_and_syncs_per_step_are_flat_in_the_rows(tiny_lm, beams):
    model, prompt_len = bench.small_vocab(tiny_lm), tiny_lm.processor.num_image_tokens + 8
    few, many = (bench.counts(model, p, beams, prompt_len) for p in (4, 32))
    assert [s.event for s in few] == [s.event for s in many]  # the same steps, 8x the rows
    windows = {"equal lengths": bench.UNIFORM, "ragged": bench.RAGGED}
    ops = {name: [bench.window(steps, numbers, "ops") for steps in (few, many)] for name, numbers in windows.items()}
    syncs = {name: [bench.window(steps, numbers, "syncs") for steps in (few, many)] for name, numbers in windows.items()}
    assert all(many - few <= 4 for few, many in ops.values()), ops
    assert all(counts == [1, 1] for counts in syncs.values()), syncs
    # events (prompts join, finish, a beam hypothesis ends) may cost Python, but not ops per prompt:
    # 8x the prompts joining or finishing in one step take the same batched copies and reads (up to
    # one batched move of the jobs still running into the finished ones' slots, ~40 ops, which at 4
    # prompts the step does not need: the short jobs that end are the last ones)
    events = [[s.ops for s in steps if s.event] for steps in (few, many)]
    assert all(b - a <= 48 for a, b in zip(*events)), events


def test_the_bench_model_leaves_the_shared_one_alone(tiny_lm):
    """small_vocab once swapped the lm_head of the model it was given (a shallow copy shares the
    child-module table): later tests then compared against a model with a 128-token head."""
    head, layers, state = tiny_lm.model.lm_head, tiny_lm.model.model.language_model.decoder.layers, torch.get_rng_state()
    model = bench.small_vocab(tiny_lm, layers=2)
    assert model.lm_head.out_features == bench.VOCAB and len(model.model.language_model.decoder.layers) == 2
    assert tiny_lm.model.lm_head is head and tiny_lm.model.model.language_model.decoder.layers is layers
    assert len(layers) == 1
    assert torch.equal(torch.get_rng_state(), state)  # no random init either
