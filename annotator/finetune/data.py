"""Training data: florence JSONL pairs or DocVQA Parquet -> Examples -> tokenised Samples ->
right-padded TrainBatches. Prompts are built and padded by annotator/sequence.py, the same code
`annotate run` feeds the model with.

Shapes: B pairs per batch, L prompt tokens (N image tokens + words), T target tokens."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageOps

from annotator.config import AUGMENT_CHOICES
from annotator.model.sequence import (DOCVQA_TOKEN, LOC_TOKENS, PromptCache, mirror_boxes, pad_right,
                                      prompt_ids, prompt_words)
from annotator.tasks import Labels, Task, UnknownTask, get_task

log = logging.getLogger(__name__)

IGNORE = -100  # label value that cross_entropy skips


class FinetuneError(RuntimeError):
    """Bad data or paths: the CLI prints it as a one-line error."""


# --------------------------------------------------------------------------- data

@dataclass(frozen=True)
class Example:
    key: str  # the image's identity: pairs of one image stay on one side of the validation split
    prompt: str  # "<OD>", "<DocVQA>What is the text in the image?"
    target: str  # "car<loc_100><loc_200><loc_300><loc_400>", answers[0]
    image: Path | None = None
    image_bytes: bytes | None = None  # docvqa rows: one bytes object per distinct image
    answers: tuple[str, ...] = ()  # docvqa: every accepted answer (the metric takes the best match)


@dataclass
class TrainData:
    kind: str  # "florence" | "docvqa"
    train: list[Example]
    val: list[Example]
    source: str  # what was read, for the model card
    val_from: str  # "split file" | "--val-fraction" | "none"

    def describe(self) -> dict:
        return {"format": self.kind, "source": self.source, "train_pairs": len(self.train),
                "train_images": len({e.key for e in self.train}), "val_pairs": len(self.val),
                "val_images": len({e.key for e in self.val}), "validation": self.val_from}


def load_data(path: Path, val_fraction: float = 0.1) -> TrainData:
    path = Path(path)
    if not path.exists():
        raise FinetuneError(f"{path}: no such file or folder")
    train_files, val_files, kind = _data_files(path)
    read = _read_jsonl if kind == "florence" else _read_parquet
    images: dict[str, bytes] = {}  # docvqa: rows repeat their image's bytes; keep one copy
    train = [e for f in train_files for e in read(f, images)]
    val = [e for f in val_files for e in read(f, images)]
    if not train:
        raise FinetuneError(f"{path}: no training pairs")
    val_from = "split file" if val else "none"
    if not val and val_fraction > 0:
        is_val = {k: _in_val(k, val_fraction) for k in {e.key for e in train}}
        if 0 < sum(is_val.values()) < len(is_val):
            val = [e for e in train if is_val[e.key]]
            train = [e for e in train if not is_val[e.key]]
            val_from = "--val-fraction"
    return TrainData(kind, train, val, ", ".join(str(f) for f in train_files + val_files), val_from)


def _in_val(key: str, fraction: float) -> bool:
    """Stable by image: the same key lands on the same side in every run and every process."""
    return int(hashlib.sha1(key.encode("utf-8", "surrogateescape")).hexdigest()[:8], 16) / 2**32 < fraction


def _data_files(path: Path) -> tuple[list[Path], list[Path], str]:
    if path.is_file():
        if path.suffix == ".jsonl":
            return [path], [], "florence"
        if path.suffix == ".parquet":
            return [path], [], "docvqa"
        raise FinetuneError(f"{path}: expected a .jsonl (florence export) or .parquet (docvqa export) file")
    if (path / "train" / "annotations.jsonl").is_file():
        val = path / "valid" / "annotations.jsonl"
        return [path / "train" / "annotations.jsonl"], [val] if val.is_file() else [], "florence"
    if (path / "annotations.jsonl").is_file():
        return [path / "annotations.jsonl"], [], "florence"
    folder = path / "data" if (path / "data").is_dir() else path
    parquet = sorted(folder.glob("*.parquet"))
    if parquet:
        val = [p for p in parquet if p.name.startswith(("validation", "valid", "val-", "val_"))]
        train = [p for p in parquet if p.name.startswith("train")] or [p for p in parquet if p not in val]
        return train, val, "docvqa"
    raise FinetuneError(f"{path}: found neither train/annotations.jsonl (annotate export --format florence) "
                        "nor data/*.parquet (annotate export --format docvqa)")


def _read_jsonl(file: Path, _images: dict) -> list[Example]:
    out = []
    with open(file, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                image, prefix, suffix = rec["image"], rec["prefix"], rec["suffix"]
            except (ValueError, KeyError, TypeError) as exc:
                raise FinetuneError(f"{file}:{n}: not a florence pair {{image, prefix, suffix}}: {exc}") from None
            if not all(isinstance(v, str) for v in (image, prefix, suffix)) or not suffix:
                raise FinetuneError(f"{file}:{n}: image, prefix and suffix must be strings, suffix not empty")
            img = file.parent / image
            out.append(Example(key=str(img), prompt=prefix, target=suffix, image=img))
    missing = sorted({str(e.image) for e in out if not e.image.is_file()})
    if missing:
        raise FinetuneError(f"{file}: {len(missing)} image files not found, e.g. {missing[0]}")
    return out


def _read_parquet(file: Path, images: dict) -> list[Example]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(file, columns=["question", "answers", "image"])
    except Exception as exc:  # noqa: BLE001 - missing columns, not Parquet, ...
        raise FinetuneError(f"{file}: not a DocVQA table (question, answers, image): {exc}") from None
    out, skipped = [], 0
    for q, answers, image in zip(*(table.column(c).to_pylist() for c in ("question", "answers", "image"))):
        answers = [a for a in (answers or []) if a and a.strip()]
        if not q or not answers or not image:
            skipped += 1
            continue
        data, name = image.get("bytes"), image.get("path")
        if data:
            key = hashlib.sha1(data).hexdigest()
            data = images.setdefault(key, data)
            out.append(Example(key, DOCVQA_TOKEN + q, answers[0], image_bytes=data, answers=tuple(answers)))
        elif name:
            p = Path(name) if Path(name).is_absolute() else file.parent / name
            out.append(Example(str(p), DOCVQA_TOKEN + q, answers[0], image=p, answers=tuple(answers)))
        else:
            skipped += 1
    if skipped:
        log.warning("%s: skipped %d rows without a question, an answer or an image", file, skipped)
    return out


# --------------------------------------------------------------------------- tokens and batches

# The prompt side is annotator/sequence.py's, under the names examples/ and tests already use.
prompt_text = prompt_words  # the words the encoder reads (a DocVQA prompt stays literal)
encode_prompt = prompt_ids  # `<image>`*N `<s>` words `</s>`: token for token what `annotate run` feeds the model


def encode_target(processor, target: str, max_tokens: int = 1024) -> list[int]:
    """`<s>` target `</s>`: what generate produces after the decoder start token (cut to whole
    instances when over `max_tokens`, see fit_target; a target with none that fits gives [])."""
    return fit_target(processor.tokenizer, processor.tokenizer(target)["input_ids"], max_tokens)[0]


@dataclass
class TargetFit:
    """Targets over --max-target-tokens, counted for the log and the model card."""

    pairs_cut: int = 0  # kept with their trailing instances left out
    instances_dropped: int = 0
    pairs_dropped: int = 0  # not even one whole instance fits (or plain text over the limit)

    def describe(self, limit: int) -> str:
        return (f"{self.pairs_cut + self.pairs_dropped} targets over --max-target-tokens {limit}: "
                f"{self.instances_dropped} whole instances left out of {self.pairs_cut} pairs, "
                f"{self.pairs_dropped} pairs dropped (no whole instance fits)")


def _instance_ends(tokenizer, ids: list[int]) -> list[int]:
    """Positions just after each instance: a `<loc_*>` token not followed by another or by `<sep>`
    (the polygons of one instance are joined by `<sep>`)."""
    locs = _loc_ids(tokenizer)
    sep = tokenizer.convert_tokens_to_ids("<sep>")
    return [i for i in range(1, len(ids)) if ids[i - 1] in locs and ids[i] not in locs and ids[i] != sep]


def _loc_ids(tokenizer) -> frozenset[int]:
    cached = getattr(tokenizer, "_annotate_loc_ids", None)
    if cached is None:
        cached = frozenset(tokenizer.convert_tokens_to_ids(LOC_TOKENS))
        tokenizer._annotate_loc_ids = cached
    return cached


def fit_target(tokenizer, ids: list[int], max_tokens: int) -> tuple[list[int], int]:
    """`ids` (`<s>` ... `</s>`) within `max_tokens`, still ending in `</s>`: the trailing instances
    that do not fit are left out whole, never half a box. Returns (ids, instances left out); ([], n)
    when no whole instance fits. Plain text over the limit is dropped too: a cut answer would teach
    the model to stop mid-sentence."""
    if len(ids) <= max_tokens:
        return ids, 0
    ends = _instance_ends(tokenizer, ids)
    fitting = [e for e in ends if e + 1 <= max_tokens]
    if not fitting:
        return [], len(ends)
    cut = fitting[-1]
    return ids[:cut] + [tokenizer.eos_token_id], len(ends) - len(fitting)


def open_image(ex: Example) -> Image.Image:
    from annotator.inputs.images import to_rgb

    src = io.BytesIO(ex.image_bytes) if ex.image_bytes is not None else ex.image
    with Image.open(src) as im:
        return to_rgb(ImageOps.exif_transpose(im))


@dataclass
class Sample:
    index: int
    pixel_values: torch.Tensor  # [3, H, W]
    input_ids: list[int]
    labels: list[int]


def _mirrorable_task(prompt: str) -> Task | None:
    """The task of a prompt whose pairs can be mirrored (Task.mirrorable), else None."""
    try:
        task = get_task(prompt) if prompt.startswith("<") else None
    except UnknownTask:
        return None
    return task if task is not None and task.mirrorable else None


class PairDataset(torch.utils.data.Dataset):
    """Tokenised pairs. augment="flip": each epoch, about half the pairs whose prompt asks for boxes of
    the whole image (Task.mirrorable: od, dense region captions, region proposals) are read mirrored
    left to right, image and boxes together; which ones is a function of (seed, epoch, index), so a
    run is repeatable. A few dozen pseudo-labelled images are fitted within a few rounds of the loop:
    the mirror is a second view of each (README, "The pseudo-label loop, on a shift").
    open_end: the target's final </s> is not in the loss, so that a pseudo-labelled target (the boxes a
    model was sure of, not every object) does not teach "nothing more here"."""

    def __init__(self, examples: list[Example], processor, max_target_tokens: int = 1024, augment: str = "none",
                 seed: int = 0, open_end: bool = False):
        if augment not in AUGMENT_CHOICES:
            raise FinetuneError(f"augment must be one of {', '.join(AUGMENT_CHOICES)}, not {augment!r}")
        self.examples = examples
        self.processor = processor
        self.max_target_tokens = max_target_tokens
        self.prompt_ids = PromptCache(processor)
        self.fit = TargetFit()
        self.targets = [self._target(ex.target) for ex in examples]  # once, so that the counts are whole
        if self.fit.pairs_cut or self.fit.pairs_dropped:
            log.warning("%s", self.fit.describe(max_target_tokens))
        self.seed, self.epoch = seed, 0
        self.open_end = open_end  # the final </s> left out of the loss: a pseudo-labelled target is not complete
        self.mirrored = [self._mirrored(ex, ids) if augment == "flip" else None
                         for ex, ids in zip(examples, self.targets)]

    def _mirrored(self, ex: Example, ids: list[int]) -> list[int] | None:
        """The mirrored target's ids (cut as the original was), or None for a pair that is not flipped."""
        task = _mirrorable_task(ex.prompt)
        mirrored = mirror_boxes(ex.target, labelled=task.labels is not Labels.NONE) if ids and task else None
        if mirrored is None:
            return None
        return fit_target(self.processor.tokenizer, self.processor.tokenizer(mirrored)["input_ids"],
                          self.max_target_tokens)[0] or None

    def set_epoch(self, epoch: int) -> None:
        """Called before each epoch (as the sampler's): the pairs flipped change from epoch to epoch."""
        self.epoch = epoch

    def flipped(self, i: int) -> bool:
        if self.mirrored[i] is None:
            return False
        return random.Random(f"{self.seed}:{self.epoch}:{i}").random() < 0.5

    def _target(self, text: str) -> list[int]:
        tokenizer = self.processor.tokenizer
        ids, dropped = fit_target(tokenizer, tokenizer(text)["input_ids"], self.max_target_tokens)
        if dropped or not ids:
            self.fit.instances_dropped += dropped if ids else 0
            self.fit.pairs_cut += bool(ids)
            self.fit.pairs_dropped += not ids
        return ids

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Sample | None:
        ex = self.examples[i]
        if not self.targets[i]:  # over the limit with no whole instance: counted in self.fit
            return None
        try:
            image = open_image(ex)
        except Exception as exc:  # noqa: BLE001 - one unreadable image must not stop training
            log.warning("skipping %s: %s", ex.key, exc)
            return None
        target = self.targets[i]
        if self.flipped(i):
            image, target = ImageOps.mirror(image), self.mirrored[i]
        if self.open_end and target[-1] == self.processor.tokenizer.eos_token_id:
            target = target[:-1]  # the decoder never reads the last label: dropping it takes it out of the loss
        pixels = self.processor.image_processor(images=image, return_tensors="pt")["pixel_values"][0]
        ids = self.prompt_ids(ex.prompt)
        return Sample(i, pixels, ids, target)


