"""Original-format (microsoft/Florence-2-*) checkpoints load natively: an original checkpoint is built from
random:tiny by the inverse mapping, written here independently of annotator/convert.py's rules."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from annotator.config import ModelSpec
from annotator.model import ModelLoadError
from annotator.model.load import load_model

# native name -> original name (first match wins), the reverse of transformers' conversion script
_B, _OB = r"^model\.vision_tower\.blocks\.(\d+)\.(\d+)\.", r"vision_tower.blocks.\1.\2."
INVERSE = [(re.compile(a), b) for a, b in [
    (r"^model\.vision_tower\.convs\.(\d+)\.conv\.", r"vision_tower.convs.\1.proj."),
    (r"^model\.vision_tower\.convs\.(\d+)\.norm\.", r"vision_tower.convs.\1.norm."),
    (_B + r"(\w+)_block\.(conv[12])\.", _OB + r"\3_block.\4.fn.dw."),
    (_B + r"spatial_block\.norm1\.", _OB + "spatial_block.window_attn.norm."),
    (_B + r"channel_block\.norm1\.", _OB + "channel_block.channel_attn.norm."),
    (_B + r"(\w+)_block\.(window|channel)_attn\.", _OB + r"\3_block.\4_attn.fn."),
    (_B + r"(\w+)_block\.norm2\.", _OB + r"\3_block.ffn.norm."),
    (_B + r"(\w+)_block\.ffn\.", _OB + r"\3_block.ffn.fn.net."),
    (r"^model\.multi_modal_projector\.image_projection\.weight$", "image_projection"),
    (r"^model\.multi_modal_projector\.image_position_embed\.", "image_pos_embed."),
    (r"^model\.multi_modal_projector\.", ""),
    (r"^model\.language_model\.", "language_model.model."),
    (r"^lm_head\.", "language_model.lm_head."),
]]
TIED_COPIES = ("language_model.model.encoder.embed_tokens.weight", "language_model.model.decoder.embed_tokens.weight",
               "language_model.lm_head.weight")
REMOTE_CODE = 'raise RuntimeError("the checkpoint\'s own code ran")\n'


def original_name(native: str) -> str:
    for pattern, repl in INVERSE:
        if pattern.search(native):
            return pattern.sub(repl, native, count=1)
    raise AssertionError(native)


def original_weights(model, rows: int, pickle: bool) -> dict[str, torch.Tensor]:
    """What the remote-code model's state_dict holds: original names, vocabulary without <image>, DaViT's
    unused classifier and norm, BART's zero logits bias; safetensors files keep one of the tied copies."""
    out = {}
    for name, t in model.state_dict().items():
        t = t.t() if name.endswith("image_projection.weight") else t
        t = t[:rows] if t.shape[0] == model.config.text_config.vocab_size else t
        out[original_name(name)] = t.clone().contiguous()
    dim = model.config.vision_config.embed_dim[-1]
    out |= {"vision_tower.norms.weight": torch.ones(dim), "vision_tower.norms.bias": torch.zeros(dim),
            "vision_tower.head.weight": torch.randn(1000, dim), "vision_tower.head.bias": torch.zeros(1000),
            "language_model.final_logits_bias": torch.zeros(1, rows)}
    if not pickle:
        for k in TIED_COPIES:
            del out[k]
    return out


