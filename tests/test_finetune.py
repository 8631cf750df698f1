"""annotate finetune: the loop closes (fine-tune the tiny random model on synthetic <OD> pairs
until it overfits, then `annotate run` and `annotate export` give the targets back), frozen
weights stay bit-identical, padding is not in the loss, DocVQA trains and reports its metric,
resume, several processes (DDP over gloo, two CPU workers standing in for two GPUs)."""

from __future__ import annotations

import json
import re

import pytest
import torch
from click.testing import CliRunner

from annotator.cli import cli
from annotator.config import ModelSpec
from annotator.finetune import (DOCVQA_TOKEN, STATE_FILE, Collator, Sample, backward_window, configure_trainable,
                                encode_prompt, encode_target, levenshtein, levenshtein_similarity, load_data,
                                loss_sum)
from annotator.model.load import load_model
from finetune_fixtures import OBJECTS, write_docvqa, write_florence, write_images

LOC = re.compile(r"<loc_(\d+)>")
FAST = ["--model", "random:tiny", "--devices", "cpu", "--workers", "0", "--no-progress"]


def invoke(*args):
    res = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    return res


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: one thread is several times faster than two contending ones."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread):
    """Fine-tune random:tiny on 4 images x 30 repeats of their <OD> pairs: 10 epochs x 30 steps."""
    root = tmp_path_factory.mktemp("ft-loop")
    targets = write_florence(root / "data", repeat=30)
    res = invoke("finetune", root / "data", "--out", root / "ckpt", "--epochs", 10, "--lr", 3e-3,
                 "--batch-size", 4, "--warmup", 10, "--freeze-vision", *FAST)
    assert res.exit_code == 0, res.output
    info = json.loads((root / "ckpt" / "finetune.json").read_text())
    print("\nloss curve (epoch, train loss, val loss):")
    for h in info["history"]:
        print(f"  {h['epoch']:>2}  {h['train_loss']:.4f}  {h['val_loss']:.4f}")
    return root, targets, info


def bins(text: str) -> list[int]:
    return [int(b) for b in LOC.findall(text)]


def test_loop_closes_run_and_export_give_the_targets_back(trained, tmp_path):
    root, targets, info = trained
    assert info["history"][-1]["train_loss"] < 0.1 * info["history"][0]["train_loss"]
    images = tmp_path / "images"
    write_images(images)
    ann = tmp_path / "ann"
    res = invoke("run", images, "--model", root / "ckpt", "--tasks", "od", "--num-beams", "1", "--out", ann,
                 "--workers", "0", "--no-progress")
    assert res.exit_code == 0, res.output
    import polars as pl

    rows = {r["image"]: r for r in pl.read_parquet(str(ann / "*.parquet")).iter_rows(named=True)}
    proc = load_model(ModelSpec(str(root / "ckpt")), "cpu").processor
    for name, target in targets.items():
        row = rows[name]
        assert row["status"] == "ok"
        label = target.split("<", 1)[0]
        assert row["labels"] == [label], row["raw"]
        got = proc.post_processor.quantize(torch.tensor(row["bboxes"]), (row["width"], row["height"]))[0].tolist()
        assert all(abs(g - t) <= 1 for g, t in zip(got, bins(target))), (got, target)

    # ... and `annotate export` writes the same pairs again
    exp = tmp_path / "exp"
    res = invoke("export", ann, "--format", "florence", "--out", exp, "--val-fraction", 0, "--copy-images",
                 "--images", images)
    assert res.exit_code == 0, res.output
    pairs = [json.loads(line) for line in (exp / "train" / "annotations.jsonl").read_text().splitlines()]
    assert len(pairs) == len(targets)
    for p in pairs:
        target = targets[p["image"]]
        assert p["prefix"] == "<OD>"
        assert p["suffix"].split("<", 1)[0] == target.split("<", 1)[0]
        assert all(abs(g - t) <= 1 for g, t in zip(bins(p["suffix"]), bins(target)))


def test_frozen_vision_tower_is_bit_identical(trained):
    root, _, _ = trained
    before = load_model(ModelSpec("random:tiny"), "cpu").model
    after = load_model(ModelSpec(str(root / "ckpt")), "cpu").model
    b, a = before.state_dict(), after.state_dict()
    vision = [k for k in b if k.startswith("model.vision_tower.")]
    assert vision and all(torch.equal(b[k], a[k]) for k in vision)
    # the rest did train: projector and language model moved
    assert not torch.equal(b["model.multi_modal_projector.image_projection.weight"],
                           a["model.multi_modal_projector.image_projection.weight"])
    assert not torch.equal(b["lm_head.weight"], a["lm_head.weight"])


