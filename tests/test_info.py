"""`annotate info`: counts by task and status, common errors, label histograms, completeness
against the manifest's inputs, duplicates and leftovers."""

import json

import pytest
from click.testing import CliRunner

from annotator.cli import cli
from annotator.readback.info import summarize
from annotator.run.device import run
from annotator.outdir.table import Annotation, Manifest, PartWriter
from run_helpers import make_cfg, noise_images


def scripted_folder(tmp_path, rows, tasks=("od",), images=None):
    out = tmp_path / "out"
    out.mkdir()
    writer = PartWriter(out)
    writer.add(rows)
    writer.flush()
    inputs = [str(images)] if images else []
    Manifest(identity={"model": "scripted"}, package_version="0", inputs=inputs, tasks=list(tasks),
             started="2026-01-01T00:00:00+00:00", finished="2026-01-01T01:00:00+00:00").save(out)
    return out


def od(image, labels):
    return Annotation(image=image, task="od", status="ok", width=10, height=10,
                      bboxes=[[0, 0, 1, 1]] * len(labels), labels=labels)


def test_counts_errors_and_completeness_of_a_real_run(tiny_lm, tmp_path):
    images = tmp_path / "images"
    noise_images(images, 3)
    (images / "empty.png").write_bytes(b"")
    (images / "empty2.png").write_bytes(b"")
    out = tmp_path / "out"
    run(make_cfg(images, out, "caption,od", limit=4), lm=tiny_lm)  # img02.png is left for later

    info = summarize(out)
    assert (info.images, info.rows, info.errors) == (4, 8, 4)
    assert info.by_task == {"caption": {"ok": 2, "error": 2}, "od": {"ok": 2, "error": 2}}
    # two files, one cause: the paths are elided so they count as one error (the wording is
    # PIL's, and changes when a library such as ultralytics has patched Image.open in this process)
    (message, n), = info.top_errors
    assert n == 4 and message.startswith("decode failed: ") and "empty" not in message
    assert info.complete is False and info.completeness.missing == 2
    assert info.completeness.examples == ["img02.png caption", "img02.png od"]
    text = "\n".join(info.lines())
    assert "complete: no, 2 of 10" in text and "--retry-errors" in text and "labels (od)" in text

    run(make_cfg(images, out, "caption,od"), lm=tiny_lm)
    info = summarize(out)
    assert info.complete is True and "complete: yes, all 10" in "\n".join(info.lines())
    (images / "img00.png").unlink()  # gone from the inputs: its rows are stale, not missing
    assert summarize(out).completeness.stale == 2


def test_label_histogram_duplicates_and_leftovers(tmp_path):
    images = tmp_path / "images"
    noise_images(images, 2)
    rows = [od("img00.png", ["car", "car", "person"]), od("img01.png", ["car"]),
            od("img01.png", ["car"]),  # a duplicate key: must be reported
            Annotation(image="img00.png", task="caption", status="ok", text="a car")]
    out = scripted_folder(tmp_path, rows, tasks=("od", "caption"), images=images)
    (out / ".tmp-abc-part-r0000-x-000001.parquet").write_bytes(b"half")
    info = summarize(out)
    assert info.labels == {"od": [("car", 4), ("person", 1)]}  # caption is no detection task
    assert info.duplicates == 1 and info.temp_files == 1
    assert info.complete is False and info.completeness.examples == ["img01.png caption"]
    text = "\n".join(info.lines())
    assert "labels (od): car 4, person 1" in text and "more than one row" in text and ".tmp files" in text


def test_cli_text_json_and_errors(tmp_path, monkeypatch):
    out = scripted_folder(tmp_path, [od("a.png", ["dog"])], images=None)
    result = CliRunner().invoke(cli, ["info", str(out)])
    assert result.exit_code == 0 and "1 rows, 1 images" in result.output and "labels (od): dog 1" in result.output
    data = json.loads(CliRunner().invoke(cli, ["info", str(out), "--json"]).output)
    assert data["rows"] == 1 and data["by_task"] == {"od": {"ok": 1}} and data["errors"] == 0
    monkeypatch.chdir(out.parent)  # the default folder is ./annotations
    result = CliRunner().invoke(cli, ["info"])
    assert result.exit_code == 2 and "not an annotations folder" in result.output


def test_unknown_completeness_is_said_not_guessed(tmp_path):
    out = scripted_folder(tmp_path, [od("a.png", ["dog"])], images=tmp_path / "moved-away")
    info = summarize(out)
    assert info.complete is None and "cannot re-discover" in info.not_checked
    assert "complete: unknown" in "\n".join(info.lines())


def test_score_distribution_per_task_and_label(tmp_path):
    from annotator.readback.info import summarize
    from annotator.outdir.table import Annotation, PartWriter

    w = PartWriter(tmp_path)
    w.add([
        Annotation(image="a.png", task="od", status="ok", width=10, height=10, bboxes=[[0, 0, 1, 1]] * 3,
                   labels=["car", "car", "dog"], scores=[0.9, 0.5, 0.2]),
        Annotation(image="b.png", task="od", status="ok", width=10, height=10, bboxes=[[0, 0, 1, 1]],
                   labels=["car"], scores=[0.7]),
        Annotation(image="a.png", task="caption", status="ok", width=10, height=10, text="x", text_score=0.4),
        Annotation(image="c.png", task="od", status="ok", width=10, height=10, bboxes=[], labels=[]),  # no scores
    ])
    w.flush()
    info = summarize(tmp_path, check_complete=False)
    od = info.scores["od"]
    assert od["n"] == 4 and od["min"] == pytest.approx(0.2) and od["max"] == pytest.approx(0.9)
    assert od["labels"][0] == ("car", pytest.approx(0.7), 3)
    assert info.scores["caption"]["median"] == pytest.approx(0.4)
    assert any(line.startswith("scores (od): n 4") for line in info.lines())
