"""`annotate run --ray` on a local Ray started here (2 CPUs, 2 CPU actors, random:tiny): the same
rows as a plain run, a killed actor loses and duplicates nothing, and a re-run resumes.
Ray is an optional extra, not in [test]: these tests skip where it is not installed, except under
FLORENCE_ANNOTATE_STRICT_CONSUMERS=1 (CI), where a missing or broken Ray fails them."""

from __future__ import annotations

import importlib.util
import logging
import os
import signal
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from annotator.cli import cli
from annotator.run.launch import launch
from annotator.run.raydata import TEST_KILL
from annotator.run.device import run

from conftest import consumer_import
from run_helpers import by_key, comparable, make_cfg, noise_images


class FakeDataset:
    """Ray Data stand-in: runs each stage eagerly in this process; delivers one batch twice, as a
    buggy retry would, to show the driver writes it once."""

    def __init__(self, rows):
        self.rows = rows

    def map(self, fn, *, fn_kwargs=None, fn_constructor_args=(), **_):
        if isinstance(fn, type):  # an actor class: one instance, like an actor pool of one
            fn = fn(*fn_constructor_args)
        return FakeDataset([fn(r, **(fn_kwargs or {})) for r in self.rows])

    def map_batches(self, fn, *, batch_size, fn_constructor_args=(), **_):
        """Rows in batches of `batch_size` as columns (Ray's numpy format), rows back from columns."""
        fn = fn(*fn_constructor_args)  # an actor class: one instance, like an actor pool of one
        out = []
        for i in range(0, len(self.rows), batch_size):
            chunk = self.rows[i:i + batch_size]
            columns = fn({k: [r[k] for r in chunk] for k in chunk[0]})
            out += [dict(zip(columns, values)) for values in zip(*columns.values())]
        return FakeDataset(out)

    def iter_rows(self):
        yield from self.rows
        yield self.rows[0]


def fake_ray():
    data = SimpleNamespace(DataContext=SimpleNamespace(get_current=lambda: SimpleNamespace()),
                           from_items=lambda items, **_: FakeDataset(items), ActorPoolStrategy=lambda size: size)
    return SimpleNamespace(is_initialized=lambda: True, shutdown=lambda: None,
                           cluster_resources=lambda: {"CPU": 2.0}, data=data)


def test_ray_driver_with_a_stand_in_ray(tmp_path, monkeypatch):
    """The driver, decode task and actor of raydata.py without a cluster: same rows as a plain
    run, a batch delivered twice is written once, a re-run resumes. Runs wherever the tests run."""
    fake = fake_ray()
    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.setitem(sys.modules, "ray.data", fake.data)
    d = tmp_path / "imgs"
    noise_images(d, 5)
    (d / "broken.png").write_bytes(b"not a png")
    from annotator.model.load import load_model

    run(make_cfg(d, tmp_path / "plain", "caption,od"), lm=load_model(make_cfg(d, tmp_path).model))
    cfg = make_cfg(d, tmp_path / "ray", "caption,od", ray="auto")
    summary = launch(cfg)
    assert (summary.images, summary.rows_ok, summary.rows_error) == (6, 10, 2)
    by_key(tmp_path / "ray")  # asserts: no duplicate (image, task) row
    assert comparable(tmp_path / "ray") == comparable(tmp_path / "plain")
    again = launch(cfg)
    assert (again.images, again.already_done) == (0, 12)

# skipped where ray is not installed, except in CI (strict consumers), where the README's claim must run
needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None
                               and os.environ.get("FLORENCE_ANNOTATE_STRICT_CONSUMERS") != "1",
                               reason="ray is not installed ([ray] extra)")


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
    ray = consumer_import("ray")  # CI (FLORENCE_ANNOTATE_STRICT_CONSUMERS=1): a broken install fails

    marker = tmp_path_factory.mktemp("ray") / "actor-died"
    env = {TEST_KILL: f"1:{marker}", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "FLORENCE_ANNOTATE_CACHE": os.environ.get("FLORENCE_ANNOTATE_CACHE", ""),
           "PYTHONPATH": str(Path(__file__).resolve().parents[1]) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    # ray.init installs its own SIGTERM/SIGINT handlers in this process; put pytest's back afterwards,
    # or a later test's signal ends the session with SystemExit 15 (seen once).
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, runtime_env={"env_vars": env})
    except Exception as exc:  # e.g. the raylet's fixed 30 s start-up wait on an overloaded machine
        if os.environ.get("FLORENCE_ANNOTATE_STRICT_CONSUMERS") == "1":  # CI: the README claims Ray runs
            pytest.fail(f"a local Ray could not start: {exc}", pytrace=False)
        pytest.skip(f"a local Ray could not start here: {exc}")
    yield marker
    ray.shutdown()
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


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


def tiled_runs(tmp_path, tiny_lm):
    """A plain tiled run, and the config of the same run on Ray (fixed 16x16 tiles: every noise
    image is cut, and ocr runs ocr_with_region on its tiles)."""
    from annotator.config import TileSettings

    d = tmp_path / "imgs"
    noise_images(d, 5)
    tile = TileSettings("fixed", (16, 16))
    run(make_cfg(d, tmp_path / "plain", "od,ocr", tiling=tile), lm=tiny_lm)
    return make_cfg(d, tmp_path / "ray", "od,ocr", tiling=tile, devices="cpu:0,cpu:1", ray="auto")


def tiled(out: Path) -> list[tuple]:
    return comparable(out) + [(k, r["tiles"]) for k, r in sorted(by_key(out).items())]


def test_ray_with_tile_equals_the_plain_tiled_run_and_records_the_actors_runtime(tiny_lm, tmp_path, monkeypatch):
    """--ray used to build its own Engine without the tiling tasks (rows untiled, the manifest saying
    tiled) and to record cpu/float32 whatever the actors ran on."""
    from annotator.model.load import LoadedModel
    from annotator.outdir.table import Manifest

    fake = fake_ray()
    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.setitem(sys.modules, "ray.data", fake.data)
    cfg = tiled_runs(tmp_path, tiny_lm)
    gpu = {"dtype": "bfloat16", "attention": "sdpa", "device": "cuda:0"}
    monkeypatch.setattr(LoadedModel, "runtime", property(lambda self: gpu))  # what an actor on a GPU reports
    launch(cfg)
    assert tiled(tmp_path / "ray") == tiled(tmp_path / "plain")
    assert any(r["tiles"] for r in by_key(tmp_path / "ray").values())
    assert Manifest.load(tmp_path / "ray").runtime == dict(gpu, decoding="scheduler")


@needs_ray
def test_real_ray_with_tile_equals_the_plain_tiled_run(tiny_lm, tmp_path, local_ray):
    cfg = tiled_runs(tmp_path, tiny_lm)
    summary = launch(cfg)
    assert summary.images == 5 and not summary.failed_workers
    assert tiled(tmp_path / "ray") == tiled(tmp_path / "plain")
