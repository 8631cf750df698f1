"""Original `microsoft/Florence-2-*` checkpoints (and fine-tunes saved in that format) -> the native
transformers classes, by config translation and weight renaming. None of the checkpoint's Python runs.

The original format: config.json with `auto_map`, a DaViT `vision_config` (`dim_embed`, ...), a BART-kind
`text_config` (`florence2_language`), weights named after the remote-code modules (`vision_tower.*`,
`image_projection`, `language_model.model.*`), often `pytorch_model.bin`, and a plain BART tokenizer whose
Florence-2 tokens the remote processor adds at load time. The mapping follows transformers'
convert_florence2_original_pytorch_to_hf.py. A converted checkpoint is cached (safetensors) under the
project cache, keyed by source and revision, and loaded from there like any native checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from annotator.config import ModelSpec
from annotator.model.convert_map import (ConversionError, build_generation_config, build_processor, check_names, convert_config,
                          grow_vocab, rename_weights)
from annotator.model.cache import cache_dir, publish, staging_dir

log = logging.getLogger(__name__)

CONVERT_FORMAT = 1  # bump when the converted output changes (invalidates cached conversions)
MARKER = ".annotate-convert"  # written into every converted folder; --overwrite replaces only folders with it


class OutputRefused(ValueError):
    """OUT cannot be (re)placed: not empty, not ours, or the final rename failed. Exit 2."""


@dataclass(frozen=True)
class OriginalCheckpoint:
    source: str  # what the user passed: hub id or local folder
    folder: Path  # local files: the hub snapshot or the user's folder
    revision: str  # hub commit, or a fingerprint of the local files
    config: dict


# ------------------------------------------------------------------------------------------ detection

def is_original_config(cfg: dict) -> bool:
    """The remote-code layout: DaViT's `dim_embed` (native: `embed_dim`) or the `florence2_language` text model."""
    if cfg.get("model_type") != "florence2":
        return False
    return "dim_embed" in (cfg.get("vision_config") or {}) or \
        (cfg.get("text_config") or {}).get("model_type") == "florence2_language"


def find_original(spec: ModelSpec) -> OriginalCheckpoint | None:
    """The checkpoint `spec` names if it is in the original format, else None (native, random, or
    unreachable: the normal loading path then says what is wrong)."""
    if spec.name.startswith("random:"):
        return None
    local = Path(spec.name)
    if local.is_dir():
        cfg_path = local / "config.json"
        if not cfg_path.is_file():
            return None
        cfg = json.loads(cfg_path.read_text())
        if not is_original_config(cfg):
            return None
        return OriginalCheckpoint(str(local.resolve()), local, _fingerprint(local), cfg)
    cfg_path = _hub_file(spec.name, spec.revision, "config.json")
    if cfg_path is None:
        return None
    cfg = json.loads(cfg_path.read_text())
    if not is_original_config(cfg):
        return None
    # hub snapshots live in .../snapshots/<commit>/: the commit is the revision, whatever branch was asked for
    return OriginalCheckpoint(spec.name, cfg_path.parent, cfg_path.parent.name, cfg)


def _hub_file(repo: str, revision: str | None, filename: str) -> Path | None:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo, filename, revision=revision))
    except Exception:  # not a hub id, offline without cache, no such file: not ours to explain
        return None


def _fingerprint(folder: Path) -> str:
    """A local folder has no revision: name, size and mtime of its files stand in for one."""
    h = hashlib.sha256()
    for p in sorted(folder.iterdir()):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------------ entry points

def native_checkpoint(spec: ModelSpec) -> Path | None:
    """For an original-format checkpoint: the folder of its native conversion (converted now, or cached
    by an earlier load). None when `spec` needs no conversion."""
    orig = find_original(spec)
    if orig is None:
        return None
    key = hashlib.sha256(f"{orig.source}@{orig.revision}#v{CONVERT_FORMAT}".encode()).hexdigest()[:16]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", orig.source.strip("/"))[-60:]
    dest = cache_dir() / "converted" / f"{slug}-{key}"
    if (dest / "config.json").is_file():
        log.info("%s is in the original Florence-2 format; using its native conversion cached at %s", spec.name, dest)
        return dest
    _write_staged(orig, dest, spec.allow_pickle)
    log.warning("%s is in the original Florence-2 format: converted to the native classes (no remote code run), "
                "cached at %s", spec.name, dest)
    return dest


