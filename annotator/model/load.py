"""Load Florence-2: hub ids and local directories through the native transformers classes,
or `random:<size>`, a randomly initialised model of a real architecture built offline.

A random model's outputs are meaningless; it exists for dry runs, tests and benchmarks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from annotator.config import ModelSpec
from annotator.model import DEMO_NAME, ModelLoadError
from annotator.model.cache import cache_dir, publish, staging_dir
from annotator.model.sequence import FLORENCE_TOKENS, POST_PROCESSOR_CONFIG
from annotator.model.precision import auto_dtype

log = logging.getLogger(__name__)

RANDOM_PREFIX = "random:"
RANDOM_FORMAT = 2  # bump when the random tokenizer/processor recipe changes (invalidates the cache)

# The generation config the published checkpoints ship (the native Florence-2-base|large's
# generation_config.json, which transformers derived from microsoft/Florence-2-*'s text_config). random:*
# carry it so that tests and `annotate bench` decode as a real checkpoint does (tests/test_published_config.py
# checks it against the published files). Like the published file it leaves max_length unset: the engine
# always passes max_new_tokens (1024 by default: 1025 positions with the start token, the ports' max_length).
PUBLISHED_GENERATION = dict(bos_token_id=0, eos_token_id=2, pad_token_id=1, decoder_start_token_id=2,
                            forced_bos_token_id=0, forced_eos_token_id=2, num_beams=3, no_repeat_ngram_size=3,
                            early_stopping=True)


@dataclass(frozen=True)
class RandomArch:
    image_size: int
    vision: dict
    text: dict


# base/large follow the published Florence-2 configs; tiny is as small as the code allows.
RANDOM_ARCHS: dict[str, RandomArch] = {
    "tiny": RandomArch(
        image_size=64,
        vision=dict(depths=[1, 1, 1, 1], embed_dim=[16, 32, 48, 64], num_heads=[2, 2, 2, 2],
                    num_groups=[2, 2, 2, 2], window_size=2, projection_dim=32),
        text=dict(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                  decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                  init_std=0.3),  # wide init: outputs then depend on image and prompt, so tests can tell them apart
    ),
    "base": RandomArch(
        image_size=768,
        vision=dict(depths=[1, 1, 9, 1], embed_dim=[128, 256, 512, 1024], num_heads=[4, 8, 16, 32],
                    num_groups=[4, 8, 16, 32], window_size=12, projection_dim=768),
        text=dict(d_model=768, encoder_layers=6, decoder_layers=6, encoder_attention_heads=12,
                  decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072),
    ),
    "large": RandomArch(
        image_size=768,
        vision=dict(depths=[1, 1, 9, 1], embed_dim=[256, 512, 1024, 2048], num_heads=[8, 16, 32, 64],
                    num_groups=[8, 16, 32, 64], window_size=12, projection_dim=1024),
        text=dict(d_model=1024, encoder_layers=12, decoder_layers=12, encoder_attention_heads=16,
                  decoder_attention_heads=16, encoder_ffn_dim=4096, decoder_ffn_dim=4096),
    ),
}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    processor: object
    name: str
    revision: str | None
    dtype: torch.dtype
    attention: str
    device: torch.device

    @property
    def runtime(self) -> dict:
        """What the manifest records as the run's runtime (runtime_settings' shape)."""
        return {"dtype": str(self.dtype).removeprefix("torch."), "attention": self.attention, "device": str(self.device)}


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def free_cache(device: torch.device) -> None:
    """After a failure on the GPU: hand the failed call's cached blocks back before the retry."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def resolve_dtype(name: str, device: torch.device, warn: bool = True) -> torch.dtype:
    """auto: what the hardware runs well (precision.auto_dtype: bf16 on GPUs that have it and on
    CPUs with AMX, fp16 on older GPUs, else fp32); float16 on CPU becomes float32."""
    if name == "float16" and device.type == "cpu":
        # CPU half matmuls have no fast kernels (80x slower here); bf16 does, fp16 never pays off.
        if warn:
            log.warning("--dtype float16 on CPU is very slow; using float32 instead")
        return torch.float32
    if name != "auto":
        return getattr(torch, name)
    choice = auto_dtype(device)
    if warn:
        log.info("--dtype auto: %s (%s)", str(choice.dtype).removeprefix("torch."), choice.reason)
    return choice.dtype


