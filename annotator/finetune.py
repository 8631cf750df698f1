"""`annotate finetune`: train Florence-2 on the pairs `annotate export` writes, so the next
`annotate run --model CKPT` annotates with the fine-tuned weights.

Data (DATA is a folder or a file):
- florence: `<DATA>/train/annotations.jsonl` (+ `<DATA>/valid/annotations.jsonl`), or one JSONL
  file; lines {"image", "prefix", "suffix"}, images relative to the JSONL file's folder.
- docvqa: `<DATA>/data/train-*.parquet` (+ `validation-*.parquet`), or one Parquet file; HF
  DocumentVQA columns. Prompt `"<DocVQA>" + question`, target `answers[0]` (the published recipe).

Where the published recipe (shared/seeds/004) is wrong, this is right:
- freezing uses `requires_grad_(False)` (`param.is_trainable = False` freezes nothing) and only
  trainable parameters go to AdamW; the frozen vision tower also stays in eval mode (no dropout);
- label padding is -100, so it is not in the loss (the recipe trains on `<pad>` targets);
- attention masks are passed (the encoder otherwise attends to padded prompt positions);
- the loss is the token-weighted mean over the whole optimizer step, so gradient accumulation and
  several processes give the same update as one big batch (a plain mean of per-batch means
  over-weights short targets).

Checkpoint layout (`--out CKPT`):
    CKPT/                 the best epoch: config, model.safetensors, processor, README.md, finetune.json
    CKPT/epoch-<n>/       every epoch (model + processor + finetune.json); the newest also holds
                          training_state.pt (optimizer, scheduler, scaler, step) for --resume

Shapes: B pairs per batch, L prompt tokens (N image tokens + words), T target tokens, V vocabulary."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import multiprocessing as mp
import os
import shutil
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from .config import ConfigError, ModelSpec

log = logging.getLogger(__name__)

DOCVQA_TOKEN = "<DocVQA>"  # not a Florence-2 task token: the model reads it as the literal text "<DocVQA>"
IGNORE = -100  # label value that cross_entropy skips
STATE_FILE = "training_state.pt"
INFO_FILE = "finetune.json"
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


class FinetuneError(RuntimeError):
    """Bad data or paths: the CLI prints it as a one-line error."""


# --------------------------------------------------------------------------- settings

@dataclass(frozen=True)
class FinetuneConfig:
    data: Path
    out: Path
    model: str = "florence-community/Florence-2-large"
    revision: str | None = None
    allow_pickle: bool = False
    epochs: int = 7
    lr: float = 1e-6  # the recipe's; larger rates overfit a real checkpoint quickly
    batch_size: int = 6  # per process; the recipe's A100 setting
    grad_accum: int = 1
    warmup: int = 0  # optimizer steps of linear warmup
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0 disables clipping
    freeze_vision: bool = True
    val_fraction: float = 0.1  # only when DATA has no validation split of its own
    devices: str = "auto"
    gradient_checkpointing: bool = False
    precision: str = "auto"  # auto: bf16 (fp16 on GPUs without bf16) autocast on GPU, fp32 on CPU
    resume: Path | None = None
    seed: int = 0
    workers: int = 2
    max_target_tokens: int = 1024  # Florence-2's decoder has 1024 positions
    eval_max_new_tokens: int = 128  # DocVQA similarity: generation limit per answer
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self):
        checks = [
            (self.epochs >= 1, "--epochs must be >= 1"),
            (self.lr > 0, "--lr must be > 0"),
            (self.batch_size >= 1, "--batch-size must be >= 1"),
            (self.grad_accum >= 1, "--grad-accum must be >= 1"),
            (self.warmup >= 0, "--warmup must be >= 0"),
            (self.weight_decay >= 0, "--weight-decay must be >= 0"),
            (self.max_grad_norm >= 0, "--max-grad-norm must be >= 0"),
            (0 <= self.val_fraction < 1, "--val-fraction must be in [0, 1)"),
            (self.precision in PRECISIONS, f"--precision must be one of {', '.join(PRECISIONS)}"),
            (self.workers >= 0, "--workers must be >= 0"),
            (self.max_target_tokens >= 2, "--max-target-tokens must be >= 2"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    def settings(self) -> dict:
        """What the model card and finetune.json record."""
        d = asdict(self)
        for k in ("out", "resume", "overwrite", "progress", "workers"):
            d.pop(k)
        d["data"] = str(self.data)
        return d


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

def prompt_text(processor, prompt: str) -> str:
    """The words the encoder reads. Florence-2 task tokens become their sentences (as in
    Engine.prompt_ids); a DocVQA prompt stays literal, because _construct_prompts would raise on a
    question that happens to contain a task token such as "<OCR>"."""
    if prompt.startswith(DOCVQA_TOKEN):
        return prompt
    return processor._construct_prompts([prompt])[0]


def encode_prompt(processor, prompt: str) -> list[int]:
    """`<image>`*N `<s>` words `</s>`: token for token what `annotate run` feeds the model."""
    tok = processor.tokenizer
    text = tok.image_token * processor.num_image_tokens + tok.bos_token + prompt_text(processor, prompt) + tok.eos_token
    return tok(text, add_special_tokens=False)["input_ids"]


def encode_target(processor, target: str, max_tokens: int = 1024) -> list[int]:
    """`<s>` target `</s>`: what generate produces after the decoder start token."""
    ids = processor.tokenizer(target)["input_ids"]
    return ids[:max_tokens]


def open_image(ex: Example) -> Image.Image:
    from .images import to_rgb

    src = io.BytesIO(ex.image_bytes) if ex.image_bytes is not None else ex.image
    with Image.open(src) as im:
        return to_rgb(ImageOps.exif_transpose(im))


@dataclass
class Sample:
    index: int
    pixel_values: torch.Tensor  # [3, H, W]
    input_ids: list[int]
    labels: list[int]


class PairDataset(torch.utils.data.Dataset):
    def __init__(self, examples: list[Example], processor, max_target_tokens: int = 1024):
        self.examples = examples
        self.processor = processor
        self.max_target_tokens = max_target_tokens
        self._prompts: dict[str, list[int]] = {}

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Sample | None:
        ex = self.examples[i]
        try:
            image = open_image(ex)
        except Exception as exc:  # noqa: BLE001 - one unreadable image must not stop training
            log.warning("skipping %s: %s", ex.key, exc)
            return None
        pixels = self.processor.image_processor(images=image, return_tensors="pt")["pixel_values"][0]
        ids = self._prompts.get(ex.prompt)
        if ids is None:
            ids = self._prompts.setdefault(ex.prompt, encode_prompt(self.processor, ex.prompt))
        return Sample(i, pixels, ids, encode_target(self.processor, ex.target, self.max_target_tokens))


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
    width = max(len(s.input_ids) for s in samples)
    tlen = max(len(s.labels) for s in samples)
    input_ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    labels = torch.full((len(samples), tlen), IGNORE, dtype=torch.long)
    for row, s in enumerate(samples):
        input_ids[row, :len(s.input_ids)] = torch.tensor(s.input_ids)
        mask[row, :len(s.input_ids)] = 1
        labels[row, :len(s.labels)] = torch.tensor(s.labels)
    return TrainBatch([s.index for s in samples], torch.stack([s.pixel_values for s in samples]),
                      input_ids, mask, labels)


class Collator:  # a class, not a lambda: DataLoader workers may need to pickle it
    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, samples):
        return collate(samples, self.pad_id)


# --------------------------------------------------------------------------- loss and metric

def loss_sum(model, batch: TrainBatch, text_config, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Summed cross-entropy over the real target tokens of the batch (divide by batch.tokens(),
    or by the tokens of the whole optimizer step). `weights` [B, T], optional: per-token weights
    (divide by their sum over the real tokens instead)."""
    from transformers.models.florence2.modeling_florence2 import shift_tokens_right

    # Teacher forcing: decoder reads </s> <s> target..., predicts <s> target... </s>
    decoder_input_ids = shift_tokens_right(batch.labels, text_config.pad_token_id, text_config.decoder_start_token_id)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixel_values,
                   decoder_input_ids=decoder_input_ids, use_cache=False).logits  # [B, T, V]
    if weights is None:
        return F.cross_entropy(logits.flatten(0, 1).float(), batch.labels.flatten(), ignore_index=IGNORE, reduction="sum")
    ce = F.cross_entropy(logits.flatten(0, 1).float(), batch.labels.flatten(), ignore_index=IGNORE, reduction="none")
    return (ce * weights.flatten()).sum()  # ignored positions have ce 0


