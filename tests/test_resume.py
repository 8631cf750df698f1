"""Crash safety and resume: SIGKILL at several points then re-run gives exactly the rows of an
uninterrupted run; SIGTERM / Ctrl-C flush what is finished and exit 130; the manifest guards
against mixing settings; --retry-errors, --overwrite, and new images or tasks."""

from __future__ import annotations

import signal
import subprocess
import time

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from annotator.cli import cli
from annotator.config import GenerationSettings, ModelSpec
from annotator.clikit import EXIT_INTERRUPTED, EXIT_USAGE
from annotator.outdir.folder import RunError
from annotator.run.device import run
from annotator.run.signals import stop_on_signals
from annotator.outdir.table import MANIFEST, Manifest, part_files
from run_helpers import FAST, annotate_argv, by_key, cli_env, comparable, make_cfg, noise_images, rows, run_cli

N_IMAGES = 10  # 5 batches of 2, a part after each


def cmd(images, out, *extra):
    # batch 2 x 2 tasks = 4 rows per batch; a part every 3 rows: flushes land between batches
    return ("run", str(images), "--out", str(out), "--tasks", "caption,od", *FAST, "--batch-size", "2",
            "--flush-every", "3", *extra)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted CLI run of the command the interrupted runs use."""
    base = tmp_path_factory.mktemp("reference")
    images, out = base / "images", base / "out"
    noise_images(images, N_IMAGES)
    proc = run_cli(*cmd(images, out), timeout=300)  # seconds alone; minutes on a loaded 2-core machine
    assert proc.returncode == 0, proc.stderr
    expected = comparable(out)
    assert len(expected) == 2 * N_IMAGES and len({r[6] for r in expected}) > 2  # outputs differ per image
    return images, expected


def start(images, out, *extra) -> subprocess.Popen:
    return subprocess.Popen(annotate_argv(*cmd(images, out, *extra)), env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_parts(proc: subprocess.Popen, out, n: int, timeout: float = 240) -> bool:
    """True once `out` holds n part files; False if the run ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(part_files(out)) >= n:
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.01)
    proc.kill()
    raise AssertionError("run made no progress")


def assert_readable_and_unique(out):
    for part in part_files(out):
        pq.read_table(part)  # never a half-written part file
    by_key(out)  # raises on duplicate (image, task) rows


# (parts on disk when the signal is sent, signals): SIGKILL twice, then SIGTERM (clean stop, exit
# 130), then SIGTERM twice in a row (the second exits at once, still 130). Each step resumes the last.
STEPS = [(1, [signal.SIGKILL]), (2, [signal.SIGKILL]), (3, [signal.SIGTERM]), (4, [signal.SIGTERM, signal.SIGTERM])]


