"""`annotate finetune --augment flip` (the localisation recipe's default): about half the box pairs
of each epoch are read mirrored left to right, image and boxes together, repeatably under --seed.
A few dozen pseudo-labelled images are fitted within two rounds of the loop (issue 31)."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from annotator.cli import cli
from annotator.finetune import load_data, recipes
from annotator.finetune.data import PairDataset
from annotator.model.sequence import LOC_TOKEN, mirror_boxes, quantize
from finetune_fixtures import OBJECTS, write_florence

FAST = ["--model", "random:tiny", "--devices", "cpu", "--workers", "0", "--no-progress"]


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def bins(text: str) -> list[int]:
    return [int(t[5:-1]) for t in LOC_TOKEN.findall(text)]


@pytest.mark.parametrize("width", [500, 640, 333, 1920])
def test_mirror_boxes_is_the_box_of_the_mirrored_image(width):
    height = 480
    for x1, y1, x2, y2 in [(0, 0, width, height), (10.5, 20, 100, 200), (width / 3, 5, width - 1, 479)]:
        target = "car" + "".join(f"<loc_{quantize(v, s)}>" for v, s in
                                 ((x1, width), (y1, height), (x2, width), (y2, height)))
        mirrored_pixels = (width - x2, y1, width - x1, y2)
        want = [quantize(v, width if i % 2 == 0 else height) for i, v in enumerate(mirrored_pixels)]
        got = mirror_boxes(target)
        assert got.startswith("car") and bins(got)[1::2] == want[1::2]
        assert all(abs(g - w) <= 1 for g, w in zip(bins(got), want))  # a pixel on a bin edge may round over
        assert mirror_boxes(got) == target  # twice: the original


def test_only_whole_labelled_boxes_are_mirrored():
    two = "car<loc_100><loc_200><loc_300><loc_400>a dog<loc_0><loc_1><loc_999><loc_998>"
    assert mirror_boxes(two) == "car<loc_699><loc_200><loc_899><loc_400>a dog<loc_0><loc_1><loc_999><loc_998>"
    polygon = "<loc_1><loc_2><loc_3><loc_4><loc_5><loc_6>"
    for target in (polygon, "a caption", "", "car<loc_1><loc_2><loc_3>", two + "trailing words"):
        assert mirror_boxes(target) is None, target
    quad = "hello" + "".join(f"<loc_{v}>" for v in range(10, 18))  # reads as two boxes, the second unlabelled
    assert mirror_boxes(quad) is not None and mirror_boxes(quad, labelled=True) is None
    assert mirror_boxes("<loc_1><loc_2><loc_3><loc_4>") == "<loc_996><loc_2><loc_998><loc_4>"  # region proposals


def _dataset(root, processor, augment="flip", seed=0):
    data = load_data(root, val_fraction=0)
    return PairDataset(data.train, processor, augment=augment, seed=seed), data


def _drawn_columns(pixels: torch.Tensor) -> tuple[float, float]:
    """x1, x2 in 1000-bins of the rectangle drawn on the fixture's plain background."""
    background = pixels[:, 0, 0][:, None, None]  # every fixture box leaves the top-left corner bare
    cols = ((pixels - background).abs().sum(0) > 0.5).any(0).nonzero().flatten()
    width = pixels.shape[-1]
    return float(cols.min()) * 1000 / width, float(cols.max() + 1) * 1000 / width


def test_flip_keeps_image_and_boxes_aligned(tmp_path, tiny_lm):
    write_florence(tmp_path / "data")
    ds, data = _dataset(tmp_path / "data", tiny_lm.processor)
    tokenizer = tiny_lm.processor.tokenizer
    seen = set()
    for epoch in range(1, 7):
        ds.set_epoch(epoch)
        for i, ex in enumerate(data.train):
            sample = ds[i]
            target = tokenizer.decode(sample.labels, skip_special_tokens=False)
            x1, _, x2, _ = bins(target)
            drawn = _drawn_columns(sample.pixel_values)
            column = 1000 / sample.pixel_values.shape[-1]  # one pixel column, in bins
            assert abs(drawn[0] - x1) <= column + 1 and abs(drawn[1] - x2) <= column + 1, (epoch, i, target, drawn)
            flipped = ds.flipped(i)
            assert (bins(target) == bins(ex.target)) != flipped  # no fixture box is its own mirror
            assert target.split("<loc_")[0].endswith(ex.target.split("<loc_")[0])  # the label stays
            seen.add(flipped)
    assert seen == {True, False}
    assert len(OBJECTS) == len(data.train)


