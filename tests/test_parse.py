"""Scripted generations for every output kind -> typed columns in original-image pixels."""

import pytest

from annotator.answers.parse import parse_generation, plain_text
from annotator.tasks import TASKS

W, H = 1000, 500  # one bin = 1 px in x, 0.5 px in y; the processor de-quantizes to the bin centre


def loc(*bins):
    return "".join(f"<loc_{b}>" for b in bins)


def test_detection_boxes_in_pixels(tiny_lm):
    text = "</s><s>car" + loc(100, 200, 300, 400) + "person" + loc(0, 0, 999, 999) + "</s>"
    p = parse_generation(tiny_lm.processor, TASKS["od"], text, (W, H))
    assert p.labels == ["car", "person"]
    assert p.bboxes == [[100.0, 100.0, 300.0, 200.0], [0.0, 0.0, 999.0, 499.0]]
    assert p.text is None and p.polygons is None


def test_region_proposal_has_empty_labels(tiny_lm):
    p = parse_generation(tiny_lm.processor, TASKS["region_proposal"], "</s><s>" + loc(10, 10, 20, 20) + "</s>", (W, H))
    assert p.bboxes == [[10.0, 5.0, 20.0, 10.0]] and p.labels == [""]


def test_polygons_in_pixels(tiny_lm):
    text = "</s><s>" + loc(100, 100, 200, 100, 200, 300) + "</s>"
    p = parse_generation(tiny_lm.processor, TASKS["referring_expression_segmentation"], text, (W, H))
    assert p.polygons == [[[100.0, 50.0, 200.0, 50.0, 200.0, 150.0]]]


def test_ocr_quads_in_pixels(tiny_lm):
    text = "</s><s>STOP" + loc(10, 20, 30, 20, 30, 40, 10, 40) + "EXIT 3" + loc(1, 2, 3, 2, 3, 4, 1, 4) + "</s>"
    p = parse_generation(tiny_lm.processor, TASKS["ocr_with_region"], text, (W, H))
    assert p.labels == ["STOP", "EXIT 3"]
    assert p.quad_boxes[0] == [10.0, 10.0, 30.0, 10.0, 30.0, 20.0, 10.0, 20.0]


def test_open_vocabulary_detection_boxes_or_polygons(tiny_lm):
    task = TASKS["open_vocabulary_detection"]
    boxes = parse_generation(tiny_lm.processor, task, "</s><s>car" + loc(1, 2, 3, 4) + "</s>", (W, H))
    assert boxes.bboxes == [[1.0, 1.0, 3.0, 2.0]] and boxes.labels == ["car"]


@pytest.mark.parametrize("task", ["caption", "ocr", "more_detailed_caption", "region_to_category"])
def test_text_tasks(tiny_lm, task):
    p = parse_generation(tiny_lm.processor, TASKS[task], "</s><s>A red car" + loc(1, 2, 3, 4) + "</s><pad>", (W, H))
    assert p.text == "A red car" and p.bboxes is None


def test_plain_text_strips_specials():
    assert plain_text("</s><s> a cat <loc_5></s>") == "a cat"


from annotator.answers.parse import Parsed, iou, refine  # noqa: E402


def test_generation_loops_are_removed_and_counted():
    box = [10.0, 10.0, 50.0, 50.0]
    p = Parsed(bboxes=[box, box, [11.0, 10.0, 50.0, 50.0], box], labels=["car", "car", "car", "dog"],
               scores=[0.9, 0.8, 0.7, 0.6])
    stats = {}
    out = refine(p, truncated=False, width=100, height=100, stats=stats)
    assert out.labels == ["car", "dog"] and out.scores == [0.9, 0.6] and stats["duplicates_removed"] == 2


def test_truncated_outputs_lose_only_their_incomplete_tail():
    p = Parsed(bboxes=[[0, 0, 5, 5], [10, 10, 20, 20], [30, 30, 31, 31]], labels=["a", "b", "c"], scores=[1, 1, 0.1])
    stats = {}
    out = refine(p, truncated=True, width=100, height=100, stats=stats)
    assert out.labels == ["a", "b"] and stats["truncated_instances_dropped"] == 1


def test_boxes_polygons_quads_are_clipped_to_the_image():
    stats = {}
    out = refine(Parsed(bboxes=[[-5, 2, 120, 40]], labels=["x"]), False, 100, 50, stats)
    assert out.bboxes == [[0, 2, 100, 40]] and stats["coordinates_clipped"] == 1
    out = refine(Parsed(polygons=[[[-1, -1, 200, 3, 5, 60]]], labels=["x"]), False, 100, 50, {})
    assert out.polygons == [[[0, 0, 100, 3, 5, 50]]]
    out = refine(Parsed(quad_boxes=[[0, 0, 150, 0, 150, 10, 0, 10]], labels=["t"]), False, 100, 50, {})
    assert out.quad_boxes == [[0, 0, 100, 0, 100, 10, 0, 10]]


