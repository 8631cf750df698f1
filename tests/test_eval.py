"""`annotate eval`: COCOeval of an export against ground truth, overall and by --min-score."""

import json

import pytest
from click.testing import CliRunner

from annotator.cli import cli
from annotator.readback.coco_eval import EvalError, evaluate
from annotator.outdir.table import Annotation, PartWriter

FALSE_POSITIVE = [60, 60, 90, 95]
BOXES = {  # image -> [(label, box, score)]
    "a.png": [("car", [10, 10, 60, 50], 0.95), ("dog", [100, 20, 190, 90], 0.9)],
    # the false positive outscores the true car of b.png: ranked between the two true cars, it costs AP
    "b.png": [("car", [5, 5, 45, 45], 0.6), ("car", FALSE_POSITIVE, 0.7)],
}


@pytest.fixture
def coco_export(tmp_path):
    from PIL import Image

    images, out = tmp_path / "images", tmp_path / "ann"
    images.mkdir()
    out.mkdir()
    writer = PartWriter(out)
    for key, insts in BOXES.items():
        Image.new("RGB", (200, 100)).save(images / key)
        writer.add([Annotation(image=key, task="od", status="ok", width=200, height=100, prompt="<OD>",
                               bboxes=[b for _, b, _ in insts], labels=[l for l, _, _ in insts],
                               scores=[s for _, _, s in insts])])
    writer.flush()
    (out / "manifest.json").write_text(json.dumps({"inputs": [str(images)], "tasks": ["od"], "schema_version": 1,
                                                   "identity": {}, "package_version": "0", "started": ""}))
    res = CliRunner().invoke(cli, ["export", str(out), "--format", "coco", "--out", str(tmp_path / "coco")])
    assert res.exit_code == 0, res.output
    return tmp_path / "coco" / "annotations.json"


def ground_truth(export_path, shift=0.0, drop_false_positive=False):
    gt = json.loads(export_path.read_text())
    anns = []
    for ann in gt["annotations"]:
        x, y, w, h = ann["bbox"]
        if drop_false_positive and [round(v) for v in (x, y, x + w, y + h)] == FALSE_POSITIVE:
            continue
        anns.append({"id": len(anns) + 1, "image_id": ann["image_id"], "category_id": ann["category_id"],
                     "bbox": [x + shift * w, y, w, h], "area": w * h, "iscrowd": 0})
    return dict(gt, annotations=anns)


def test_export_against_itself_is_perfect(coco_export, tmp_path):
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps(ground_truth(coco_export)))
    report = evaluate(coco_export, gt)
    assert report.stats["AP"] == pytest.approx(1.0) and report.matched_images == 2


def test_shifted_ground_truth_gives_the_expected_lower_ap(coco_export, tmp_path):
    # shifting each box by a quarter of its width gives IoU 0.75/1.25 = 0.6 with its prediction:
    # matched at IoU thresholds 0.50, 0.55, 0.60 of COCO's ten -> AP 0.3, AP50 1.0, AP75 0.0
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps(ground_truth(coco_export, shift=0.25)))
    report = evaluate(coco_export, gt)
    assert report.stats["AP50"] == pytest.approx(1.0)
    assert report.stats["AP75"] == pytest.approx(0.0)
    assert report.stats["AP"] == pytest.approx(0.3, abs=0.01)


def test_min_score_thresholds_remove_false_positives(coco_export, tmp_path):
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps(ground_truth(coco_export, drop_false_positive=True)))
    assert len(json.loads(gt.read_text())["annotations"]) == 3
    report = evaluate(coco_export, gt, iou=0.5)
    # COCO's 101-point interpolated AP at IoU 0.5. car, ranked: TP 0.95, FP 0.7, TP 0.6 over 2 true cars ->
    # precision 1 up to recall 0.5 (51 points), 2/3 above it (50 points); dog: 1.
    car_all = (51 + 50 * 2 / 3) / 101
    car_top = 51 / 101  # >= 0.75 keeps only the 0.95 car: recall 0.5
    assert report.by_threshold[0.0] == pytest.approx((car_all + 1) / 2, abs=1e-4)
    assert report.by_threshold[0.5] == report.by_threshold[0.0]  # 0.5 removes nothing
    assert report.by_threshold[0.75] == pytest.approx((car_top + 1) / 2, abs=1e-4)
    assert report.by_threshold[0.9] == pytest.approx((car_top + 1) / 2, abs=1e-4)  # >=: the 0.9 dog stays
    assert report.stats["AP@0.5"] == pytest.approx(report.by_threshold[0.0])
    assert report.per_class["car"] == pytest.approx(car_all, abs=1e-4) and report.per_class["dog"] == pytest.approx(1.0)


def test_cli_prints_the_table_and_errors_are_one_line(coco_export, tmp_path):
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps(ground_truth(coco_export)))
    res = CliRunner().invoke(cli, ["eval", str(coco_export.parent), "--gt", str(gt)])
    assert res.exit_code == 0 and "AP50" in res.output and "--min-score" in res.output
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    res = CliRunner().invoke(cli, ["eval", str(coco_export), "--gt", str(bad)])
    assert res.exit_code == 2 and "not COCO" in res.output
    with pytest.raises(EvalError):
        evaluate(tmp_path / "nope", gt)
