"""Review formats (Label Studio, CVAT) and their importers. The exports are checked by the tools'
own parsers when installed (label-studio-sdk's LabelInterface validates the labeling config and
every prediction; datumaro loads the CVAT XML), and export -> import gives back the same boxes."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest
from click.testing import CliRunner

from annotator.cli import cli
from conftest import consumer_import
from exporters import run_export
from exporters.classes import parse_classes_arg
from exporters.importers import run_import
from exporters.labelstudio import image_url, ls_results
from exporters.geometry import Instance
from exporters.options import ExportOptions
from export_fixtures import make_run, ok, standard_rows

TOL = 0.02  # px: percent with 4 decimals (labelstudio) and pixels with 2 (cvat, coco)


def _run(tmp_path, extra=()):
    parts = standard_rows()
    parts[0] += [ok("a/cat.jpg", "detailed_caption", prompt="<DETAILED_CAPTION>", text="A cat & a <dog>."), *extra]
    return make_run(tmp_path, parts)


def _accept_predictions(tasks: list[dict]) -> list[dict]:
    """What Label Studio's JSON export holds after a reviewer accepts every prediction unchanged."""
    return [{"id": i, "data": t["data"], "predictions": t["predictions"],
             "annotations": [{"id": i, "result": t["predictions"][0]["result"], "was_cancelled": False,
                              "updated_at": "2026-12-02T10:00:00Z"}]} for i, t in enumerate(tasks, 1)]


def _boxes(coco: dict) -> dict:
    """file_name -> sorted [(category name, x, y, w, h, text)]."""
    names = {c["id"]: c["name"] for c in coco["categories"]}
    files = {i["id"]: i["file_name"] for i in coco["images"]}
    out: dict = {f: [] for f in files.values()}
    for a in coco["annotations"]:
        out[files[a["image_id"]]].append((names[a["category_id"]], *a["bbox"], a.get("text")))
    return {k: sorted(v, key=lambda t: (t[0], t[1], t[2])) for k, v in out.items()}