def test_checkpoint_layout_card_and_settings(trained):
    root, _, info = trained
    ckpt = root / "ckpt"
    assert (ckpt / "model.safetensors").is_file() and (ckpt / "processor_config.json").is_file()
    epochs = sorted(ckpt.glob("epoch-*"), key=lambda p: int(p.name.split("-")[1]))
    assert [p.name for p in epochs] == [f"epoch-{i}" for i in range(1, 11)]
    assert all((p / "model.safetensors").is_file() for p in epochs)
    assert [p.name for p in epochs if (p / STATE_FILE).exists()] == ["epoch-10"]  # only the newest: resume point
    assert info["settings"]["lr"] == 3e-3 and info["settings"]["freeze_vision"] is True
    assert info["data"]["format"] == "florence" and info["data"]["train_pairs"] == 120
    assert info["data"]["val_pairs"] == 4 and info["data"]["validation"] == "split file"
    assert info["best_metric"] == "val_loss"
    best = min(info["history"], key=lambda h: h["val_loss"])
    assert info["best_epoch"] == best["epoch"]
    card = (ckpt / "README.md").read_text()
    assert "library_name: transformers" in card and "train: 120 pairs over 4 images" in card
    assert "| lr | 0.003 |" in card and "| 10 |" in card


def sample(processor, i: int, prompt: str, target: str) -> Sample:
    from PIL import Image

    _, _, colour = OBJECTS[i % len(OBJECTS)]
    pixels = processor.image_processor(images=Image.new("RGB", (64, 64), colour), return_tensors="pt")["pixel_values"][0]
    return Sample(i, pixels, encode_prompt(processor, prompt), encode_target(processor, target))


def two_samples(processor) -> tuple[Sample, Sample]:
    """Different prompt and target lengths, so batching them pads both."""
    a = sample(processor, 0, "<OD>", "car<loc_100><loc_200><loc_300><loc_400>")
    b = sample(processor, 1, "<OPEN_VOCABULARY_DETECTION>a long phrase here",
               "person<loc_500><loc_100><loc_900><loc_600>" * 4)
    return a, b


def pad_to(batch, width: int, tlen: int, pad_id: int, label_pad: int = -100):
    F = torch.nn.functional
    batch.input_ids = F.pad(batch.input_ids, (0, width - batch.input_ids.shape[1]), value=pad_id)
    batch.attention_mask = F.pad(batch.attention_mask, (0, width - batch.attention_mask.shape[1]))
    batch.labels = F.pad(batch.labels, (0, tlen - batch.labels.shape[1]), value=label_pad)
    return batch


def test_padding_is_not_in_the_loss(tiny_lm):
    model, processor = tiny_lm.model, tiny_lm.processor  # eval mode: no dropout
    cfg, pad_id = model.config.text_config, processor.tokenizer.pad_token_id
    a, b = two_samples(processor)
    collate = Collator(pad_id)
    alone, both = collate([a]), collate([a, b])
    width, tlen = both.input_ids.shape[1], both.labels.shape[1]
    assert width > alone.input_ids.shape[1] and tlen > alone.labels.shape[1]
    with torch.no_grad():
        la, lb, lab = (loss_sum(model, x, cfg) for x in (alone, collate([b]), both))
        padded = pad_to(collate([a]), width, tlen, pad_id)  # a alone, padded to the pair's width
        lp = loss_sum(model, padded, cfg)
        # the published recipe pads the labels with <pad>: padding then counts as targets
        lr = loss_sum(model, pad_to(collate([a]), width, tlen, pad_id, label_pad=pad_id), cfg)
    assert padded.tokens() == alone.tokens() == len(a.labels) and both.tokens() == len(a.labels) + len(b.labels)
    torch.testing.assert_close(lp, la, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(lab, la + lb, rtol=1e-5, atol=1e-4)
    assert not torch.isclose(lr, la, rtol=1e-3)


def test_gradient_accumulation_equals_one_big_batch():
    lm = load_model(ModelSpec("random:tiny"), "cpu")  # a fresh copy: this test sets requires_grad
    model, processor = lm.model, lm.processor
    params = configure_trainable(model, freeze_vision=True)
    a, b = two_samples(processor)
    collate = Collator(processor.tokenizer.pad_token_id)
    grads = []
    for window in ([collate([a]), collate([b])], [collate([a, b])]):
        model.zero_grad(set_to_none=True)
        total = backward_window(model, window, model.config.text_config)
        assert total[1].item() == len(a.labels) + len(b.labels)
        grads.append([p.grad.clone() for p in params])
    for g1, g2 in zip(*grads):
        torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for p in model.model.vision_tower.parameters())