def backward_window(net, batches: list[TrainBatch], text_config, world: int = 1, autocast=contextlib.nullcontext,
                    scaler=None) -> torch.Tensor | None:
    """Backward for one optimizer step's batches: gradients of (summed token loss / tokens of the
    whole step, over every rank), so accumulating k batches or running k ranks gives the update
    of one k-times larger batch. Returns [summed loss, tokens] of this rank, None if no tokens."""
    import torch.distributed as dist

    distributed = world > 1
    tokens = torch.tensor(float(sum(b.tokens() for b in batches)), device=_device_of(net))
    if distributed:
        dist.all_reduce(tokens)  # every rank divides by the step's global token count
    if tokens.item() == 0:
        return None
    scale = world / tokens.item()  # DDP averages gradients over ranks: * world undoes it
    total = torch.zeros(2, dtype=torch.float64)
    for i, b in enumerate(batches):
        last = i == len(batches) - 1
        with net.no_sync() if distributed and not last else contextlib.nullcontext():  # all-reduce once
            with autocast():
                s = loss_sum(net, b, text_config)
            (scaler.scale(s * scale) if scaler is not None else s * scale).backward()
        total += torch.tensor([s.item(), b.tokens()], dtype=torch.float64)
    return total


def _device_of(net) -> torch.device:
    return next(net.parameters()).device


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insert, delete, substitute: cost 1 each), two rows of DP."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def levenshtein_similarity(prediction: str, answers) -> float:
    """Normalized Levenshtein similarity in [0, 1]: 1 - distance / longer length, on stripped,
    lower-cased text, best over the accepted answers (DocVQA's ANLS without its 0.5 cut-off)."""
    if isinstance(answers, str):
        answers = [answers]
    p = prediction.strip().lower()
    best = 0.0
    for ans in answers:
        a = ans.strip().lower()
        longest = max(len(a), len(p))
        best = max(best, 1.0 if longest == 0 else 1.0 - levenshtein(p, a) / longest)
    return best


