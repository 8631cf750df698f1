"""Several workers behave like one: two CPU workers and a 2-process torchrun give exactly the
rows of a single-process run; a killed worker is reported and its work resumes."""

import os
import re
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from annotator.cli import cli
from annotator.config import ConfigError
from annotator.run.launch import parse_devices
from conftest import write_images

ARGS = ["--tasks", "caption,od", "--model", "random:tiny", "--num-beams", "1", "--max-new-tokens", "6",
        "--batch-size", "2", "--workers", "0", "--no-progress"]


@pytest.fixture
def no_gpu(monkeypatch):
    """Device parsing as on a machine without GPUs, whatever this machine has."""
    monkeypatch.setattr("torch.cuda.device_count", lambda: 0)


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
    # CPU ranks also on a GPU machine: the rows are compared with the CPU run's (and two ranks on one GPU
    # would ask for cuda:1)
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "annotator", "run", str(many_images), "--out", str(out), *ARGS]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert rows(out) == single_run
    assert {p.name.split("-")[1] for p in out.glob("part-*.parquet")} == {"r0000", "r0001"}


CHANGING_FOLDER = """
import sys
from pathlib import Path

from PIL import Image

import annotator.run.device as runner

real = runner.discover


def discover(*args, **kwargs):  # the folder gains an image right after every discovery
    found = real(*args, **kwargs)
    folder = Path(sys.argv[2])
    n = len(list(folder.glob("a_new*.png")))
    Image.new("RGB", (33 + n, 21), (9 * n, 80, 200)).save(folder / f"a_new{n}.png")
    return found


runner.discover = discover
from annotator.cli import main  # noqa: E402

main()
"""


def test_torchrun_ranks_split_one_list_while_the_folder_changes(many_images, single_run, tmp_path):
    import shutil

    folder = tmp_path / "images"
    shutil.copytree(many_images, folder)
    script = tmp_path / "changing.py"
    script.write_text(CHANGING_FOLDER)
    out = tmp_path / "ann"
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(__file__)), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), "run", str(folder), "--out", str(out), *ARGS]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert rows(out) == single_run  # the 12 images rank 0 listed, each exactly once
    assert len(list(folder.glob("a_new*.png"))) == 1  # one discovery, by rank 0


def test_a_dead_worker_is_reported_and_resume_finishes(many_images, single_run, tmp_path, monkeypatch):
    out = tmp_path / "ann"
    # The worker that takes the last chunk (img6..img9 in key order: 12 images in chunks of 8 and 4) dies
    # holding it (injected through the environment the workers inherit; see launch._test_kill_hook).
    monkeypatch.setenv("FLORENCE_ANNOTATE_TEST_KILL_IMAGE", "img9.png")
    # --flush-every 1: rows are saved batch by batch, so when one worker takes both chunks (a race) the
    # chunk it finished before dying is kept and only the held chunk is lost, whichever worker held it.
    res = CliRunner().invoke(cli, ["run", str(many_images), "--out", str(out), "--devices", "cpu:0,cpu:1", *ARGS,
                                   "--flush-every", "1"])
    assert res.exit_code == 4, res.output
    assert re.search(r"worker failed: rank [01] \(cpu:[01]\)", res.output), res.output
    kept = rows(out)
    missing = {r[0] for r in single_run} - {r[0] for r in kept}
    assert missing == {"img6.png", "img7.png", "img8.png", "img9.png"}  # the dead worker's chunk is lost
    assert set(kept) <= set(single_run) and len(kept) == 16  # the rest is there, and right
    monkeypatch.delenv("FLORENCE_ANNOTATE_TEST_KILL_IMAGE")
    res = CliRunner().invoke(cli, ["run", str(many_images), "--out", str(out), "--devices", "cpu:0,cpu:1", *ARGS])
    assert res.exit_code == 0, res.output
    assert rows(out) == single_run  # complete, nothing twice


@pytest.mark.parametrize("spec,expected", [
    ("cpu", ["cpu"]), ("cpu:0,cpu:1", ["cpu:0", "cpu:1"]), ("auto", ["cpu"]),
])
def test_parse_devices(spec, expected, no_gpu):
    assert parse_devices(spec) == expected


@pytest.mark.parametrize("spec,expected", [
    ("auto", ["cuda:0", "cuda:1"]), ("cuda", ["cuda:0", "cuda:1"]), ("cuda:0,1", ["cuda:0", "cuda:1"]),
    ("cuda:1", ["cuda:1"]), ("cpu", ["cpu"]),
])
def test_parse_devices_with_two_gpus(spec, expected, monkeypatch):
    monkeypatch.setattr("torch.cuda.device_count", lambda: 2)
    assert parse_devices(spec) == expected
    with pytest.raises(ConfigError, match="cuda:2 does not exist"):
        parse_devices("cuda:2")


@pytest.mark.parametrize("spec", ["cuda", "cuda:0,1", "tpu", "cpu:x"])
def test_bad_devices_say_what_works(spec, no_gpu):
    with pytest.raises(ConfigError, match="--devices"):
        parse_devices(spec)
