"""Host time per decoder step of the decode scheduler: what a GPU user pays on the CPU side of each
step, measured on a CPU host by counting and timing.

    OMP_NUM_THREADS=1 python examples/bench_host_step.py [--prompts 16,64,256] [--beams 1,3]

On a GPU every tensor op is queued asynchronously, so a step's host time is about its Python time
plus (ops dispatched) x (launch cost), and each device->host sync makes the host wait for the device
(no overlap between the host's next step and the device's work). So per step this reports:
  ops    aten ops dispatched (TorchDispatchMode; views included: they are host work too), plus
         each tensor made from host data (torch.tensor / as_tensor: a host->device copy on a GPU);
  syncs  device->host reads: .item()/int()/float()/bool() of a tensor (aten._local_scalar_dense),
         .tolist(), .numpy(), nonzero / masked_select / boolean-mask indexing (their output size needs the data);
  host   CPU ms of the step (one thread), with the vocabulary-sized compute taken out by cutting
         random:tiny's lm_head to its first 128 tokens (small_vocab): every op of the step still
         runs, with the same count (the rules, top-k, scoring and bookkeeping do not depend on the
         vocabulary size), but lm_head / log_softmax / top-k over 128 tokens instead of 51289 cost
         little. (Timing the vocabulary ops one by one inside a dispatch mode and subtracting them
         was tried first: on this shared machine the memory-bound ops varied more between passes
         than the rest weighs, giving negative remainders.) The figure keeps the Python, the
         dispatch of every op and the small tensor work (random:tiny: 1 decoder layer, width 32), so
         it also counts the CPU compute of that small work (copying beam caches, the n-gram compare,
         the 128-token vocabulary work), which on a GPU would be device time: an upper bound.

The workload drives the real DecodeScheduler (random:tiny, its published generation config:
num_beams from --beams, no_repeat_ngram_size 3, forced <s>/</s>, scores on) with the prompts' encoder states
drawn at random (the encoder is not part of a step). Capacity = the prompts; each job is forced to a
fixed length (min_new = max_new), so the steps are the same on any code: a quarter of the prompts run
long (160 tokens), the rest 24 tokens, then as many new prompts join (60 tokens): steps 2-23 have
rows of equal length, steps 28-36 rows far apart in length (ragged), all prompts in flight. Each
window is summarized as the median over its steps; steps with an event (a prompt joins or
finishes) are left out (their ops are reported apart).
The timed pass runs --repeat times (the first also warms up) and each step keeps its fastest.
At 128 tokens the vocabulary work is one chunk, as on a GPU (with the full vocabulary the CPU splits
it into row chunks of 16 MB: more ops, a CPU-only choice). Location tokens: the upper 64 of the 128."""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from annotator.answers.confidence import LocBins
from annotator.config import ModelSpec
from annotator.decode.scheduler import DecodeScheduler, Job
from annotator.model.load import load_model

VOCAB = 128  # lm_head cut to this many tokens (small_vocab); the upper half scored as location bins
LONG, SHORT, JOIN = 160, 24, 60
UNIFORM, RAGGED = range(3, 23), range(28, 37)  # step numbers (1 = the admission step)
SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "unique_consecutive", "equal",
            "is_nonzero"}


@dataclass
class Step:
    number: int
    event: bool  # a prompt joined or finished in this step
    cpu_ms: float = 0.0
    ops: int = 0
    syncs: int = 0


def jobs(prompts: int, prompt_len: int) -> list[Job]:
    first = [Job(prompt_len, n, n, tag=i) for i, n in enumerate(LONG if i % 4 == 0 else SHORT for i in range(prompts))]
    joining = sum(1 for j in first if j.max_new == SHORT)
    return first + [Job(prompt_len, JOIN, JOIN, tag=prompts + i) for i in range(joining)]


