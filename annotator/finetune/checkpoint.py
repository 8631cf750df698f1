"""Checkpoints: the output folder, atomic saves, the model card, and what --resume restores.

    CKPT/                 the best epoch: config, model.safetensors, processor, README.md, finetune.json
    CKPT/epoch-<n>/       every epoch (model + processor + finetune.json); the newest also holds
                          training_state.pt (optimizer, scheduler, scaler, step) for --resume"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..config import FinetuneConfig
from annotator.model.sequence import DOCVQA_TOKEN
from .data import FinetuneError, TrainData

STATE_FILE = "training_state.pt"
INFO_FILE = "finetune.json"


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
    from .. import __version__

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


def save_epoch(cfg, model, processor, data: TrainData, progress: Progress, base_model: str, best: bool,
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
