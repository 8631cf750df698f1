"""`annotate run` and `annotate tasks` through click's runner, end to end on the tiny model."""

import json

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from annotator.cli import cli
from annotator.outdir.table import SCHEMA
from annotator.tasks import TASKS

FAST = ["--num-beams", "1", "--max-new-tokens", "8", "--no-progress"]


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def read_rows(out):
    tables = [pq.read_table(p) for p in sorted(out.glob("part-*.parquet"))]
    return [row for t in tables for row in t.to_pylist()], tables


def test_run_writes_one_row_per_image_and_task(image_dir, tmp_path):
    out = tmp_path / "ann"
    res = invoke("run", image_dir, "--tasks", "caption,od,dense_region_caption,ocr", "--model", "random:tiny",
                 "--out", out, "--workers", "2", "--batch-size", "2", *FAST)
    assert res.exit_code == 0, res.output
    rows, tables = read_rows(out)
    assert all(t.schema.equals(SCHEMA, check_metadata=False) for t in tables)
    keys = sorted((r["image"], r["task"]) for r in rows)
    assert keys == sorted((f"img{i}.png", t) for i in range(5) for t in ["caption", "od", "dense_region_caption", "ocr"])
    assert all(r["status"] == "ok" and r["width"] > 0 and r["raw"] for r in rows)
    assert {r["task"]: r["prompt"] for r in rows}["od"] == "<OD>"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["identity"]["model"] == "random:tiny" and manifest["finished"]
    assert manifest["tasks"] == ["caption", "od", "dense_region_caption", "ocr"]
    assert "images: 5" in res.output and "rows ok: 20" in res.output


def test_run_from_a_local_checkpoint_dir_and_error_rows_exit_1(image_dir, tiny_checkpoint, tmp_path):
    (image_dir / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    out = tmp_path / "ann"
    res = invoke("run", image_dir, "--tasks", "od", "--model", tiny_checkpoint, "--out", out, "--workers", "0", *FAST)
    assert res.exit_code == 1, res.output
    rows, _ = read_rows(out)
    bad = [r for r in rows if r["image"] == "broken.jpg"]
    assert len(rows) == 6 and len(bad) == 1 and bad[0]["status"] == "error" and "decode failed" in bad[0]["error"]


def test_limit(image_dir, tmp_path):
    out = tmp_path / "ann"
    res = invoke("run", image_dir, "--tasks", "caption", "--model", "random:tiny", "--out", out, "--limit", "2", *FAST)
    assert res.exit_code == 0
    assert len(read_rows(out)[0]) == 2


@pytest.mark.parametrize("args,expected", [
    (["--tasks", "odd"], "unknown task"),
    (["--tasks", "region_to_segmentation"], "--tasks od,region_to_segmentation"),
    (["--tasks", "open_vocabulary_detection"], "--classes"),
    (["--batch-size", "0"], "--batch-size"),
    (["--dtype", "float8"], "float8"),
])
def test_usage_errors_are_one_line_exit_2(image_dir, tmp_path, args, expected):
    res = CliRunner().invoke(cli, ["run", str(image_dir), "--model", "random:tiny", "--out", str(tmp_path / "o"), *args])
    assert res.exit_code == 2, res.output
    assert expected in res.output and "Traceback" not in res.output


def test_missing_input_is_a_usage_error(tmp_path):
    res = CliRunner().invoke(cli, ["run", str(tmp_path / "nope"), "--model", "random:tiny", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "input not found" in res.output


def test_missing_model_dir_is_a_usage_error_one_line(image_dir, tmp_path):
    res = CliRunner().invoke(cli, ["run", str(image_dir), "--model", str(tmp_path / "nomodel-here"),
                                   "--out", str(tmp_path / "o"), "--no-progress"])
    assert res.exit_code == 2, res.output  # checked before anything starts (issue 13)
    assert res.output.count("\n") == 1 and "does not exist" in res.output and not (tmp_path / "o").exists()


def test_tasks_lists_every_task():
    res = invoke("tasks")
    for name, task in TASKS.items():
        assert name in res.output and task.token in res.output
