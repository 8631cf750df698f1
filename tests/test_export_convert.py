"""Small pure converters of the exporters, tested alone with parametrized tables."""

from __future__ import annotations

from collections import Counter

import pytest

from exporters.classes import ClassVocab, normalize_label, parse_classes_arg, parse_classes_file, singular
from exporters.docvqa import article, plural, qa_pairs
from exporters.errors import ExportError, UnsafePath
from exporters.files import assign_splits, flat_names
from exporters.florence import clean_text, florence_pairs
from annotator.model.sequence import dequantize, loc_tokens, quantize
from exporters.geometry import (clip_box, clip_polygon, polygon_area, row_instances, xyxy_to_cxcywh_norm,
                                xyxy_to_xywh)
from exporters.read import ImageRows, Row
from exporters.safety import check_key, safe_component
from exporters.yolo import merge_parts


@pytest.mark.parametrize("word, expected", [
    ("cars", "car"), ("buses", "bus"), ("boxes", "box"), ("puppies", "puppy"), ("glasses", "glass"),
    ("benches", "bench"), ("bus", "bus"), ("grass", "grass"), ("people", "person"), ("cases", "case"), ("houses", "house"), ("cat", "cat"),
    ("news", "news"), ("gas", "gas"), ("species", "species"),
])
def test_singular(word, expected):
    assert singular(word) == expected


@pytest.mark.parametrize("label, expected", [
    ("  Traffic   LIGHTS ", "traffic light"), ("Cars", "car"), ("car", "car"), ("", ""), (None, ""),
    ("Straßenbahnen", "straßenbahnen"), ("ＣＡＴＳ", "cat"),  # NFKC folds full-width letters
    ("dog\t", "dog"), ("Persons", "person"),
])
def test_normalize_label(label, expected):
    assert normalize_label(label) == expected


def test_classes_file_with_synonyms_and_vocab_mapping():
    spec = parse_classes_file("# comment\nperson: man, woman, Children\n\ncar:cars, automobile\nbus\n")
    vocab = ClassVocab.from_spec(spec)
    assert vocab.names == ["person", "car", "bus"]
    cases = {"Man": 0, "WOMEN": 0, "children": 0, "Automobiles": 1, "buses": 2, "truck": None, "person ": 0}
    assert {k: vocab.index(k) for k in cases} == cases


@pytest.mark.parametrize("text", ["", "# only a comment\n", ": orphan synonym\n"])
def test_classes_file_errors(text):
    with pytest.raises(ExportError):
        parse_classes_file(text)


def test_classes_arg_and_conflicting_synonyms():
    assert ClassVocab.from_spec(parse_classes_arg(" person , car,")).names == ["person", "car"]
    with pytest.raises(ExportError):
        parse_classes_arg(" , ")
    with pytest.raises(ExportError, match="maps to both"):
        ClassVocab.from_spec(parse_classes_file("person: kid\nchild: kids\n"))


def test_vocab_from_counts_orders_by_frequency_and_applies_min_count():
    vocab, rare = ClassVocab.from_counts(Counter({"Cars": 3, "car": 2, "dog": 5, "bird": 1, "": 4}), min_count=2)
    assert vocab.names == ["car", "dog"]  # 5 and 5: ties broken by name
    assert rare == Counter({"bird": 1}) and vocab.rare == {"bird"}


@pytest.mark.parametrize("box, expected", [
    ([10, 10, 20, 30], (10, 10, 20, 30)),
    ([-5, -5, 50, 40], (0, 0, 50, 40)),          # outside: clipped
    ([90, 40, 150, 80], (90, 40, 100, 50)),       # past the far edges
    ([20, 30, 10, 10], (10, 10, 20, 30)),         # corners swapped
    ([20, 20, 20, 40], None),                     # zero width
    ([120, 10, 150, 20], None),                   # wholly outside
    ([1, 2, 3], None), (None, None), ([0, 0, float("nan"), 4], None),
])
def test_clip_box(box, expected):
    assert clip_box(box, 100, 50) == expected