def original_config(model, rows: int) -> dict:
    v, t = model.config.vision_config, model.config.text_config
    text = {k: getattr(t, k) for k in (
        "d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads", "decoder_attention_heads",
        "encoder_ffn_dim", "decoder_ffn_dim", "max_position_embeddings", "activation_function", "init_std",
        "scale_embedding", "bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")}
    text |= dict(model_type="florence2_language", vocab_size=rows, dropout=0.1, attention_dropout=0.1,
                 activation_dropout=0.1, forced_bos_token_id=0, forced_eos_token_id=2, num_beams=3,
                 no_repeat_ngram_size=3, early_stopping=True, add_final_layer_norm=False, normalize_before=False,
                 add_bias_logits=False, is_encoder_decoder=True)
    return {
        "architectures": ["Florence2ForConditionalGeneration"], "model_type": "florence2", "vocab_size": rows,
        "auto_map": {"AutoConfig": "configuration_florence2.Florence2Config",
                     "AutoModelForCausalLM": "modeling_florence2.Florence2ForConditionalGeneration"},
        "projection_dim": v.projection_dim, "is_encoder_decoder": True, "torch_dtype": "float32",
        "vision_config": {
            "model_type": "davit", "drop_path_rate": 0.1, "patch_size": list(v.patch_size),
            "patch_stride": list(v.patch_stride), "patch_padding": list(v.patch_padding),
            "patch_prenorm": list(v.patch_prenorm), "enable_checkpoint": False, "dim_embed": list(v.embed_dim),
            "num_heads": list(v.num_heads), "num_groups": list(v.num_groups), "depths": list(v.depths),
            "window_size": v.window_size, "projection_dim": v.projection_dim,
            "visual_temporal_embedding": {"type": "COSINE", "max_temporal_embeddings": v.max_temporal_embeddings},
            "image_pos_embed": {"type": "learned_abs_2d", "max_pos_embeddings": v.max_position_embeddings},
            "image_feature_source": ["spatial_avg_pool", "temporal_avg_pool"],
        },
        "text_config": text,
    }


