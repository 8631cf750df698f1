"""`annotate export` command: one-line errors for bad input, --overwrite, and never writing outside --out."""

from __future__ import annotations

import json
import os

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from annotator.outdir.table import SCHEMA_VERSION, Annotation, rows_to_table
from exporters import EXPORTERS
from exporters.cli import export
from export_fixtures import make_run, ok


def invoke(*args, cwd=None):
    runner = CliRunner()
    if cwd is not None:
        old = os.getcwd()
        os.chdir(cwd)
    try:
        return runner.invoke(export, [str(a) for a in args], catch_exceptions=False)
    finally:
        if cwd is not None:
            os.chdir(old)


def one_line_error(res, *words):
    assert res.exit_code == 2, res.output  # EXIT_USAGE, as in every command
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:"), res.output
    for w in words:
        assert w in lines[0], lines[0]


def test_format_choices_come_from_the_registry():
    opt = next(p for p in export.params if p.name == "fmt")
    assert sorted(opt.type.choices) == sorted(EXPORTERS) == ["coco", "cvat", "docvqa", "florence", "labelstudio", "yolo"]


def test_defaults_annotations_folder_and_out_and_prints_summary(tmp_path):
    make_run(tmp_path)
    res = invoke("--format", "coco", "--include-ocr", cwd=tmp_path)
    assert res.exit_code == 0, res.output
    assert (tmp_path / "export" / "coco" / "annotations.json").exists()
    assert "5 images" in res.output and "dropped:" in res.output and "error rows 1" in res.output


@pytest.mark.parametrize("fmt", sorted(EXPORTERS))
def test_every_format_runs_from_the_cli(tmp_path, fmt):
    ann, _ = make_run(tmp_path)
    res = invoke(ann, "--format", fmt, "--out", tmp_path / "o")
    assert res.exit_code == 0, res.output
    assert res.output.startswith(f"{fmt}: wrote")


def test_missing_and_empty_annotations_folder(tmp_path):
    one_line_error(invoke(tmp_path / "nope", "--format", "coco", "--out", tmp_path / "o"), "does not exist")
    (tmp_path / "empty").mkdir()
    one_line_error(invoke(tmp_path / "empty", "--format", "coco", "--out", tmp_path / "o"), "no part-*.parquet")
    assert not (tmp_path / "o").exists()


def test_newer_schema_in_manifest(tmp_path):
    newer = SCHEMA_VERSION + 1
    ann, _ = make_run(tmp_path, manifest={"schema_version": newer})
    one_line_error(invoke(ann, "--format", "coco", "--out", tmp_path / "o"), f"schema {newer}", "upgrade")


def test_newer_schema_in_parquet_metadata(tmp_path):
    ann, _ = make_run(tmp_path)
    t = rows_to_table([ok("doc.png", "od", bboxes=[], labels=[])])
    t = t.replace_schema_metadata({"florence_annotate_schema": str(SCHEMA_VERSION + 1)})
    pq.write_table(t, ann / "part-r0009-newer-000000.parquet")
    one_line_error(invoke(ann, "--format", "yolo", "--out", tmp_path / "o"), f"schema {SCHEMA_VERSION + 1}")


def test_no_rows_for_requested_task(tmp_path):
    ann, _ = make_run(tmp_path)
    one_line_error(invoke(ann, "--format", "coco", "--task", "dense_region_caption", "--out", tmp_path / "o"),
                   "dense_region_caption", "it holds")
    one_line_error(invoke(ann, "--format", "coco", "--task", "nonsense", "--out", tmp_path / "o"), "unknown task")
    assert not (tmp_path / "o").exists()  # a failed export leaves nothing behind
    ann2, _ = make_run(tmp_path / "t2", parts=[[ok("doc.png", "ocr", text="x")]])
    one_line_error(invoke(ann2, "--format", "yolo", "--out", tmp_path / "o"), "pick with --task")


def test_existing_output_requires_overwrite(tmp_path):
    ann, _ = make_run(tmp_path)
    out = tmp_path / "o"
    assert invoke(ann, "--format", "yolo", "--out", out).exit_code == 0
    one_line_error(invoke(ann, "--format", "yolo", "--out", out), "--overwrite")
    stale = out / "labels" / "train" / "stale.txt"
    stale.write_text("0 0.5 0.5 1 1\n")
    assert invoke(ann, "--format", "yolo", "--out", out, "--overwrite").exit_code == 0
    assert not stale.exists()
    # a non-empty folder that is not an export is never cleared
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("precious")
    one_line_error(invoke(ann, "--format", "coco", "--out", mine, "--overwrite"), "refusing")
    assert (mine / "thesis.tex").read_text() == "precious"


def test_classes_options(tmp_path):
    ann, _ = make_run(tmp_path)
    one_line_error(invoke(ann, "--format", "coco", "--classes", "a", "--classes-file", __file__), "not both")
    cf = tmp_path / "classes.txt"
    cf.write_text("animal: cat, dog\n")
    res = invoke(ann, "--format", "coco", "--task", "od", "--classes-file", cf, "--out", tmp_path / "o")
    assert res.exit_code == 0 and "label not in classes" in res.output and "'car'" in res.output
    data = json.loads((tmp_path / "o" / "annotations.json").read_text())
    assert [c["name"] for c in data["categories"]] == ["animal"]


HOSTILE_KEYS = ["../escape.jpg", "../../etc/evil.png", "/tmp/abs.jpg", "a\x00b.jpg", "ok/../../up.jpg"]


@pytest.mark.parametrize("fmt", sorted(EXPORTERS))
def test_never_writes_outside_out(tmp_path, fmt):
    work = tmp_path / "work"
    work.mkdir()
    rows = [ok("doc.png", "od", bboxes=[[1, 1, 50, 50]], labels=["../../../../x"]),
            ok("doc.png", "ocr", text="../../etc/passwd"),
            ok("doc.png", "ocr_with_region", quad_boxes=[[1, 1, 50, 1, 50, 9, 1, 9]], labels=["/abs\x00"])]
    rows += [Annotation(image=k, task="od", status="ok", width=10, height=10, bboxes=[[1, 1, 5, 5]], labels=["../x"])
             for k in HOSTILE_KEYS]
    ann, root = make_run(work, parts=[rows])
    # the hostile targets exist as real files next to the root, so a careless exporter would find them
    (work / "escape.jpg").write_bytes((root / "doc.png").read_bytes())
    before = {p for p in tmp_path.rglob("*")}
    out = work / "out"
    res = invoke(ann, "--format", fmt, "--out", out, "--task", "od" if fmt in ("coco", "yolo", "cvat") else "od,ocr")
    assert res.exit_code == 0, res.output
    created = {p for p in tmp_path.rglob("*")} - before
    assert created and all(p == out or out in p.parents for p in created), sorted(created)
    assert f"unsafe image key {len(HOSTILE_KEYS)}" in res.output, res.output
    for p in out.rglob("*"):
        if p.is_symlink():
            assert os.path.realpath(p) == str((root / "doc.png").resolve())
