"""The shipped demo model really annotates: on scenes and pages it never saw (a seed not used in
training), through `annotate run` and the COCO export, its boxes, labels and text match the truth.
The floors here are the issue's ("the tests fail under 0.5"); the README's table has the measured figures."""

from __future__ import annotations

import json
import os

import pytest

from annotator import samples
from annotator.model import DEMO_NAME, demo_dir
from annotator.quality import measure
from tests.run_helpers import by_key, run_cli

slow = pytest.mark.skipif(not os.environ.get("FLORENCE_ANNOTATE_SLOW"),
                          reason="the pseudo-label loop takes minutes: FLORENCE_ANNOTATE_SLOW=1 runs it (CI does)")


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("golden") / "scenes"
    samples.write(folder, n=24, seed=4242, kind="scenes")
    return folder


def test_demo_ships_with_the_package_and_is_small():
    files = {p.name: p.stat().st_size for p in demo_dir().iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "processor_config.json"} <= files.keys()
    assert sum(files.values()) <= 30 * 2**20


def test_demo_detects_held_out_scenes(scenes, tmp_path):
    q = measure(DEMO_NAME, scenes, tmp_path, tasks="od,caption")
    assert q.od["AP50"] >= 0.5, q.lines()
    # scores rank right above wrong: using them never costs AP, and high-score boxes are mostly right
    assert q.od["AP"] >= q.od_scores_one["AP"] - 0.01, q.lines()
    assert q.precision[0.7]["precision"] >= 0.8, q.lines()
    assert q.caption_exact >= 0.3, q.lines()


def test_demo_golden_boxes_and_labels_through_the_cli(scenes, tmp_path):
    """One fixed scene, its boxes and labels checked one by one against the drawn truth."""
    res = run_cli("run", str(scenes), "--model", "demo", "--tasks", "od", "--out", str(tmp_path / "a"),
                  "--limit", "6", "--workers", "0", "--no-progress", timeout=300)
    assert res.returncode == 0, res.stderr
    gt = json.loads((scenes / "ground_truth.json").read_text())
    names = {c["id"]: c["name"] for c in gt["categories"]}
    rows = by_key(tmp_path / "a")
    hits = total = 0
    for im in gt["images"][:6]:
        row = rows[(im["file_name"], "od")]
        truth = [(names[a["category_id"]], a["bbox"]) for a in gt["annotations"] if a["image_id"] == im["id"]]
        for label, (x, y, w, h) in truth:
            total += 1
            hits += any(lab == label and abs(b[0] - x) <= 0.1 * w + 4 and abs(b[1] - y) <= 0.1 * h + 4
                        and abs(b[2] - x - w) <= 0.1 * w + 4 and abs(b[3] - y - h) <= 0.1 * h + 4
                        for lab, b in zip(row["labels"], row["bboxes"]))
    assert hits / total >= 0.5, (hits, total)


def test_demo_reads_printed_text(tmp_path):
    folder = tmp_path / "docs"
    samples.write(folder, n=8, seed=4343, kind="documents")
    q = measure(DEMO_NAME, folder, tmp_path, tasks="ocr")
    assert q.ocr_cer is not None and q.ocr_cer <= 0.5, q.lines()


@slow
def test_pseudo_label_loop_improves_the_demo_model_on_a_shift(tmp_path):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("loop", Path(__file__).parents[1] / "examples" / "pseudo_label_loop.py")
    loop = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loop)
    result = loop.loop(tmp_path, n=120, n_test=30, epochs=2)
    assert result["pairs"] > 0
    assert result["after"]["AP50"] > result["before"]["AP50"], result


def test_training_script_trains_and_saves_a_loadable_model(tmp_path):
    """examples/train_demo.py, which made the shipped model, still runs: two steps, saved, loaded back."""
    import importlib.util
    from pathlib import Path

    from annotator.config import ModelSpec
    from annotator.model import load_model

    path = Path(__file__).parents[1] / "examples" / "train_demo.py"
    spec = importlib.util.spec_from_file_location("train_demo", path)
    train_demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_demo)
    classes, bins = train_demo.cell_targets([samples.scene(__import__("numpy").random.default_rng(0))], 12)
    assert classes.shape == (1, 144) and bins.shape == (1, 144, 4) and (classes > 0).any()
    train_demo.main(["--out", str(tmp_path / "m"), "--steps", "2", "--batch", "2", "--save-every", "2"])
    log = json.loads((tmp_path / "m" / "training_log.json").read_text())
    assert isinstance(log, list)
    lm = load_model(ModelSpec(str(tmp_path / "m")))
    assert lm.processor.tokenizer.convert_tokens_to_ids("<loc_0>") != lm.processor.tokenizer.unk_token_id
