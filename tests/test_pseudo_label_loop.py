"""Issue 12's promise, end to end: the demo model pseudo-labels scenes of a shift it never saw
(striped backgrounds) with a mirrored pass merged in (`--tta flip`), the default `--filter instance`
keeps its confident boxes as Florence-2 training pairs, `annotate finetune` (the localisation recipe it picks from the pairs) adapts the
model, and it then finds more of the held-out shifted objects than before: by about the gain
measured for this seed (README, "The pseudo-label loop, on a shift"), not merely more. Slow (tens of
minutes on a 2-core CPU): run it with `python -m pytest -m slow`."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

# One row of the README's table: seed 2000 (96 unlabelled, 60 test scenes), greedy decoding, round 1,
# pseudo-labels with --tta flip, the localisation recipe (its --augment flip).
LOOP = dict(n=96, n_test=60, seed=2000, policies=("instance",), rounds=1, min_score=0.7, num_beams=1, tta="flip")
MEASURED = {"before": 0.182, "after": 0.571}  # AP50 of that row (39 pairs; 0.419 from 26 without --tta flip)
# Thread counts and BLAS change float sums, and a box near a score threshold can flip in or out. Before
# --tta flip this row gave 0.4188 twice (through the loop and by hand) and the three seeds' round-1
# figures spread by 0.02 (sd); with it they spread by 0.048 (sd) across seeds, but a rerun of one seed
# repeats its pseudo-labels, so a rerun is still held to 0.05.
TOLERANCE = 0.05


def _example():
    path = Path(__file__).parents[1] / "examples" / "pseudo_label_loop.py"
    spec = importlib.util.spec_from_file_location("pseudo_label_loop", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_rerun_keeps_the_scenes_it_drew(tmp_path):
    """The loop resumes a work folder: the scenes already drawn are not drawn again (new files would
    make `annotate run` label them again), but another seed's or size's are."""
    scenes = _example().scenes
    scenes(tmp_path / "u", 3, 7)
    first = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "u").iterdir()}
    assert sum(name.endswith(".png") for name in first) == 3
    scenes(tmp_path / "u", 3, 7)
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "u").iterdir()} == first
    scenes(tmp_path / "u", 3, 8)
    assert any("_8_" in p.name for p in (tmp_path / "u").iterdir())


@pytest.mark.slow
def test_pseudo_labels_adapt_the_demo_model_to_a_shift(tmp_path):
    res = _example().loop(tmp_path, **LOOP)
    before, (r1,) = res["before"]["AP50"], res["policies"]["instance"]
    assert r1["pairs"] >= 30, res  # 39 in the measured run (26 without --tta flip)
    assert before == pytest.approx(MEASURED["before"], abs=TOLERANCE), res
    gain = r1["after"]["AP50"] - before
    assert gain >= MEASURED["after"] - MEASURED["before"] - TOLERANCE, res
