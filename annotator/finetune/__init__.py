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

The package: data.py (pairs -> padded batches), steps.py (loss, backward, what trains),
loop.py (epochs, validation), checkpoint.py (folders, saves, model card), run.py (processes).
The names below stay importable from `annotator.finetune` (examples/ and tests use them)."""


from ..config import PRECISIONS, FinetuneConfig
from annotator.model.sequence import DOCVQA_TOKEN
from .checkpoint import INFO_FILE, STATE_FILE, Progress, find_resume, model_card, prepare_out, save_model
from .data import (IGNORE, Collator, Example, FinetuneError, PairDataset, Sample, TrainBatch, TrainData, collate,
                   encode_prompt, encode_target, load_data, open_image, prompt_text)
from .loop import FinetuneResult, evaluate, train
from .run import finetune
from .steps import (autocast_dtype, backward_window, configure_trainable, enable_checkpointing, levenshtein,
                    levenshtein_similarity, loss_sum, train_mode)

__all__ = [
    "DOCVQA_TOKEN", "IGNORE", "INFO_FILE", "PRECISIONS", "STATE_FILE", "Collator", "Example", "FinetuneConfig",
    "FinetuneError", "FinetuneResult", "PairDataset", "Progress", "Sample", "TrainBatch", "TrainData",
    "autocast_dtype", "backward_window", "collate", "configure_trainable", "enable_checkpointing", "encode_prompt",
    "encode_target", "evaluate", "find_resume", "finetune", "levenshtein", "levenshtein_similarity", "load_data",
    "loss_sum", "model_card", "open_image", "prepare_out", "prompt_text", "save_model", "train", "train_mode",
]
