"""Issue 12's promise, end to end: the demo model pseudo-labels scenes of a shift it never saw
(striped backgrounds), the default `--filter instance` keeps its confident boxes as Florence-2
training pairs, `annotate finetune` (the localisation recipe it picks from the pairs) adapts the
model, and it then finds more of the held-out shifted objects than before: by about the gain
measured for this seed (README, "The pseudo-label loop, on a shift"), not merely more. Slow (tens of
minutes on a 2-core CPU): run it with `python -m pytest -m slow`."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

# One row of the README's table: seed 2000 (96 unlabelled, 60 test scenes), greedy decoding, round 1.
LOOP = dict(n=96, n_test=60, seed=2000, policies=("instance",), rounds=1, min_score=0.7, num_beams=1)
MEASURED = {"before": 0.182, "after": 0.280}  # AP50 of that row (31 pairs)
# Thread counts and BLAS change float sums, and a box near a score threshold can flip in or out; the
# seeds' gains spread by 0.1 (README), so a rerun of one seed is held to within half of that.
TOLERANCE = 0.05


def test_pseudo_labels_adapt_the_demo_model_to_a_shift(tmp_path):
    path = Path(__file__).parents[1] / "examples" / "pseudo_label_loop.py"
    spec = importlib.util.spec_from_file_location("pseudo_label_loop", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    res = module.loop(tmp_path, **LOOP)
    before, (r1,) = res["before"]["AP50"], res["policies"]["instance"]
    assert r1["pairs"] >= 20, res  # 31 in the measured run
    assert before == pytest.approx(MEASURED["before"], abs=TOLERANCE), res
    gain = r1["after"]["AP50"] - before
    assert gain >= MEASURED["after"] - MEASURED["before"] - TOLERANCE, res