@dataclass
class TrainBatch:
    index: list[int]  # into the dataset's examples
    pixel_values: torch.Tensor  # [B, 3, H, W]
    input_ids: torch.Tensor  # [B, L], right-padded with <pad>: image tokens keep their positions
    attention_mask: torch.Tensor  # [B, L], 1 on real tokens
    labels: torch.Tensor  # [B, T], right-padded with -100: padding is not in the loss

    def to(self, device) -> "TrainBatch":
        return TrainBatch(self.index, *(t.to(device, non_blocking=True) for t in
                                        (self.pixel_values, self.input_ids, self.attention_mask, self.labels)))

    def tokens(self) -> int:
        return int((self.labels != IGNORE).sum())


def collate(samples: list[Sample | None], pad_id: int) -> TrainBatch | None:
    samples = [s for s in samples if s is not None]
    if not samples:
        return None
    input_ids, mask = pad_right([s.input_ids for s in samples], pad_id)  # as the engine pads its prompts
    labels, _ = pad_right([s.labels for s in samples], IGNORE)
    return TrainBatch([s.index for s in samples], torch.stack([s.pixel_values for s in samples]),
                      input_ids, mask, labels)


class Collator:  # a class, not a lambda: DataLoader workers may need to pickle it
    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, samples):
        return collate(samples, self.pad_id)
