"""Florence-2 JSONL export: every suffix parsed by Florence2Processor.post_process_generation (a
tiny processor built offline) gives back the table's geometry within one quantization bin."""

from __future__ import annotations

import json
import re

import pytest

from exporters import run_export
from exporters.files import flat_names
from exporters.geometry import clip_box, clip_polygon
from exporters.options import ExportOptions
from export_fixtures import IMAGES, make_run, standard_rows

POST_PROCESSOR_CONFIG = {  # as the real checkpoints ship it
    "ocr": {"PATTERN": r"(.+?)<loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)>",
            "AREA_THRESHOLD": 0.0},
    "phrase_grounding": {"FILTER_BY_BLACK_LIST": True}, "pure_text": {}, "description_with_bboxes": {},
    "description_with_polygons": {}, "polygons": {}, "bboxes": {}, "description_with_bboxes_or_polygons": {},
}


@pytest.fixture(scope="module")
def processor():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPImageProcessor, PreTrainedTokenizerFast
    from transformers.models.florence2.processing_florence2 import Florence2Processor

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<image>", "<sep>", "<poly>", "</poly>"] + [f"<loc_{i}>" for i in range(1000)]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                        unk_token="<unk>", extra_special_tokens={"image_token": "<image>"})
    tokenizer.add_special_tokens({"additional_special_tokens": specials[5:]})
    image_processor = CLIPImageProcessor(size={"height": 32, "width": 32}, crop_size={"height": 32, "width": 32})
    image_processor.image_seq_length = 4
    return Florence2Processor(image_processor=image_processor, tokenizer=tokenizer,
                              post_processor_config=POST_PROCESSOR_CONFIG)


def close(a, b, size) -> bool:
    """Within one bin (the processor also truncates to int: one more pixel)."""
    w, h = size
    return len(a) == len(b) and all(abs(x - y) <= (w if i % 2 == 0 else h) / 1000 + 1 for i, (x, y) in enumerate(zip(a, b)))


def _lines(out):
    for split in ("train", "valid"):
        for line in (out / split / "annotations.jsonl").read_text(encoding="utf-8").splitlines():
            yield split, json.loads(line)


def test_florence_jsonl_round_trips_through_the_processor(tmp_path, processor):
    ann, _ = make_run(tmp_path)
    out = tmp_path / "out"
    s = run_export(ann, "florence", out, ExportOptions())
    source = {(r.image, r.task): r for part in standard_rows() for r in part if r.status == "ok"}
    by_token = {}
    lines = list(_lines(out))
    assert len(lines) == s.records == 10
    checked = 0
    key_of = {v: k for k, v in flat_names(list(IMAGES)).items()}
    for split, d in lines:
        assert set(d) == {"image", "prefix", "suffix"}
        assert (out / split / d["image"]).exists()
        key = key_of[d["image"]]
        size = IMAGES[key]
        token = d["prefix"][: d["prefix"].index(">") + 1]
        parsed = processor.post_process_generation(d["suffix"], task=token, image_size=size)[token]
        by_token.setdefault(token, []).append(parsed)
        task = {"<OD>": "od", "<OCR_WITH_REGION>": "ocr_with_region", "<OPEN_VOCABULARY_DETECTION>": "open_vocabulary_detection",
                "<REGION_TO_SEGMENTATION>": "region_to_segmentation", "<CAPTION>": "caption", "<OCR>": "ocr"}[token]
        row = source[(key, task)]
        w, h = size
        if task == "od":
            boxes = [clip_box(b, w, h) for b in row.bboxes]
            want = [(lab, b) for lab, b in zip(row.labels, boxes) if b]
            # Florence-2's own parser keeps only the ASCII characters of a phrase ('Straßenbahn' -> 'Straenbahn')
            assert parsed["labels"] == [lab.encode("ascii", "ignore").decode() for lab, _ in want]
            assert all(close(p, b, size) for p, (_, b) in zip(parsed["bboxes"], want))
        elif task == "ocr_with_region":
            assert parsed["labels"] == row.labels
            assert all(close(p, clip_polygon(q, w, h), size) for p, q in zip(parsed["quad_boxes"], row.quad_boxes))
        elif task == "open_vocabulary_detection":
            assert parsed["polygons_labels"] == row.labels
            assert close(parsed["polygons"][0][0], row.polygons[0][0], size)
        elif task == "region_to_segmentation":
            # the prefix names the source box: find it, then compare its mask
            bins = [int(b) for b in re.findall(r"<loc_(\d+)>", d["prefix"])]
            region = [(b + 0.5) * (w if j % 2 == 0 else h) / 1000 for j, b in enumerate(bins)]
            i = next(i for i, b in enumerate(row.bboxes) if close(region, clip_box(b, w, h), size))
            assert len(parsed["polygons"]) == 1
            assert all(close(p, q, size) for p, q in zip(parsed["polygons"][0], row.polygons[i]))
        else:
            assert parsed == (row.text or "").strip()
        checked += 1
    assert checked == 10
    assert set(by_token) == {"<OD>", "<OCR_WITH_REGION>", "<OPEN_VOCABULARY_DETECTION>", "<REGION_TO_SEGMENTATION>",
                             "<CAPTION>", "<OCR>"}


def test_florence_task_choice_and_classes(tmp_path):
    from exporters.classes import parse_classes_arg

    ann, _ = make_run(tmp_path)
    s = run_export(ann, "florence", tmp_path / "out", ExportOptions(tasks=("od",), classes=parse_classes_arg("car,cat")))
    lines = [d for _, d in _lines(tmp_path / "out")]
    assert {d["prefix"] for d in lines} == {"<OD>"}
    assert all("dog" not in d["suffix"].lower() for d in lines)
    assert s.dropped["label not in classes"] == 3  # Dogs, Straßenbahn, dog