def resolve_attention(name: str, device: torch.device) -> str:
    if name != "auto":
        if name == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
            raise ModelLoadError("--attention flash_attention_2 needs flash-attn: pip install 'florence-annotate[gpu]'")
        return name
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def runtime_settings(spec: ModelSpec, device: torch.device | str) -> dict:
    """The dtype and attention a load on `device` uses (what the manifest records, never "auto")."""
    device = torch.device(device)
    try:
        attention = resolve_attention(spec.attention, device)
    except ModelLoadError:
        attention = spec.attention
    dtype = resolve_dtype(spec.dtype, device, warn=False)  # the load itself warns
    return {"dtype": str(dtype).removeprefix("torch."), "attention": attention, "device": str(device)}


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it: 1, true, yes, on (any case)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "TRUE", "YES", "ON"}


def load_model(spec: ModelSpec, device: torch.device | str = "cpu") -> LoadedModel:
    device = torch.device(device)
    dtype = resolve_dtype(spec.dtype, device)
    attention = resolve_attention(spec.attention, device)
    if spec.name.startswith(RANDOM_PREFIX):
        model, processor = _random_model(spec.name[len(RANDOM_PREFIX):], attention)
        model = model.to(dtype)
    elif spec.name == DEMO_NAME:
        model, processor = _pretrained(dataclasses.replace(spec, name=str(demo_dir()), revision=None), dtype, attention)
    else:
        model, processor = _pretrained(spec, dtype, attention)
    model = model.to(device).eval()
    model.requires_grad_(False)
    return LoadedModel(model, processor, spec.name, spec.revision, dtype, attention, device)


def demo_dir() -> Path:
    """The shipped demo checkpoint; trained by examples/train_demo.py (see its model card)."""
    path = Path(__file__).parents[1] / "demo_model"  # annotator/demo_model: package data
    if not (path / "model.safetensors").is_file():
        raise ModelLoadError(f"the demo model is missing from this installation ({path}); reinstall "
                             f"florence-annotate, or train it with `python examples/train_demo.py --out {path}`")
    return path


def _pretrained(spec: ModelSpec, dtype: torch.dtype, attention: str):
    from transformers import AutoModelForCausalLM, AutoProcessor, Florence2ForConditionalGeneration

    from annotator.model.convert import native_checkpoint

    converted = native_checkpoint(spec)  # original microsoft/Florence-2-* format: a native copy, no remote code
    if converted is not None:
        spec = dataclasses.replace(spec, name=str(converted), revision=None, trust_remote_code=False)
    kwargs = dict(revision=spec.revision, trust_remote_code=spec.trust_remote_code)
    try:
        processor = AutoProcessor.from_pretrained(spec.name, **kwargs)
        if spec.trust_remote_code:
            # Legacy microsoft/Florence-2-* checkpoints ship their own modeling code.
            model_cls = AutoModelForCausalLM
        else:
            model_cls = Florence2ForConditionalGeneration
        model = model_cls.from_pretrained(
            spec.name, dtype=dtype, attn_implementation=attention,
            use_safetensors=None if spec.allow_pickle else True, **kwargs,
        )
    except (OSError, ValueError, ImportError) as exc:
        raise ModelLoadError(_explain_load_failure(spec, exc)) from exc
    if not hasattr(model, "get_image_features"):
        # The engine computes vision features once and reuses them per prompt, which needs the
        # native class's get_image_features/get_encoder; old remote code has neither.
        raise ModelLoadError(f"{spec.name!r} loaded as {type(model).__name__}, which the batched engine cannot "
                             "drive; use its native conversion (florence-community/Florence-2-base|large)")
    return model, processor


def _explain_load_failure(spec: ModelSpec, exc: Exception) -> str:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    text = str(exc)
    if "safetensors" in text.lower() and not spec.allow_pickle:
        fix = "this checkpoint has only pickle weights; pass --allow-pickle if you trust it"
    elif "trust_remote_code" in text or "custom code" in text:
        fix = "this is a legacy remote-code checkpoint; use florence-community/Florence-2-base|large, or pass --trust-remote-code if you trust it"
    elif Path(spec.name).exists():
        fix = "the directory exists but is not a Florence-2 checkpoint (needs config.json, weights, processor files)"
    elif hub_offline():
        fix = "HF_HUB_OFFLINE is set and the model is not in the local cache: download it once with network, or pass a local directory"
    else:
        fix = ("check the id (e.g. florence-community/Florence-2-large), the --revision, and the network; "
               "offline, pass a local checkpoint directory or set HF_HUB_OFFLINE=1 to use the cache")
    return f"cannot load model {spec.name!r}: {first} -- {fix}"


