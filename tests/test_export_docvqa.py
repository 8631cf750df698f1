"""DocVQA export: the columns and types of HuggingFaceM4/DocumentVQA, loaded by `datasets` with
its images decoded."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from exporters import run_export
from exporters.docvqa import SCHEMA
from exporters.options import ExportOptions
from conftest import consumer_import
from export_fixtures import IMAGES, make_run, ok

EXPECTED = pa.schema([
    ("questionId", pa.int32()), ("question", pa.string()), ("question_types", pa.list_(pa.string())),
    ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])), ("docId", pa.int32()),
    ("ucsf_document_id", pa.string()), ("ucsf_document_page_no", pa.string()), ("answers", pa.list_(pa.string())),
])


def test_docvqa_schema_matches_documentvqa(tmp_path):
    ann, _ = make_run(tmp_path)
    run_export(ann, "docvqa", tmp_path / "out", ExportOptions(val_fraction=0.5))
    for f in ("train", "validation"):
        schema = pq.read_schema(tmp_path / "out" / "data" / f"{f}-00000-of-00001.parquet")
        assert schema.remove_metadata().equals(EXPECTED), schema
        assert b"huggingface" in schema.metadata
    assert SCHEMA.equals(EXPECTED)


def test_docvqa_loads_with_datasets_and_decodes_images(tmp_path):
    datasets = consumer_import("datasets")
    ann, _ = make_run(tmp_path)
    s = run_export(ann, "docvqa", tmp_path / "out", ExportOptions(val_fraction=0.5))
    d = tmp_path / "out" / "data"
    ds = datasets.load_dataset("parquet", data_files={"train": str(d / "train-00000-of-00001.parquet"),
                                                      "validation": str(d / "validation-00000-of-00001.parquet")},
                               cache_dir=str(tmp_path / "hf-cache"))
    assert set(ds) == {"train", "validation"}
    assert sum(len(ds[k]) for k in ds) == s.records > 0
    assert isinstance(ds["train"].features["image"], datasets.Image)
    rows = [r for k in ds for r in ds[k]]
    by_q = {}
    for r in rows:
        assert isinstance(r["image"], Image.Image)
        assert r["image"].size == IMAGES[r["ucsf_document_id"]]
        assert r["answers"] and all(isinstance(a, str) for a in r["answers"])
        # the fine-tuning loop: prompt "<DocVQA>" + question, target answers[0]
        by_q.setdefault(r["ucsf_document_id"], {})["<DocVQA>" + r["question"]] = r["answers"][0]
    assert by_q["doc.png"]["<DocVQA>What is the text in the image?"] == "INVOICE 42\nTotal: 7 EUR"
    assert by_q["doc.png"]["<DocVQA>What is the first line of text in the image?"] == "INVOICE 42"
    assert by_q["a/cat.jpg"]["<DocVQA>What does the image describe?"] == "A cat next to a dog."
    assert by_q["b/cat.jpg"]["<DocVQA>How many cars are there in the image?"] == "2"
    assert by_q["a/cat.jpg"]["<DocVQA>Is there a car in the image?"] == "no"
    assert len({r["questionId"] for r in rows}) == len(rows)
    assert "bad.jpg" not in by_q  # error rows only: skipped and counted
    assert s.dropped["error rows"] == 2
    # the auto-detected layout too: load_dataset on the folder finds both splits
    auto = datasets.load_dataset(str(tmp_path / "out"), cache_dir=str(tmp_path / "hf-cache2"))
    assert set(auto) == {"train", "validation"}


def test_docvqa_exif_rotated_image_is_stored_upright(tmp_path):
    ann, root = make_run(tmp_path, parts=[[ok("doc.png", "ocr", text="HELLO", width=200, height=300)]])
    # replace doc.png by a 300x200 JPEG whose EXIF says "rotate 90": upright it is 200x300
    img = Image.new("RGB", (300, 200), "white")
    exif = Image.Exif()
    exif[0x0112] = 6
    (root / "doc.png").unlink()
    img.save(root / "doc.png", format="JPEG", exif=exif.tobytes())
    run_export(ann, "docvqa", tmp_path / "out", ExportOptions(val_fraction=0.0))
    t = pq.read_table(tmp_path / "out" / "data" / "train-00000-of-00001.parquet")
    cell = t.column("image")[0].as_py()
    with Image.open(io.BytesIO(cell["bytes"])) as im:
        assert im.size == (200, 300) and im.getexif().get(0x0112, 1) == 1


def _detections(labels, scores):
    from collections import Counter

    from exporters.docvqa import qa_pairs
    from exporters.read import ImageRows, Row

    boxes = [[10.0 * i, 10.0, 10.0 * i + 8, 18.0] for i in range(len(labels))]
    row = Row(image="x.png", task="od", width=100, height=100, bboxes=boxes, labels=labels, scores=scores)
    drops = Counter()
    return qa_pairs(ImageRows("x.png", 100, 100, {"od": row}), None, ["car", "dog", "bus"], drops, 0.5), drops


def test_count_questions_under_min_score_do_not_teach_uncertain_objects_as_absent():
    """An uncertain car (below --min-score, or with no score: a garbled row) makes "how many cars" and
    "is there a car? no" unknowable: neither is asked; a confident car still answers "yes". Before, the
    unscored car was counted as confident and the low one dropped from the count: "2" and "1", both
    wrong about what the model saw."""
    qa, drops = _detections(["car", "car", "car", "dog"], [0.9, None, 0.2, 0.8])
    asked = {q: a for q, a, _ in qa}
    assert "How many cars are there in the image?" not in asked
    assert asked["Is there a car in the image?"] == "yes"
    assert asked["How many dogs are there in the image?"] == "1"
    assert asked["Is there a bus in the image?"] == "no"
    assert drops["no score (--min-score needs one)"] == 1 and drops["score below --min-score"] == 1
    qa, _ = _detections(["dog", "car"], [0.9, 0.3])  # an uncertain car alone: no "car? no"
    asked = {q: a for q, a, _ in qa}
    assert "Is there a car in the image?" not in asked and asked["Is there a bus in the image?"] == "no"
    qa, _ = _detections(["car", "car"], [0.9, 0.7])  # all confident: counted
    assert {q: a for q, a, _ in qa}["How many cars are there in the image?"] == "2"
