"""A run parsed before labels were repaired (annotator/parse.repair_label) may hold location tokens in
its labels: no export carries them. Each format's written files are searched for `loc_` outside the
places Florence-2's own syntax puts location tokens (the florence targets' coordinates)."""

from __future__ import annotations

import json
import re

import pytest

from exporters import run_export
from exporters.options import ExportOptions
from export_fixtures import make_run, ok

ROWS = [
    ok("doc.png", "ocr_with_region", prompt="<OCR_WITH_REGION>",
       quad_boxes=[[10, 10, 120, 10, 120, 30, 10, 30], [10, 50, 120, 50, 120, 70, 10, 70],
                   [10, 150, 200, 150, 200, 175, 10, 175]],
       labels=["<loc_784>one one", "<loc_975><loc_976>the garden<loc_197>gate", "<loc_1><loc_2>"],
       scores=[0.9, 0.9, 0.9]),
    ok("a/cat.jpg", "od", prompt="<OD>", bboxes=[[10, 10, 60, 50], [100, 20, 190, 90]], labels=["loc_3>dog", "cat"],
       scores=[0.9, 0.9]),
]


def written_text(root) -> str:
    return "".join(p.read_text(encoding="utf-8", errors="replace") for p in sorted(root.rglob("*"))
                   if p.is_file() and p.suffix in (".json", ".jsonl", ".xml", ".txt", ".yaml"))


@pytest.mark.parametrize("fmt", ["labelstudio", "cvat", "coco", "yolo"])
def test_review_and_box_formats_never_carry_location_tokens(tmp_path, fmt):
    ann, _ = make_run(tmp_path, [ROWS])
    s = run_export(ann, fmt, tmp_path / "out", ExportOptions(include_ocr=True))
    text = written_text(tmp_path / "out")
    assert "loc_" not in text, fmt
    assert "one one" in text or fmt == "yolo"  # yolo writes class ids; data.yaml has the class names
    assert s.dropped["label of location tokens"] == 1 and s.dropped["labels cut at location tokens (kept)"] == 3


def test_florence_targets_carry_only_their_own_coordinates(tmp_path):
    ann, _ = make_run(tmp_path, [ROWS])
    run_export(ann, "florence", tmp_path / "out", ExportOptions(val_fraction=0.0))
    pairs = {json.loads(x)["prefix"]: json.loads(x)["suffix"]
             for x in (tmp_path / "out" / "train" / "annotations.jsonl").read_text().splitlines()}
    ocr = pairs["<OCR_WITH_REGION>"]
    assert re.sub(r"<loc_\d+>", "|", ocr).strip("|").split("|" * 8) == ["one one", "gate"]
    assert re.sub(r"<loc_\d+>", "|", pairs["<OD>"]).strip("|").split("|" * 4) == ["dog", "cat"]
