"""The decode path is never silent, and the generation rules a run overrides are part of what it is:
- the engine names its path ("scheduler" or "generate: <why>"); the manifest's runtime, the run's
  summary and `annotate info` say it;
- --no-repeat-ngram-size / --repetition-penalty (and their ANNOTATE_RUN_* forms) reach the model's
  generation config, change the answers, are recorded in the manifest identity, and a resume with
  another value is refused as for --num-beams; bad values are one line with the fix."""

from __future__ import annotations

import copy
import json

import pytest
from click.testing import CliRunner

from annotator.cli import cli
from annotator.config import ConfigError, GenerationSettings, TaskInputs
from annotator.decode.engine import Engine, decoding_path
from annotator.outdir.folder import RunError
from annotator.run.device import run
from annotator.decode.scheduler import UNSUPPORTED
from annotator.outdir.table import Manifest
from annotator.tasks import parse_task_list
from run_helpers import FAST, make_cfg, noise_images, rows

NGRAM_BANNED_BY_SCHEDULER = "no_repeat_ngram_size" not in UNSUPPORTED  # true once the scheduler bans n-grams


@pytest.fixture
def lm(tiny_lm):
    """random:tiny with a model object of its own (an engine sets the run's overrides on it)."""
    own = copy.copy(tiny_lm)
    own.model = copy.copy(tiny_lm.model)
    return own


def engine(lm, **overrides) -> Engine:
    return Engine(lm, parse_task_list("caption"), TaskInputs(), GenerationSettings(num_beams=1, **overrides))


def test_the_engine_names_its_decode_path(lm):
    plain = engine(lm)
    if not NGRAM_BANNED_BY_SCHEDULER:
        assert not plain.use_scheduler
        assert plain.decoding == "generate: no_repeat_ngram_size=3 is not implemented by the decode scheduler"
    off = engine(lm, no_repeat_ngram_size=0)
    assert off.use_scheduler and off.decoding == "scheduler"
    off.use_scheduler = False  # bench --no-scheduler
    assert off.decoding == "generate: the scheduler is turned off"
    assert decoding_path(lm.model.generation_config) == "scheduler"


def test_overrides_go_into_the_model_config_and_leave_its_own_for_the_next_run(lm):
    engine(lm, no_repeat_ngram_size=0, repetition_penalty=1.3)
    gc = lm.model.generation_config
    assert (gc.no_repeat_ngram_size, gc.repetition_penalty) == (0, 1.3)
    engine(lm)  # the next run in this process, no overrides: the checkpoint's own rules again
    gc = lm.model.generation_config
    assert gc.no_repeat_ngram_size == 3 and gc.repetition_penalty in (None, 1.0)


def test_an_override_changes_the_answers(lm, tmp_path):
    images = tmp_path / "images"
    noise_images(images, 3)
    gen = dict(num_beams=1, max_new_tokens=24)
    run(make_cfg(images, tmp_path / "own", generation=GenerationSettings(**gen)), lm=lm)
    run(make_cfg(images, tmp_path / "pen", generation=GenerationSettings(**gen, repetition_penalty=3.0)), lm=lm)
    own = dict(rows(tmp_path / "own").select("image", "raw").iter_rows())
    pen = dict(rows(tmp_path / "pen").select("image", "raw").iter_rows())
    assert own.keys() == pen.keys() and own != pen


def test_the_manifest_records_the_path_and_the_overrides(lm, tmp_path):
    images = tmp_path / "images"
    noise_images(images, 2)
    out = tmp_path / "out"
    summary = run(make_cfg(images, out, generation=GenerationSettings(num_beams=1, max_new_tokens=4,
                                                                      no_repeat_ngram_size=0)), lm=lm)
    manifest = Manifest.load(out)
    assert manifest.runtime["decoding"] == summary.decoding == "scheduler"
    assert manifest.identity["generation"]["no_repeat_ngram_size"] == 0
    assert "repetition_penalty" not in manifest.identity["generation"]  # not set: the model's own, as before
    assert "decoding: scheduler" in summary.lines()


def test_resume_refuses_a_changed_override_as_it_does_num_beams(lm, tmp_path):
    images = tmp_path / "images"
    noise_images(images, 2)
    out = tmp_path / "out"
    base = GenerationSettings(num_beams=1, max_new_tokens=4)
    run(make_cfg(images, out, generation=base), lm=lm)
    changed = GenerationSettings(num_beams=1, max_new_tokens=4, no_repeat_ngram_size=0)
    with pytest.raises(RunError, match=r"generation: .* -> .*'no_repeat_ngram_size': 0"):
        run(make_cfg(images, out, generation=changed), lm=lm)
    with pytest.raises(RunError, match=r"'repetition_penalty': 1.2"):
        run(make_cfg(images, out, generation=GenerationSettings(num_beams=1, max_new_tokens=4,
                                                                repetition_penalty=1.2)), lm=lm)
    again = run(make_cfg(images, out, generation=base), lm=lm)  # same settings: resumes
    assert again.already_done == 2


def test_a_folder_written_before_the_overrides_existed_still_resumes(lm, tmp_path):
    images = tmp_path / "images"
    noise_images(images, 2)
    out = tmp_path / "out"
    cfg = make_cfg(images, out)
    run(cfg, lm=lm)
    manifest = Manifest.load(out)
    old = {k: v for k, v in manifest.identity["generation"].items() if k not in ("no_repeat_ngram_size",
                                                                                  "repetition_penalty")}
    manifest.identity["generation"] = old
    manifest.save(out)
    assert run(cfg, lm=lm).already_done == 2


@pytest.mark.parametrize("bad, message", [
    (dict(no_repeat_ngram_size=-1), "--no-repeat-ngram-size must be >= 0"),
    (dict(repetition_penalty=0.0), "--repetition-penalty must be a number > 0"),
    (dict(repetition_penalty=float("nan")), "--repetition-penalty must be a number > 0"),
])
def test_bad_values_are_refused(bad, message):
    with pytest.raises(ConfigError, match=message):
        GenerationSettings(**bad)


def test_cli_flags_env_vars_info_and_bad_values(tmp_path):
    images = tmp_path / "images"
    noise_images(images, 2)
    runner = CliRunner()
    out = tmp_path / "out"
    args = ["run", str(images), "--out", str(out), "--tasks", "caption", *FAST]
    res = runner.invoke(cli, args, env={"ANNOTATE_RUN_NO_REPEAT_NGRAM_SIZE": "0"})
    assert res.exit_code == 0, res.output
    assert "decoding: scheduler" in res.output
    manifest = Manifest.load(out)
    assert manifest.identity["generation"]["no_repeat_ngram_size"] == 0 and manifest.runtime["decoding"] == "scheduler"

    refused = runner.invoke(cli, args + ["--no-repeat-ngram-size", "2"])
    assert refused.exit_code == 2 and "no_repeat_ngram_size" in refused.output and "--force" in refused.output

    info = runner.invoke(cli, ["info", str(out)])
    assert "decoding: scheduler" in info.output
    assert json.loads(runner.invoke(cli, ["info", str(out), "--json"]).output)["decoding"] == "scheduler"

    for extra, env in ((["--repetition-penalty", "-1"], {}), ([], {"ANNOTATE_RUN_REPETITION_PENALTY": "0"})):
        bad = runner.invoke(cli, args + ["--out", str(tmp_path / "bad")] + extra, env=env)
        error = [line for line in bad.output.splitlines() if line.startswith("Error:")]
        assert bad.exit_code == 2 and len(error) == 1 and "--repetition-penalty must be a number > 0" in error[0]
        assert not (tmp_path / "bad").exists()
