"""COCO export, checked by pycocotools: COCO loads it and COCOeval of the export against itself gives AP 1.0."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from exporters import run_export
from exporters.classes import parse_classes_file
from exporters.options import ExportOptions
from export_fixtures import make_run, ok


def _self_ap(path, iou_type: str) -> float:
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(path))
        if iou_type == "bbox":
            dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
                    for a in gt.dataset["annotations"]]
        else:
            # results carry masks as RLE (what a segmentation model would output)
            dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "segmentation": gt.annToRLE(a),
                     "score": 1.0} for a in gt.dataset["annotations"]]
        ev = COCOeval(gt, gt.loadRes(dets), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats[0]


def test_coco_loads_and_self_eval_is_perfect(tmp_path):
    ann, _ = make_run(tmp_path)
    s = run_export(ann, "coco", tmp_path / "out", ExportOptions(include_ocr=True))
    path = tmp_path / "out" / "annotations.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    assert s.tasks == ["od", "open_vocabulary_detection", "region_to_segmentation", "ocr_with_region"]
    # the retried od row of b/cat.jpg is used, its error row is not; bad.jpg (errors only) is left out
    assert [i["file_name"] for i in data["images"]] == ["a/cat.jpg", "b/CAT.png", "b/cat.jpg", "doc.png", "ü/straße.png"]
    assert s.dropped["error rows"] == 1 and s.dropped["degenerate box"] == 1
    assert _self_ap(path, "bbox") == pytest.approx(1.0)
    by_img = {i["file_name"]: i["id"] for i in data["images"]}
    anns = [a for a in data["annotations"] if a["image_id"] == by_img["b/cat.jpg"]]
    assert sorted(a.get("score") for a in anns) == [0.2, 0.9, 0.95]
    assert [a["bbox"] for a in anns if a.get("score") == 0.2] == [[30.0, 30.0, 130.0, 90.0]]  # clipped to 160x120
    texts = [a["text"] for a in data["annotations"] if "text" in a]
    assert texts == ["INVOICE 42", "Total: 7 EUR"]
    assert {c["name"] for c in data["categories"]} == {"car", "cat", "dog", "text", "straßenbahn"}


def test_coco_segmentation_self_eval(tmp_path):
    ann, _ = make_run(tmp_path)
    run_export(ann, "coco", tmp_path / "out", ExportOptions(tasks=("region_to_segmentation",)))
    path = tmp_path / "out" / "annotations.json"
    data = json.loads(path.read_text())
    assert len(data["annotations"]) == 2 and all("segmentation" in a for a in data["annotations"])
    assert len(data["annotations"][1]["segmentation"]) == 2  # a mask with two parts
    assert _self_ap(path, "segm") == pytest.approx(1.0)


def test_coco_image_ids_stable_across_exports(tmp_path):
    ann, _ = make_run(tmp_path)
    run_export(ann, "coco", tmp_path / "o1", ExportOptions())
    run_export(ann, "coco", tmp_path / "o2", ExportOptions(tasks=("ocr_with_region",), include_ocr=True))
    ids = [{i["file_name"]: i["id"] for i in json.loads((tmp_path / o / "annotations.json").read_text())["images"]}
           for o in ("o1", "o2")]
    assert ids[1]["doc.png"] == ids[0]["doc.png"]
    assert len(set(ids[0].values())) == len(ids[0])


def test_coco_classes_synonyms_min_score_and_dropped_counts(tmp_path):
    ann, _ = make_run(tmp_path)
    spec = parse_classes_file("animal: cat, dog\nvehicle: car\n")
    s = run_export(ann, "coco", tmp_path / "out", ExportOptions(tasks=("od",), classes=spec, min_score=0.5))
    data = json.loads((tmp_path / "out" / "annotations.json").read_text())
    assert [c["name"] for c in data["categories"]] == ["animal", "vehicle"]
    names = {c["id"]: c["name"] for c in data["categories"]}
    assert sorted(names[a["category_id"]] for a in data["annotations"]) == ["animal", "animal", "animal", "animal", "vehicle"]
    assert s.dropped["label not in classes"] == 1 and s.dropped_labels == {"Straßenbahn": 1}
    assert s.dropped["score below --min-score"] == 1
    assert _self_ap(tmp_path / "out" / "annotations.json", "bbox") == pytest.approx(1.0)


def test_coco_min_count_and_skip_empty(tmp_path):
    ann, _ = make_run(tmp_path)
    s = run_export(ann, "coco", tmp_path / "out", ExportOptions(tasks=("od",), min_count=2, skip_empty=True))
    data = json.loads((tmp_path / "out" / "annotations.json").read_text())
    assert [c["name"] for c in data["categories"]] == ["car", "cat", "dog"]  # 'straßenbahn' seen once
    assert s.dropped["label below --min-count"] == 1
    assert "doc.png" not in [i["file_name"] for i in data["images"]] and s.dropped["empty images skipped"] == 1


def test_coco_from_table_with_only_empty_rows_is_loadable(tmp_path):
    ann, _ = make_run(tmp_path, parts=[[ok("doc.png", "od", bboxes=[], labels=[])]])
    s = run_export(ann, "coco", tmp_path / "out", ExportOptions())
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(tmp_path / "out" / "annotations.json"))
    assert len(gt.imgs) == 1 and not gt.anns and s.instances == 0