# --------------------------------------------------------------------------- model setup

def configure_trainable(model, freeze_vision: bool) -> list[torch.nn.Parameter]:
    """requires_grad on everything but the frozen vision tower; returns the trainable parameters
    (the only ones the optimizer sees). The projector (image_projection, position embeddings)
    stays trainable, as in the published recipe that froze `vision_tower` only."""
    model.requires_grad_(True)
    if freeze_vision:
        model.model.vision_tower.requires_grad_(False)
    return [p for p in model.parameters() if p.requires_grad]


def enable_checkpointing(model) -> None:
    """Non-reentrant: works with a frozen vision tower (no input needs grad) and keeps dropout's
    RNG, so gradients equal those without checkpointing."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name; the old one warns
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def train_mode(net, model, freeze_vision: bool) -> None:
    net.train()  # net: the model, or its DDP wrapper
    if freeze_vision:
        model.model.vision_tower.eval()  # frozen weights, and no dropout / drop-path noise on its features


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if device.type != "cuda":
        if precision in ("bf16", "fp16"):
            log.warning("--precision %s: autocast is used on GPU only; training in float32 on %s", precision, device)
        return None
    if precision == "fp32":
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if precision == "bf16" else torch.float16


# --------------------------------------------------------------------------- checkpoints

@dataclass
class Progress:
    """What --resume restores besides the weights and the optimizer."""

    epoch: int = 0  # epochs finished
    step: int = 0  # optimizer steps taken
    history: list[dict] = field(default_factory=list)
    best_epoch: int | None = None
    best_value: float | None = None
    best_metric: str = ""


def find_resume(path: Path) -> Path:
    """An epoch folder with training_state.pt: the folder itself, or the newest one under --out."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    epochs = sorted((p for p in path.glob("epoch-*") if (p / STATE_FILE).is_file()),
                    key=lambda p: int(p.name.split("-", 1)[1]) if p.name.split("-", 1)[1].isdigit() else -1)
    if not epochs:
        raise FinetuneError(f"--resume {path}: no {STATE_FILE} there or in its epoch-* folders")
    return epochs[-1]