def convert_checkpoint(spec: ModelSpec, out: Path, overwrite: bool = False) -> OriginalCheckpoint:
    """`annotate convert`: write the native checkpoint of an original-format one to `out`. An existing
    `out` is replaced only with `overwrite` and only if this command wrote it (its MARKER file), and
    only after the new checkpoint is complete: a failed conversion leaves `out` as it was."""
    _check_out(out, overwrite)
    orig = find_original(spec)
    if orig is None:
        raise ConversionError(f"{spec.name!r} is not an original-format Florence-2 checkpoint (or cannot be "
                              "reached); native checkpoints load as they are")
    staging = _convert_into_staging(orig, out, spec.allow_pickle)
    _swap_in(staging, out)
    return orig


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise OutputRefused(f"{out} exists and is not a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise OutputRefused(f"{out} is not empty; pass --overwrite to replace it")
    if out.is_symlink() or not (out / MARKER).is_file():
        raise OutputRefused(f"refusing to replace {out}: it was not written by `annotate convert` (no {MARKER} "
                            "file); choose an empty OUT")


def _swap_in(staging: Path, out: Path) -> None:
    """Put the finished `staging` folder at `out`. POSIX cannot rename a folder over a non-empty one, so
    the old folder is first renamed aside and only deleted once the new one is in place; if any rename
    fails the old folder is put back and the error says so."""
    old = out.with_name(out.name + f".old{os.getpid()}") if out.exists() else None
    try:
        if old is not None:
            os.replace(out, old)
        try:
            os.replace(staging, out)
        except OSError:
            if old is not None:
                os.replace(old, out)
            raise
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise OutputRefused(f"cannot move the converted checkpoint into {out}: {exc.strerror or exc}; "
                            f"{out} is unchanged") from exc
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_staged(orig: OriginalCheckpoint, dest: Path, allow_pickle: bool) -> None:
    """The cache: convert into a staging folder, then rename into place, so a killed conversion never
    leaves a half checkpoint where a load would find it."""
    _convert_into_staging(orig, dest, allow_pickle)
    publish(dest)


def _convert_into_staging(orig: OriginalCheckpoint, dest: Path, allow_pickle: bool) -> Path:
    staging = staging_dir(dest)
    try:
        write_native(orig, staging, allow_pickle)
        (staging / MARKER).write_text("written by `annotate convert`; --overwrite may replace this folder\n")
    except ConversionError:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    except Exception as exc:  # download or file errors: one line, like every other load failure
        shutil.rmtree(staging, ignore_errors=True)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConversionError(f"cannot convert {orig.source!r}: {first}") from exc
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging


def write_native(orig: OriginalCheckpoint, out: Path, allow_pickle: bool) -> None:
    """Config, weights, processor and generation config of `orig`, saved as a native checkpoint in `out`."""
    from transformers import Florence2ForConditionalGeneration

    folder = _fetch_files(orig, allow_pickle)
    weights = rename_weights(load_original_weights(folder, allow_pickle))
    processor = build_processor(folder)
    tokenizer = processor.tokenizer
    rows = grow_vocab(weights, tokenizer.image_token_id + 1)
    config = convert_config(orig.config, vocab_size=rows, image_token_id=tokenizer.image_token_id)
    with torch.device("meta"):  # shapes and names only: the real tensors are assigned below
        model = Florence2ForConditionalGeneration(config)
    check_names(model, weights)
    model.load_state_dict(weights, strict=False, assign=True)
    model.tie_weights()
    model.generation_config = build_generation_config(orig.config, folder)
    model.save_pretrained(out)  # safetensors
    processor.save_pretrained(out)


# ------------------------------------------------------------------------------------------ files

WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json")
PICKLE_PATTERNS = ("*.bin", "*.bin.index.json")
META_PATTERNS = ("config.json", "generation_config.json", "preprocessor_config.json", "tokenizer.json",
                 "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json", "added_tokens.json")


def _fetch_files(orig: OriginalCheckpoint, allow_pickle: bool) -> Path:
    """The files conversion reads, never the checkpoint's *.py. A local folder is used in place."""
    if Path(orig.source).is_dir():
        return orig.folder
    from huggingface_hub import snapshot_download

    def fetch(patterns) -> Path:
        return Path(snapshot_download(orig.source, revision=orig.revision, allow_patterns=list(patterns)))

    folder = fetch(META_PATTERNS + WEIGHT_PATTERNS)
    if not list(folder.glob("*.safetensors")):
        if not allow_pickle:  # say so before downloading gigabytes of pickle
            raise ConversionError(f"{orig.source} has no safetensors weights; its pickle weights "
                                  "(pytorch_model.bin) need --allow-pickle if you trust it")
        folder = fetch(PICKLE_PATTERNS)
    return folder


def load_original_weights(folder: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint; safetensors preferred, pickle only when the user allows it."""
    from safetensors.torch import load_file

    shards = sorted(folder.glob("*.safetensors"))
    if shards:
        return {k: v for s in shards for k, v in load_file(s).items()}
    pickles = sorted(folder.glob("*.bin"))
    if not pickles:
        raise ConversionError(f"no weights (*.safetensors or *.bin) in {folder}")
    if not allow_pickle:
        raise ConversionError(f"{folder} has only pickle weights ({pickles[0].name}); pass --allow-pickle "
                              "if you trust it")
    # weights_only: even when allowed, a pickle may only hold tensors, never code
    return {k: v for p in pickles for k, v in torch.load(p, map_location="cpu", weights_only=True).items()}
