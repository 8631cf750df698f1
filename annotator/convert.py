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
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ModelSpec
from .model import ModelLoadError, POST_PROCESSOR_CONFIG, _publish, _staging, random_cache_dir

log = logging.getLogger(__name__)

CONVERT_FORMAT = 1  # bump when the converted output changes (invalidates cached conversions)
PAD_VOCAB_TO = 64  # as transformers' own conversion: embedding rows padded for tensor-core friendly shapes


class ConversionError(ModelLoadError):
    """An original-format checkpoint that cannot be converted; the message says why."""


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
    dest = random_cache_dir() / "converted" / f"{slug}-{key}"
    if (dest / "config.json").is_file():
        log.info("%s is in the original Florence-2 format; using its native conversion cached at %s", spec.name, dest)
        return dest
    _write_staged(orig, dest, spec.allow_pickle)
    log.warning("%s is in the original Florence-2 format: converted to the native classes (no remote code run), "
                "cached at %s", spec.name, dest)
    return dest


def convert_checkpoint(spec: ModelSpec, out: Path, overwrite: bool = False) -> OriginalCheckpoint:
    """`annotate convert`: write the native checkpoint of an original-format one to `out`."""
    orig = find_original(spec)
    if orig is None:
        raise ConversionError(f"{spec.name!r} is not an original-format Florence-2 checkpoint (or cannot be "
                              "reached); native checkpoints load as they are")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConversionError(f"{out} is not empty; pass --overwrite to replace it")
    _write_staged(orig, out, spec.allow_pickle, replace=True)
    return orig


def _write_staged(orig: OriginalCheckpoint, dest: Path, allow_pickle: bool, replace: bool = False) -> None:
    """Convert into a staging folder, then rename into place: a killed conversion never leaves a half
    checkpoint where a load would find it."""
    staging = _staging(dest)
    try:
        write_native(orig, staging, allow_pickle)
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
    if replace and dest.exists():
        shutil.rmtree(dest)
    _publish(dest)


def write_native(orig: OriginalCheckpoint, out: Path, allow_pickle: bool) -> None:
    """Config, weights, processor and generation config of `orig`, saved as a native checkpoint in `out`."""
    from transformers import Florence2ForConditionalGeneration

    folder = _fetch_files(orig, allow_pickle)
    weights = rename_weights(load_original_weights(folder, allow_pickle))
    processor = build_processor(folder)
    tokenizer = processor.tokenizer
    rows = _grow_vocab(weights, tokenizer.image_token_id + 1)
    config = convert_config(orig.config, vocab_size=rows, image_token_id=tokenizer.image_token_id)
    with torch.device("meta"):  # shapes and names only: the real tensors are assigned below
        model = Florence2ForConditionalGeneration(config)
    _check_names(model, weights)
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


# ------------------------------------------------------------------------------------------ weights

_BLOCK = r"vision_tower\.blocks\.(?P<s>\d+)\.(?P<b>\d+)\.(?P<kind>spatial|channel)_block\."
_NATIVE_BLOCK = r"model.vision_tower.blocks.\g<s>.\g<b>.\g<kind>_block."
_P = r"(?P<p>weight|bias)"