def prepare_out(cfg: FinetuneConfig) -> None:
    out = cfg.out
    if out.exists() and not out.is_dir():
        raise FinetuneError(f"--out {out} is a file")
    if cfg.resume is not None and out.exists() and find_resume(cfg.resume).parent.resolve() == out.resolve():
        return  # resuming in place
    if out.exists() and any(out.iterdir()):
        if not cfg.overwrite:
            raise FinetuneError(f"--out {out} is not empty; pass --resume {out} to go on training, "
                                "--overwrite to replace it, or another --out")
        if not (out / INFO_FILE).is_file():
            raise FinetuneError(f"--out {out} does not hold an `annotate finetune` checkpoint ({INFO_FILE}); "
                                "refusing to delete it even with --overwrite")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def save_model(model, processor, dest: Path, files: dict[str, str]) -> None:
    """save_pretrained into a staging folder, then rename into place: a killed run never leaves
    a half-written checkpoint under the final name."""
    from transformers.utils import logging as hf_logging

    tmp = dest.parent / f".tmp-{dest.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # its "Writing model shards" bar would interleave with ours
    try:
        model.save_pretrained(tmp)  # safetensors
        processor.save_pretrained(tmp)
    finally:
        if shown:
            hf_logging.enable_progress_bar()
    for name, text in files.items():
        (tmp / name).write_text(text, encoding="utf-8")
    if dest.is_dir():
        # the top level (the best model): replace file by file, the epoch-* folders stay
        for f in tmp.iterdir():
            os.replace(f, dest / f.name)
        tmp.rmdir()
    else:
        os.replace(tmp, dest)


