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
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import click

from .clikit import Aliased
from .measure import count_flops, matmul_rates, peak_memory_bytes, sync, timed

# Forced new tokens per task: roughly what the real model writes on a busy photo.
DEFAULT_TOKENS = {"caption": 20, "od": 100, "dense_region_caption": 200, "ocr": 100}
OTHER_TASK_TOKENS = 100
SIZES = [(640, 480), (480, 640), (800, 600), (512, 512)]  # synthetic image sizes, cycled


@dataclass
class Side:
    """One side's measurement."""

    images: int = 0
    seconds: float = 0.0
    tokens: dict = field(default_factory=dict)  # task -> generated tokens over all images (per output sequence)
    generate_calls: int = 0
    rows_error: int = 0  # parse failures on random output: the work was still done

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def synthetic_images(n: int, seed: int = 0):
    """Deterministic noisy photos-sized RGB images with a few flat rectangles."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        for _ in range(3):
            x0, y0 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
            arr[y0:y0 + h // 3, x0:x0 + w // 3] = rng.integers(0, 256, 3, dtype=np.uint8)
        out.append(Image.fromarray(arr))
    return out


def parse_tokens(spec: str | None, tasks) -> dict[str, int]:
    """`od=50,caption=10` -> {task name: n} for every task, defaults filled in."""
    from .tasks import get_task

    tokens = {t.name: DEFAULT_TOKENS.get(t.name, OTHER_TASK_TOKENS) for t in tasks}
    for part in (spec or "").split(","):
        if not part.strip():
            continue
        name, sep, value = part.partition("=")
        if not sep or not value.strip().isdigit() or int(value) < 1:
            raise click.BadParameter(f"expected task=n with n >= 1, got {part!r}", param_hint="--tokens")
        task = get_task(name)
        if task.name not in tokens:
            raise click.BadParameter(f"{task.name} is not in --tasks", param_hint="--tokens")
        tokens[task.name] = int(value)
    return tokens


class GenerateRecorder:
    """Wraps model.generate on the instance: counts calls and generated tokens per task.
    The task is recognised from the prompt words, which are the same on both sides."""

    def __init__(self, lm, tasks):
        from .sequence import prompt_words  # the engine's words for the task token

        self.lm = lm
        self.by_words = {prompt_words(lm.processor, t.token).strip(): t.name for t in tasks}
        self.side: Side | None = None

    def __enter__(self):
        model, original = self.lm.model, self.lm.model.generate

        def generate(*args, **kwargs):
            out = original(*args, **kwargs)
            if self.side is not None:
                seqs = out if hasattr(out, "shape") else out.sequences  # [rows, 1 + T]
                tok = self.lm.processor.tokenizer
                for prompt, seq in zip(kwargs["input_ids"], seqs):  # tasks may share a call: count per row
                    task = self.by_words.get(tok.decode(prompt, skip_special_tokens=True).strip(), "?")
                    # rows that stopped early are padded to the longest: padding is not output
                    n = int((seq[1:] != tok.pad_token_id).sum())
                    self.side.tokens[task] = self.side.tokens.get(task, 0) + n
                self.side.generate_calls += 1
            return out

        model.generate = generate
        return self

    def __exit__(self, *exc):
        del self.lm.model.generate



def engine_batches(lm, tasks, images, batch_size: int, first: int = 0):
    """What `annotate run`'s DataLoader hands the engine, minus decoding files: preprocessed
    batches, made lazily (in the consuming thread, so the engine's time counts them).
    Image keys are bench<first + i>.png (they select the image's lengths)."""
    from .images import ImageItem, collate

    names = tuple(t.name for t in tasks)
    for start in range(0, len(images), batch_size):
        items = []
        for k, im in enumerate(images[start:start + batch_size]):
            pixels = lm.processor.image_processor(images=im, return_tensors="pt")["pixel_values"][0]
            items.append(ImageItem(f"bench{first + start + k}.png", im.width, im.height, pixels, names))
        yield collate(items)


def count_rows(side: Side, rows) -> None:
    side.rows_error += sum(r.status != "ok" for r in rows)
    side.images += len({r.image for r in rows})


def run_engine(engine, images, batch_size: int, side: Side, first: int = 0) -> None:
    """What `annotate run` does, minus the DataLoader and Parquet: one engine stream over the
    batches (preprocess, vision once, decoding shared across tasks and batches, parse)."""
    for rows in engine.annotate_stream(engine_batches(engine.lm, engine.tasks, images, batch_size, first)):
        count_rows(side, rows)
    sync(engine.lm.device)


def run_reference(lm, tasks, lengths: list[dict[str, int]], num_beams: int, images, side: Side) -> None:
    """The loop of the published examples, one image and one prompt at a time.
    lengths[i][task]: the exact answer length for images[i]."""
    proc, model = lm.processor, lm.model
    for im, exact in zip(images, lengths):
        for task in tasks:
            inputs = proc(text=task.token, images=im, return_tensors="pt").to(lm.device)
            n = exact[task.name]
            ids = model.generate(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"].to(lm.dtype),
                                 max_new_tokens=n, min_new_tokens=n, num_beams=num_beams, do_sample=False)
            text = proc.batch_decode(ids, skip_special_tokens=False)[0]
            try:
                proc.post_process_generation(text, task=task.token, image_size=(im.width, im.height))
            except Exception:  # noqa: BLE001 - random output may not parse; the work was done
                side.rows_error += 1
        side.images += 1
    sync(lm.device)




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
          lengths: str = "fixed", scheduler: bool = True, echo=print) -> dict:
    """Run the benchmark; prints a human report through `echo`, returns every figure."""
    import torch

    from .config import ConfigError, GenerationSettings, ModelSpec, TaskInputs
    from .engine import Engine
    from .lengths import REALISTIC, ForcedLengths, draw_lengths
    from .scheduler import DecodeStats
    from .model import load_model
    from .precision import auto_dtype
    from .speed import stock_linear
    from .tasks import Input, parse_task_list

    if threads:
        torch.set_num_threads(threads)
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
    by_key = {f"bench{i}.png": row for i, row in enumerate(exact)}  # run_engine's image keys
    generation = GenerationSettings(num_beams=num_beams, max_new_tokens=max(max(r.values()) for r in exact),
                                    scores=scores)
    dev = torch.device(device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))

    lm = load_model(ModelSpec(model, dtype=dtype, attention=attention), dev)
    pictures = synthetic_images(images, seed)
    rates = matmul_rates(lm.dtype, dev, matmul_size)
    fp32 = matmul_rates(torch.float32, dev, matmul_size) if lm.dtype != torch.float32 else rates
    why = f" (auto: {auto_dtype(dev).reason})" if dtype == "auto" else ""
    echo(f"model {model}  dtype {str(lm.dtype).replace('torch.', '')}{why}  attention {lm.attention}  device {dev}  "
         f"threads {torch.get_num_threads()}  kernels {kernels}")
    echo(f"scores {'on' if scores else 'off'}  tasks {','.join(t.name for t in tasks)}  beams {num_beams}  "
         f"images {images}  batch {batch_size}  lengths {lengths}: " + (
             " ".join(f"{k}={v}" for k, v in tokens.items()) if lengths == "fixed" else
             " ".join(f"{t.name}={REALISTIC[t.name].describe() if t.name in REALISTIC else 'other'}" for t in tasks)
             + f" (seed {seed}, mean {sum(map(sum, (r.values() for r in exact))) / images:.0f} tokens per image)"))
    echo("matmul ceiling: " + ceiling_text(lm.dtype, rates, fp32))

    runner = Engine(lm, tasks, TaskInputs(), generation, max_prompts=batch_size * len(tasks))  # patches Linear on CPU
    runner.forced_lengths = ForcedLengths(lambda key, task: by_key[key][task])
    runner.use_scheduler = runner.use_scheduler and scheduler  # --no-scheduler: the generate path, for A/B
    engine_kernels = (lambda: stock_linear(lm.model)) if kernels == "stock" else contextlib.nullcontext
    engine, ref = Side(), Side()
    ref_flops = None
    with GenerateRecorder(lm, tasks) as rec:
        # FLOPs on one image; these runs also warm up both sides.
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
        # One engine stream over all images (batches join each other's decoding), timed inside the
        # stream; the reference catches up after each batch the engine returns, so on a shared
        # machine both sides see the same load.
        stream = runner.annotate_stream(engine_batches(lm, tasks, pictures, batch_size))
        while True:
            rec.side = engine
            with engine_kernels():
                t = time.perf_counter()
                rows = next(stream, None)
                sync(lm.device)
                engine.seconds += time.perf_counter() - t
            if rows is None:
                break
            count_rows(engine, rows)
            while baseline and ref.images < engine.images:
                rec.side = ref
                start = ref.images
                with stock_linear(lm.model):  # the published loop runs torch's own kernels
                    ref.seconds += timed(lambda: run_reference(lm, tasks, exact[start:start + batch_size], num_beams,
                                                               pictures[start:start + batch_size], ref))
            echo(f"  {engine.images}/{images} images: engine {engine.seconds:.1f} s"
                 + (f", reference {ref.seconds:.1f} s ({ref.images} images)" if baseline else ""))
        rec.side = None
    decode = runner.decode_stats
    engine.tokens, engine.generate_calls = dict(decode.tokens), decode.calls
    peak = peak_memory_bytes(lm.device)  # the engine's batches set the peak: the reference runs batch 1
    # Again at the end, keeping the best: on a shared machine a busy moment must not lower the ceiling.
    rates = best_rates(rates, matmul_rates(lm.dtype, dev, matmul_size))
    fp32 = rates if lm.dtype == torch.float32 else best_rates(fp32, matmul_rates(torch.float32, dev, matmul_size))
    ceiling_rate = max(rates.values())
    echo("matmul ceiling (best of start and end): " + ceiling_text(lm.dtype, rates, fp32))
    engine_gflops = engine_flops * engine.images_per_s / 1e9
    ceiling = engine_gflops / ceiling_rate
    echo(f"engine:    {engine.images} images in {engine.seconds:.1f} s = {engine.images_per_s:.3f} images/s  "
         f"{engine_gflops:.0f} GFLOP/s = {ceiling:.0%} of the matmul ceiling  "
         f"peak {'GPU memory' if lm.device.type == 'cuda' else 'RSS'} {peak / 2**30:.2f} GiB  "
         f"tokens {sum(engine.tokens.values())}")
    echo(f"engine decoding: {'scheduler (continuous batching)' if runner.use_scheduler else 'generate'}  "
         f"{decode.steps} steps  {decode.row_steps / max(decode.steps, 1):.1f} rows in flight per step  "
         f"slot efficiency {decode.efficiency:.0%} (useful tokens / (steps x rows in flight))  "
         f"occupancy {decode.occupancy:.0%} of {runner.max_prompts} slots"
         + (f" (prompts; x {num_beams} beam rows each)" if num_beams > 1 else ""))
    if baseline:
        echo(f"reference: {ref.images} images in {ref.seconds:.1f} s = {ref.images_per_s:.3f} images/s  "
             f"{ref_flops * ref.images_per_s / 1e9:.0f} GFLOP/s  tokens {sum(ref.tokens.values())}")
    tokens_equal = not baseline or engine.tokens == ref.tokens
    if not tokens_equal:
        echo(f"WARNING: generated tokens differ (engine {engine.tokens}, reference {ref.tokens}): "
             "the speedup compares different work")
    speedup = engine.images_per_s / ref.images_per_s if baseline and ref.images_per_s > 0 else None
    result = {
        "model": model, "dtype": str(lm.dtype).replace("torch.", ""), "attention": lm.attention, "device": str(dev),
        "threads": torch.get_num_threads(), "kernels": kernels, "scores": scores, "tasks": [t.name for t in tasks],
        "num_beams": num_beams, "images": images, "batch_size": batch_size, "lengths": lengths,
        "forced_tokens": tokens if lengths == "fixed" else None, "seed": seed,
        "decode": dict(asdict(decode), efficiency=decode.efficiency, occupancy=decode.occupancy,
                       scheduler=runner.use_scheduler, slots=runner.max_prompts),
        "matmul_gflops": rates, "ceiling_gflops": ceiling_rate, "fp32_matmul_gflops": fp32,
        "fp32_ceiling_gflops": max(fp32.values()), "dtype_reason": why.removeprefix(" (auto: ").removesuffix(")") or None,
        "engine": dict(asdict(engine), images_per_s=engine.images_per_s, gflops=engine_gflops,
                       flops_per_image=engine_flops, peak_memory_bytes=peak),
        "baseline": None if not baseline else dict(asdict(ref), images_per_s=ref.images_per_s,
                                                   flops_per_image=ref_flops,
                                                   gflops=ref_flops * ref.images_per_s / 1e9),
        "tokens_equal": tokens_equal, "speedup": speedup, "ceiling": ceiling,
        "torch": torch.__version__,
    }
    echo(f"speedup={'n/a' if speedup is None else f'{speedup:.2f}'} ceiling={ceiling:.3f}")
    return result


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
                   "realistic per-task distributions (annotator/lengths.py; --seed).")
@click.option("--scheduler/--no-scheduler", default=True, show_default=True,
              help="Engine decoding (greedy or beams) through the continuous-batching scheduler "
                   "(off: one generate per chunk).")
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
def bench(model, tasks_spec, images, batch_size, num_beams, baseline, tokens_spec, lengths, scheduler, dtype, attention, device,
              kernels, threads, matmul_size, seed, no_scores, json_path) -> None:
    """Images/s of the engine vs the one-image-one-prompt loop, FLOPs, and the matmul ceiling.

    Last line: speedup=<engine/reference images/s or n/a> ceiling=<achieved / matmul GFLOP/s>."""
    from .config import ConfigError
    from .model import ModelLoadError
    from .tasks import UnknownTask

    try:
        result = run_bench(model, tasks_spec, images, batch_size, num_beams, baseline, tokens_spec, dtype,
                           attention, device, kernels, seed, threads, matmul_size, scores=not no_scores,
                           lengths=lengths, scheduler=scheduler, echo=click.echo)
    except (ConfigError, UnknownTask) as exc:
        raise click.UsageError(str(exc)) from None
    except ModelLoadError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(3)
    if json_path is not None:
        json_path.write_text(json.dumps(result, indent=2) + "\n")
