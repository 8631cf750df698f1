"""The bench's two sides on the same synthetic images: the engine as `annotate run` drives it, and the one-image-one-prompt reference loop; what each generated."""

from __future__ import annotations

import itertools

from dataclasses import dataclass, field

import click

from annotator.bench.machine import sync

# Forced new tokens per task: roughly what the real model writes on a busy photo.
DEFAULT_TOKENS = {"caption": 20, "od": 100, "dense_region_caption": 200, "ocr": 100}
OTHER_TASK_TOKENS = 100
SIZES = [(640, 480), (480, 640), (800, 600), (512, 512)]  # synthetic image sizes, cycled


@dataclass
class Side:
    """One side's measurement."""

    images: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # this process's CPU time (all threads): comparable on a shared machine
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
    from annotator.tasks import get_task

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
        from annotator.model.sequence import prompt_words  # the engine's words for the task token

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
    from annotator.inputs.images import ImageItem, collate

    names = tuple(t.name for t in tasks)
    for start in range(0, len(images), batch_size):
        items = []
        for k, im in enumerate(images[start:start + batch_size]):
            pixels = lm.processor.image_processor(images=im, return_tensors="pt")["pixel_values"][0]
            items.append(ImageItem(f"bench{first + start + k}.png", im.width, im.height, pixels, names))
        yield collate(items)


def restarted_stream(engine, batches, every: int):
    """The engine's stream over `batches`, drained and restarted every `every` batches (0: one
    stream): what an `annotate run --ray` actor does once per call (run/raydata.py)."""
    if not every:
        yield from engine.annotate_stream(batches)
        return
    batches = iter(batches)
    while chunk := list(itertools.islice(batches, every)):
        yield from engine.annotate_stream(chunk)


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