@pytest.mark.parametrize("poly, expected", [
    ([0, 0, 10, 0, 10, 10], [0, 0, 10, 0, 10, 10]),
    ([-10, -10, 200, -10, 200, 80, 0, 80], [0, 0, 100, 0, 100, 50, 0, 50]),
    ([0, 0, 10, 0, 10, 10, 7], [0, 0, 10, 0, 10, 10]),   # odd length: last value dropped
    ([0, 0, 10, 0], None),                               # two points
    ([0, 0, 5, 5, 10, 10], None),                        # collinear: no area
    ([200, 0, 300, 0, 300, 10], None),                   # outside: collapses onto the edge
])
def test_clip_polygon(poly, expected):
    assert clip_polygon(poly, 100, 50) == expected


def test_box_conversions():
    assert xyxy_to_xywh((10, 20, 30, 60)) == [10, 20, 20, 40]
    assert xyxy_to_cxcywh_norm((0, 0, 100, 50), 100, 50) == (0.5, 0.5, 1.0, 1.0)
    assert xyxy_to_cxcywh_norm((10, 10, 30, 20), 100, 50) == pytest.approx((0.2, 0.3, 0.2, 0.2))
    assert polygon_area([0, 0, 4, 0, 4, 3, 0, 3]) == 12


@pytest.mark.parametrize("coord, size, bin_", [
    (0, 640, 0), (0.63, 640, 0), (0.64, 640, 1), (639.99, 640, 999), (640, 640, 999), (-3, 640, 0),
    (1e9, 640, 999), (333.3, 1000, 333), (50, 100, 500),
])
def test_quantize_matches_florence_floor_mode(coord, size, bin_):
    assert quantize(coord, size) == bin_


@pytest.mark.parametrize("size", [7, 100, 640, 1333, 4032])
def test_quantize_round_trip_within_one_bin(size):
    for k in range(0, 1000, 37):
        c = k * size / 1000 + 0.3 * size / 1000
        assert abs(dequantize(quantize(c, size), size) - c) <= size / 1000


def test_loc_tokens_uses_width_for_x_and_height_for_y():
    assert loc_tokens([50, 50, 100, 100], 100, 200) == "<loc_500><loc_250><loc_999><loc_500>"


def _row(task="od", **kw):
    kw.setdefault("width", 100)
    kw.setdefault("height", 50)
    return Row(image="x.jpg", task=task, **kw)


@pytest.mark.parametrize("row, expected, drops", [
    # empty row
    (_row(bboxes=[], labels=[]), [], {}),
    (_row(), [], {}),
    # box outside the image: clipped; zero-area box dropped and counted
    (_row(bboxes=[[-10, -10, 20, 20], [5, 5, 5, 9]], labels=["cat", "dog"]), [("cat", (0, 0, 20, 20), 0)],
     {"degenerate box": 1}),
    # unicode labels kept as they are
    (_row(bboxes=[[1, 1, 9, 9]], labels=["Straßenbahn 🚋"]), [("Straßenbahn 🚋", (1, 1, 9, 9), 0)], {}),
    # polygons with several parts: one instance, bbox = extent of the clipped parts
    (_row("referring_expression_segmentation", prompt="<REFERRING_EXPRESSION_SEGMENTATION>the red car",
          polygons=[[[0, 0, 10, 0, 10, 10], [20, 20, 30, 20, 30, 30, 20, 30], [1, 1, 2, 2]]], labels=[""]),
     [("the red car", (0, 0, 30, 30), 2)], {}),
    # a polygon instance with no valid part
    (_row("region_to_segmentation", bboxes=[[0, 0, 5, 5]], polygons=[[[0, 0, 1, 1]]], labels=["x"]), [],
     {"degenerate polygon": 1}),
    # OCR quads: category text, string kept
    (_row("ocr_with_region", quad_boxes=[[0, 0, 10, 0, 10, 5, 0, 5]], labels=["Hi"]), [("text", (0, 0, 10, 5), 1)], {}),
    # scores are not filtered here (filtering.py and docvqa.count_questions decide under --min-score)
    (_row(bboxes=[[0, 0, 5, 5], [0, 0, 6, 6]], labels=["a", "b"], scores=[0.9, 0.1]),
     [("a", (0, 0, 5, 5), 0), ("b", (0, 0, 6, 6), 0)], {}),
    (_row(bboxes=[[0, 0, 5, 5]], labels=["a"], scores=None), [("a", (0, 0, 5, 5), 0)], {}),
    # class-agnostic proposals get the label 'object'; a missing label elsewhere is dropped
    (_row("region_proposal", bboxes=[[0, 0, 5, 5]], labels=[""]), [("object", (0, 0, 5, 5), 0)], {}),
    (_row(bboxes=[[0, 0, 5, 5]], labels=[]), [], {"empty label": 1}),
    # no size: nothing can be placed
    (_row(bboxes=[[0, 0, 5, 5]], labels=["a"], width=0), [], {"no image size": 1}),
])
def test_row_instances(row, expected, drops):
    got_drops: Counter = Counter()
    got = row_instances(row, got_drops)
    assert [(i.label, i.bbox, len(i.polygons)) for i in got] == expected
    assert dict(got_drops) == drops


