"""The synthetic world: deterministic, its ground truth true to what is drawn, and written in the
formats its consumers read (pycocotools for the boxes, the demo model's answer format for training)."""

from __future__ import annotations

import hashlib
import json
import re

import numpy as np
from pycocotools.coco import COCO

from annotator.demo import world as samples
from tests.run_helpers import run_cli


def _digest(folder) -> dict:
    return {p.name: hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_same_seed_same_files_other_seed_other_files(tmp_path):
    samples.write(tmp_path / "a", n=6, seed=3)
    samples.write(tmp_path / "b", n=6, seed=3)
    samples.write(tmp_path / "c", n=6, seed=4)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_ground_truth_is_coco_and_boxes_sit_on_the_drawn_shapes(tmp_path):
    samples.write(tmp_path, n=12, seed=1, kind="scenes")
    coco = COCO(str(tmp_path / "ground_truth.json"))
    assert len(coco.getImgIds()) == 12 and len(coco.getAnnIds()) > 12
    assert {c["name"] for c in coco.loadCats(coco.getCatIds())} == set(samples.CATEGORIES)
    from PIL import Image

    for ann in coco.loadAnns(coco.getAnnIds()):
        img = coco.loadImgs(ann["image_id"])[0]
        x, y, w, h = ann["bbox"]
        assert 0 <= x and 0 <= y and x + w <= img["width"] + 1e-6 and y + h <= img["height"] + 1e-6
        assert w >= 15.9 and h >= 15.9  # the smallest objects are 16 px
        colour = coco.loadCats(ann["category_id"])[0]["name"].split()[0]
        with Image.open(tmp_path / img["file_name"]) as im:
            px = np.asarray(im.convert("RGB"))[int(y + h / 2), int(x + w / 2)]  # every shape covers its centre
        # the centre pixel is the object's colour, unless a later shape was drawn over it
        others = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=ann["image_id"])) if a["id"] > ann["id"]]
        covered = any(o["bbox"][0] <= x + w / 2 <= o["bbox"][0] + o["bbox"][2]
                      and o["bbox"][1] <= y + h / 2 <= o["bbox"][1] + o["bbox"][3] for o in others)
        if not covered:
            assert np.abs(px.astype(int) - samples.COLOURS[colour]).max() <= 16, (ann, px)


def test_texts_hold_captions_that_count_and_ocr_lines_with_quads(tmp_path):
    samples.write(tmp_path, n=20, seed=2, kind="mixed")
    gt = json.loads((tmp_path / "ground_truth.json").read_text())
    texts = [json.loads(line) for line in (tmp_path / "texts.jsonl").read_text().splitlines()]
    assert len(texts) == 20
    names = {c["id"]: c["name"] for c in gt["categories"]}
    by_image = {im["file_name"]: im["id"] for im in gt["images"]}
    docs = [t for t in texts if t["image"].startswith("document")]
    scenes = [t for t in texts if t["image"].startswith("scene")]
    assert docs and scenes
    for t in scenes:
        cats = [names[a["category_id"]] for a in gt["annotations"] if a["image_id"] == by_image[t["image"]]]
        assert t["caption"] == samples.describe(cats) and t["ocr"] == "" and t["ocr_regions"] == []
    for t in docs:
        assert t["ocr"] == "\n".join(text for _, text in t["ocr_regions"]) and t["ocr"]
        assert all(len(quad) == 8 for quad, _ in t["ocr_regions"])


def test_describe_counts_and_orders():
    assert samples.describe(["blue square", "red circle", "red circle"]) == "two red circles and a blue square"
    assert samples.describe(["green star"]) == "a green star"


def test_truth_pairs_are_what_the_parser_reads_back(tmp_path):
    """The training targets parse, with the processor's own post-processing, to the drawn boxes (within a bin)."""
    from annotator.demo import architecture as demo

    processor = demo.build_processor()
    rng = np.random.default_rng(5)
    d = samples.scene(rng)
    prompt, target = samples.truth_pairs(d)["od"]
    parsed = processor.post_process_generation(target, task="<OD>", image_size=d.image.size)["<OD>"]
    truth = sorted(d.objects, key=lambda o: (o[1][1], o[1][0]))
    assert parsed["labels"] == [c for c, _ in truth]
    bin_w, bin_h = d.image.width / 1000, d.image.height / 1000
    for got, (_, want) in zip(parsed["bboxes"], truth):
        assert np.allclose(got, want, atol=max(bin_w, bin_h) + 1)  # a bin, and the processor truncates to whole pixels
    doc = samples.document(rng)
    _, ocr_target = samples.truth_pairs(doc)["ocr_with_region"]
    assert len(re.findall(r"<loc_\d+>", ocr_target)) == 8 * len(doc.lines)
    prompt, od_target = samples.truth_pairs(doc)["od"]  # a page: od answers with nothing
    assert processor.post_process_generation(od_target, task="<OD>", image_size=doc.image.size)["<OD>"] == {"bboxes": [], "labels": []}


def test_cli_samples_writes_the_folder(tmp_path):
    res = run_cli("samples", str(tmp_path / "s"), "--n", "3", "--seed", "7", "--kind", "documents")
    assert res.returncode == 0, res.stderr
    assert "wrote 3 images" in res.stdout
    assert len(list((tmp_path / "s").glob("document_7_*.png"))) == 3
