"""Several workers behave like one: two CPU workers and a 2-process torchrun give exactly the
rows of a single-process run; a killed worker is reported and its work resumes."""

import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from annotator.cli import cli
from annotator.config import ConfigError
from annotator.launch import parse_devices
from conftest import write_images

ARGS = ["--tasks", "caption,od", "--model", "random:tiny", "--num-beams", "1", "--max-new-tokens", "6",
        "--batch-size", "2", "--workers", "0", "--no-progress"]


def rows(out):
    got = [r for p in sorted(out.glob("part-*.parquet")) for r in pq.read_table(p).to_pylist()]
    return sorted((r["image"], r["task"], r["status"], r["raw"]) for r in got)


@pytest.fixture(scope="module")
def many_images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("many")
    write_images(folder, sizes=[(40 + 7 * i, 30 + 5 * i) for i in range(12)])
    return folder


@pytest.fixture(scope="module")
def single_run(many_images, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "ann"
    res = CliRunner().invoke(cli, ["run", str(many_images), "--out", str(out), "--devices", "cpu", *ARGS])
    assert res.exit_code == 0, res.output
    return rows(out)


def test_two_cpu_workers_equal_one(many_images, single_run, tmp_path):
    out = tmp_path / "ann"
    res = CliRunner().invoke(cli, ["run", str(many_images), "--out", str(out), "--devices", "cpu:0,cpu:1", *ARGS])
    assert res.exit_code == 0, res.output
    assert rows(out) == single_run and len(single_run) == 24
    assert {p.name.split("-")[1] for p in out.glob("part-*.parquet")} <= {"r0000", "r0001"}
    assert "images per worker: 0: " in res.output


def test_torchrun_two_processes_equal_one(many_images, single_run, tmp_path):
    out = tmp_path / "ann"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "annotator", "run", str(many_images), "--out", str(out), *ARGS]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert rows(out) == single_run
    assert {p.name.split("-")[1] for p in out.glob("part-*.parquet")} == {"r0000", "r0001"}


def test_a_dead_worker_is_reported_and_resume_finishes(many_images, single_run, tmp_path, monkeypatch):
    out = tmp_path / "ann"
    # The worker on cpu:1 dies on its first chunk (injected through the environment it inherits).
    monkeypatch.setenv("FLORENCE_ANNOTATE_TEST_KILL_RANK", "1")
    res = CliRunner().invoke(cli, ["run", str(many_images), "--out", str(out), "--devices", "cpu:0,cpu:1", *ARGS])
    assert res.exit_code == 4, res.output
    assert "worker failed: rank 1 (cpu:1)" in res.output
    monkeypatch.delenv("FLORENCE_ANNOTATE_TEST_KILL_RANK")
    res = CliRunner().invoke(cli, ["run", str(many_images), "--out", str(out), "--devices", "cpu:0,cpu:1", *ARGS])
    assert res.exit_code == 0, res.output
    assert rows(out) == single_run  # complete, nothing twice


@pytest.mark.parametrize("spec,expected", [
    ("cpu", ["cpu"]), ("cpu:0,cpu:1", ["cpu:0", "cpu:1"]), ("auto", ["cpu"]),
])
def test_parse_devices(spec, expected):
    assert parse_devices(spec) == expected


@pytest.mark.parametrize("spec", ["cuda", "cuda:0,1", "tpu", "cpu:x"])
def test_bad_devices_say_what_works(spec):
    with pytest.raises(ConfigError, match="--devices"):
        parse_devices(spec)
