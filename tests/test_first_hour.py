"""Issue 13, through the CLI: no silent loss, no poisoned folders, one consistent CLI.
One test per bullet; the key collision for folder inputs, single-file inputs and --retry-errors."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from annotator.cli import cli
from annotator.outdir.table import MANIFEST, SCHEMA_VERSION, Manifest, part_files
from run_helpers import FAST, by_key, noise_images


def annotate(*args: str, env: dict | None = None):
    result = CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)
    return result


def run_into(out: Path, *inputs: Path, extra: tuple = ()):
    return annotate("run", *map(str, inputs), "--out", str(out), "--tasks", "caption", *FAST, *extra)


@pytest.fixture
def twins(tmp_path):
    """a/x.png and b/x.png: the same name, different pictures."""
    noise_images(tmp_path / "a", 1, start=1)[0].rename(tmp_path / "a" / "x.png")
    noise_images(tmp_path / "b", 1, start=2)[0].rename(tmp_path / "b" / "x.png")
    return tmp_path / "a", tmp_path / "b"


def sources_of(out: Path) -> dict[str, str]:
    return {k[0]: r["source"] for k, r in by_key(out).items()}


# ------------------------------------------------------------------ key collision across inputs

def test_same_name_from_another_folder_is_annotated_not_resumed(twins, tmp_path):
    a, b = twins
    out = tmp_path / "X"
    assert run_into(out, a).exit_code == 0
    second = run_into(out, b)
    assert second.exit_code == 0, second.output
    assert "images: 1" in second.output and "resumed" not in second.output
    assert sources_of(out) == {"x.png": "s0", "b/x.png": "s1"}
    m = Manifest.load(out)
    assert [(s["root"], s["prefix"]) for s in m.sources] == [(str(a.absolute()), ""), (str(b.absolute()), "b/")]
    # resume counts only the same file; both inputs at once resume fully
    again = run_into(out, a, b)
    assert again.exit_code == 0 and "images: 0" in again.output and "resumed: 2 rows" in again.output
    # the export finds each file under its own input
    exp = annotate("export", str(out), "--format", "florence", "--out", str(tmp_path / "fl"), "--tasks", "caption",
                   "--val-fraction", "0")
    assert exp.exit_code == 0, exp.output
    assert "image file not found" not in exp.output


def test_same_name_in_one_command_gets_its_own_key(twins, tmp_path):
    a, b = twins
    result = run_into(tmp_path / "X", a, b)
    assert result.exit_code == 0, result.output
    assert sources_of(tmp_path / "X") == {"x.png": "s0", "b/x.png": "s1"}


def test_same_name_single_file_inputs(twins, tmp_path):
    a, b = twins
    out = tmp_path / "X"
    assert run_into(out, a / "x.png").exit_code == 0
    second = run_into(out, b / "x.png")
    assert second.exit_code == 0 and "images: 1" in second.output, second.output
    assert sources_of(out) == {"x.png": "s0", "b/x.png": "s1"}


def test_retry_errors_redoes_only_the_same_files_errors(twins, tmp_path):
    a, b = twins
    (a / "x.png").write_bytes(b"not a png")  # a's x.png fails to decode: an error row
    out = tmp_path / "X"
    first = run_into(out, a)
    assert first.exit_code == 1 and "rows error: 1" in first.output
    second = run_into(out, b, extra=("--retry-errors",))
    assert second.exit_code == 0 and "images: 1" in second.output, second.output
    rows = by_key(out)
    assert rows[("x.png", "caption")]["status"] == "error"  # a's error stays a's, untouched
    assert rows[("b/x.png", "caption")]["status"] == "ok"
    (a / "x.png").unlink()
    noise_images(a, 1, start=3)[0].rename(a / "x.png")
    third = run_into(out, a, extra=("--retry-errors",))
    assert third.exit_code == 0 and "images: 1" in third.output
    assert by_key(out)[("x.png", "caption")]["status"] == "ok"


def _downgrade_to_schema_1(out: Path) -> None:
    """What florence-annotate wrote before the `source` column existed."""
    for part in part_files(out):
        t = pq.read_table(part)
        pq.write_table(t.drop_columns(["source"]).replace_schema_metadata({"florence_annotate_schema": "1"}), part)
    m = json.loads((out / MANIFEST).read_text())
    m["schema_version"] = 1
    m.pop("sources")
    (out / MANIFEST).write_text(json.dumps(m))


def test_schema_1_folder_resumes_and_a_poisoned_one_is_refused_with_the_fix(twins, tmp_path):
    a, b = twins
    out = tmp_path / "X"
    assert run_into(out, a).exit_code == 0
    _downgrade_to_schema_1(out)
    resumed = run_into(out, a)
    assert resumed.exit_code == 0 and "images: 0" in resumed.output and "resumed: 1 rows" in resumed.output
    assert Manifest.load(out).schema_version == SCHEMA_VERSION
    assert all("source" in pq.read_schema(p).names for p in part_files(out))
    newcomer = run_into(out, b)  # a new input: its own key, the old row stays a's
    assert newcomer.exit_code == 0 and "images: 1" in newcomer.output, newcomer.output
    # An old folder that already mixed a/ and b/ under one key cannot be attributed: refused, rc 2.
    poisoned = tmp_path / "P"
    assert run_into(poisoned, a).exit_code == 0
    _downgrade_to_schema_1(poisoned)
    m = json.loads((poisoned / MANIFEST).read_text())
    m["inputs"].append(str(b.absolute()))
    (poisoned / MANIFEST).write_text(json.dumps(m))
    refused = run_into(poisoned, b)
    assert refused.exit_code == 2, refused.output
    assert "exists under both" in refused.output and "new --out" in refused.output


# ------------------------------------------------------------------ malformed generations

def test_location_fragment_labels_and_inverted_boxes_are_dropped_and_counted(tmp_path, monkeypatch):
    import annotator.answers.assemble as assemble

    real = assemble.parse_generation
    scripted = ("<loc_150><loc_500><loc_100><loc_600><loc_700>"  # label `loc_150>`: a fragment
                "dog<loc_10><loc_10><loc_500><loc_500>"  # a sound instance
                "car<loc_600><loc_10><loc_100><loc_500>"  # x2 < x1: inverted
                "cat<loc_10><loc_10><loc_900><loc_900>")  # the tail, dropped when generation was truncated
    monkeypatch.setattr(assemble, "parse_generation", lambda proc, task, text, size: real(proc, task, scripted, size))
    noise_images(tmp_path / "in", 2)
    result = annotate("run", str(tmp_path / "in"), "--out", str(tmp_path / "X"), "--tasks", "od", *FAST, "--no-scores")
    assert result.exit_code == 0, result.output
    assert "malformed labels dropped: 2" in result.output and "empty boxes dropped: 2" in result.output
    for row in by_key(tmp_path / "X").values():
        assert row["labels"] == (["dog"] if row["truncated"] else ["dog", "cat"])
    assert Manifest.load(tmp_path / "X").counts["quality"]["malformed_labels_dropped"] == 2


# ------------------------------------------------------------------ folders that block the next try

def test_a_failed_model_load_leaves_nothing_that_blocks_the_retry(tmp_path):
    noise_images(tmp_path / "in", 1)
    out = tmp_path / "X"
    failed = annotate("run", str(tmp_path / "in"), "--out", str(out), "--model", "florence-community/Florence-2-typo",
                      "--no-progress", env={"HF_HUB_OFFLINE": "yes"})
    assert failed.exit_code == 3, failed.output
    assert "HF_HUB_OFFLINE is set" in failed.output  # `yes` is understood like `1`
    assert not out.exists()
    out.mkdir()  # a manifest left by an older version's failed start, with no rows, does not block
    (out / MANIFEST).write_text(json.dumps({"identity": {"model": "other"}, "package_version": "0", "inputs": [],
                                            "tasks": [], "started": "then", "schema_version": 2}))
    retry = run_into(out, tmp_path / "in")
    assert retry.exit_code == 0, retry.output


@pytest.mark.parametrize("model, says", [("random:huge", "unknown random model"), ("./no-such-dir", "does not exist")])
def test_invalid_model_is_refused_before_anything_starts(tmp_path, model, says):
    noise_images(tmp_path / "in", 1)
    result = annotate("run", str(tmp_path / "in"), "--out", str(tmp_path / "X"), "--model", model)
    assert result.exit_code == 2 and says in result.output and "Traceback" not in result.output
    assert not (tmp_path / "X").exists()


def test_no_images_is_an_error_that_counts_what_was_skipped(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("x")
    (tmp_path / "docs" / "b.txt").write_text("x")
    for folder, says in (("empty", "hold no files"), ("docs", "2 .txt file(s)")):
        result = annotate("run", str(tmp_path / folder), "--out", str(tmp_path / "X"), "--model", "random:tiny")
        assert result.exit_code == 2 and "no images found" in result.output and says in result.output
    assert not (tmp_path / "X").exists()


def test_an_export_that_writes_nothing_is_an_error(tmp_path):
    noise_images(tmp_path / "in", 1)
    ran = annotate("run", str(tmp_path / "in"), "--out", str(tmp_path / "X"), "--tasks", "od", *FAST)
    assert ran.exit_code == 0, ran.output
    result = annotate("export", str(tmp_path / "X"), "--format", "coco", "--tasks", "od", "--classes", "zebra",
                      "--skip-empty", "--out", str(tmp_path / "c"))
    assert result.exit_code == 2 and "0 records" in result.output, result.output
    assert not (tmp_path / "c").exists()


def test_float16_on_cpu_runs_in_float32_and_the_manifest_says_so(tmp_path, caplog):
    noise_images(tmp_path / "in", 1)
    result = run_into(tmp_path / "X", tmp_path / "in", extra=("--dtype", "float16", "--devices", "cpu"))
    assert result.exit_code == 0, result.output
    assert "float16 on CPU" in caplog.text
    runtime = Manifest.load(tmp_path / "X").runtime
    assert runtime["dtype"] == "float32" and runtime["attention"] == "sdpa"


# ------------------------------------------------------------------ one CLI

def test_same_names_everywhere_old_spellings_hidden_but_working():
    for cmd, new, old in (("export", "--tasks", "--task"), ("preview", "--tasks", "--task"),
                          ("bench", "--devices", "--device")):
        text = annotate(cmd, "--help").output
        assert new in text and f"{old} " not in text and f"{old}," not in text, cmd
    from annotator.cli import cli as group

    assert "--task" in group.commands["preview"].params[[p.name for p in group.commands["preview"].params]
                                                       .index("task_spec")].opts


def test_exit_codes_are_one_table_listed_once_in_the_readme():
    from annotator import clikit

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert readme.count("## Exit codes") == 1
    section = readme.split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    codes = {v for k, v in vars(clikit).items() if k.startswith("EXIT_")}
    assert all(f"| `{c}` |" in section for c in codes), section


def test_readme_documents_every_option_and_the_environment():
    from annotator.cli import cli as group

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    missing = [f"{name} {p.opts[0]}" for name, cmd in group.commands.items() for p in cmd.params
               if isinstance(p, __import__("click").Option) and not p.hidden and p.opts[0].startswith("--")
               and p.opts[0] not in readme]
    missing += [o for p in group.params for o in p.opts if o not in readme]
    assert not missing
    assert "FLORENCE_ANNOTATE_CACHE" in readme and "ANNOTATE_RUN_TASKS" in readme
    assert "--min-score" not in readme.split("annotate eval", 1)[1].split("\n", 1)[0]


def test_dry_run_says_what_would_happen_and_writes_nothing(twins, tmp_path):
    a, b = twins
    (a / "notes.txt").write_text("x")
    out = tmp_path / "X"
    fresh = annotate("run", str(a), "--out", str(out), "--tasks", "caption,od", "--dry-run", "--json")
    assert fresh.exit_code == 0 and not out.exists()
    plan = json.loads(fresh.output)
    assert plan["pending_pairs"] == 2 and plan["unsupported"] == {".txt": 1} and plan["folder"].startswith("absent")
    assert run_into(out, a).exit_code == 0
    before = sorted(p.name for p in out.iterdir())
    again = annotate("run", str(a), str(b), "--out", str(out), "--tasks", "caption", *FAST, "--dry-run")
    assert again.exit_code == 0, again.output
    assert "would annotate 1 of 2 images: 1 rows (1 already done)" in again.output
    assert "keys prefixed b/" in again.output and "resumable" in again.output
    assert sorted(p.name for p in out.iterdir()) == before


def test_run_and_export_print_json_summaries(tmp_path):
    noise_images(tmp_path / "in", 1)
    run = run_into(tmp_path / "X", tmp_path / "in", extra=("--json",))
    assert run.exit_code == 0
    summary = json.loads(run.output)
    assert summary["images"] == 1 and summary["rows_ok"] == 1 and summary["exit_code"] == 0
    exp = annotate("export", str(tmp_path / "X"), "--format", "florence", "--tasks", "caption", "--val-fraction", "0",
                   "--out", str(tmp_path / "f"), "--json")
    assert exp.exit_code == 0 and json.loads(exp.output)["records"] == 1


def test_environment_defaults_for_every_option(tmp_path):
    noise_images(tmp_path / "in", 2)
    env = {"ANNOTATE_RUN_TASKS": "caption,od,ocr", "ANNOTATE_RUN_LIMIT": "1", "ANNOTATE_RUN_DRY_RUN": "1",
           "ANNOTATE_RUN_OUT": str(tmp_path / "X")}
    result = annotate("run", str(tmp_path / "in"), "--json", env=env)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["pending_pairs"] == 3
    from annotator.cli import cli as group

    unnamed = [f"{n} {p.name}" for n, c in group.commands.items() for p in c.params
               if getattr(p, "envvar", "") is None and p.param_type_name == "option"]
    assert not unnamed