def model_card(cfg: FinetuneConfig, data: dict, progress: Progress, base_model: str) -> str:
    from . import __version__

    hub_base = not base_model.startswith("random:") and not Path(base_model).exists() and "/" in base_model
    front = ["---", "library_name: transformers", "pipeline_tag: image-text-to-text",
             "tags: [florence-2, florence-annotate, fine-tuned]"]
    if hub_base:
        front.append(f"base_model: {base_model}")
    front.append("---")
    lines = front + [
        "", f"# {cfg.out.name}", "",
        f"Florence-2 fine-tuned by `annotate finetune` (florence-annotate {__version__}) from `{base_model}`.",
        "This folder holds the best epoch; `epoch-<n>/` holds every epoch.", "",
        "## Data", "",
        f"- format: {data['format']}; read from {data['source']}",
        f"- train: {data['train_pairs']} pairs over {data['train_images']} images",
        f"- validation: {data['val_pairs']} pairs over {data['val_images']} images ({data['validation']})",
    ]
    if data["format"] == "docvqa":
        lines.append(f"- prompt `{DOCVQA_TOKEN}` + question (literal text, not a task token), target answers[0]")
    else:
        lines.append("- prompt = prefix (a Florence-2 task token and its input), target = suffix")
    lines += ["- the labels are pseudo-labels when they come from `annotate run`: the model also learns their mistakes",
              "", "## Settings", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in cfg.settings().items() if k != "data"]
    lines += ["", "## Results", "", "| epoch | train loss | val loss | val similarity (%) |", "|---|---|---|---|"]

    def fmt(v, pct=False):
        return "-" if v is None else (f"{100 * v:.1f}" if pct else f"{v:.4f}")

    for h in progress.history:
        lines.append(f"| {h['epoch']} | {fmt(h['train_loss'])} | {fmt(h.get('val_loss'))} "
                     f"| {fmt(h.get('val_similarity'), True)} |")
    if progress.best_epoch is not None:
        lines += ["", f"Best: epoch {progress.best_epoch} by {progress.best_metric} ({progress.best_value:.4f})."]
    lines += ["", "## Use", "", "```", f"annotate run IMAGES --model {cfg.out}", "```"]
    if data["format"] == "docvqa":
        lines += ["", "`annotate run` has no DocVQA task; ask questions with transformers:", "", "```python",
                  "from transformers import AutoProcessor, Florence2ForConditionalGeneration",
                  f"model = Florence2ForConditionalGeneration.from_pretrained({str(cfg.out)!r})",
                  f"processor = AutoProcessor.from_pretrained({str(cfg.out)!r})",
                  f"inputs = processor(text='{DOCVQA_TOKEN}' + question, images=image, return_tensors='pt')",
                  "ids = model.generate(**inputs, max_new_tokens=128, num_beams=3)",
                  "answer = processor.batch_decode(ids, skip_special_tokens=True)[0]", "```"]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- the loop

@dataclass
class FinetuneResult:
    out: Path
    kind: str
    data: dict
    history: list[dict]
    best_epoch: int | None
    best_metric: str
    seconds: float = 0.0
    owner: bool = True  # rank 0: the one that reports

    def lines(self) -> list[str]:
        best = f"best epoch {self.best_epoch} by {self.best_metric}" if self.best_epoch else "no epoch trained"
        return [f"fine-tuned on {self.data['train_pairs']} pairs ({self.kind}) in {self.seconds:.0f}s; {best}",
                f"checkpoint: {self.out}  (annotate run IMAGES --model {self.out})"]