def test_interrupt_at_several_points_then_resume_equals_uninterrupted_run(reference, tmp_path):
    images, expected = reference
    out = tmp_path / "out"
    interrupted = 0
    for parts, signals in STEPS:
        proc = start(images, out)
        if wait_for_parts(proc, out, parts):
            for i, sig in enumerate(signals):
                time.sleep(0.05 * i)
                proc.send_signal(sig)
            _, err = proc.communicate(timeout=60)
            want = -signal.SIGKILL if signals == [signal.SIGKILL] else EXIT_INTERRUPTED
            assert proc.returncode == want, err
            if want == EXIT_INTERRUPTED:
                assert "interrupted: finished rows are saved" in err and "Traceback" not in err
            interrupted += 1
        else:
            proc.communicate()
        assert_readable_and_unique(out)
    assert interrupted >= 3, "the signals must land before the run ends, or this test proves nothing"
    assert rows(out).height < 2 * N_IMAGES
    proc = run_cli(*cmd(images, out), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "resumed:" in proc.stdout
    assert comparable(out) == expected
    assert Manifest.load(out).finished is not None


def test_stop_signal_flushes_the_rows_already_finished(tiny_lm, tmp_path):
    """No part would be written before 1000 rows; SIGTERM after 3 images still saves those 3."""
    images = tmp_path / "images"
    noise_images(images, 6)
    cfg = make_cfg(images, tmp_path / "out", batch_size=1, flush_every_rows=1000, flush_every_seconds=1e9)

    class KillAfter3:
        done = 0

        def start(self, total):
            pass

        def update(self, n):
            self.done += n
            if self.done == 3:
                import os

                os.kill(os.getpid(), signal.SIGTERM)

    try:
        with pytest.raises(KeyboardInterrupt), stop_on_signals(EXIT_INTERRUPTED):
            run(cfg, lm=tiny_lm, progress=KillAfter3())
    finally:  # once stopping, the handler stays (a second signal exits at once): not in pytest
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    assert sorted(k for k, _ in by_key(cfg.out)) == ["img00.png", "img01.png", "img02.png"]
    summary = run(cfg, lm=tiny_lm)
    assert summary.already_done == 3 and summary.images == 3 and len(by_key(cfg.out)) == 6


def test_signal_handlers_are_restored_when_no_signal_came():
    before = signal.getsignal(signal.SIGTERM)
    with stop_on_signals(EXIT_INTERRUPTED):
        assert signal.getsignal(signal.SIGTERM) is not before
    assert signal.getsignal(signal.SIGTERM) is before


def test_changed_settings_are_refused_with_the_difference(tiny_lm, tmp_path):
    images = tmp_path / "images"
    noise_images(images, 2)
    out = tmp_path / "out"
    run(make_cfg(images, out), lm=tiny_lm)
    before = comparable(out)
    with pytest.raises(RunError, match=r"generation: .*'max_new_tokens': 6.* -> .*'max_new_tokens': 5"):
        run(make_cfg(images, out, generation=GenerationSettings(num_beams=1, max_new_tokens=5)), lm=tiny_lm)
    other_model = make_cfg(images, out)
    object.__setattr__(other_model, "model", ModelSpec("florence-community/Florence-2-base"))
    with pytest.raises(RunError, match="model: 'random:tiny' -> 'florence-community/Florence-2-base'"):
        run(other_model, lm=tiny_lm)
    assert comparable(out) == before  # refused before touching anything

    proc = run_cli("run", str(images), "--out", str(out), "--tasks", "caption", *FAST, "--max-new-tokens", "5")
    assert proc.returncode == EXIT_USAGE and "other settings" in proc.stderr and "--force" in proc.stderr

    summary = run(make_cfg(images, out, generation=GenerationSettings(num_beams=1, max_new_tokens=5), force=True),
                  lm=tiny_lm)
    assert summary.already_done == 2 and summary.images == 0  # --force resumes: done rows stay done
    assert Manifest.load(out).identity["generation"]["max_new_tokens"] == 5


def test_parts_without_manifest_are_refused(tiny_lm, tmp_path):
    images = tmp_path / "images"
    noise_images(images, 1)
    out = tmp_path / "out"
    run(make_cfg(images, out), lm=tiny_lm)
    (out / MANIFEST).unlink()
    with pytest.raises(RunError, match="no manifest.json"):
        run(make_cfg(images, out), lm=tiny_lm)


def test_retry_errors_replaces_only_the_rows_it_redoes(tiny_lm, tmp_path):
    images = tmp_path / "images"
    noise_images(images, 1)
    (images / "late.png").write_bytes(b"")  # still being copied when the first run saw it
    out = tmp_path / "out"
    run(make_cfg(images, out, "caption,od"), lm=tiny_lm)
    assert by_key(out)[("late.png", "od")]["status"] == "error"
    noise_images(images, 1, start=3)
    (images / "img03.png").rename(images / "late.png")  # the copy finished

    summary = run(make_cfg(images, out, "caption,od"), lm=tiny_lm)  # plain resume: errors are done rows
    assert summary.images == 0 and by_key(out)[("late.png", "caption")]["status"] == "error"

    summary = run(make_cfg(images, out, "caption", retry_errors=True), lm=tiny_lm)
    got = by_key(out)  # also: no duplicate keys
    assert summary.images == 1 and got[("late.png", "caption")]["status"] == "ok"
    assert got[("late.png", "od")]["status"] == "error"  # not asked for this time: kept, not lost

    run(make_cfg(images, out, "caption,od", retry_errors=True), lm=tiny_lm)
    got = by_key(out)
    assert len(got) == 4 and all(r["status"] == "ok" for r in got.values())


def test_overwrite_starts_fresh_and_deletes_only_its_own_files(tiny_lm, tmp_path):
    images = tmp_path / "images"
    noise_images(images, 2)
    out = tmp_path / "out"
    run(make_cfg(images, out), lm=tiny_lm)
    old_parts = set(part_files(out))
    (out / "notes.txt").write_text("mine")
    summary = run(make_cfg(images, out, overwrite=True), lm=tiny_lm)
    assert summary.already_done == 0 and summary.images == 2
    assert not old_parts & set(part_files(out)) and len(by_key(out)) == 2
    assert (out / "notes.txt").read_text() == "mine"


def test_new_images_and_new_tasks_are_picked_up(tiny_lm, tmp_path):
    images = tmp_path / "images"
    noise_images(images, 3)
    out = tmp_path / "out"
    run(make_cfg(images, out, "caption"), lm=tiny_lm)
    first = {k: r["raw"] for k, r in by_key(out).items()}
    noise_images(images, 2, start=3)
    summary = run(make_cfg(images, out, "caption,od"), lm=tiny_lm)
    got = by_key(out)
    assert summary.already_done == 3 and summary.rows_ok == 2 + 5
    assert set(got) == {(f"img{i:02d}.png", t) for i in range(5) for t in ("caption", "od")}
    assert all(got[k]["raw"] == raw for k, raw in first.items())  # old rows untouched
    assert Manifest.load(out).tasks == ["caption", "od"]
    assert run(make_cfg(images, out, "caption,od"), lm=tiny_lm).images == 0  # nothing left


def test_cli_interrupt_message_and_code(tmp_path, monkeypatch):
    """KeyboardInterrupt out of launch (Ctrl-C) is reported and exits with EXIT_INTERRUPTED."""
    import annotator.run.launch as launch

    def interrupted(cfg):
        raise KeyboardInterrupt

    def exit_(code):  # the CLI leaves through os._exit after a stop: not out of pytest
        raise SystemExit(code)

    monkeypatch.setattr(launch, "launch", interrupted)
    monkeypatch.setattr("annotator.run.signals.os._exit", exit_)
    noise_images(tmp_path / "images", 1)
    result = CliRunner().invoke(cli, ["run", str(tmp_path / "images"), "--out", str(tmp_path / "out"), *FAST])
    assert result.exit_code == EXIT_INTERRUPTED and "run the same command again to resume" in result.output


def test_a_moved_input_folder_reuses_its_rows_instead_of_annotating_again(tiny_lm, tmp_path, caplog):
    images = tmp_path / "images"
    noise_images(images, 4)
    out = tmp_path / "out"
    run(make_cfg(images, out, "caption"), lm=tiny_lm)
    first = {k: r["raw"] for k, r in by_key(out).items()}
    moved = tmp_path / "renamed"
    images.rename(moved)
    noise_images(moved, 1, start=4)  # and one new image
    with caplog.at_level("WARNING", logger="annotator.outdir.keys"):
        summary = run(make_cfg(moved, out, "caption"), lm=tiny_lm)
    got = by_key(out)
    assert summary.already_done == 4 and summary.rows_ok == 1
    assert set(got) == {(f"img{i:02d}.png", "caption") for i in range(5)}  # no `renamed/...` second copies
    assert all(got[k]["raw"] == raw for k, raw in first.items())
    assert [s["root"] for s in Manifest.load(out).sources] == [str(moved)]
    notices = [r.message for r in caplog.records if "moved" in r.message]
    assert len(notices) == 1 and str(images) in notices[0]


def test_other_images_under_a_gone_folders_names_are_refused(tiny_lm, tmp_path):
    images = tmp_path / "images"
    noise_images(images, 3)
    out = tmp_path / "out"
    run(make_cfg(images, out, "caption"), lm=tiny_lm)
    other = tmp_path / "other"
    other.mkdir()
    for i, p in enumerate(sorted(images.iterdir())):  # same names, different pictures (sizes)
        noise_images(other, 1, start=10 + i)[0].rename(other / p.name)
    import shutil

    shutil.rmtree(images)
    from annotator.outdir.keys import KeyConflict  # a SourceError: one line, exit 2

    with pytest.raises(KeyConflict, match="another --out"):
        run(make_cfg(other, out, "caption"), lm=tiny_lm)
    assert len(rows(out)) == 3