@pytest.mark.parametrize("key", ["a.jpg", "a/b/c.png", "ü/straße.png", "..a/b..c.jpg"])
def test_check_key_accepts(key):
    assert str(check_key(key)) == key


@pytest.mark.parametrize("key", ["../a.jpg", "a/../../b.jpg", "/etc/passwd", "a\x00b.jpg", "C:\\x.jpg", "c:/x.jpg",
                                 "", "..", "a\\..\\b.jpg"])
def test_check_key_rejects(key):
    with pytest.raises(UnsafePath):
        check_key(key)


@pytest.mark.parametrize("name, expected", [
    ("../../etc/passwd", "_.._etc_passwd"), ("a b.jpg", "a_b.jpg"), ("...", "_"), ("x\x00y", "xy"),
    ("straße.png", "straße.png"), ("/abs", "_abs"),
])
def test_safe_component(name, expected):
    out = safe_component(name)
    assert out == expected and "/" not in out and not out.startswith(".")


def test_flat_names_unique_by_stem_and_case():
    keys = ["a/cat.jpg", "b/cat.jpg", "a/cat.png", "A/CAT.jpg", "a__cat.jpg", "c/d/e.jpg", "../x.jpg"]
    names = flat_names(keys)
    stems = [n.rsplit(".", 1)[0].casefold() for n in names.values()]
    assert len(set(stems)) == len(keys)
    assert names["c/d/e.jpg"] == "c__d__e.jpg"
    assert all("/" not in n and not n.startswith(".") for n in names.values())
    assert flat_names(list(reversed(keys))) == names  # order of the input does not matter


def test_assign_splits_deterministic():
    keys = [f"img{i}.jpg" for i in range(2000)]
    a, b = assign_splits(keys, 0.1), assign_splits(list(reversed(keys)), 0.1)
    assert a == b
    assert 150 < sum(v == "val" for v in a.values()) < 250
    assert assign_splits(keys[:1000], 0.1) == {k: a[k] for k in keys[:1000]}  # a key's split never moves
    assert set(assign_splits(["x.jpg", "y.jpg"], 0.01).values()) == {"train", "val"}  # val never empty
    assert set(assign_splits(keys[:10], 0.0).values()) == {"train"}


@pytest.mark.parametrize("parts, expected", [
    ([[0, 0, 1, 0, 1, 1]], [0, 0, 1, 0, 1, 1]),
    ([[0, 0, 1, 0, 1, 1], [5, 5, 6, 5, 6, 6]], [0, 0, 1, 0, 1, 1, 0, 0, 5, 5, 6, 5, 6, 6, 5, 5, 0, 0]),
])
def test_merge_parts(parts, expected):
    assert merge_parts(parts) == expected