def test_which_pairs_flip_is_repeatable_and_changes_by_epoch_and_seed(tmp_path, tiny_lm):
    write_florence(tmp_path / "data", repeat=8)  # 32 pairs

    def pattern(seed, epoch):
        ds, _ = _dataset(tmp_path / "data", tiny_lm.processor, seed=seed)
        ds.set_epoch(epoch)
        return [ds.flipped(i) for i in range(len(ds))]

    assert pattern(0, 1) == pattern(0, 1)
    assert pattern(0, 1) != pattern(0, 2) and pattern(0, 1) != pattern(1, 1)
    assert 8 <= sum(pattern(0, 1)) <= 24  # about half
    none, _ = _dataset(tmp_path / "data", tiny_lm.processor, augment="none")
    assert not any(none.flipped(i) for i in range(len(none)))


def test_pairs_that_are_not_boxes_are_never_flipped(tmp_path, tiny_lm):
    (tmp_path / "d" / "train").mkdir(parents=True)
    Image.new("RGB", (64, 64), (200, 10, 10)).save(tmp_path / "d" / "train" / "a.png")
    quad = "hello" + "".join(f"<loc_{v}>" for v in range(10, 18))
    box = "car<loc_1><loc_2><loc_3><loc_4>"
    rows = [("<OCR_WITH_REGION>", quad), ("<CAPTION>", "a red square"), ("<REGION_TO_CATEGORY>" + box[3:], "car"),
            ("<CAPTION_TO_PHRASE_GROUNDING>the car on the left", box), ("<DocVQA>where?", box), ("<OD>", quad)]
    with open(tmp_path / "d" / "train" / "annotations.jsonl", "w") as fh:
        for prefix, suffix in rows:
            fh.write(json.dumps({"image": "a.png", "prefix": prefix, "suffix": suffix}) + "\n")
    ds, _ = _dataset(tmp_path / "d", tiny_lm.processor)
    for epoch in range(1, 9):
        ds.set_epoch(epoch)
        assert not any(ds.flipped(i) for i in range(len(ds)))


def test_the_localisation_recipe_flips_and_a_flag_wins(tmp_path):
    from annotator.config import FinetuneConfig

    boxes = ["car<loc_1><loc_2><loc_3><loc_4>"]
    assert recipes.apply(FinetuneConfig(tmp_path, tmp_path / "o"), boxes)[0].augment == "flip"
    assert recipes.apply(FinetuneConfig(tmp_path, tmp_path / "o"), ["an answer"])[0].augment == "none"
    assert recipes.apply(FinetuneConfig(tmp_path, tmp_path / "o", augment="none"), boxes)[0].augment == "none"


def _finetune(root, out, *flags):
    res = CliRunner().invoke(cli, ["finetune", str(root), "--out", str(out), "--epochs", "2", "--batch-size", "2",
                                   "--lr", "1e-3", "--warmup", "0", *flags, *FAST], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res.output, json.loads((out / "finetune.json").read_text())


def test_a_run_with_flip_is_repeatable(tmp_path, one_thread):
    write_florence(tmp_path / "data", repeat=2)
    out1, first = _finetune(tmp_path / "data", tmp_path / "a")
    _, again = _finetune(tmp_path / "data", tmp_path / "b")
    _, plain = _finetune(tmp_path / "data", tmp_path / "c", "--augment", "none")
    assert "--augment flip" in out1 and first["settings"]["augment"] == "flip"
    assert [h["train_loss"] for h in first["history"]] == [h["train_loss"] for h in again["history"]]
    assert [h["train_loss"] for h in first["history"]] != [h["train_loss"] for h in plain["history"]]


def test_open_end_leaves_the_final_end_token_out_of_the_loss(tmp_path, tiny_lm):
    write_florence(tmp_path / "data")
    closed, _ = _dataset(tmp_path / "data", tiny_lm.processor, augment="none")
    data = load_data(tmp_path / "data", val_fraction=0)
    opened = PairDataset(data.train, tiny_lm.processor, open_end=True)
    eos = tiny_lm.processor.tokenizer.eos_token_id
    for i in range(len(data.train)):
        assert closed[i].labels[-1] == eos and opened[i].labels == closed[i].labels[:-1]