def finetune(cfg: FinetuneConfig) -> FinetuneResult:
    """Entry point: one process, several spawned DDP processes (--devices), or a torchrun rank."""
    from .launch import parse_devices, torch_device, torchrun_env

    env = torchrun_env()
    if env is not None and env.world > 1:
        device = f"cuda:{env.local_rank}" if torch.cuda.is_available() else "cpu"
        return train(cfg, env.rank, env.world, device)
    devices = parse_devices(cfg.devices)
    if len(devices) == 1:
        return train(cfg, 0, 1, torch_device(devices[0]))
    return _spawn(cfg, devices)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(cfg: FinetuneConfig, devices: list[str]) -> FinetuneResult:
    """One process per device, DDP over a local rendezvous (nccl on GPUs, gloo on CPU workers)."""
    from .launch import torch_device

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    cpu = sum(d.startswith("cpu") for d in devices)
    threads = max(1, (os.cpu_count() or 1) // cpu) if cpu else 0
    procs = [ctx.Process(target=_spawned, args=(cfg, rank, len(devices), torch_device(d), port, threads, results))
             for rank, d in enumerate(devices)]
    for p in procs:
        p.start()
    result = None
    try:
        while any(p.is_alive() for p in procs) and result is None:
            try:
                result = results.get(timeout=0.5)
            except Exception:  # noqa: BLE001 - queue.Empty
                continue
        for p in procs:
            p.join()
    except KeyboardInterrupt:
        for p in procs:
            if p.is_alive():
                p.terminate()
        raise
    failed = [f"rank {r} ({devices[r]}) exited with code {p.exitcode}" for r, p in enumerate(procs) if p.exitcode]
    if isinstance(result, str):
        raise FinetuneError(result)
    if failed or result is None:
        raise FinetuneError("; ".join(failed) or "no result from rank 0")
    return result


def _spawned(cfg, rank, world, device, port, threads, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    if threads:
        torch.set_num_threads(threads)
    try:
        result = train(cfg, rank, world, device)
    except (FinetuneError, ConfigError) as exc:
        if rank == 0:
            results.put(str(exc))
        raise SystemExit(2)
    if rank == 0:
        results.put(result)


def train(cfg: FinetuneConfig, rank: int = 0, world: int = 1, device: str = "cpu") -> FinetuneResult:
    import torch.distributed as dist
    from tqdm import tqdm
    from transformers import get_linear_schedule_with_warmup

    from .model import load_model

    start = time.monotonic()
    torch.manual_seed(cfg.seed + rank)  # dropout; the data order comes from the sampler's own seed
    device = torch.device(device)
    distributed = world > 1
    if distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owner = rank == 0
    try:
        data = load_data(cfg.data, cfg.val_fraction)
        resume_dir = find_resume(cfg.resume) if cfg.resume is not None else None
        if owner:
            prepare_out(cfg)
        _barrier(distributed)

        # ---- model: float32 master weights; autocast (GPU) does the half-precision math
        base_model, state = cfg.model, None
        if resume_dir is not None:
            state = torch.load(resume_dir / STATE_FILE, map_location="cpu", weights_only=True)
            base_model = state.get("base_model", cfg.model)
        spec = ModelSpec(str(resume_dir) if resume_dir else cfg.model, None if resume_dir else cfg.revision,
                         "float32", "sdpa", cfg.allow_pickle)
        lm = load_model(spec, device)
        model, processor = lm.model, lm.processor
        params = configure_trainable(model, cfg.freeze_vision)
        if cfg.gradient_checkpointing:
            enable_checkpointing(model)
        text_config = model.config.text_config
        net = model
        if distributed:
            from torch.nn.parallel import DistributedDataParallel

            net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

        # ---- data
        pad_id = processor.tokenizer.pad_token_id
        train_ds = PairDataset(data.train, processor, cfg.max_target_tokens)
        sampler = torch.utils.data.DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True,
                                                      seed=cfg.seed)
        loader_kw = dict(batch_size=cfg.batch_size, num_workers=cfg.workers, collate_fn=Collator(pad_id),
                         pin_memory=device.type == "cuda")
        train_loader = torch.utils.data.DataLoader(train_ds, sampler=sampler, **loader_kw)
        val_ds = PairDataset(data.val[rank::world], processor, cfg.max_target_tokens)  # no padding repeats
        val_loader = torch.utils.data.DataLoader(val_ds, shuffle=False, **loader_kw) if data.val else None

        # ---- optimizer and schedule
        steps_per_epoch = math.ceil(len(train_loader) / cfg.grad_accum)
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        scheduler = get_linear_schedule_with_warmup(optimizer, cfg.warmup, steps_per_epoch * cfg.epochs)
        half = autocast_dtype(cfg.precision, device)
        scaler = torch.amp.GradScaler("cuda", enabled=half is torch.float16)
        progress = Progress()
        if state is not None:
            try:
                optimizer.load_state_dict(state["optimizer"])
            except ValueError as exc:
                raise FinetuneError(f"--resume {resume_dir}: the optimizer state does not fit ({exc}); "
                                    "resume with the same --freeze-vision setting") from None
            scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            progress = Progress(**state["progress"])
            if resume_dir.parent.resolve() != cfg.out.resolve():
                # the best model so far lives in the other folder: pick the best among this folder's epochs
                progress.best_epoch = progress.best_value = None
            if state.get("data") != data.describe():
                log.warning("--resume: the data differ from the run being resumed (%s)", state.get("data"))
            if owner:
                tqdm.write(f"resuming after epoch {progress.epoch} (step {progress.step}) from {resume_dir}")
        if progress.epoch >= cfg.epochs and owner:
            tqdm.write(f"already trained {progress.epoch} epochs (--epochs {cfg.epochs}): nothing to do")

        def autocast():
            return torch.autocast("cuda", dtype=half) if half is not None else contextlib.nullcontext()

        # ---- epochs
        for epoch in range(progress.epoch + 1, cfg.epochs + 1):
            sampler.set_epoch(epoch)
            train_mode(net, model, cfg.freeze_vision)
            bar = tqdm(total=len(train_loader), desc=f"epoch {epoch}/{cfg.epochs}", unit="batch",
                       disable=not (cfg.progress and owner), dynamic_ncols=True, leave=False)
            total = torch.zeros(2, dtype=torch.float64)  # [summed loss, tokens] of this rank
            for window in _windows(train_loader, cfg.grad_accum):
                batches = [b.to(device) for b in window if b is not None]
                done = backward_window(net, batches, text_config, world, autocast, scaler)
                if done is None:  # every image of the window failed to decode
                    bar.update(len(window))
                    continue
                total += done
                scaler.unscale_(optimizer)
                if cfg.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                progress.step += 1
                bar.update(len(window))
                bar.set_postfix(loss=f"{total[0].item() / max(total[1].item(), 1):.4f}",
                                lr=f"{scheduler.get_last_lr()[0]:.2e}")
            bar.close()
            train_loss = _global_mean(total, distributed)
            record = {"epoch": epoch, "step": progress.step, "train_loss": train_loss,
                      "lr": scheduler.get_last_lr()[0]}
            if distributed:
                record["ranks_in_sync"] = _ranks_in_sync(params, world)
            if val_loader is not None:
                record.update(evaluate(net, model, val_loader, val_ds, data.kind, text_config, device, autocast,
                                       distributed, cfg, owner))
            progress.epoch = epoch
            progress.history.append(record)
            metric, value, better = _best(record, progress)
            if better:
                progress.best_epoch, progress.best_value, progress.best_metric = epoch, value, metric
            if owner:
                tqdm.write(_epoch_line(record, cfg.epochs))
                _save_epoch(cfg, model, processor, data, progress, base_model, better, optimizer, scheduler, scaler)
            _barrier(distributed)
        return FinetuneResult(cfg.out, data.kind, data.describe(), progress.history, progress.best_epoch,
                              progress.best_metric, time.monotonic() - start, owner)
    finally:
        if distributed and dist.is_initialized():
            dist.destroy_process_group()


def _ranks_in_sync(params: list, world: int) -> bool:
    """DDP keeps the ranks' weights identical (same start, same averaged gradients, same steps).
    Checked once per epoch by per-tensor sums, so a desync is an error, not a quietly worse model."""
    import torch.distributed as dist

    sums = torch.stack([p.detach().double().sum() for p in params])
    gathered = [torch.empty_like(sums) for _ in range(world)]
    dist.all_gather(gathered, sums)
    if not all(torch.equal(g, sums) for g in gathered):
        raise FinetuneError("the DDP ranks' weights differ after an epoch (they must stay identical)")
    return True


def _barrier(distributed: bool) -> None:
    if distributed:
        import torch.distributed as dist

        dist.barrier()


def _windows(loader, n: int):
    """The loader's batches, n at a time (one optimizer step each; the last window may be shorter)."""
    window = []
    for batch in loader:
        window.append(batch)
        if len(window) == n:
            yield window
            window = []
    if window:
        yield window


def _global_mean(total: torch.Tensor, distributed: bool) -> float | None:
    if distributed:
        import torch.distributed as dist

        dist.all_reduce(total)
    return total[0].item() / total[1].item() if total[1].item() else None


@torch.no_grad()
def evaluate(net, model, loader, dataset: PairDataset, kind: str, text_config, device, autocast, distributed: bool,
             cfg: FinetuneConfig, owner: bool) -> dict:
    """Validation loss (token-weighted mean); for DocVQA also the generated answers' mean
    normalized Levenshtein similarity (greedy decoding)."""
    from tqdm import tqdm

    net.eval()
    total = torch.zeros(2, dtype=torch.float64)  # [summed loss, tokens]
    sim = torch.zeros(2, dtype=torch.float64)  # [summed similarity, questions]
    tok = dataset.processor.tokenizer
    for batch in tqdm(loader, desc="validation", unit="batch", leave=False,
                      disable=not (cfg.progress and owner), dynamic_ncols=True):
        if batch is None:
            continue
        batch = batch.to(device)
        with autocast():
            s = loss_sum(net, batch, text_config)
            if kind == "docvqa":
                ids = model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                     pixel_values=batch.pixel_values, max_new_tokens=cfg.eval_max_new_tokens,
                                     num_beams=1, do_sample=False)
        total += torch.tensor([s.item(), batch.tokens()], dtype=torch.float64)
        if kind == "docvqa":
            for i, text in zip(batch.index, tok.batch_decode(ids, skip_special_tokens=True)):
                ex = dataset.examples[i]
                sim += torch.tensor([levenshtein_similarity(text, ex.answers or [ex.target]), 1.0], dtype=torch.float64)
    out = {"val_loss": _global_mean(total, distributed)}
    if kind == "docvqa":
        out["val_similarity"] = _global_mean(sim, distributed)
    return out