@pytest.mark.parametrize("row, pairs, drops", [
    (_row("caption", text=" A cat. "), [("<CAPTION>", "A cat.")], {}),
    (_row("caption", text=""), [], {"empty target": 1}),
    (_row(bboxes=[[0, 0, 50, 25], [0, 0, 0, 0]], labels=["cat", "dog"]), [("<OD>", "cat<loc_0><loc_0><loc_500><loc_500>")],
     {"degenerate box": 1}),
    (_row(bboxes=[], labels=[]), [], {"empty target": 1}),
    (_row(bboxes=[[0, 0, 50, 25]], labels=["<loc_1>evil</od>"]), [("<OD>", "evil<loc_0><loc_0><loc_500><loc_500>")],
     {"labels cut at location tokens (kept)": 1}),
    (_row("region_proposal", bboxes=[[0, 0, 50, 25]], labels=[""]), [("<REGION_PROPOSAL>", "<loc_0><loc_0><loc_500><loc_500>")], {}),
    (_row("caption_to_phrase_grounding", prompt="<CAPTION_TO_PHRASE_GROUNDING>A cat", bboxes=[[0, 0, 50, 25]], labels=["A cat"]),
     [("<CAPTION_TO_PHRASE_GROUNDING>A cat", "A cat<loc_0><loc_0><loc_500><loc_500>")], {}),
    (_row("region_to_category", bboxes=[[0, 0, 50, 25], [10, 10, 20, 20]], labels=["cat", ""]),
     [("<REGION_TO_CATEGORY><loc_0><loc_0><loc_500><loc_500>", "cat<loc_0><loc_0><loc_500><loc_500>")], {"empty label": 1}),
    (_row("region_to_ocr", bboxes=[[0, 0, 50, 25]], labels=["EXIT"]),
     [("<REGION_TO_OCR><loc_0><loc_0><loc_500><loc_500>", "EXIT")], {}),
    (_row("region_to_segmentation", bboxes=[[0, 0, 50, 25]], polygons=[[[0, 0, 50, 0, 50, 25], [60, 0, 70, 0, 70, 10]]], labels=[""]),
     [("<REGION_TO_SEGMENTATION><loc_0><loc_0><loc_500><loc_500>",
       "<loc_0><loc_0><loc_500><loc_0><loc_500><loc_500><sep><loc_600><loc_0><loc_700><loc_0><loc_700><loc_200>")], {}),
    (_row("ocr_with_region", quad_boxes=[[0, 0, 50, 0, 50, 25, 0, 25]], labels=["Hi"]),
     [("<OCR_WITH_REGION>", "Hi<loc_0><loc_0><loc_500><loc_0><loc_500><loc_500><loc_0><loc_500>")], {}),
])
def test_florence_pairs(row, pairs, drops):
    got_drops: Counter = Counter()
    assert florence_pairs(row, got_drops) == pairs
    assert dict(got_drops) == drops


def test_clean_text():
    assert clean_text("a<loc_3>b</s> <c") == "ab c"


@pytest.mark.parametrize("noun, pl, art", [("car", "cars", "a"), ("bus", "buses", "a"), ("puppy", "puppies", "a"),
                                           ("apple", "apples", "an"), ("box", "boxes", "a"), ("toy", "toys", "a")])
def test_plural_and_article(noun, pl, art):
    assert (plural(noun), article(noun)) == (pl, art)


def test_qa_pairs_templates():
    rows = {
        "ocr": _row("ocr", text="HELLO\nWORLD"),
        "ocr_with_region": _row("ocr_with_region", quad_boxes=[[0, 30, 50, 30, 50, 40, 0, 40], [0, 0, 50, 0, 50, 10, 0, 10]],
                                labels=["WORLD", "HELLO"]),
        "caption": _row("caption", text="A sign."),
        "od": _row(bboxes=[[0, 0, 5, 5], [5, 5, 9, 9], [1, 1, 2, 2]], labels=["Cars", "car", "tree"]),
    }
    qa = qa_pairs(ImageRows("x.jpg", 100, 50, rows), None, ["person", "car", "dog", "cat"], Counter())
    got = {q: (a, t) for q, a, t in qa}
    assert got["What is the text in the image?"] == ("HELLO\nWORLD", ["ocr"])
    assert got["What text is in the region <loc_0><loc_0><loc_500><loc_200>?"][0] == "HELLO"
    assert got["What is the first line of text in the image?"][0] == "HELLO"
    assert got["What is the last line of text in the image?"][0] == "WORLD"
    assert got["How many lines of text are in the image?"][0] == "2"
    assert got["What does the image describe?"][0] == "A sign."
    assert got["How many cars are there in the image?"][0] == "2"
    assert got["Is there a tree in the image?"][0] == "yes"
    assert got["Is there a person in the image?"][0] == "no" and got["Is there a dog in the image?"][0] == "no"
    assert "Is there a cat in the image?" not in got  # two negatives per image
    assert qa == qa_pairs(ImageRows("x.jpg", 100, 50, rows), None, ["person", "car", "dog", "cat"], Counter())
    assert qa_pairs(ImageRows("x.jpg", 100, 50, {}), None, [], Counter()) == []
