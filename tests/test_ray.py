"""`annotate run --ray` on a local Ray started here (2 CPUs, 2 CPU actors, random:tiny): the same
rows as a plain run, a killed actor loses and duplicates nothing, and a re-run resumes.
Ray is an optional extra, not in [test]: these tests skip where it is not installed."""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from annotator.cli import cli
from annotator.launch import launch
from annotator.raydata import TEST_KILL
from annotator.runner import run

from run_helpers import by_key, comparable, make_cfg, noise_images

needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed ([ray] extra)")


def test_without_ray_the_flag_says_how_to_install(tmp_path, monkeypatch):
    noise_images(tmp_path / "imgs", 1)
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    res = CliRunner().invoke(cli, ["run", str(tmp_path / "imgs"), "--ray", "--out", str(tmp_path / "out"),
                                   "--model", "random:tiny"])
    assert res.exit_code == 2 and "pip install 'florence-annotate[ray]'" in res.output
    assert not (tmp_path / "out").exists()  # nothing touched


def test_ray_flag_before_inputs_is_caught(tmp_path):
    noise_images(tmp_path / "imgs", 1)
    res = CliRunner().invoke(cli, ["run", "--ray", str(tmp_path / "imgs"), "--out", str(tmp_path / "out")])
    assert res.exit_code == 2 and "as the cluster address" in res.output


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    import ray

    marker = tmp_path_factory.mktemp("ray") / "actor-died"
    env = {TEST_KILL: f"1:{marker}", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "FLORENCE_ANNOTATE_CACHE": os.environ.get("FLORENCE_ANNOTATE_CACHE", ""),
           "PYTHONPATH": str(Path(__file__).resolve().parents[1]) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, runtime_env={"env_vars": env})
    yield marker
    ray.shutdown()


@needs_ray
def test_ray_run_equals_plain_run_survives_a_killed_actor_and_resumes(tiny_lm, tmp_path, local_ray):
    d = tmp_path / "imgs"
    noise_images(d, 7)
    run(make_cfg(d, tmp_path / "plain", "caption,od"), lm=tiny_lm)
    cfg = make_cfg(d, tmp_path / "ray", "caption,od", devices="cpu:0,cpu:1", ray="auto")
    summary = launch(cfg)  # 4 batches of 2; the actor that takes batch 1 dies once, mid-run
    assert local_ray.exists(), "no actor was killed"
    assert summary.images == 7 and summary.rows_ok == 14 and not summary.failed_workers
    by_key(tmp_path / "ray")  # asserts: no duplicate (image, task) row
    assert comparable(tmp_path / "ray") == comparable(tmp_path / "plain")
    again = launch(cfg)
    assert (again.images, again.already_done) == (0, 14)
