"""The training loop: epochs of optimizer steps, validation, the best epoch, a checkpoint each epoch."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import FinetuneConfig, ModelSpec
from .checkpoint import STATE_FILE, Progress, find_resume, prepare_out, save_epoch
from . import recipes
from .data import Collator, FinetuneError, PairDataset, load_data
from .steps import (autocast_dtype, backward_window, configure_trainable, enable_checkpointing, levenshtein_similarity,
                    loss_sum, train_mode)

log = logging.getLogger(__name__)


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
    notes: list[str] = field(default_factory=list)  # the recipe chosen, a too-short warning

    def lines(self) -> list[str]:
        best = f"best epoch {self.best_epoch} by {self.best_metric}" if self.best_epoch else "no epoch trained"
        return [*self.notes, f"fine-tuned on {self.data['train_pairs']} pairs ({self.kind}) in {self.seconds:.0f}s; {best}",
                f"checkpoint: {self.out}  (annotate run IMAGES --model {self.out})"]


def _optimizer(cfg: FinetuneConfig, params, batches: int, notes: list[str], owner: bool):
    """AdamW and the linear schedule over every optimizer step; the recipe's notes (and a warning when
    the schedule is too short to move the model) are printed once, by the owner."""
    from tqdm import tqdm
    from transformers import get_linear_schedule_with_warmup

    steps = math.ceil(batches / cfg.grad_accum) * cfg.epochs
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, cfg.warmup, steps)
    warning = recipes.too_short(cfg, steps)
    if warning:
        notes.append(warning)  # the result reports it too
    if owner:
        for note in notes:
            tqdm.write(note)
    return optimizer, scheduler


def train(cfg: FinetuneConfig, rank: int = 0, world: int = 1, device: str = "cpu") -> FinetuneResult:
    import torch.distributed as dist
    from tqdm import tqdm

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
        cfg, recipe = recipes.apply(cfg, [e.target for e in data.train])
        notes = [recipes.describe(recipe, cfg)]
        resume_dir = find_resume(cfg.resume) if cfg.resume is not None else None
        if owner:
            prepare_out(cfg)
        _barrier(distributed)

        base_model, state = cfg.model, None
        if resume_dir is not None:
            state = torch.load(resume_dir / STATE_FILE, map_location="cpu", weights_only=True)
            base_model = state.get("base_model", cfg.model)
        model, processor, params, net = _model(cfg, resume_dir, device, distributed)
        text_config = model.config.text_config

        sampler, train_loader, val_ds, val_loader = _loaders(cfg, data, processor, rank, world, device)

        optimizer, scheduler = _optimizer(cfg, params, len(train_loader), notes, owner)
        half = autocast_dtype(cfg.precision, device)
        scaler = torch.amp.GradScaler("cuda", enabled=half is torch.float16)
        progress = Progress()
        if state is not None:
            progress = _restore(state, resume_dir, cfg, data, optimizer, scheduler, scaler, owner)
        if progress.epoch >= cfg.epochs and owner:
            tqdm.write(f"already trained {progress.epoch} epochs (--epochs {cfg.epochs}): nothing to do")

        def autocast():
            return torch.autocast(device.type, dtype=half) if half is not None else contextlib.nullcontext()

        # ---- epochs
        for epoch in range(progress.epoch + 1, cfg.epochs + 1):
            sampler.set_epoch(epoch)
            train_loader.dataset.set_epoch(epoch)
            train_mode(net, model, cfg.freeze_vision)
            bar = tqdm(total=len(train_loader), desc=f"epoch {epoch}/{cfg.epochs}", unit="batch",
                       disable=not (cfg.progress and owner), dynamic_ncols=True, leave=False)
            total = _epoch_steps(cfg, train_loader, net, params, text_config, world, autocast, optimizer, scheduler,
                                 scaler, progress, bar, device)
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
                save_epoch(cfg, model, processor, data, progress, base_model, better, optimizer, scheduler, scaler)
            _barrier(distributed)
        return FinetuneResult(cfg.out, data.kind, data.describe(), progress.history, progress.best_epoch,
                              progress.best_metric, time.monotonic() - start, owner, notes)
    finally:
        if distributed and dist.is_initialized():
            dist.destroy_process_group()


def _model(cfg: FinetuneConfig, resume_dir, device, distributed: bool):
    """float32 master weights (autocast on GPU does the half-precision math), the trainable
    parameters, and the module the steps run (DDP-wrapped across ranks)."""
    from annotator.model.load import load_model

    spec = ModelSpec(str(resume_dir) if resume_dir else cfg.model, None if resume_dir else cfg.revision,
                     "float32", "sdpa", cfg.allow_pickle)
    lm = load_model(spec, device)
    model = lm.model
    params = configure_trainable(model, cfg.freeze_vision)
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    net = model
    if distributed:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model, lm.processor, params, net


def _loaders(cfg: FinetuneConfig, data, processor, rank: int, world: int, device):
    """The training loader (its sampler shards and shuffles across ranks) and this rank's validation share."""
    pad_id = processor.tokenizer.pad_token_id
    train_ds = PairDataset(data.train, processor, cfg.max_target_tokens, cfg.augment, cfg.seed, cfg.open_end)
    sampler = torch.utils.data.DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True,
                                                  seed=cfg.seed)
    loader_kw = dict(batch_size=cfg.batch_size, num_workers=cfg.workers, collate_fn=Collator(pad_id),
                     pin_memory=device.type == "cuda")
    train_loader = torch.utils.data.DataLoader(train_ds, sampler=sampler, **loader_kw)
    val_ds = PairDataset(data.val[rank::world], processor, cfg.max_target_tokens,  # no padding repeats
                         open_end=cfg.open_end)
    val_loader = torch.utils.data.DataLoader(val_ds, shuffle=False, **loader_kw) if data.val else None
    return sampler, train_loader, val_ds, val_loader


def _restore(state: dict, resume_dir, cfg: FinetuneConfig, data, optimizer, scheduler, scaler, owner: bool) -> Progress:
    """--resume: the optimizer, schedule and scaler as the last epoch left them, and the progress so far."""
    from tqdm import tqdm

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
    return progress


def _epoch_steps(cfg: FinetuneConfig, train_loader, net, params, text_config, world: int, autocast, optimizer,
                 scheduler, scaler, progress: Progress, bar, device) -> torch.Tensor:
    """One epoch's optimizer steps; returns [summed loss, tokens] of this rank."""
    total = torch.zeros(2, dtype=torch.float64)
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
    return total


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