def _best(record: dict, progress: Progress) -> tuple[str, float, bool]:
    """DocVQA: the similarity the recipe reports (higher is better); otherwise the validation
    loss, or the training loss when there is no validation set (lower is better)."""
    if record.get("val_similarity") is not None:
        metric, value, higher = "val_similarity", record["val_similarity"], True
    elif record.get("val_loss") is not None:
        metric, value, higher = "val_loss", record["val_loss"], False
    else:
        metric, value, higher = "train_loss", record["train_loss"], False
    if value is None:
        return metric, float("nan"), False
    if progress.best_value is None or progress.best_metric != metric:
        return metric, value, True
    return metric, value, value > progress.best_value if higher else value < progress.best_value


def _epoch_line(r: dict, epochs: int) -> str:
    parts = [f"epoch {r['epoch']}/{epochs}: train loss {r['train_loss']:.4f}"]
    if r.get("val_loss") is not None:
        parts.append(f"val loss {r['val_loss']:.4f}")
    if r.get("val_similarity") is not None:
        parts.append(f"val similarity {100 * r['val_similarity']:.1f}")
    return ", ".join(parts)


def _save_epoch(cfg, model, processor, data: TrainData, progress: Progress, base_model: str, best: bool,
                optimizer, scheduler, scaler) -> None:
    described = data.describe()
    info = json.dumps({"base_model": base_model, "data": described, "settings": cfg.settings(),
                       **asdict(progress)}, indent=2, default=str)
    files = {INFO_FILE: info, "README.md": model_card(cfg, described, progress, base_model)}
    epoch_dir = cfg.out / f"epoch-{progress.epoch}"
    save_model(model, processor, epoch_dir, {INFO_FILE: info})
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "progress": asdict(progress), "base_model": base_model,
                "data": described}, epoch_dir / (STATE_FILE + ".tmp"))
    os.replace(epoch_dir / (STATE_FILE + ".tmp"), epoch_dir / STATE_FILE)
    for old in cfg.out.glob(f"epoch-*/{STATE_FILE}"):  # only the newest epoch keeps the optimizer (2x the weights)
        if old.parent != epoch_dir:
            old.unlink()
    if best:
        save_model(model, processor, cfg.out, files)
    else:  # the card and finetune.json follow every epoch; the weights only the best
        for name, text in files.items():
            (cfg.out / name).write_text(text, encoding="utf-8")