# original name (full match) -> native name; the first matching rule wins.
RENAMES: list[tuple[re.Pattern, str]] = [(re.compile(a), b) for a, b in [
    (rf"vision_tower\.convs\.(?P<i>\d+)\.proj\.{_P}", r"model.vision_tower.convs.\g<i>.conv.\g<p>"),
    (rf"vision_tower\.convs\.(?P<i>\d+)\.norm\.{_P}", r"model.vision_tower.convs.\g<i>.norm.\g<p>"),
    (rf"{_BLOCK}(?P<c>conv[12])\.fn\.dw\.{_P}", _NATIVE_BLOCK + r"\g<c>.\g<p>"),
    (rf"{_BLOCK}(?:window|channel)_attn\.norm\.{_P}", _NATIVE_BLOCK + r"norm1.\g<p>"),
    (rf"{_BLOCK}(?P<a>window|channel)_attn\.fn\.(?P<l>qkv|proj)\.{_P}", _NATIVE_BLOCK + r"\g<a>_attn.\g<l>.\g<p>"),
    (rf"{_BLOCK}ffn\.norm\.{_P}", _NATIVE_BLOCK + r"norm2.\g<p>"),
    (rf"{_BLOCK}ffn\.fn\.net\.(?P<l>fc[12])\.{_P}", _NATIVE_BLOCK + r"ffn.\g<l>.\g<p>"),
    (r"image_projection", "model.multi_modal_projector.image_projection.weight"),  # (in, out) -> Linear's (out, in)
    (rf"image_proj_norm\.{_P}", r"model.multi_modal_projector.image_proj_norm.\g<p>"),
    (r"image_pos_embed\.(?P<a>row|column)_embeddings\.weight",
     r"model.multi_modal_projector.image_position_embed.\g<a>_embeddings.weight"),
    (r"visual_temporal_embed\.pos_idx_to_embed", "model.multi_modal_projector.visual_temporal_embed.pos_idx_to_embed"),
    (r"language_model\.model\.(?P<rest>.+)", r"model.language_model.\g<rest>"),
    (r"language_model\.lm_head\.weight", "lm_head.weight"),
]]

# DaViT's classification head and final norm exist in the original modules but Florence-2 never runs them.
DROPPED = re.compile(r"vision_tower\.(?:norms|head)\..+")
ZERO_BIAS = "language_model.final_logits_bias"  # BART's logits bias buffer: all zeros in Florence-2; native has none

SHARED = "model.language_model.shared.weight"
TIED = ("model.language_model.encoder.embed_tokens.weight", "model.language_model.decoder.embed_tokens.weight",
        "lm_head.weight")
TEMPORAL = "model.multi_modal_projector.visual_temporal_embed.pos_idx_to_embed"


def native_name(name: str) -> str | None:
    for pattern, repl in RENAMES:
        if pattern.fullmatch(name):
            return pattern.sub(repl, name)
    return None


