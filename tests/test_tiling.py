"""Tiled inference: tile geometry, mapping tile answers to image pixels and merging them, on
scripted rows; then end to end on the tiny random model."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from annotator.config import ConfigError, TileSettings
from annotator.outdir.table import OK, SCHEMA, Annotation, drop_error_rows, scan_parts
from annotator.answers.tile_merge import merge_row
from annotator.inputs.tiles import TileBox, axis_starts, plan_tiles, tile_grid
from annotator.answers.tile_merge import splice_text

# Two tiles side by side on a 200x100 image, overlapping in x 88..112.
LEFT, RIGHT = TileBox(0, 0, 112, 100), TileBox(88, 0, 200, 100)


def row(task, image="a.png", w=200, h=100, **kw):
    return Annotation(image=image, task=task, status=OK, width=w, height=h, **kw)


def quad(x0, y0, x1, y1):
    return [x0, y0, x1, y0, x1, y1, x0, y1]


# --------------------------------------------------------------------------- geometry
def test_grid_covers_the_image_with_at_least_the_overlap():
    assert axis_starts(200, 112, 0.2) == [0, 88]
    assert axis_starts(100, 112, 0.2) == [0]
    for w, h, t in [(200, 100, 112), (4000, 3000, 768), (1000, 1000, 333)]:
        grid = tile_grid(w, h, t, t, 0.2)
        assert {b.x0 for b in grid} >= {0} and max(b.x1 for b in grid) == w and max(b.y1 for b in grid) == h
        xs = sorted({b.x0 for b in grid})
        assert all(b - a <= t * 0.8 + 1 for a, b in zip(xs, xs[1:]))  # neighbours share >= 20%
    assert tile_grid(100, 80, 112, 90, 0.2) == []  # one tile would be the whole image again


def test_auto_tiles_only_large_images_unless_forced():
    auto = TileSettings("auto")
    assert plan_tiles(1000, 700, auto, 768) == []
    big = plan_tiles(4000, 3000, auto, 768)
    assert 1 < len(big) <= 16 and min(b.width for b in big) >= 768
    forced = plan_tiles(700, 500, auto, 768, force=True)  # truncated answer: 2 tiles along the long side
    assert len({b.x0 for b in forced}) == 2
    assert len(plan_tiles(200, 100, TileSettings.parse("112x90"), 768)) == 4  # 2 x 2


@pytest.mark.parametrize("spec,overlap", [("12x12", 0.2), ("wide", 0.2), ("100x100", 0.6)])
def test_bad_tile_options(spec, overlap):
    with pytest.raises(ConfigError):
        TileSettings.parse(spec, overlap)


# --------------------------------------------------------------------------- boxes
def test_mapping_to_image_pixels():
    tile = TileBox(100, 50, 180, 100)
    merged = merge_row(row("od", bboxes=[], labels=[], scores=[]),
                       [(tile, row("od", "a.png\0tile0", 80, 50, bboxes=[[10, 20, 30, 40]], labels=["car"], scores=[0.9]))])
    assert merged.bboxes == [[110, 70, 130, 90]] and merged.labels == ["car"] and merged.scores == [0.9]
    assert merged.tiles == 1


def test_a_box_split_over_two_tiles_comes_back_as_one():
    # a car at x 80..130: the left tile sees 80..112 (cut by its right side), the right one 88..130
    parts = [(LEFT, row("od", bboxes=[[80, 30, 112, 60]], labels=["car"], scores=[0.6])),
             (RIGHT, row("od", bboxes=[[0, 31, 42, 60]], labels=["car"], scores=[0.8]))]
    merged = merge_row(row("od", bboxes=[], labels=[], scores=[]), parts)
    assert merged.bboxes == [[80, 30, 130, 60]] and merged.labels == ["car"] and merged.scores == [0.8]
    assert merged.tiles == 2


def test_a_corner_object_of_four_tiles_comes_back_as_one():
    tiles = [TileBox(0, 0, 112, 112), TileBox(88, 0, 200, 112), TileBox(0, 88, 112, 200), TileBox(88, 88, 200, 200)]
    seen = [[80, 80, 112, 112], [0, 80, 42, 112], [80, 0, 112, 42], [0, 0, 42, 42]]  # tile pixels
    parts = [(t, row("od", w=200, h=200, bboxes=[b], labels=["sign"])) for t, b in zip(tiles, seen)]
    merged = merge_row(row("od", w=200, h=200, bboxes=[], labels=[]), parts)
    assert merged.bboxes == [[80, 80, 130, 130]] and merged.scores is None


def test_duplicates_fragments_and_other_classes():
    whole = row("od", bboxes=[[10, 10, 190, 90]], labels=["bus"], scores=[0.7])
    parts = [
        # the bus seen in two pieces, the piece cut by the tile border too: all one bus
        (LEFT, row("od", bboxes=[[10, 10, 112, 90], [95, 5, 105, 9]], labels=["bus", "bird"], scores=[0.9, 0.5])),
        # the same bird, whole in the overlap band of both tiles; a dog cut at the border
        (RIGHT, row("od", bboxes=[[7, 5, 17, 9], [0, 40, 20, 60]], labels=["bird", "dog"], scores=[0.6, 0.4])),
    ]
    merged = merge_row(whole, parts)
    got = sorted(zip(merged.labels, merged.bboxes, merged.scores))
    assert [g[0] for g in got] == ["bird", "bus", "dog"]
    assert got[1][1] == [10, 10, 190, 90]  # not a second, cut bus
    assert got[0][2] == 0.6 and got[2][1] == [88, 40, 108, 60]  # nothing to join the cut dog with: kept


def test_label_free_tasks_merge_across_labels_and_failed_tiles_fail_the_row():
    parts = [(LEFT, row("dense_region_caption", bboxes=[[95, 5, 105, 9]], labels=["a red bird"])),
             (RIGHT, row("dense_region_caption", bboxes=[[7, 5, 17, 9]], labels=["a small bird"]))]
    assert len(merge_row(row("dense_region_caption", bboxes=[], labels=[]), parts).bboxes) == 1
    bad = Annotation.failed("a.png\0tile1", "od", "generation failed: OOM")
    merged = merge_row(row("od", bboxes=[], labels=[]), [(LEFT, row("od", bboxes=[], labels=[])), (RIGHT, bad)])
    assert merged.status == "error" and "tile failed" in merged.error


# --------------------------------------------------------------------------- OCR
def ocr_parts():
    # "Hello world again" at x 20..180 is cut by the border: each tile reads its part, both the
    # overlap band; "second line" lies in the right tile only; "x=1" in the band is read twice.
    return [
        (LEFT, row("ocr_with_region", quad_boxes=[quad(20, 10, 112, 20), quad(92, 40, 108, 48)],
                   labels=["Hello wor", "x=1"], scores=[0.9, 0.8])),
        (RIGHT, row("ocr_with_region", quad_boxes=[quad(0, 10, 92, 20), quad(4, 40, 20, 48), quad(10, 70, 80, 80)],
                    labels=["world again", "x=1", "second line"], scores=[0.7, 0.8, 0.6])),
    ]


def test_ocr_lines_are_joined_deduplicated_and_in_reading_order():
    merged = merge_row(row("ocr_with_region", quad_boxes=[], labels=[], scores=[]), ocr_parts())
    assert merged.labels == ["Hello world again", "x=1", "second line"]
    assert merged.quad_boxes[0] == quad(20, 10, 180, 20)


def test_ocr_text_is_assembled_from_the_tiles_lines():
    whole = row("ocr", text="Hello wo", truncated=True, text_score=0.5)
    merged = merge_row(whole, ocr_parts())
    assert merged.text == "Hello world again\nx=1\nsecond line" and not merged.truncated and merged.tiles == 2


def test_ocr_text_never_shows_location_tokens():
    parts = [(LEFT, row("ocr_with_region", quad_boxes=[quad(10, 10, 60, 20), quad(10, 40, 60, 50)],
                        labels=["red<loc_3><loc_9>blue", "<loc_7>"]))]
    assert merge_row(row("ocr", text=""), parts).text == "red blue"


def test_splice_text():
    assert splice_text("Hello wor", "world again") == "Hello world again"
    assert splice_text("abc", "xyz") == "abc xyz"


# --------------------------------------------------------------------------- store: older folders
def test_parts_written_before_the_tiles_column_still_read(tmp_path):
    old_schema = pa.schema([f for f in SCHEMA if f.name != "tiles"])
    old = pa.Table.from_pylist([{"image": "a.png", "task": "od", "status": "ok"},
                                {"image": "b.png", "task": "od", "status": "error", "error": "x"}], schema=old_schema)
    pq.write_table(old, tmp_path / "part-r0000-old-000000.parquet")
    new = pa.Table.from_pylist([{"image": "c.png", "task": "od", "status": "ok", "tiles": 4}], schema=SCHEMA)
    pq.write_table(new, tmp_path / "part-r0000-new-000000.parquet")
    df = scan_parts(sorted(tmp_path.glob("part-*.parquet"))).collect().sort("image")
    assert df["tiles"].to_list() == [None, None, 4]
    assert drop_error_rows(tmp_path) == 1  # rewrites the old part in today's schema
    assert pq.read_schema(tmp_path / "part-r0000-old-000000.parquet").names == SCHEMA.names


# --------------------------------------------------------------------------- end to end
def test_cli_run_with_tiles(tmp_path):
    from click.testing import CliRunner

    from annotator.cli import cli
    from tests.run_helpers import FAST, rows

    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (200, 160), (200, 200, 50)).save(images / "big.png")
    Image.new("RGB", (60, 40), (20, 90, 200)).save(images / "small.png")
    out = tmp_path / "ann"
    args = ["run", str(images), "--tasks", "caption,od,ocr", "--out", str(out), "--tile", "112x90", *FAST]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    df = rows(out)
    assert df.height == 6 and set(df["status"]) == {"ok"}  # one row per image and task, tiles or not
    tiles = {(r["image"], r["task"]): r["tiles"] for r in df.iter_rows(named=True)}
    assert tiles == {("big.png", "caption"): 0, ("big.png", "od"): 4, ("big.png", "ocr"): 4,
                     ("small.png", "caption"): 0, ("small.png", "od"): 0, ("small.png", "ocr"): 0}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["identity"]["tiling"] == {"mode": "fixed", "size": [112, 90], "overlap": 0.2}
    assert manifest["counts"]["quality"]["tiles"] == 4 and "images: 2" in res.output
    assert CliRunner().invoke(cli, args).exit_code == 0 and rows(out).height == 6  # resumes: nothing redone
    assert "other settings" in CliRunner().invoke(cli, [*args[:-len(FAST) - 2], "--tile", "off", *FAST]).output


def test_auto_tiles_an_image_whose_answer_was_truncated(tmp_path):
    from annotator.run.device import run
    from tests.run_helpers import make_cfg, rows

    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (100, 70), (200, 200, 50)).save(images / "page.png")  # below auto's size trigger
    cfg = make_cfg(images, tmp_path / "ann", tasks="od", tiling=TileSettings("auto"))
    summary = run(cfg)
    (r,) = rows(cfg.out).iter_rows(named=True)
    # random weights never stop within 6 tokens: truncated, so auto tiled it, with tiles of the
    # model's input side (64 px for random:tiny): 2 x 2; each tile truncated too, so each is split
    # once more (2 x 2 pieces of 36 px), and the pieces replace it: 16
    assert r["status"] == "ok" and r["tiles"] == 16
    assert summary.quality["retiled_truncated"] == 1 and summary.quality["tiles_split_truncated"] == 4


# --------------------------------------------------------------------------- the measurement's inputs
def test_long_pages_hold_many_lines_inside_the_page(tmp_path):
    from annotator.demo import world as samples

    samples.write(tmp_path, n=2, seed=1, kind="pages")
    texts = [json.loads(line) for line in (tmp_path / "texts.jsonl").read_text().splitlines()]
    for t in texts:
        with Image.open(tmp_path / t["image"]) as im:
            w, h = im.size
        assert 600 <= w <= 1000 and 1000 <= h <= 1800 and len(t["ocr_regions"]) >= 15
        assert t["ocr"] == "\n".join(text for _, text in t["ocr_regions"])
        for q, _ in t["ocr_regions"]:
            assert 0 <= min(q[0::2]) and max(q[0::2]) <= w and 0 <= min(q[1::2]) and max(q[1::2]) <= h


def test_bench_scores_region_lines(tmp_path):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("bench_tiling", Path(__file__).parents[1] / "examples" / "bench_tiling.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    pred = row("ocr_with_region", quad_boxes=[quad(0, 0, 50, 10), quad(0, 60, 50, 70)], labels=["hello", "junk"])
    pq.write_table(pa.Table.from_pylist([vars(pred)], schema=SCHEMA), tmp_path / "part-r0000-x-000000.parquet")
    truth = {"a.png": [[quad(1, 0, 50, 10), "hallo"], [quad(0, 30, 50, 40), "world"]]}
    recall, line_cer = bench.region_scores(tmp_path, truth)
    # one of two lines found; errors: 1 (hallo/hello) + 5 (world missed) + 4 (junk invented) over 10
    assert recall == 0.5 and line_cer == 1.0
