"""`annotate bench`: the engine against the loop people write, on the same synthetic images, in
one process, reported as ratios (absolute times drift on shared machines; ratios much less).

Both sides generate exactly the same number of tokens per answer (min = max new tokens), so they
do the same decoding work: `--lengths fixed` forces one length per task (`--tokens`), `realistic`
draws a length per (image, task) from lengths.py's distributions, with `--seed`. The engine's
slot efficiency (useful tokens / (decode steps x rows in flight)) shows what uneven lengths cost; the engine saves work only where it is truly redundant (vision once
per image, batched prompts) and runs it faster (batching, oneDNN Linear kernels on CPU).

The reference loop, as in the published examples, per image and per task:
    inputs = processor(text=task, images=image) -> model.generate(batch of 1)
    -> processor.batch_decode -> processor.post_process_generation
"""

from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import click

from annotator.bench.machine import clocked, count_flops, matmul_rates, peak_memory_bytes
from annotator.bench.sides import (DEFAULT_TOKENS, OTHER_TASK_TOKENS, GenerateRecorder, Side, count_rows,
                                   engine_batches, parse_tokens, restarted_stream, run_engine, run_reference,
                                   synthetic_images)
from annotator.clikit import Aliased


def best_rates(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    """Per kernel, the better of two measurements: on a shared machine a busy moment must not lower the ceiling."""
    return {k: max(v, b.get(k, 0.0)) for k, v in a.items()}


def ceiling_text(dtype, rates: dict[str, float], fp32: dict[str, float]) -> str:
    """The ceiling of the dtype that ran, and float32's beside it (what half precision could gain here)."""
    name = str(dtype).replace("torch.", "")
    text = f"{name} " + "  ".join(f"{k} {v:.0f}" for k, v in rates.items()) + " GFLOP/s"
    if fp32 is not rates:
        text += ("  |  float32 " + "  ".join(f"{k} {v:.0f}" for k, v in fp32.items())
                 + f" GFLOP/s  ({max(rates.values()) / max(fp32.values()):.1f}x)")
    return text


def run_bench(model: str = "random:base", tasks_spec: str = "caption,od,dense_region_caption,ocr", images: int = 8,
              batch_size: int = 8, num_beams: int = 3, baseline: bool = False, tokens_spec: str | None = None,
              dtype: str = "auto", attention: str = "auto", device: str = "auto", kernels: str = "onednn",
              seed: int = 0, threads: int | None = None, matmul_size: int | None = None, scores: bool = True,
              lengths: str = "fixed", scheduler: bool = True, echo=print, overrides: dict | None = None,
              stream_batches: int = 0) -> dict:
    """Run the benchmark; prints a human report through `echo`, returns every figure."""
    import torch

    from annotator.config import ModelSpec, TaskInputs
    from annotator.decode.engine import Engine
    from annotator.decode.forced_lengths import ForcedLengths
    from annotator.model.load import load_model
    from annotator.model.precision import auto_dtype

    if threads:
        torch.set_num_threads(threads)
    plan = _plan(tasks_spec, images, batch_size, num_beams, tokens_spec, device, seed, scores, lengths, overrides,
                 stream_batches)
    lm = load_model(ModelSpec(model, dtype=dtype, attention=attention), plan.dev)
    pictures = synthetic_images(images, seed)
    rates = matmul_rates(lm.dtype, plan.dev, matmul_size)
    fp32 = matmul_rates(torch.float32, plan.dev, matmul_size) if lm.dtype != torch.float32 else rates
    why = auto_dtype(plan.dev).reason if dtype == "auto" else None
    echo(f"model {model}  dtype {str(lm.dtype).replace('torch.', '')}{f' (auto: {why})' if why else ''}  "
         f"attention {lm.attention}  device {plan.dev}  threads {torch.get_num_threads()}  kernels {kernels}")
    echo(plan.describe(num_beams, images, batch_size, scores))
    echo("matmul ceiling: " + ceiling_text(lm.dtype, rates, fp32))

    runner = Engine(lm, plan.tasks, TaskInputs(), plan.generation, max_prompts=batch_size * len(plan.tasks))  # patches Linear on CPU
    by_key = {f"bench{i}.png": row for i, row in enumerate(plan.exact)}  # run_engine's image keys
    runner.forced_lengths = ForcedLengths(lambda key, task: by_key[key][task])
    runner.use_scheduler = runner.use_scheduler and scheduler  # --no-scheduler: the generate path, for A/B
    sides = _measure(runner, plan, pictures, batch_size, num_beams, baseline, kernels, echo)
    # Again at the end, keeping the best: on a shared machine a busy moment must not lower the ceiling.
    rates = best_rates(rates, matmul_rates(lm.dtype, plan.dev, matmul_size))
    fp32 = rates if lm.dtype == torch.float32 else best_rates(fp32, matmul_rates(torch.float32, plan.dev, matmul_size))
    echo("matmul ceiling (best of start and end): " + ceiling_text(lm.dtype, rates, fp32))
    result = _report(runner, plan, sides, rates, baseline, echo)
    result.update(model=model, kernels=kernels, images=images, batch_size=batch_size, seed=seed,
                  fp32_matmul_gflops=fp32, fp32_ceiling_gflops=max(fp32.values()), dtype_reason=why)
    return {k: result[k] for k in RESULT_ORDER}


@dataclass
class BenchPlan:
    """What both sides run: the tasks, the exact answer lengths per image, the generation settings."""

    tasks: list
    tokens: dict  # task -> forced tokens (fixed lengths)
    lengths: str
    exact: list  # [image][task] -> new tokens
    generation: object
    dev: object
    seed: int
    stream_batches: int = 0  # restart the engine's stream every N batches (0: one stream), as a --ray actor does

    def describe(self, num_beams: int, images: int, batch_size: int, scores: bool) -> str:
        from annotator.bench.lengths import REALISTIC

        tasks = self.tasks
        lengths = " ".join(f"{k}={v}" for k, v in self.tokens.items()) if self.lengths == "fixed" else (
            " ".join(f"{t.name}={REALISTIC[t.name].describe() if t.name in REALISTIC else 'other'}" for t in tasks)
            + f" (seed {self.seed}, mean {sum(map(sum, (r.values() for r in self.exact))) / images:.0f} tokens per image)")
        return (f"scores {'on' if scores else 'off'}  tasks {','.join(t.name for t in tasks)}  beams {num_beams}  "
                f"images {images}  batch {batch_size}  lengths {self.lengths}: " + lengths)


def _plan(tasks_spec, images, batch_size, num_beams, tokens_spec, device, seed, scores, lengths, overrides=None,
          stream_batches: int = 0) -> BenchPlan:
    import torch

    from annotator.config import ConfigError, GenerationSettings
    from annotator.bench.lengths import draw_lengths
    from annotator.tasks import Input, parse_task_list

    tasks = parse_task_list(tasks_spec)
    for t in tasks:
        if t.input is not Input.NONE:
            raise ConfigError(f"bench runs tasks that need no input; {t.name} needs {t.input.value}")
    if images < 1 or batch_size < 1:
        raise ConfigError("--images and --batch-size must be >= 1")
    tokens = parse_tokens(tokens_spec, tasks)
    if lengths not in ("fixed", "realistic"):
        raise ConfigError(f"--lengths must be fixed or realistic, not {lengths!r}")
    exact = draw_lengths(lengths, [t.name for t in tasks], images, tokens, seed)  # [image][task] -> new tokens
    generation = GenerationSettings(num_beams=num_beams, max_new_tokens=max(max(r.values()) for r in exact),
                                    scores=scores, **(overrides or {}))  # overrides reach both sides (the model's config)
    if stream_batches < 0:
        raise ConfigError("--stream-batches must be >= 0")
    dev = torch.device(device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    return BenchPlan(tasks, tokens, lengths, exact, generation, dev, seed, stream_batches)


@dataclass
class Sides:
    engine: Side
    ref: Side
    engine_flops: int
    ref_flops: int | None
    peak: int


def _measure(runner, plan: BenchPlan, pictures, batch_size: int, num_beams: int, baseline: bool, kernels: str,
             echo) -> Sides:
    """FLOPs on one image (which also warms both sides up), then one engine stream over all images,
    the reference catching up after each batch the engine returns (both see the same load)."""
    import torch

    from annotator.decode.scheduler import DecodeStats
    from annotator.model.cpu_kernels import stock_linear

    lm, tasks, exact = runner.lm, plan.tasks, plan.exact
    engine_kernels = (lambda: stock_linear(lm.model)) if kernels == "stock" else contextlib.nullcontext
    engine, ref = Side(), Side()
    ref_flops = None
    with GenerateRecorder(lm, tasks) as rec:
        with engine_kernels():
            engine_flops = count_flops(lambda: run_engine(runner, pictures[:1], 1, Side()))
        echo(f"engine FLOPs per image: {engine_flops / 1e9:.1f} GFLOP")
        if baseline:
            with stock_linear(lm.model):
                ref_flops = count_flops(lambda: run_reference(lm, tasks, exact[:1], num_beams, pictures[:1], Side()))
            echo(f"reference FLOPs per image: {ref_flops / 1e9:.1f} GFLOP")
        if lm.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(lm.device)
        runner.decode_stats = DecodeStats()  # the engine counts its own decoding work (scheduler or generate)
        stream = restarted_stream(runner, engine_batches(lm, tasks, pictures, batch_size), plan.stream_batches)
        while True:
            rec.side = engine
            with engine_kernels(), clocked(engine, lm.device):
                rows = next(stream, None)
            if rows is None:
                break
            count_rows(engine, rows)
            while baseline and ref.images < engine.images:
                rec.side = ref
                start = ref.images
                with stock_linear(lm.model), clocked(ref, lm.device):  # the published loop runs torch's own kernels
                    run_reference(lm, tasks, exact[start:start + batch_size], num_beams,
                                  pictures[start:start + batch_size], ref)
            echo(f"  {engine.images}/{len(pictures)} images: engine {engine.seconds:.1f} s"
                 + (f", reference {ref.seconds:.1f} s ({ref.images} images)" if baseline else ""))
        rec.side = None
    engine.tokens, engine.generate_calls = dict(runner.decode_stats.tokens), runner.decode_stats.calls
    peak = peak_memory_bytes(lm.device)  # the engine's batches set the peak: the reference runs batch 1
    return Sides(engine, ref, engine_flops, ref_flops, peak)


RESULT_ORDER = ("model", "dtype", "attention", "device", "threads", "kernels", "scores", "tasks", "num_beams", "images",
                "batch_size", "lengths", "forced_tokens", "seed", "decode", "matmul_gflops", "ceiling_gflops",
                "fp32_matmul_gflops", "fp32_ceiling_gflops", "dtype_reason", "engine",
                "baseline", "tokens_equal", "speedup", "cpu_speedup", "ceiling", "torch")


def _report(runner, plan: BenchPlan, sides: Sides, rates: dict, baseline: bool, echo) -> dict:
    """The closing lines, and every figure (run_bench adds its arguments)."""
    import torch

    lm, decode, engine, ref = runner.lm, runner.decode_stats, sides.engine, sides.ref
    num_beams = plan.generation.num_beams
    ceiling_rate = max(rates.values())
    engine_gflops = sides.engine_flops * engine.images_per_s / 1e9
    ceiling = engine_gflops / ceiling_rate
    echo(f"engine:    {engine.images} images in {engine.seconds:.1f} s = {engine.images_per_s:.3f} images/s  "
         f"{engine_gflops:.0f} GFLOP/s = {ceiling:.0%} of the matmul ceiling  "
         f"peak {'GPU memory' if lm.device.type == 'cuda' else 'RSS'} {sides.peak / 2**30:.2f} GiB  "
         f"tokens {sum(engine.tokens.values())}")
    echo(f"engine decoding: {runner.decoding}"
         + (f" (stream restarted every {plan.stream_batches} batches)" if plan.stream_batches else "") + "  "
         f"{decode.steps} steps  {decode.row_steps / max(decode.steps, 1):.1f} rows in flight per step  "
         f"slot efficiency {decode.efficiency:.0%} (useful tokens / (steps x rows in flight))  "
         f"occupancy {decode.occupancy:.0%} of {runner.max_prompts} slots"
         + (f" (prompts; x {num_beams} beam rows each)" if num_beams > 1 else ""))
    ref_flops = sides.ref_flops
    if baseline:
        echo(f"reference: {ref.images} images in {ref.seconds:.1f} s = {ref.images_per_s:.3f} images/s  "
             f"{ref_flops * ref.images_per_s / 1e9:.0f} GFLOP/s  tokens {sum(ref.tokens.values())}")
    tokens_equal = not baseline or engine.tokens == ref.tokens
    if not tokens_equal:
        echo(f"WARNING: generated tokens differ (engine {engine.tokens}, reference {ref.tokens}): "
             "the speedup compares different work")
    speedup = engine.images_per_s / ref.images_per_s if baseline and ref.images_per_s > 0 else None
    cpu_speedup = ref.cpu_seconds / engine.cpu_seconds if baseline and engine.cpu_seconds > 0 else None
    if cpu_speedup is not None:  # on a shared machine wall time moves with the load; CPU time much less
        echo(f"CPU time: engine {engine.cpu_seconds:.1f} s, reference {ref.cpu_seconds:.1f} s "
             f"-> {cpu_speedup:.2f}x (process CPU time, all threads)")
    echo(f"speedup={'n/a' if speedup is None else f'{speedup:.2f}'} ceiling={ceiling:.3f}")
    return {
        "dtype": str(lm.dtype).replace("torch.", ""), "attention": lm.attention, "device": str(plan.dev),
        "threads": torch.get_num_threads(), "scores": plan.generation.scores, "tasks": [t.name for t in plan.tasks],
        "num_beams": num_beams, "lengths": plan.lengths, "forced_tokens": plan.tokens if plan.lengths == "fixed" else None,
        "decode": dict(asdict(decode), efficiency=decode.efficiency, occupancy=decode.occupancy,
                       scheduler=runner.use_scheduler, decoding=runner.decoding, slots=runner.max_prompts,
                       stream_batches=plan.stream_batches),
        "matmul_gflops": rates, "ceiling_gflops": ceiling_rate,
        "engine": dict(asdict(engine), images_per_s=engine.images_per_s, gflops=engine_gflops,
                       flops_per_image=sides.engine_flops, peak_memory_bytes=sides.peak),
        "baseline": None if not baseline else dict(asdict(ref), images_per_s=ref.images_per_s, flops_per_image=ref_flops,
                                                   gflops=ref_flops * ref.images_per_s / 1e9),
        "tokens_equal": tokens_equal, "speedup": speedup, "cpu_speedup": cpu_speedup, "ceiling": ceiling, "torch": torch.__version__,
    }


@click.command("bench")
@click.option("--model", default="random:base", show_default=True, help="Hub id, local dir, or random:tiny|base|large.")
@click.option("--tasks", "tasks_spec", default="caption,od,dense_region_caption,ocr", show_default=True,
              help="Tasks that need no input (no region/text tasks).")
@click.option("--images", default=8, show_default=True, help="Synthetic images (the same on both sides).")
@click.option("--batch-size", default=8, show_default=True, help="Engine images per batch (and prompts per generate).")
@click.option("--num-beams", default=3, show_default=True, help="Beam width on both sides (1 = greedy).")
@click.option("--baseline", is_flag=True, help="Also time the one-image-one-prompt reference loop (slow).")
@click.option("--tokens", "tokens_spec", default=None,
              help="Forced new tokens per task, e.g. od=50,caption=10 "
                   f"(default {','.join(f'{k}={v}' for k, v in DEFAULT_TOKENS.items())}, others {OTHER_TASK_TOKENS}).")
@click.option("--lengths", type=click.Choice(["fixed", "realistic"]), default="fixed", show_default=True,
              help="Answer lengths: fixed per task (--tokens), or drawn per image and task from "
                   "realistic per-task distributions (annotator/bench/lengths.py; --seed).")
@click.option("--scheduler/--no-scheduler", default=True, show_default=True,
              help="Engine decoding (greedy or beams) through the continuous-batching scheduler "
                   "(off: one generate per chunk).")
@click.option("--no-repeat-ngram-size", type=int, default=None, help="Override the model's (as `run`), on both sides.")
@click.option("--repetition-penalty", type=float, default=None, help="Override the model's (as `run`), on both sides.")
@click.option("--stream-batches", default=0, show_default=True,
              help="Restart the engine's stream every N batches (0: one stream), as a --ray actor does per call.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]), default="auto", show_default=True)
@click.option("--attention", type=click.Choice(["auto", "sdpa", "eager", "flash_attention_2"]), default="auto",
              show_default=True)
@click.option("--devices", "--device", "device", cls=Aliased, default="auto", show_default=True, help="auto, cpu, cuda, cuda:1")
@click.option("--kernels", type=click.Choice(["onednn", "stock"]), default="onednn", show_default=True,
              help="Engine Linear kernels on CPU: stock measures the engine without the oneDNN patch.")
@click.option("--threads", type=int, default=None, help="torch threads (default: torch's, one per core).")
@click.option("--matmul-size", type=int, default=None,
              help="n of the n x n x n matmul that sets the ceiling (default 3072 on CPU, 8192 on GPU).")
@click.option("--seed", default=0, show_default=True, help="Synthetic image and realistic-length seed.")
@click.option("--no-scores", is_flag=True, help="Time the engine without its confidence-score pass (as `run --no-scores`).")
@click.option("--json", "json_path", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Write every figure to this JSON file.")
def bench(model, tasks_spec, images, batch_size, num_beams, baseline, tokens_spec, lengths, scheduler,
          no_repeat_ngram_size, repetition_penalty, stream_batches, dtype, attention, device,
          kernels, threads, matmul_size, seed, no_scores, json_path) -> None:
    """Images/s of the engine vs the one-image-one-prompt loop, FLOPs, and the matmul ceiling.

    Last line: speedup=<engine/reference images/s or n/a> ceiling=<achieved / matmul GFLOP/s>."""
    from annotator.config import ConfigError
    from annotator.model import ModelLoadError
    from annotator.tasks import UnknownTask

    try:
        result = run_bench(model, tasks_spec, images, batch_size, num_beams, baseline, tokens_spec, dtype,
                           attention, device, kernels, seed, threads, matmul_size, scores=not no_scores,
                           lengths=lengths, scheduler=scheduler, echo=click.echo, stream_batches=stream_batches,
                           overrides={k: v for k, v in (("no_repeat_ngram_size", no_repeat_ngram_size),
                                                        ("repetition_penalty", repetition_penalty)) if v is not None})
    except (ConfigError, UnknownTask) as exc:
        raise click.UsageError(str(exc)) from None
    except ModelLoadError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(3)
    if json_path is not None:
        json_path.write_text(json.dumps(result, indent=2) + "\n")
