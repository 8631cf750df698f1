"""One training step's pieces: the loss, the backward over an optimizer step's batches, which
parameters train, precision; and the DocVQA metric.

Shapes: B pairs per batch, T target tokens, V vocabulary."""

from __future__ import annotations

import contextlib
import logging

import torch
import torch.nn.functional as F

from annotator.model.precision import auto_dtype
from .data import IGNORE, TrainBatch

log = logging.getLogger(__name__)


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
    """The autocast dtype of a training step (None: float32). Weights, optimizer state and the loss
    stay float32 either way. GPU: bf16 where it has it, else fp16 (with a grad scaler). CPU: bf16
    when asked, or with auto where inference picks it too (AMX, precision.py); fp16 never."""
    if precision == "fp32":
        return None
    if device.type == "cpu":
        if precision == "fp16":
            log.warning("--precision fp16: CPUs have no fast fp16 kernels; training in float32")
            return None
        if precision == "bf16" or auto_dtype(device).dtype == torch.bfloat16:
            return torch.bfloat16
        return None
    if device.type != "cuda":
        log.warning("--precision %s: autocast runs on CPU and CUDA only; training in float32 on %s", precision, device)
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16
    return torch.bfloat16 if precision == "bf16" else torch.float16