def _same_boxes(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert len(a[key]) == len(b[key]), key
        for x, y in zip(a[key], b[key]):
            assert x[0] == y[0] and x[5] == y[5], (key, x, y)
            assert x[1:5] == pytest.approx(y[1:5], abs=TOL), (key, x, y)


# --- pure converters -------------------------------------------------------------------------------
@pytest.mark.parametrize("root, key, url", [
    (None, "a/b c.jpg", "a/b c.jpg"),
    ("/data/local-files/?d=photos/", "ü/b c&d.jpg", "/data/local-files/?d=photos/%C3%BC/b%20c%26d.jpg"),
    ("https://cdn.example/x/", "a/1.jpg", "https://cdn.example/x/a/1.jpg"),
    ("/mnt/images/", "a/b c.jpg", "/mnt/images/a/b c.jpg"),
])
def test_image_url(root, key, url):
    assert image_url(key, root) == url


def test_ls_results_percent_coordinates_and_ocr_text():
    [r] = ls_results("r0", "cat", Instance("cat", (20.0, 10.0, 120.0, 60.0), score=0.5), 200, 100)
    assert r["value"] == {"x": 10.0, "y": 10.0, "width": 50.0, "height": 50.0, "rotation": 0, "rectanglelabels": ["cat"]}
    assert r["score"] == 0.5 and r["original_width"] == 200
    quad = [0.0, 0.0, 100.0, 0.0, 100.0, 50.0, 0.0, 50.0]
    poly, text = ls_results("r1", "text", Instance("text", (0, 0, 100, 50), [quad], text="Hi"), 200, 100)
    assert poly["type"] == "polygonlabels" and text["type"] == "textarea" and poly["id"] == text["id"]
    assert text["value"]["text"] == ["Hi"] and poly["value"]["points"][2] == [50.0, 50.0]


# --- Label Studio ----------------------------------------------------------------------------------
def test_labelstudio_export_is_valid_for_the_sdk(tmp_path):
    li_mod = consumer_import("label_studio_sdk.label_interface")
    ann, _ = _run(tmp_path)
    s = run_export(ann, "labelstudio", tmp_path / "ls", ExportOptions(image_root="/data/local-files/?d=", order="score"))
    tasks = json.loads((tmp_path / "ls" / "tasks.json").read_text(encoding="utf-8"))
    li = li_mod.LabelInterface((tmp_path / "ls" / "labeling.xml").read_text(encoding="utf-8"))
    assert [c.name for c in li.controls] == ["label", "polygon", "transcription", "caption", "detailed_caption", "ocr"]
    assert list(next(iter(li.labels))) == s.classes == ["car", "cat", "dog", "text", "straßenbahn"]
    for t in tasks:
        assert li.validate_prediction(t["predictions"][0], return_errors=True) == [], t["data"]["key"]
    # lowest-confidence image first; the rest (no scores) in key order
    assert [t["data"]["key"] for t in tasks] == ["b/cat.jpg", "a/cat.jpg", "b/CAT.png", "doc.png", "ü/straße.png"]
    assert tasks[0]["predictions"][0]["score"] == 0.2 and tasks[0]["data"]["image"] == "/data/local-files/?d=b/cat.jpg"
    regions = sum(len({r["id"] for r in t["predictions"][0]["result"]}) for t in tasks)
    assert regions == s.instances + 1 + 2 + 1  # + one extra mask part, + caption, detailed_caption, ocr texts
    # the SDK's own check catches a label that is not in the config
    bad = json.loads(json.dumps(tasks[0]["predictions"][0]))
    bad["result"][0]["value"]["rectanglelabels"] = ["zebra"]
    assert li.validate_prediction(bad, return_errors=True)


def test_labelstudio_round_trip_gives_back_the_boxes(tmp_path):
    ann, _ = _run(tmp_path)
    opts = ExportOptions(include_ocr=True)
    run_export(ann, "labelstudio", tmp_path / "ls", opts)
    run_export(ann, "coco", tmp_path / "coco", opts)
    tasks = json.loads((tmp_path / "ls" / "tasks.json").read_text(encoding="utf-8"))
    exported = tmp_path / "export.json"
    exported.write_text(json.dumps(_accept_predictions(tasks)), encoding="utf-8")
    s = run_import("labelstudio", exported, tmp_path / "gt")
    gt = json.loads((tmp_path / "gt" / "annotations.json").read_text(encoding="utf-8"))
    _same_boxes(_boxes(gt), _boxes(json.loads((tmp_path / "coco" / "annotations.json").read_text(encoding="utf-8"))))
    assert s.instances == len(gt["annotations"]) == 10
    seg = [a for a in gt["annotations"] if len(a.get("segmentation", [])) == 2]
    assert len(seg) == 1  # the two-part mask is one instance again
    texts = {i["file_name"]: i.get("texts") for i in gt["images"]}
    assert texts["a/cat.jpg"] == {"caption": "A cat next to a dog.", "detailed_caption": "A cat & a <dog>."}


def test_labelstudio_import_takes_the_reviewers_edits(tmp_path):
    """Reviewer moved a box, deleted one, relabelled one, added one; a second task was skipped."""
    ann, _ = _run(tmp_path)
    run_export(ann, "labelstudio", tmp_path / "ls", ExportOptions(tasks=("od",)))
    tasks = {t["data"]["key"]: t for t in json.loads((tmp_path / "ls" / "tasks.json").read_text(encoding="utf-8"))}
    res = [dict(r, value=dict(r["value"])) for r in tasks["a/cat.jpg"]["predictions"][0]["result"]]
    res[0]["value"]["x"] = 50.0  # 200 px wide: x = 100 px
    res[1]["value"]["rectanglelabels"] = ["cat"]
    res.append({"id": "new1", "from_name": "label", "to_name": "image", "type": "rectanglelabels",
                "original_width": 200, "original_height": 100,
                "value": {"x": 0, "y": 0, "width": 10, "height": 10, "rotation": 0, "rectanglelabels": ["dog"]}})
    export = [{"data": tasks["a/cat.jpg"]["data"], "annotations": [
                  {"result": [], "was_cancelled": False, "updated_at": "2026-01-01T00:00:00Z"},  # older
                  {"result": res, "was_cancelled": False, "updated_at": "2026-02-01T00:00:00Z"}]},
              {"data": tasks["b/cat.jpg"]["data"], "annotations": [{"result": [], "was_cancelled": True}]},
              {"data": tasks["doc.png"]["data"], "annotations": [{"result": [], "was_cancelled": False}]}]
    path = tmp_path / "export.json"
    path.write_text(json.dumps(export), encoding="utf-8")
    s = run_import("labelstudio", path, tmp_path / "gt")
    boxes = _boxes(json.loads((tmp_path / "gt" / "annotations.json").read_text(encoding="utf-8")))
    assert boxes["a/cat.jpg"] == [("cat", 100.0, 10.0, 50.0, 40.0, None), ("cat", 100.0, 20.0, 90.0, 70.0, None),
                                  ("dog", 0.0, 0.0, 20.0, 10.0, None)]
    assert boxes["doc.png"] == []  # reviewed: no objects (a true negative)
    assert "b/cat.jpg" not in boxes and s.dropped["task not annotated"] == 1


def test_labelstudio_import_rejects_hostile_keys(tmp_path):
    export = [{"data": {"key": k, "width": 10, "height": 10}, "annotations": [{"result": []}]}
              for k in ("../x.jpg", "/etc/passwd", "ok.jpg")]
    path = tmp_path / "e.json"
    path.write_text(json.dumps(export))
    s = run_import("labelstudio", path, tmp_path / "gt")
    gt = json.loads((tmp_path / "gt" / "annotations.json").read_text())
    assert [i["file_name"] for i in gt["images"]] == ["ok.jpg"] and s.dropped["unsafe or missing image key"] == 2


# --- CVAT ------------------------------------------------------------------------------------------
def test_cvat_export_loads_in_datumaro(tmp_path):
    dm = consumer_import("datumaro")
    ann, _ = _run(tmp_path)
    s = run_export(ann, "cvat", tmp_path / "cv", ExportOptions(include_ocr=True, min_score=0.5))
    ds = dm.Dataset.import_from(str(tmp_path / "cv" / "annotations.xml"), "cvat")
    cats = ds.categories()[dm.AnnotationType.label]
    assert [c.name for c in cats] == s.classes
    shapes = [(item.id, cats[a.label].name, a.type.name, a.attributes) for item in ds for a in item.annotations]
    assert len(shapes) == s.instances + 1  # the two-part mask is two polygons (one group)
    assert s.dropped["score below --min-score"] == 1
    car = [a for i, name, t, a in shapes if i == "b/cat" and t == "bbox"]
    assert car == [{"score": 0.95, "task": "od", "occluded": False}]
    assert {a["text"] for i, name, t, a in shapes if name == "text"} == {"INVOICE 42", "Total: 7 EUR"}
    groups = [a.group for item in ds if item.id == "a/cat" for a in item.annotations]
    assert sorted(groups) == [0, 1, 1]


def test_cvat_import_agrees_with_datumaros_coco_conversion(tmp_path):
    dm = consumer_import("datumaro")
    ann, _ = _run(tmp_path)
    run_export(ann, "cvat", tmp_path / "cv", ExportOptions(include_ocr=True))
    dm.Dataset.import_from(str(tmp_path / "cv" / "annotations.xml"), "cvat").export(
        str(tmp_path / "dm"), "coco_instances", save_media=False)
    theirs = json.loads((tmp_path / "dm" / "annotations" / "instances_annotations.json").read_text(encoding="utf-8"))
    run_import("cvat", tmp_path / "cv" / "annotations.xml", tmp_path / "gt")
    ours = json.loads((tmp_path / "gt" / "annotations.json").read_text(encoding="utf-8"))
    strip = lambda boxes: {k: [b[:5] + (None,) for b in v] for k, v in boxes.items()}  # noqa: E731 (no text in theirs)
    _same_boxes(strip(_boxes(ours)), strip(_boxes(theirs)))
    assert len(ours["annotations"]) == len(theirs["annotations"]) == 10  # both join the two-part mask


def test_cvat_round_trip_gives_back_the_boxes(tmp_path):
    ann, _ = _run(tmp_path)
    opts = ExportOptions(include_ocr=True, classes=parse_classes_arg("cat,dog,car"))
    run_export(ann, "cvat", tmp_path / "cv", opts)
    run_export(ann, "coco", tmp_path / "coco", opts)
    s = run_import("cvat", tmp_path / "cv" / "annotations.xml", tmp_path / "gt")
    gt = json.loads((tmp_path / "gt" / "annotations.json").read_text(encoding="utf-8"))
    _same_boxes(_boxes(gt), _boxes(json.loads((tmp_path / "coco" / "annotations.json").read_text(encoding="utf-8"))))
    assert s.classes == ["car", "cat", "dog", "text"]
    assert len([a for a in gt["annotations"] if len(a.get("segmentation", [])) == 2]) == 1


def test_cvat_import_of_edited_xml(tmp_path):
    """A reviewer's CVAT dump: a rotated box, a deleted shape, a point shape we ignore, a bad label."""
    xml = """<?xml version="1.0"?><annotations><version>1.1</version><meta><task><labels/></task></meta>
      <image id="0" name="a.jpg" width="100" height="100">
        <box label="cat" occluded="0" xtl="40" ytl="45" xbr="60" ybr="55" rotation="90"/>
        <points label="nose" points="1,1"/>
        <box label="" xtl="1" ytl="1" xbr="5" ybr="5"/>
      </image>
      <image id="1" name="../evil.jpg" width="10" height="10"/>
    </annotations>"""
    path = tmp_path / "annotations.xml"
    path.write_text(xml)
    s = run_import("cvat", path, tmp_path / "gt")
    gt = json.loads((tmp_path / "gt" / "annotations.json").read_text())
    assert [a["bbox"] for a in gt["annotations"]] == [[45.0, 40.0, 10.0, 20.0]]  # turned a quarter
    assert s.dropped == {"points shapes ignored": 1, "empty label": 1, "unsafe image key": 1}


def test_cvat_refuses_text_tasks(tmp_path):
    ann, _ = _run(tmp_path)
    with pytest.raises(Exception, match="labelstudio"):
        run_export(ann, "cvat", tmp_path / "cv", ExportOptions(tasks=("od", "caption")))


# --- CLI and florence pairs ------------------------------------------------------------------------
def test_cli_export_then_import_florence(tmp_path):
    ann, root = _run(tmp_path)
    r = CliRunner().invoke(cli, ["export", str(ann), "--format", "labelstudio", "--out", str(tmp_path / "ls"),
                                 "--config-out", str(tmp_path / "labeling.xml"), "--order", "score"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "labeling.xml").read_text() == (tmp_path / "ls" / "labeling.xml").read_text()
    tasks = json.loads((tmp_path / "ls" / "tasks.json").read_text(encoding="utf-8"))
    (tmp_path / "e.json").write_text(json.dumps(_accept_predictions(tasks)), encoding="utf-8")
    r = CliRunner().invoke(cli, ["import", "labelstudio", str(tmp_path / "e.json"), "--format", "florence",
                                 "--images", str(root), "--out", str(tmp_path / "fl")])
    assert r.exit_code == 0, r.output
    lines = [json.loads(line) for d in ("train", "valid")
             for line in (tmp_path / "fl" / d / "annotations.jsonl").read_text(encoding="utf-8").splitlines()]
    prefixes = {(x["image"], x["prefix"]) for x in lines}
    assert ("doc.png", "<OCR_WITH_REGION>") in prefixes and ("a__cat.jpg", "<DETAILED_CAPTION>") in prefixes
    # b/cat.jpg's flat name has a hash added (b/CAT.png would clash on case-insensitive file systems)
    od = next(x["suffix"] for x in lines if x["image"].startswith("b__cat-") and x["prefix"] == "<OD>")
    assert od.count("car<loc_") == 3
    # a second import into the same folder needs --overwrite
    r = CliRunner().invoke(cli, ["import", "labelstudio", str(tmp_path / "e.json"), "--out", str(tmp_path / "fl")])
    assert r.exit_code == 2 and "--overwrite" in r.output  # README: a refused --out is 2


def test_config_out_never_clobbers(tmp_path):
    ann, _ = _run(tmp_path)
    (tmp_path / "labeling.xml").write_text("mine")
    with pytest.raises(Exception, match="exists"):
        run_export(ann, "labelstudio", tmp_path / "ls", ExportOptions(config_out=tmp_path / "labeling.xml"))
    assert (tmp_path / "labeling.xml").read_text() == "mine" and not (tmp_path / "ls").exists()


def test_cvat_xml_escapes_labels(tmp_path):
    ann, _ = make_run(tmp_path, [[ok("doc.png", "od", bboxes=[[1, 1, 50, 50]], labels=['a "<b>" & c'])]])
    run_export(ann, "cvat", tmp_path / "cv", ExportOptions())
    root = ET.parse(tmp_path / "cv" / "annotations.xml").getroot()
    assert root.find("image/box").get("label") == 'a "<b>" & c'
