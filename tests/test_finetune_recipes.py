"""`annotate finetune` picks its schedule from the data (annotator/finetune/recipes.py) and warns when
a run is too short to move the model: the DocVQA recipe on a few dozen pseudo-labelled boxes changed
nothing (issue 31)."""

from __future__ import annotations

import json

import pytest

from click.testing import CliRunner

from annotator.cli import cli
from annotator.config import FinetuneConfig
from annotator.finetune import recipes
from finetune_fixtures import write_docvqa, write_florence

FAST = ["--model", "random:tiny", "--devices", "cpu", "--workers", "0", "--no-progress"]
BOXES = ["car<loc_1><loc_2><loc_3><loc_4>", "dog<loc_5><loc_6><loc_7><loc_8>", "a caption"]


def test_the_recipe_follows_the_targets():
    assert recipes.choose(BOXES).name == "localisation"  # most targets are locations
    assert recipes.choose(["an answer", "42", BOXES[0]]).name == "text"
    assert recipes.choose([]).name == "text"
    assert recipes.choose(["an answer"], "localisation").name == "localisation"  # named: no guessing


def test_flags_given_win_over_the_recipe(tmp_path):
    cfg = FinetuneConfig(tmp_path, tmp_path / "o", lr=3e-5, freeze_vision=True)
    got, recipe = recipes.apply(cfg, BOXES)
    assert recipe.name == "localisation"
    assert (got.lr, got.freeze_vision, got.epochs, got.batch_size, got.warmup) == (3e-5, True, 2, 8, 10)


def test_too_short_warns_when_the_schedule_sums_to_too_little(tmp_path):
    cfg = FinetuneConfig(tmp_path, tmp_path / "o", lr=1e-6, warmup=0)
    assert "barely move" in recipes.too_short(cfg, 10)  # the DocVQA rate on a few batches
    assert recipes.too_short(cfg, 400_000) is None  # the published recipe on all of DocVQA
    loc = FinetuneConfig(tmp_path, tmp_path / "o", lr=1e-4, warmup=10)
    assert "barely move" in recipes.too_short(loc, 2)  # 2 steps inside the warmup: 0 + 1e-5
    assert recipes.too_short(loc, 8) is None  # 8 steps: 2.8e-4, what adapted the demo model
    assert recipes.lr_sum(1e-4, 10, 2) == pytest.approx(1e-5)
    assert recipes.lr_sum(1.0, 0, 4) == pytest.approx(1 + 0.75 + 0.5 + 0.25)


def test_cli_picks_localisation_for_box_pairs_and_warns_when_too_short(tmp_path):
    write_florence(tmp_path / "data", repeat=1)
    res = CliRunner().invoke(cli, ["finetune", str(tmp_path / "data"), "--out", str(tmp_path / "ckpt"),
                                   "--epochs", "1", "--lr", "1e-6", *FAST], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "recipe localisation" in res.output and "--no-freeze-vision" in res.output
    assert "barely move the model" in res.output
    settings = json.loads((tmp_path / "ckpt" / "finetune.json").read_text())["settings"]
    assert (settings["lr"], settings["freeze_vision"], settings["batch_size"], settings["warmup"]) == \
        (1e-6, False, 8, 10)


def test_cli_picks_text_for_docvqa(tmp_path):
    write_docvqa(tmp_path / "data", repeat=1)
    res = CliRunner().invoke(cli, ["finetune", str(tmp_path / "data"), "--out", str(tmp_path / "ckpt"),
                                   "--epochs", "1", *FAST], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "recipe text" in res.output and "--freeze-vision" in res.output
    settings = json.loads((tmp_path / "ckpt" / "finetune.json").read_text())["settings"]
    assert (settings["lr"], settings["freeze_vision"], settings["recipe"]) == (1e-6, True, "auto")