# --------------------------------------------------------------------------- random models

def _random_model(size: str, attention: str):
    from transformers import AutoProcessor

    if size not in RANDOM_ARCHS:
        raise ModelLoadError(f"unknown random model 'random:{size}'; use one of: "
                             + ", ".join(RANDOM_PREFIX + s for s in RANDOM_ARCHS))
    arch = RANDOM_ARCHS[size]
    proc_dir = cache_dir() / f"random-processor-v{RANDOM_FORMAT}-{arch.image_size}"
    if not (proc_dir / "processor_config.json").exists():
        build_random_processor(arch.image_size).save_pretrained(staging_dir(proc_dir))
        publish(proc_dir)
    processor = AutoProcessor.from_pretrained(proc_dir)
    return random_florence2(size, len(processor.tokenizer), processor.tokenizer.image_token_id, attention), processor


def random_florence2(size: str, vocab_size: int, image_token_id: int, attention: str = "sdpa"):
    """A Florence2ForConditionalGeneration with the architecture of `size` and seeded random weights,
    so every process that builds it gets the same model."""
    from transformers import Florence2Config, Florence2ForConditionalGeneration, GenerationConfig

    arch = RANDOM_ARCHS[size]
    text = dict({"init_std": 0.02, **arch.text}, vocab_size=vocab_size, max_position_embeddings=1024, bos_token_id=0,
                pad_token_id=1, eos_token_id=2, decoder_start_token_id=2, forced_bos_token_id=0,
                forced_eos_token_id=2, scale_embedding=False)
    config = Florence2Config(vision_config=dict(arch.vision, drop_path_rate=0.0), text_config=text,
                             image_token_id=image_token_id)
    config._attn_implementation = attention
    with _seeded(0):
        model = Florence2ForConditionalGeneration(config)
    model.generation_config = GenerationConfig(**PUBLISHED_GENERATION)
    return model


@contextlib.contextmanager
def _seeded(seed: int):
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(state)


BART_VOCAB_SIZE = 50265


def build_random_tokenizer():
    """A byte-level BPE with BART's vocabulary size, trained on seeded random words (2 s), plus
    Florence-2's location/task tokens and the <image> token: real sizes, meaningless merges."""
    import random

    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 9))) for _ in range(60_000)]
    seed_text = " Locate the objects with category name in the image. What does the image describe? A car, 1 person."

    def corpus():
        for i in range(0, len(words), 50):
            yield " ".join(words[i:i + 50]) + seed_text

    return florence_tokenizer(corpus(), BART_VOCAB_SIZE)


def florence_tokenizer(corpus, vocab_size: int):
    """A byte-level BPE (any text still encodes) trained on `corpus`, as BART's tokenizer class,
    plus Florence-2's location/task tokens and the <image> token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import BartTokenizer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<s>", "<pad>", "</s>", "<unk>"], min_frequency=1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    tokenizer = BartTokenizer(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                              unk_token="<unk>", padding_side="right")
    tokenizer.add_tokens(FLORENCE_TOKENS)
    # The image placeholder comes last, so the ids of the other tokens match the published vocabulary.
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    tokenizer._set_model_specific_special_tokens(special_tokens={"image_token": "<image>"})
    return tokenizer


def build_random_processor(image_size: int):
    from transformers import Florence2Processor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    grid = image_size // 32  # DaViT's four stages stride 4*2*2*2
    square = {"height": image_size, "width": image_size}
    # The published preprocessor_config.json's settings (images.py hands the processor RGB already,
    # so do_convert_rgb stays unset as there); only the size differs for random:tiny.
    image_processor = CLIPImageProcessorPil(
        size=square, crop_size=square, do_center_crop=False, do_resize=True, resample=3, do_rescale=True,
        rescale_factor=1 / 255, do_normalize=True, image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225], do_convert_rgb=None,
        image_seq_length=grid * grid + 1,  # +1: the temporal-mean token the projector appends
    )
    return Florence2Processor(image_processor=image_processor, tokenizer=build_random_tokenizer(),
                              post_processor_config=POST_PROCESSOR_CONFIG)