def test_gradient_checkpointing_gives_the_same_gradients():
    """Checkpointing is really on (the language model's layers run again during backward) and the
    gradients, all there, equal those without it."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    from annotator.finetune import enable_checkpointing, train_mode

    grads, calls = [], []
    for checkpointing in (False, True):
        lm = load_model(ModelSpec("random:tiny"), "cpu")
        params = configure_trainable(lm.model, freeze_vision=True)
        if checkpointing:
            enable_checkpointing(lm.model)
        train_mode(lm.model, lm.model, freeze_vision=True)  # dropout on: recomputation must replay its RNG
        # a hook on each checkpointed layer's fc1: the recomputation re-runs the layer's forward (the
        # layer's own hook does not see it, the checkpoint wraps inside __call__)
        layers = [m for m in lm.model.model.language_model.modules() if isinstance(m, GradientCheckpointingLayer)]
        count = [0]
        hooks = [m.fc1.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1)) for m in layers]
        a, b = two_samples(lm.processor)
        torch.manual_seed(0)
        backward_window(lm.model, [Collator(lm.processor.tokenizer.pad_token_id)([a, b])], lm.model.config.text_config)
        for h in hooks:
            h.remove()
        grads.append([p.grad for p in params])
        calls.append(count[0])
    assert layers and calls[0] == len(layers) and calls[1] == 2 * calls[0], calls  # each layer recomputed once
    assert all(g is not None for g in grads[1]) and all(g.abs().sum() > 0 for g in grads[1][-5:])
    for g1, g2 in zip(*grads):
        torch.testing.assert_close(g1, g2)


def test_prompts_tokenize_as_annotate_run_and_the_model_card_snippet_do(tiny_lm):
    from PIL import Image

    from annotator.config import GenerationSettings, TaskInputs
    from annotator.decode.engine import Engine
    from annotator.tasks import parse_task_list

    proc = tiny_lm.processor
    engine = Engine(tiny_lm, parse_task_list("od"), TaskInputs(), GenerationSettings())
    for prompt in ("<OD>", "<CAPTION>", "<OPEN_VOCABULARY_DETECTION>car"):
        assert encode_prompt(proc, prompt) == engine.prompt_ids(prompt)
    # DocVQA: literal text, the same ids every time, equal to what processor(text=..., images=...) gives
    q = DOCVQA_TOKEN + "What is in the image?"
    ids = encode_prompt(proc, q)
    assert ids == encode_prompt(proc, q)
    assert proc.tokenizer.decode(ids[proc.num_image_tokens:], skip_special_tokens=True) == q
    via_processor = proc(text=q, images=Image.new("RGB", (64, 64)), return_tensors="pt")["input_ids"][0].tolist()
    assert via_processor == ids
    # a question that contains a task token does not trip _construct_prompts
    assert encode_prompt(proc, DOCVQA_TOKEN + "What does <OCR> mean?")


@pytest.mark.parametrize("a,b,dist", [("", "", 0), ("abc", "", 3), ("kitten", "sitting", 3), ("flaw", "lawn", 2),
                                      ("same", "same", 0)])
def test_levenshtein(a, b, dist):
    assert levenshtein(a, b) == dist == levenshtein(b, a)


@pytest.mark.parametrize("pred,answers,sim", [("car", ["car"], 1.0), (" Car ", ["car"], 1.0), ("", [""], 1.0),
                                              ("cat", ["car"], 2 / 3), ("xyz", ["car", "xyz"], 1.0),
                                              ("", ["car"], 0.0)])
def test_levenshtein_similarity(pred, answers, sim):
    assert levenshtein_similarity(pred, answers) == pytest.approx(sim)


def test_docvqa_trains_and_reports_similarity(tmp_path, one_thread):
    qa = write_docvqa(tmp_path / "data", repeat=25)
    data = load_data(tmp_path / "data")
    assert data.kind == "docvqa" and len(data.train) == 100 and len(data.val) == 4
    assert data.train[0].prompt == DOCVQA_TOKEN + qa[0][0] and data.train[0].target == qa[0][1]
    assert len({id(e.image_bytes) for e in data.train}) == 4  # one copy of each image's bytes
    res = invoke("finetune", tmp_path / "data", "--out", tmp_path / "ckpt", "--epochs", 8, "--lr", 3e-3,
                 "--batch-size", 4, "--warmup", 10, *FAST)
    assert res.exit_code == 0, res.output
    info = json.loads((tmp_path / "ckpt" / "finetune.json").read_text())
    sims = [h["val_similarity"] for h in info["history"]]
    print("\ndocvqa (epoch, train loss, val loss, val similarity):")
    for h in info["history"]:
        print(f"  {h['epoch']}  {h['train_loss']:.4f}  {h['val_loss']:.4f}  {h['val_similarity']:.3f}")
    assert all(0 <= s <= 1 for s in sims) and info["best_metric"] == "val_similarity"
    assert max(sims) >= 0.75 and info["history"][-1]["val_loss"] < info["history"][0]["val_loss"]
    assert "val similarity" in res.output
    card = (tmp_path / "ckpt" / "README.md").read_text()
    assert "<DocVQA>" in card and "docvqa" in card


def test_resume_goes_on_from_the_newest_epoch(tmp_path, one_thread):
    write_florence(tmp_path / "data", repeat=2)
    args = ["--lr", 1e-3, "--batch-size", 4, *FAST]
    assert invoke("finetune", tmp_path / "data", "--out", tmp_path / "ckpt", "--epochs", 1, *args).exit_code == 0
    # a non-empty --out without --resume is refused
    res = invoke("finetune", tmp_path / "data", "--out", tmp_path / "ckpt", "--epochs", 2, *args)
    assert res.exit_code == 2 and "--resume" in res.output
    res = invoke("finetune", tmp_path / "data", "--out", tmp_path / "ckpt", "--epochs", 3, "--resume",
                 tmp_path / "ckpt", *args)
    assert res.exit_code == 0, res.output
    info = json.loads((tmp_path / "ckpt" / "finetune.json").read_text())
    assert [h["epoch"] for h in info["history"]] == [1, 2, 3]
    assert [h["step"] for h in info["history"]] == [2, 4, 6]  # the optimizer/scheduler step count went on
    assert [p.name for p in (tmp_path / "ckpt").glob(f"epoch-*/{STATE_FILE}")] == [STATE_FILE]
    assert (tmp_path / "ckpt" / "epoch-3" / STATE_FILE).is_file()


def test_bad_data_is_a_one_line_usage_error(tmp_path):
    (tmp_path / "d").mkdir()
    res = invoke("finetune", tmp_path / "d", "--out", tmp_path / "ckpt", *FAST)
    assert res.exit_code == 2 and "annotations.jsonl" in res.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "nope.png", "prefix": "<OD>", "suffix": "x"}\n')
    res = invoke("finetune", bad, "--out", tmp_path / "ckpt", *FAST)
    assert res.exit_code == 2 and "not found" in res.output


def test_two_processes_ddp_on_cpu(tmp_path):
    """--devices cpu:0,cpu:1: two spawned DDP ranks (gloo), as two GPUs would run (nccl)."""
    write_florence(tmp_path / "data", repeat=2)
    res = invoke("finetune", tmp_path / "data", "--out", tmp_path / "ckpt", "--epochs", 1, "--lr", 1e-3,
                 "--batch-size", 2, "--model", "random:tiny", "--devices", "cpu:0,cpu:1", "--workers", "0",
                 "--no-progress")
    assert res.exit_code == 0, res.output
    info = json.loads((tmp_path / "ckpt" / "finetune.json").read_text())
    # 8 pairs, 2 per batch, 2 ranks: 2 optimizer steps, each over 4 pairs
    assert info["history"][0]["step"] == 2 and info["history"][0]["val_loss"] is not None
    # both ranks ended the epoch with the same weights (checked by the ranks, recorded by rank 0)
    assert info["history"][0]["ranks_in_sync"] is True
    assert load_model(ModelSpec(str(tmp_path / "ckpt")), "cpu").model is not None


def test_targets_over_the_limit_lose_whole_instances_and_are_counted(tiny_lm, tmp_path, caplog):
    from annotator.finetune.data import Example, PairDataset
    from annotator.model.sequence import loc_tokens

    tok = tiny_lm.processor.tokenizer
    boxes = "".join(f"car{loc_tokens([10 + i, 20, 30 + i, 40], 100, 100)}" for i in range(12))
    text = "word " * 300
    examples = [Example("a", "<OD>", boxes), Example("b", "<OD>", "dog" + loc_tokens([1, 2, 3, 4], 10, 10)),
                Example("c", "<CAPTION>", text)]
    full = tok(boxes)["input_ids"]
    limit = len(full) - 3  # the last box does not fit whole
    with caplog.at_level("WARNING", logger="annotator.finetune.data"):
        ds = PairDataset(examples, tiny_lm.processor, max_target_tokens=limit)
    cut = ds.targets[0]
    assert len(cut) <= limit and cut[-1] == tok.eos_token_id  # still ends in </s>
    assert tok.decode(cut[1:-1]) == "".join(f"car{loc_tokens([10 + i, 20, 30 + i, 40], 100, 100)}" for i in range(11))
    assert ds.targets[1] == tok("dog" + loc_tokens([1, 2, 3, 4], 10, 10))["input_ids"]  # short: unchanged
    assert ds.targets[2] == [] and ds[2] is None  # plain text over the limit: dropped, not cut mid-sentence
    assert (ds.fit.pairs_cut, ds.fit.instances_dropped, ds.fit.pairs_dropped) == (1, 1, 1)
    assert any("1 whole instances left out of 1 pairs, 1 pairs dropped" in r.message for r in caplog.records)


def test_max_target_tokens_is_a_finetune_option():
    res = CliRunner().invoke(cli, ["finetune", "--help"])
    assert "--max-target-tokens" in res.output
