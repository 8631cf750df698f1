"""Loading: local checkpoint dirs through the native classes, safetensors-only, clear errors."""

import shutil

import pytest
import torch

from annotator.config import ConfigError, ModelSpec
from annotator.model import ModelLoadError
from annotator.model.load import load_model, resolve_attention, resolve_dtype


def test_local_checkpoint_loads_with_native_classes(tiny_checkpoint, tiny_lm):
    from transformers import Florence2ForConditionalGeneration

    lm = load_model(ModelSpec(str(tiny_checkpoint)), "cpu")
    assert isinstance(lm.model, Florence2ForConditionalGeneration)
    assert lm.processor.tokenizer.image_token_id == tiny_lm.processor.tokenizer.image_token_id
    for (name, a), (_, b) in zip(lm.model.state_dict().items(), tiny_lm.model.state_dict().items()):
        assert torch.equal(a, b), name


def test_pickle_weights_need_allow_pickle(tiny_checkpoint, tmp_path):
    from safetensors.torch import load_file

    ckpt = tmp_path / "pickled"
    shutil.copytree(tiny_checkpoint, ckpt)
    (weights,) = ckpt.glob("*.safetensors")
    torch.save(load_file(weights), ckpt / "pytorch_model.bin")  # what old checkpoints ship
    weights.unlink()
    with pytest.raises(ModelLoadError, match="--allow-pickle"):
        load_model(ModelSpec(str(ckpt)), "cpu")
    assert load_model(ModelSpec(str(ckpt), allow_pickle=True), "cpu").model is not None


def test_missing_model_offline_is_one_line_with_the_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as err:
        load_model(ModelSpec("no-such-org/no-such-florence"), "cpu")
    msg = str(err.value)
    assert "\n" not in msg and "no-such-org/no-such-florence" in msg and "local" in msg


def test_not_a_checkpoint_dir(tmp_path):
    with pytest.raises(ModelLoadError, match="not a Florence-2 checkpoint"):
        load_model(ModelSpec(str(tmp_path)), "cpu")


def test_unknown_random_size_is_refused_when_the_spec_is_made():
    from annotator.config import ConfigError

    with pytest.raises(ConfigError, match="random:tiny"):  # before any folder is made or model code runs
        ModelSpec("random:huge")


def test_dtype_and_attention_policy():
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) in (torch.float32, torch.bfloat16)  # tests/test_precision.py: which, and why
    assert resolve_dtype("bfloat16", cpu) == torch.bfloat16
    assert resolve_attention("auto", cpu) == "sdpa"
    with pytest.raises(ConfigError):
        ModelSpec(dtype="float8")


def test_random_model_is_the_same_in_every_process(tiny_lm):
    again = load_model(ModelSpec("random:tiny"), "cpu")
    a, b = tiny_lm.model.state_dict(), again.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_random_base_has_the_published_shape():
    """random:base must cost what Florence-2-base costs: 768 px images -> 577 image tokens, 768-wide text."""
    from annotator.model.load import RANDOM_ARCHS, build_random_processor

    arch = RANDOM_ARCHS["base"]
    assert build_random_processor(arch.image_size).num_image_tokens == 577
    assert arch.text["d_model"] == arch.vision["projection_dim"] == 768
    assert (arch.text["encoder_layers"], arch.text["decoder_layers"]) == (6, 6)