@pytest.mark.parametrize("a,b,expected", [
    ([0, 0, 10, 10], [0, 0, 10, 10], 1.0), ([0, 0, 10, 10], [10, 10, 20, 20], 0.0),
    ([0, 0, 10, 10], [5, 0, 15, 10], 1 / 3), ([3, 3, 3, 3], [3, 3, 3, 3], 1.0),
])
def test_iou(a, b, expected):
    assert iou(a, b) == pytest.approx(expected)


@pytest.mark.parametrize("label, fragment", [("loc_150>", True), ("<loc_3", True), ("loc_1> loc_2>", True),
                                             ("car", False), ("", False), ("location", False), ("loc_3 car", False)])
def test_location_fragments(label, fragment):
    from annotator.answers.parse import is_location_fragment

    assert is_location_fragment(label) is fragment


def test_malformed_instances_are_dropped_and_counted():
    stats = {}
    p = Parsed(bboxes=[[5, 5, 50, 50], [60, 5, 20, 50], [1, 1, 9, 9], [0, 5, 10, 5]],
               labels=["car", "car", "loc_150>", "dog"], scores=[0.9, 0.8, 0.7, 0.6])
    out = refine(p, False, 100, 100, stats)
    assert out.bboxes == [[5, 5, 50, 50]] and out.labels == ["car"] and out.scores == [0.9]
    assert stats["malformed_labels_dropped"] == 1 and stats["empty_boxes_dropped"] == 2


# --------------------------------------------------------------------------- malformed spans (issue 31)
from annotator.answers.parse import repair_label  # noqa: E402
from annotator.tasks import Output  # noqa: E402

# A quad with one coordinate too many (its 9th token glued to the next line's text), a box with one too
# few, a stray pair at the start, and a piece the phrase regex cut ("loc_3>"): what a small model writes.
MALFORMED = ("</s><s>" + loc(975, 976) + "one one" + loc(10, 20, 30, 20, 30, 40, 10, 40) + "garden" + loc(197)
             + "gate" + loc(1, 2, 3, 2, 3, 4, 1, 4, 9) + "x" + loc(5, 6, 7, 6, 7, 8, 5, 8) + "car" + loc(1, 2, 3)
             + "dog" + loc(100, 200, 300, 400) + "</s>")


def _all_text(p) -> list[str]:
    return [s for s in [p.text, *(p.labels or [])] if s is not None]


@pytest.mark.parametrize("name", sorted(TASKS))
def test_no_location_token_reaches_a_label_or_text(tiny_lm, name):
    """Every task kind, one malformed answer: what the table gets holds no location token or piece of one."""
    task, stats = TASKS[name], {}
    p = parse_generation(tiny_lm.processor, task, MALFORMED, (W, H))
    if task.output is not Output.TEXT:
        p = refine(p, False, W, H, stats)
    for s in _all_text(p):
        assert "loc_" not in s and "<" not in s and ">" not in s, (name, s)


def test_malformed_quads_are_repaired_and_counted(tiny_lm):
    stats = {}
    p = parse_generation(tiny_lm.processor, TASKS["ocr_with_region"], MALFORMED, (W, H))
    assert any("loc_" in s for s in p.labels)  # the processor's own parse carries them (the bug)
    p = refine(p, False, W, H, stats)
    assert p.labels == ["one one", "gate", "x"]  # each keeps the text right before its own 8 coordinates
    assert stats["location_tokens_repaired"] == 3


def test_od_labels_cut_at_location_pieces(tiny_lm):
    stats = {}
    p = refine(parse_generation(tiny_lm.processor, TASKS["od"], "</s><s>car" + loc(1, 2, 3) + "dog"
                                + loc(100, 200, 300, 400) + "</s>", (W, H)), False, W, H, stats)
    assert p.labels == ["dog"] and p.bboxes == [[100.0, 100.0, 300.0, 200.0]]
    assert stats == {"location_tokens_repaired": 1, "coordinates_clipped": 0}


@pytest.mark.parametrize("label,expected", [
    ("<loc_784>one one", ("one one", True)),
    ("<loc_975><loc_976>the garden<loc_197>gate", ("gate", True)),
    ("loc_3>dog", ("dog", True)),
    ("hello<loc_1>", ("", True)),  # the text has no coordinates of its own left
    ("loc_150>", ("", True)),
    ("a <b> tag", ("a <b> tag", False)),  # no location token: left as it is
    ("", ("", False)),
])
def test_repair_label(label, expected):
    assert repair_label(label) == expected
