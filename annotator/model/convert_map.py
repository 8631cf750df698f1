"""The mapping from original `microsoft/Florence-2-*` checkpoints to the native transformers classes:
weight names, config, generation config and processor. Pure translation of files already on disk;
convert.py finds, fetches, stages and caches (see its docstring for the original format)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from annotator.model import ModelLoadError
from annotator.model.sequence import LOC_TOKENS, POST_PROCESSOR_CONFIG

PAD_VOCAB_TO = 64  # as transformers' own conversion: embedding rows padded for tensor-core friendly shapes


class ConversionError(ModelLoadError):
    """An original-format checkpoint that cannot be converted; the message says why."""


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
    `check_names` can report every problem in one line."""
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


def grow_vocab(weights: dict[str, torch.Tensor], needed: int) -> int:
    """Make room for the <image> token the native processor adds (its rows only ever get replaced by image
    features). New rows are the mean of the old ones, so their logit is the mean of the real tokens'
    logits: never above the best, and the same on every conversion."""
    if SHARED not in weights:
        return needed  # reported as missing by check_names
    old = weights[SHARED]
    if old.shape[0] >= needed:
        return old.shape[0]
    rows = math.ceil(needed / PAD_VOCAB_TO) * PAD_VOCAB_TO
    mean = old.float().mean(0, keepdim=True).to(old.dtype)
    grown = torch.cat([old, mean.expand(rows - old.shape[0], -1)])
    for k in (SHARED, *TIED):
        weights[k] = grown
    return rows


def check_names(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
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
ORIGINAL_TOKENS = (["<od>", "</od>", "<ocr>", "</ocr>"] + LOC_TOKENS + [
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
