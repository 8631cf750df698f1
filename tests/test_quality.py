"""The quality figures the README's demo-model table comes from: box matching, precision at a
score threshold and calibration, on hand-made predictions whose answers are known."""

from __future__ import annotations

import json

from annotator.readback.coco_eval import evaluate_data
from annotator.readback.quality import LineScore, Quality, box_quality, score_lines, text_errors, text_quality


def _coco(boxes, names=("red circle", "blue square")):
    cats = [{"id": i + 1, "name": n} for i, n in enumerate(names)]
    anns = [{"id": k + 1, "image_id": 1, "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": 0,
             **({"score": s} if s is not None else {})} for k, (c, b, s) in enumerate(boxes)]
    return {"images": [{"id": 1, "file_name": "a.png", "width": 100, "height": 100}], "annotations": anns,
            "categories": cats}


GT = _coco([(1, [10, 10, 20, 20], None), (2, [50, 50, 30, 30], None)])


def test_match_is_greedy_by_score_one_truth_once_and_class_aware():
    """The per-box verdicts are COCOeval's own (coco_eval.py), plus: a label the truth lacks is wrong."""
    pred = _coco([(1, [10, 10, 20, 20], 0.9),  # right
                  (1, [11, 11, 20, 20], 0.8),  # a duplicate of the same object: the truth is taken
                  (1, [50, 50, 30, 30], 0.7),  # right place, wrong class
                  (2, [52, 52, 30, 30], 0.2),  # right, low score
                  (3, [50, 50, 30, 30], 0.5)],  # a label the ground truth does not have
                 names=("red circle", "blue square", "green blob"))
    report = evaluate_data(pred, GT, thresholds=())
    assert report.matches == [(0.9, True), (0.8, False), (0.7, False), (0.5, False), (0.2, True)]
    assert report.unmatched_labels == {"green blob": 1}


def test_scores_that_rank_right_above_wrong_raise_ap_over_scores_of_one(tmp_path):
    pred = _coco([(1, [70, 0, 20, 20], 0.1), (1, [10, 10, 20, 20], 0.9), (2, [0, 70, 20, 20], 0.2),
                  (2, [50, 50, 30, 30], 0.8)])
    pred_path, gt_path = tmp_path / "pred.json", tmp_path / "gt.json"
    pred_path.write_text(json.dumps(pred))
    gt_path.write_text(json.dumps(GT))
    q = Quality()
    box_quality(pred_path, gt_path, q)
    assert q.od["AP50"] > 0.99  # the wrong boxes come last: they cost nothing
    assert q.od_scores_one["AP50"] < q.od["AP50"]  # in file order, a false positive comes first
    assert q.precision[0.5] == {"precision": 1.0, "recall": 1.0, "kept": 2}
    assert q.precision[0.3]["kept"] == 2 and q.precision[0.7]["kept"] == 2
    by_bin = {c["bin"]: c for c in q.calibration}
    assert by_bin["0.0-0.3"] == {"bin": "0.0-0.3", "boxes": 2, "matched": 0.0}
    assert by_bin["0.7-0.9"]["matched"] == 1.0


def test_card_keeps_one_block_per_command(tmp_path):
    from annotator.readback.quality import QUALITY_HEADING, write_card

    card = tmp_path / "README.md"
    card.write_text("# model\n\nTraining text.\n")
    scenes, docs = "python -m annotator.readback.quality --kind scenes", "python -m annotator.readback.quality --kind documents"
    write_card(card, scenes, ["od: AP50 0.5"])
    write_card(card, docs, ["ocr: character error rate 0.2"])
    write_card(card, scenes, ["od: AP50 0.8"])  # measured again: replaces its own block only
    text = card.read_text()
    assert text.startswith("# model\n\nTraining text.\n\n" + QUALITY_HEADING)
    assert text.count(QUALITY_HEADING) == 1
    assert "AP50 0.8" in text and "AP50 0.5" not in text and "error rate 0.2" in text
    assert text.index(docs) < text.index(scenes)


def test_ocr_lines_match_one_to_one_at_iou_half_and_count_missed_and_invented_text():
    regions = [([0, 0, 100, 0, 100, 20, 0, 20], "one two"), ([0, 40, 100, 40, 100, 60, 0, 60], "three"),
               ([0, 80, 50, 80, 50, 100, 0, 100], "four")]
    row = {"labels": ["one  two", "three x", "four", "one two"],  # the last: the first line read twice
           "quad_boxes": [[2, 1, 99, 1, 99, 21, 2, 21], [0, 41, 100, 41, 100, 59, 0, 59],
                          [0, 80, 20, 80, 20, 100, 0, 100], [0, 0, 100, 0, 100, 20, 0, 20]]}
    score = score_lines(row, regions)  # the third quad covers 40% of its line: "four" is missed
    assert (score.lines, score.boxed, score.exact, score.chars) == (3, 2, 1, 16)
    assert score.errors == 2 + 4 + 4 + 7  # "three x", missed "four", invented "four" and one "one two"
    assert score_lines({"labels": None, "quad_boxes": None}, regions) == LineScore(3, 0, 0, 16, 16)
    assert text_errors("one\ntwo  three", "one two three") == (0, 13)  # layout is not an error
    q = Quality(ocr_lines={"lines": 3, "boxed": 2 / 3, "exact": 1 / 3, "cer": 17 / 16})
    assert "ocr_with_region: 3 lines, boxed at IoU 0.5 0.667, boxed and read exactly 0.333, line CER 1.062" in q.lines()


def test_text_quality_counts_a_failed_page_as_read_nothing(tmp_path):
    """An error row is not left out of the rates: its page's text and lines count as missed."""
    from annotator.outdir.table import Annotation, PartWriter

    quad = [0, 0, 100, 0, 100, 20, 0, 20]
    texts = tmp_path / "texts.jsonl"
    texts.write_text("\n".join(json.dumps({"image": f"p{i}.png", "caption": "a page of text", "ocr": "one two",
                                           "ocr_regions": [[quad, "one two"]]}) for i in (1, 2)))
    (tmp_path / "ann").mkdir()
    writer = PartWriter(tmp_path / "ann")
    writer.add([Annotation("p1.png", "ocr", text="one two"),
                Annotation("p1.png", "ocr_with_region", labels=["one two"], quad_boxes=[quad]),
                Annotation.failed("p2.png", "ocr", "decode failed"), Annotation.failed("p2.png", "ocr_with_region", "x")])
    writer.flush()
    q = Quality()
    text_quality(tmp_path / "ann", texts, q)
    assert q.ocr_cer == 0.5
    assert q.ocr_lines == {"lines": 2, "boxed": 0.5, "exact": 0.5, "cer": 0.5}