def rename_weights(original: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original tensors under native names. Unknown names are kept under an `unexpected:` prefix so that
    `_check_names` can report every problem in one line."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in original.items():
        if DROPPED.fullmatch(name):
            continue
        if name == ZERO_BIAS:
            if torch.count_nonzero(tensor):
                raise ConversionError(f"{ZERO_BIAS} is not zero; the native Florence-2 has no logits bias")
            continue
        new = native_name(name)
        if name == "image_projection":
            tensor = tensor.t().contiguous()
        out[new or f"unexpected:{name}"] = tensor
    # The word embeddings are one tensor in both formats; checkpoints store any one of the tied copies.
    shared = next((out[k] for k in (SHARED, *TIED) if k in out), None)
    if shared is not None:
        for k in (SHARED, *TIED):
            out[k] = shared
    return out


def _grow_vocab(weights: dict[str, torch.Tensor], needed: int) -> int:
    """Make room for the <image> token the native processor adds (its rows only ever get replaced by image
    features). New rows are the mean of the old ones, so their logit is the mean of the real tokens'
    logits: never above the best, and the same on every conversion."""
    if SHARED not in weights:
        return needed  # reported as missing by _check_names
    old = weights[SHARED]
    if old.shape[0] >= needed:
        return old.shape[0]
    rows = math.ceil(needed / PAD_VOCAB_TO) * PAD_VOCAB_TO
    mean = old.float().mean(0, keepdim=True).to(old.dtype)
    grown = torch.cat([old, mean.expand(rows - old.shape[0], -1)])
    for k in (SHARED, *TIED):
        weights[k] = grown
    return rows


def _check_names(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """One line naming every missing, unexpected or misshapen weight; fills the temporal embedding, a
    constant table, when a checkpoint left it out."""
    expected = model.state_dict()
    if TEMPORAL not in weights:
        weights[TEMPORAL] = _temporal_table(model.config)
    unexpected = [k.removeprefix("unexpected:") for k in weights if k not in expected]
    missing = [k for k in expected if k not in weights]
    shapes = [f"{k} {tuple(weights[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
              if k in weights and weights[k].shape != v.shape]
    problems = [f"{len(v)} {what}: {_few(v)}" for what, v in
                (("unexpected", unexpected), ("missing (native names)", missing), ("misshapen", shapes)) if v]
    if problems:
        raise ConversionError("cannot convert the original Florence-2 checkpoint: " + "; ".join(problems))


def _temporal_table(config) -> torch.Tensor:
    from transformers.models.florence2.modeling_florence2 import Florence2VisionPositionalEmbeddingCosine1D

    return Florence2VisionPositionalEmbeddingCosine1D(config).pos_idx_to_embed


def _few(names: list[str], n: int = 6) -> str:
    return ", ".join(names[:n]) + (f", ... (+{len(names) - n})" if len(names) > n else "")


# ------------------------------------------------------------------------------------------ config

# Generation settings live in the original text_config (the remote class generates through its BART
# language model, whose generation config is built from it); natively they belong in generation_config.json.
GENERATION_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "forced_bos_token_id",
                   "forced_eos_token_id", "num_beams", "no_repeat_ngram_size", "early_stopping", "length_penalty")


def convert_config(orig: dict, vocab_size: int, image_token_id: int):
    from dataclasses import fields

    from transformers import BartConfig, Florence2Config

    v, t = orig["vision_config"], dict(orig["text_config"])
    _require(v.get("image_feature_source", ["spatial_avg_pool", "temporal_avg_pool"])
             == ["spatial_avg_pool", "temporal_avg_pool"], "image_feature_source", v.get("image_feature_source"))
    _require(v["visual_temporal_embedding"]["type"] == "COSINE", "visual_temporal_embedding",
             v["visual_temporal_embedding"])
    _require(v["image_pos_embed"]["type"] == "learned_abs_2d", "image_pos_embed", v["image_pos_embed"])
    for flag in ("add_final_layer_norm", "normalize_before", "add_bias_logits"):
        _require(not t.get(flag), flag, t.get(flag))
    vision = dict(
        depths=v["depths"], patch_size=v["patch_size"], patch_stride=v["patch_stride"],
        patch_padding=v["patch_padding"], patch_prenorm=v["patch_prenorm"], embed_dim=v["dim_embed"],
        num_heads=v["num_heads"], num_groups=v["num_groups"], window_size=v["window_size"],
        drop_path_rate=v.get("drop_path_rate", 0.1), projection_dim=v["projection_dim"],
        max_temporal_embeddings=v["visual_temporal_embedding"]["max_temporal_embeddings"],
        max_position_embeddings=v["image_pos_embed"]["max_pos_embeddings"],
    )
    meta = {"transformers_version", "architectures", "id2label", "label2id", "problem_type", "dtype", "is_decoder"}
    arch = {f.name for f in fields(BartConfig)} - meta
    text = {k: val for k, val in t.items() if k in arch}
    text.update(vocab_size=vocab_size, tie_word_embeddings=True)
    return Florence2Config(vision_config=vision, text_config=text, image_token_id=image_token_id)


def _require(ok: bool, key: str, value) -> None:
    if not ok:
        raise ConversionError(f"cannot convert: the native Florence-2 has no equivalent of {key}={value!r}")


def build_generation_config(orig: dict, folder: Path):
    from transformers import GenerationConfig

    values = {}
    saved = folder / "generation_config.json"
    if saved.is_file():
        values = {k: v for k, v in json.loads(saved.read_text()).items()
                  if k not in ("_from_model_config", "transformers_version")}
    text = orig["text_config"]
    values.update({k: text[k] for k in GENERATION_KEYS if k in text})  # what the original actually generated with
    return GenerationConfig(**values)


# ------------------------------------------------------------------------------------------ processor

# What the remote processor adds to the plain BART tokenizer, in its order (the ids the weights were trained with).
ORIGINAL_TOKENS = (["<od>", "</od>", "<ocr>", "</ocr>"] + [f"<loc_{i}>" for i in range(1000)] + [
    "<cap>", "</cap>", "<ncap>", "</ncap>", "<dcap>", "</dcap>", "<grounding>", "</grounding>", "<seg>", "</seg>",
    "<sep>", "<region_cap>", "</region_cap>", "<region_to_desciption>", "</region_to_desciption>", "<proposal>",
    "</proposal>", "<poly>", "</poly>", "<and>"])

# The remote post-processor drops these grounding phrases (its black list); the native one reads them from here.
BANNED_GROUNDING = [
    "it", "I", "me", "mine", "you", "your", "yours", "he", "him", "his", "she", "her", "hers", "they", "them",
    "their", "theirs", "one", "oneself", "we", "us", "our", "ours", "its", "myself", "yourself", "himself",
    "herself", "itself", "ourselves", "yourselves", "themselves", "this", "that", "these", "those", "who", "whom",
    "whose", "which", "what", "all", "another", "any", "anybody", "anyone", "anything", "each", "everybody",
    "everyone", "everything", "few", "many", "nobody", "none", "several", "some", "somebody", "someone",
    "something", "each other", "one another", "the image", "image", "images", "the", "a", "an", "a group",
    "other objects", "lots", "a set"]

IMAGE_KEYS = ("size", "crop_size", "do_center_crop", "do_resize", "resample", "do_rescale", "rescale_factor",
              "do_normalize", "image_mean", "image_std", "do_convert_rgb", "image_seq_length")


def build_processor(folder: Path):
    """The native Florence2Processor from the original's files: its BART tokenizer plus the Florence-2
    tokens (added as the remote processor does) and <image>; its CLIP image settings."""
    from transformers import BartTokenizer, Florence2Processor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    try:
        tokenizer = BartTokenizer.from_pretrained(folder)
    except Exception as exc:
        raise ConversionError(f"cannot read the BART tokenizer in {folder}: {str(exc).splitlines()[0]}") from exc
    vocab = tokenizer.get_vocab()
    missing = [t for t in ORIGINAL_TOKENS if t not in vocab]
    tokenizer.add_tokens(missing, special_tokens=True)
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    tokenizer._set_model_specific_special_tokens(special_tokens={"image_token": "<image>"})

    pre_path = folder / "preprocessor_config.json"
    if not pre_path.is_file():
        raise ConversionError(f"no preprocessor_config.json in {folder}")
    pre = json.loads(pre_path.read_text())
    kind = pre.get("image_processor_type", "CLIPImageProcessor")
    _require(kind.startswith("CLIPImageProcessor"), "image_processor_type", kind)
    image_processor = CLIPImageProcessorPil(**{k: pre[k] for k in IMAGE_KEYS if pre.get(k) is not None})
    post = dict(POST_PROCESSOR_CONFIG, phrase_grounding={"banned_grounding_tokens": BANNED_GROUNDING})
    return Florence2Processor(image_processor=image_processor, tokenizer=tokenizer, post_processor_config=post)


# ------------------------------------------------------------------------------------------ command

def _command():
    import click

    @click.command("convert")
    @click.argument("src")
    @click.argument("out", type=click.Path(path_type=Path, file_okay=False))
    @click.option("--revision", default=None, help="Hub branch, tag or commit of SRC.")
    @click.option("--allow-pickle", is_flag=True, help="Allow pickle (.bin) weights. Only for checkpoints you trust.")
    @click.option("--overwrite", is_flag=True, help="Replace what is in OUT.")
    def convert(src, out, revision, allow_pickle, overwrite) -> None:
        """Write the native checkpoint of an original-format Florence-2 one (SRC: hub id or folder).

        `--model SRC` converts on the fly (and caches); this keeps or shares the result. No code from
        SRC runs."""
        try:
            orig = convert_checkpoint(ModelSpec(src, revision, allow_pickle=allow_pickle), out, overwrite)
        except ModelLoadError as exc:
            click.echo(f"Error: {exc}", err=True)
            raise SystemExit(2)
        click.echo(f"{src} (revision {orig.revision}) -> {out}: native Florence2ForConditionalGeneration + "
                   f"Florence2Processor; load it with --model {out}")

    return convert