def scheduler(model, prompts: int, beams: int, prompt_len: int, seed: int = 0) -> DecodeScheduler:
    d_model = model.config.text_config.d_model
    g = torch.Generator().manual_seed(seed)

    def encode(batch: list[Job]):
        length = max(j.prompt_len for j in batch)
        return torch.randn((len(batch), length, d_model), generator=g), torch.ones((len(batch), length), dtype=torch.long)

    dec = DecodeScheduler(model, prompts * beams, encode, scores=True, locs=LocBins(VOCAB // 2, VOCAB // 2),
                          num_beams=beams)
    dec.submit(jobs(prompts, prompt_len))
    return dec


def drive(dec: DecodeScheduler, each_step) -> list[Step]:
    """Steps until the scheduler is done; each_step(step_fn) -> Step fields measured around it."""
    out, number = [], 0
    while dec.busy:
        number += 1
        waiting, rows = len(dec.waiting), len(dec.rows)
        step = Step(number, False)
        finished = each_step(dec.step, step)
        step.event = bool(finished) or len(dec.waiting) != waiting or (number == 1) or len(dec.rows) != rows
        out.append(step)
    return out


class Counter(TorchDispatchMode):
    """Counts aten ops, and the ones that make the host read device memory."""

    def __init__(self):
        super().__init__()
        self.ops, self.syncs = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops += 1
        name = func._schema.name.split("::")[-1]
        flat = list(args) + list(kwargs.values())
        if name in SYNC_OPS or (name in ("index", "index_put", "index_put_") and any(
                i.dtype == torch.bool for i in _indices(flat))):
            self.syncs += 1
        if name == "repeat_interleave" and func._overloadname != "self_int" and kwargs.get("output_size") is None:
            self.syncs += 1  # repeats given as a tensor: the output size needs its values
        return func(*args, **kwargs)


def _indices(flat):
    for a in flat:
        if isinstance(a, (list, tuple)):
            yield from (i for i in a if isinstance(i, torch.Tensor))


def counted(each_step_fn, step: Step):
    """`drive`'s each_step: the ops and syncs of one step."""
    reads = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy")}
    makers = {name: getattr(torch, name) for name in ("as_tensor", "tensor")}
    mode = Counter()

    def reading(name):  # on CPU no aten op runs; on a GPU it is a device->host copy
        def read(self, *args, **kwargs):
            mode.syncs += 1
            return reads[name](self, *args, **kwargs)
        return read

    def making(name):  # a tensor from host data: on CPU no aten op may run; on a GPU a host->device copy
        def make(data, *args, **kwargs):
            mode.ops += not isinstance(data, torch.Tensor)
            return makers[name](data, *args, **kwargs)
        return make

    for name in reads:
        setattr(torch.Tensor, name, reading(name))
    for name in makers:
        setattr(torch, name, making(name))
    try:
        with mode:
            finished = each_step_fn()
    finally:
        for name, fn in reads.items():
            setattr(torch.Tensor, name, fn)
        for name, fn in makers.items():
            setattr(torch, name, fn)
    step.ops, step.syncs = mode.ops, mode.syncs
    return finished


def timed(step_fn, step: Step):
    t0 = time.thread_time_ns()
    finished = step_fn()
    step.cpu_ms = (time.thread_time_ns() - t0) / 1e6
    return finished


def small_vocab(lm, vocab: int = VOCAB, layers: int = 1):
    """random:tiny with lm_head cut to its first `vocab` tokens (<s>, </s> and the forced tokens are
    among them): a step dispatches the same ops at any vocabulary size, only their work shrinks.
    layers > 1: its decoder layer repeated (same weights), for the ops of a deeper decoder
    (Florence-2-base has 6 decoder layers, large 12)."""
    model = _own_children(lm.model)
    if layers > 1:
        model.model = _own_children(model.model)
        model.model.language_model = _own_children(model.model.language_model)
        decoder = _own_children(model.model.language_model.decoder)
        decoder.layers = torch.nn.ModuleList(list(decoder.layers) * layers)
        model.model.language_model.decoder = decoder
    full = lm.model.lm_head
    # skip_init: no random init, so building the bench model leaves torch's global RNG alone
    head = torch.nn.utils.skip_init(torch.nn.Linear, full.in_features, vocab, bias=full.bias is not None)
    with torch.no_grad():
        head.weight.copy_(full.weight[:vocab])
        if full.bias is not None:
            head.bias.copy_(full.bias[:vocab])
    model.lm_head = head
    return model


def _own_children(module: torch.nn.Module) -> torch.nn.Module:
    """A shallow copy with its own table of child modules: copy.copy alone shares `_modules`, so
    replacing a child of the copy (lm_head) would replace it in the original too (the caller's model,
    e.g. the tests' shared random:tiny)."""
    import copy

    clone = copy.copy(module)
    clone._modules = dict(module._modules)
    return clone


def counts(model, prompts: int, beams: int, prompt_len: int) -> list[Step]:
    """The counting pass: ops and syncs of every step."""
    return drive(scheduler(model, prompts, beams, prompt_len), counted)


def window(steps: list[Step], numbers: range, field: str) -> float:
    """The median of `field` over the steps of a window that had no event."""
    return statistics.median(getattr(s, field) for s in steps if s.number in numbers and not s.event)


def measure(model, prompts: int, beams: int, prompt_len: int, repeat: int = 3) -> dict:
    """Per-step figures of the workload: timed passes (per step the fastest) and a counting pass."""
    passes = [drive(scheduler(model, prompts, beams, prompt_len), timed) for _ in range(repeat)]
    timed_ = [min(steps, key=lambda s: s.cpu_ms) for steps in zip(*passes)]  # the first pass warms up too
    count = counts(model, prompts, beams, prompt_len)
    assert [s.event for s in timed_] == [s.event for s in count], "the passes took different steps"
    out = {"prompts": prompts, "beams": beams, "steps": len(timed_), "events": sum(s.event for s in timed_),
           "event_ops": statistics.median(c.ops for c in count if c.event)}
    for name, numbers in (("uniform", UNIFORM), ("ragged", RAGGED)):
        out[name] = {"ops": window(count, numbers, "ops"), "syncs": window(count, numbers, "syncs"),
                     "host_ms": window(timed_, numbers, "cpu_ms")}
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", default="16,64,256")
    ap.add_argument("--beams", default="1,3")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--layers", type=int, default=1, help="decoder layers (random:tiny's one, repeated)")
    ap.add_argument("--repeat", type=int, default=3, help="timed passes (per step, the fastest counts)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    lm = load_model(ModelSpec("random:tiny"), "cpu")
    model, prompt_len = small_vocab(lm, layers=args.layers), lm.processor.num_image_tokens + 8
    print("prompts x beams | steps (events) | equal lengths: ops, syncs, host ms per step "
          "| ragged: ops, syncs, host ms | ops per event step (median)")
    for beams in (int(b) for b in args.beams.split(",")):
        for prompts in (int(p) for p in args.prompts.split(",")):
            r = measure(model, prompts, beams, prompt_len, args.repeat)
            u, g = r["uniform"], r["ragged"]
            print(f"{prompts} x {beams} | {r['steps']} ({r['events']}) | {_fmt(u)} | {_fmt(g)} | {r['event_ops']:.0f}",
                  flush=True)


def _fmt(w: dict) -> str:
    return f"{w['ops']:.0f}, {w['syncs']:.0f}, {w['host_ms']:.2f}"


if __name__ == "__main__":
    main()
