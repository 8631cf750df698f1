"""random:base against the published Florence-2-base: its config, generation config and processor
settings, field by field, so that tests and `annotate bench` decode as a real checkpoint does.

The published values are written out here from the public files (model weights cannot be downloaded here):
- TEXT: microsoft/Florence-2-base config.json, text_config
  (https://huggingface.co/microsoft/Florence-2-base/blob/main/config.json). transformers'
  convert_florence2_original_pytorch_to_hf.py passes this text_config unchanged to the native
  Florence2Config of florence-community/Florence-2-base.
- VISION: the same file's vision_config (DaViT), under the native names the conversion script gives them.
- GENERATION: the native checkpoint's generation_config.json, which transformers derives from that
  text_config (https://huggingface.co/h2oai/Florence-2-base/blob/main/generation_config.json, "Duplicate
  from ducviet00/Florence-2-base-hf", the conversion published as florence-community/Florence-2-base).
  It leaves max_length unset (transformers' default 20); the public ONNX ports cap at max_length 1025
  (1024 decoder positions + the start token), which is what the engine's max_new_tokens 1024 gives.
- IMAGE: microsoft/Florence-2-base preprocessor_config.json
  (https://huggingface.co/microsoft/Florence-2-base/blob/main/preprocessor_config.json), which the
  conversion script keeps as the native processor's image processor.
random:tiny keeps its small dimensions (64 px images, 32-wide text) but every setting that picks a
code path is the published one."""

from __future__ import annotations

import pytest

from annotator.config import GenerationSettings, TaskInputs
from annotator.model.load import RANDOM_ARCHS, build_random_processor, random_florence2

TEXT = dict(
    d_model=768, encoder_layers=6, decoder_layers=6, encoder_attention_heads=12, decoder_attention_heads=12,
    encoder_ffn_dim=3072, decoder_ffn_dim=3072, max_position_embeddings=1024, activation_function="gelu",
    scale_embedding=False, bos_token_id=0, eos_token_id=2, pad_token_id=1, decoder_start_token_id=2,
    forced_eos_token_id=2,  # forced_bos_token_id 0 too, which transformers 5 keeps in the generation config only
)
VISION = dict(
    depths=[1, 1, 9, 1], embed_dim=[128, 256, 512, 1024], num_heads=[4, 8, 16, 32], num_groups=[4, 8, 16, 32],
    patch_size=[7, 3, 3, 3], patch_stride=[4, 2, 2, 2], patch_padding=[3, 1, 1, 1],
    patch_prenorm=[False, True, True, True], window_size=12, projection_dim=768, max_temporal_embeddings=100,
    max_position_embeddings=50,
)
GENERATION = dict(  # the whole file, less transformers_version and _from_model_config
    bos_token_id=0, decoder_start_token_id=2, early_stopping=True, eos_token_id=2, forced_bos_token_id=0,
    forced_eos_token_id=2, no_repeat_ngram_size=3, num_beams=3, pad_token_id=1,
)
IMAGE = dict(
    size={"height": 768, "width": 768}, crop_size={"height": 768, "width": 768}, do_center_crop=False,
    do_convert_rgb=None, do_normalize=True, do_rescale=True, do_resize=True, image_mean=[0.485, 0.456, 0.406],
    image_std=[0.229, 0.224, 0.225], resample=3, rescale_factor=0.00392156862745098, image_seq_length=577,
)
IMAGE_TOKEN_ID = 51289  # the native checkpoints add <image> after the 51289 tokens of the original vocabulary


def _differences(obj, published: dict) -> dict:
    got = {k: getattr(obj, k, "<missing>") for k in published}
    got = {k: list(v) if isinstance(v, tuple) else v for k, v in got.items()}
    return {k: (got[k], v) for k, v in published.items() if got[k] != v}


@pytest.fixture(scope="module")
def base_model():
    from annotator.model.load import BART_VOCAB_SIZE
    from annotator.model.sequence import FLORENCE_TOKENS

    vocab = BART_VOCAB_SIZE + len(FLORENCE_TOKENS) + 1  # the random tokenizer: same ids as the published one
    return random_florence2("base", vocab, vocab - 1)


def test_random_base_config_is_the_published_one(base_model):
    config = base_model.config
    assert _differences(config.text_config, TEXT) == {}
    assert _differences(config.vision_config, VISION) == {}
    assert config.image_token_id == IMAGE_TOKEN_ID


def test_random_models_generate_with_the_published_generation_config(base_model, tiny_lm):
    for model in (base_model, tiny_lm.model):
        # every rule the random config sets, and only those: what the published file sets
        written = {k: v for k, v in model.generation_config.to_diff_dict().items()
                   if k not in ("transformers_version", "_from_model_config")}
        assert written == GENERATION


@pytest.mark.parametrize("size", ["base", "large"])
def test_random_processor_has_the_published_image_settings(size):
    image = build_random_processor(RANDOM_ARCHS[size].image_size).image_processor
    assert _differences(image, IMAGE) == {}


def test_random_tiny_differs_from_the_published_processor_only_in_size(tiny_lm):
    image = tiny_lm.processor.image_processor
    sizes = {"size": {"height": 64, "width": 64}, "crop_size": {"height": 64, "width": 64}, "image_seq_length": 5}
    assert _differences(image, dict(IMAGE, **sizes)) == {}


def test_the_engine_takes_num_beams_from_the_run_not_the_model(tiny_lm):
    """The model's num_beams (3) is what a bare `generate` would use; the engine passes the run's
    --num-beams (default 3) explicitly, so `--num-beams 1` decodes greedily on any checkpoint."""
    import copy

    from annotator.decode.engine import Engine
    from annotator.tasks import parse_task_list

    lm = copy.copy(tiny_lm)
    lm.model = copy.copy(tiny_lm.model)
    engine = Engine(lm, parse_task_list("caption"), TaskInputs(), GenerationSettings(num_beams=1, max_new_tokens=4))
    assert lm.model.generation_config.num_beams == 3 and engine.generation.num_beams == 1


def test_a_loaded_random_model_reports_the_generate_path_until_the_scheduler_bans_ngrams(tiny_lm):
    """With no_repeat_ngram_size 3 the decode path is named, not silent (what the manifest records)."""
    from annotator.decode.engine import decoding_path
    from annotator.decode.scheduler import UNSUPPORTED

    path = decoding_path(tiny_lm.model.generation_config)
    if "no_repeat_ngram_size" in UNSUPPORTED:
        assert path == "generate: no_repeat_ngram_size=3 is not implemented by the decode scheduler"
    else:
        assert path == "scheduler"