def write_original(lm, folder: Path, pickle: bool) -> Path:
    """random:tiny as an original-format checkpoint, remote code files included (they must never run)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    tok = lm.processor.tokenizer
    rows = tok.image_token_id  # <image> is the last token: the original vocabulary is everything before it
    weights = original_weights(lm.model, rows, pickle)
    if pickle:
        torch.save(weights, folder / "pytorch_model.bin")
    else:
        save_file(weights, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(original_config(lm.model, rows)))
    for name in ("configuration_florence2.py", "modeling_florence2.py", "processing_florence2.py"):
        (folder / name).write_text(REMOTE_CODE)
    ip = lm.processor.image_processor
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "auto_map": {"AutoProcessor": "processing_florence2.Florence2Processor"},
        "image_processor_type": "CLIPImageProcessor", "processor_class": "Florence2Processor",
        "size": {"height": 64, "width": 64}, "crop_size": {"height": 64, "width": 64},
        "do_center_crop": False, "do_resize": True,
        "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": list(ip.image_mean), "image_std": list(ip.image_std), "do_convert_rgb": None,
        "image_seq_length": ip.image_seq_length}))
    # the tokenizer without <image>, as a saved remote-code processor leaves it
    tok.save_pretrained(folder)
    tj = json.loads((folder / "tokenizer.json").read_text())
    tj["added_tokens"] = [t for t in tj["added_tokens"] if t["content"] != "<image>"]
    (folder / "tokenizer.json").write_text(json.dumps(tj))
    tc = json.loads((folder / "tokenizer_config.json").read_text())
    for k in ("image_token", "model_specific_special_tokens", "extra_special_tokens", "added_tokens_decoder"):
        tc.pop(k, None)
    tc.update(tokenizer_class="BartTokenizer", processor_class="Florence2Processor")
    (folder / "tokenizer_config.json").write_text(json.dumps(tc))
    return folder


@pytest.fixture(scope="module")
def original_st(tiny_lm, tmp_path_factory) -> Path:
    return write_original(tiny_lm, tmp_path_factory.mktemp("orig") / "safetensors", pickle=False)


@pytest.fixture(scope="module")
def original_bin(tiny_lm, tmp_path_factory) -> Path:
    return write_original(tiny_lm, tmp_path_factory.mktemp("orig") / "bin", pickle=True)


def assert_same_weights(converted, reference, rows: int):
    ref = reference.state_dict()
    got = converted.state_dict()
    assert set(got) == set(ref)
    for name, r in ref.items():
        g = got[name]
        if g.shape != r.shape:  # the word embeddings: grown for <image>, padded to a multiple of 64
            assert g.shape[0] % 64 == 0 and g.shape[0] > rows
            assert torch.equal(g[:rows], r[:rows]), name
            assert torch.allclose(g[rows:], r[:rows].mean(0).expand_as(g[rows:]), atol=1e-6), name
        else:
            assert torch.equal(g, r), name


def batched_generate(lm, images, prompts):
    inputs = lm.processor(text=prompts, images=images, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = lm.model.generate(**inputs, max_new_tokens=12, num_beams=3, do_sample=False)
    return inputs, out


def test_original_safetensors_loads_natively_and_generates_the_same(original_st, tiny_lm, caplog):
    from transformers import Florence2ForConditionalGeneration

    rows = tiny_lm.processor.tokenizer.image_token_id
    with caplog.at_level(logging.INFO, logger="annotator.model.convert"):
        lm = load_model(ModelSpec(str(original_st)), "cpu")
    assert isinstance(lm.model, Florence2ForConditionalGeneration)
    assert lm.name == str(original_st)
    assert sum("original Florence-2 format: converted" in r.message for r in caplog.records) == 1
    assert_same_weights(lm.model, tiny_lm.model, rows)

    gen = lm.model.generation_config  # carried over from the original text_config
    assert (gen.num_beams, gen.no_repeat_ngram_size, gen.forced_bos_token_id, gen.forced_eos_token_id) == (3, 3, 0, 2)
    tok = lm.processor.tokenizer
    assert tok.image_token_id == rows and len(tok) == rows + 1
    assert lm.processor.post_processor_config["phrase_grounding"]["banned_grounding_tokens"][:2] == ["it", "I"]

    # The reference: the native model whose <image> row is the converted one's (the mean row), so that no
    # difference but the conversion is left. Batched: two images, two prompts of different lengths.
    reference = Florence2ForConditionalGeneration(tiny_lm.model.config).eval()
    reference.load_state_dict(tiny_lm.model.state_dict())
    with torch.no_grad():
        emb = reference.get_input_embeddings().weight
        emb[rows:] = emb[:rows].mean(0)
    reference.generation_config = gen
    images = [Image.new("RGB", (80, 60), (200, 30, 30)), Image.new("RGB", (50, 90), (20, 160, 90))]
    prompts = ["<OD>", "<CAPTION_TO_PHRASE_GROUNDING>a red car"]
    got_in, got = batched_generate(lm, images, prompts)
    ref_in, ref = batched_generate(type(lm)(reference, tiny_lm.processor, "ref", None, torch.float32, "sdpa",
                                            torch.device("cpu")), images, prompts)
    assert torch.equal(got_in["input_ids"], ref_in["input_ids"])
    assert torch.equal(got_in["pixel_values"], ref_in["pixel_values"])
    assert got.shape[1] > 3 and torch.equal(got, ref)

    # The next load is a plain native load of the cached copy; --trust-remote-code changes nothing for
    # Florence-2 (the checkpoint's .py files raise if anything runs them).
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="annotator.model.convert"):
        again = load_model(ModelSpec(str(original_st), trust_remote_code=True), "cpu")
    assert isinstance(again.model, Florence2ForConditionalGeneration)
    msgs = [r.message for r in caplog.records if "original Florence-2" in r.message]
    assert len(msgs) == 1 and "using its native conversion cached at" in msgs[0]


def test_pickle_original_needs_allow_pickle(original_bin, tiny_lm):
    with pytest.raises(ModelLoadError, match="--allow-pickle"):
        load_model(ModelSpec(str(original_bin)), "cpu")
    lm = load_model(ModelSpec(str(original_bin), allow_pickle=True), "cpu")
    assert_same_weights(lm.model, tiny_lm.model, tiny_lm.processor.tokenizer.image_token_id)


def test_missing_and_unexpected_weights_fail_in_one_line(original_st, tmp_path):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(original_st, broken)
    weights = load_file(broken / "model.safetensors")
    del weights["image_proj_norm.bias"]
    weights["vision_tower.extra.weight"] = torch.zeros(2)
    save_file(weights, broken / "model.safetensors")
    with pytest.raises(ModelLoadError) as err:
        load_model(ModelSpec(str(broken)), "cpu")
    msg = str(err.value)
    assert "\n" not in msg
    assert "vision_tower.extra.weight" in msg and "image_proj_norm.bias" in msg


def test_convert_command_writes_a_native_checkpoint(original_st, tiny_lm, tmp_path):
    from click.testing import CliRunner

    from annotator.cli import cli
    from annotator.model.convert import is_original_config

    out = tmp_path / "native"
    result = CliRunner().invoke(cli, ["convert", str(original_st), str(out)])
    assert result.exit_code == 0, result.output
    assert not is_original_config(json.loads((out / "config.json").read_text()))
    assert list(out.glob("*.safetensors")) and not list(out.glob("*.py"))
    lm = load_model(ModelSpec(str(out)), "cpu")
    assert_same_weights(lm.model, tiny_lm.model, tiny_lm.processor.tokenizer.image_token_id)

    again = CliRunner().invoke(cli, ["convert", str(original_st), str(out)])
    assert again.exit_code == 2 and "--overwrite" in again.output
    assert CliRunner().invoke(cli, ["convert", str(original_st), str(out), "--overwrite"]).exit_code == 0
    native = CliRunner().invoke(cli, ["convert", str(out), str(tmp_path / "x")])
    assert native.exit_code == 3 and "not an original-format" in native.output  # README: 3, cannot load


def test_convert_overwrite_replaces_only_a_folder_it_wrote(original_st, tmp_path):
    from click.testing import CliRunner

    from annotator.cli import cli

    mine = tmp_path / "photos"
    mine.mkdir()
    (mine / "holiday.jpg").write_bytes(b"not ours to delete")
    res = CliRunner().invoke(cli, ["convert", str(original_st), str(mine), "--overwrite"])
    assert res.exit_code == 2 and "not written by `annotate convert`" in res.output
    assert len(res.output.strip().splitlines()) == 1
    assert (mine / "holiday.jpg").read_bytes() == b"not ours to delete"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]  # no staging folder left behind


def test_convert_failed_swap_keeps_the_old_folder_and_fails(original_st, tmp_path, monkeypatch):
    from click.testing import CliRunner

    import annotator.model.convert as convert
    from annotator.cli import cli

    out = tmp_path / "native"
    assert CliRunner().invoke(cli, ["convert", str(original_st), str(out)]).exit_code == 0
    before = sorted(p.name for p in out.iterdir())
    real_replace = os.replace

    def failing(src, dst):  # the new folder cannot be moved into place (full disk, permissions, ...)
        if Path(dst) == out and ".tmp" in Path(src).name:
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(convert.os, "replace", failing)
    res = CliRunner().invoke(cli, ["convert", str(original_st), str(out), "--overwrite"])
    assert res.exit_code == 2, res.output
    errors = [line for line in res.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "cannot move" in errors[0] and "Traceback" not in res.output
    assert sorted(p.name for p in out.iterdir()) == before  # the earlier conversion is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["native"]


def test_failed_cache_publish_is_an_error_not_a_missing_folder(original_st, tmp_path, monkeypatch):
    import annotator.model.cache as model
    from annotator.model.convert import native_checkpoint

    monkeypatch.setenv("FLORENCE_ANNOTATE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(model.os, "replace", lambda src, dst: (_ for _ in ()).throw(OSError(13, "Permission denied")))
    with pytest.raises(ModelLoadError, match="cannot move"):
        native_checkpoint(ModelSpec(str(original_st)))


def test_finetune_from_an_original_checkpoint_saves_native_ones(original_st, tmp_path):
    from click.testing import CliRunner

    from annotator.cli import cli
    from annotator.model.convert import is_original_config
    from finetune_fixtures import write_florence

    write_florence(tmp_path / "data", repeat=1)
    res = CliRunner().invoke(cli, ["finetune", str(tmp_path / "data"), "--out", str(tmp_path / "ckpt"),
                                   "--epochs", "1", "--batch-size", "4", "--model", str(original_st),
                                   "--devices", "cpu", "--workers", "0", "--no-progress"])
    assert res.exit_code == 0, res.output
    for folder in (tmp_path / "ckpt", tmp_path / "ckpt" / "epoch-1"):
        assert not is_original_config(json.loads((folder / "config.json").read_text()))
        assert list(folder.glob("*.safetensors"))
    assert load_model(ModelSpec(str(tmp_path / "ckpt")), "cpu").model.config.image_token_id > 0
