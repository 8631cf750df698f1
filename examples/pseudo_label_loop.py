"""The pseudo-label loop on a shift the demo model never saw (striped backgrounds), end to end with
the CLI a user would type:

    annotate run shifted/ --model demo --tasks od          # pseudo-labels on unlabelled images
    annotate export --format florence --min-score T        # the confident ones as training pairs
    annotate finetune export/ --model demo                 # a model adapted to the shift
    then od AP on held-out shifted scenes, before and after.

    python examples/pseudo_label_loop.py --work /tmp/loop [--n 300 --epochs 3 --min-score 0.5]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from annotator.demo import world as samples  # noqa: E402
from annotator.readback.quality import measure  # noqa: E402


def annotate(*args: str) -> None:
    cmd = [sys.executable, "-m", "annotator", *args]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[2:])} failed ({res.returncode}):\n{res.stderr[-2000:]}")


def loop(work: Path, n: int = 300, n_test: int = 60, min_score: float = 0.5, epochs: int = 3, lr: float = 1e-4,
         batch_size: int = 8, model: str = "demo") -> dict:
    shift = samples.SHIFTED_BACKGROUNDS
    samples.write(work / "unlabelled", n=n, seed=2000, kind="scenes", backgrounds=shift)  # truth files unused
    samples.write(work / "test", n=n_test, seed=3000, kind="scenes", backgrounds=shift)
    before = measure(model, work / "test", work / "before", tasks="od")
    annotate("run", str(work / "unlabelled"), "--model", model, "--tasks", "od", "--out", str(work / "pseudo"),
             "--workers", "0", "--no-progress")
    annotate("export", str(work / "pseudo"), "--format", "florence", "--out", str(work / "pairs"),
             "--min-score", str(min_score), "--skip-empty")
    pairs = sum(1 for _ in open(work / "pairs" / "train" / "annotations.jsonl"))
    annotate("finetune", str(work / "pairs"), "--model", model, "--out", str(work / "adapted"), "--epochs", str(epochs),
             "--lr", str(lr), "--batch-size", str(batch_size), "--no-freeze-vision", "--warmup", "10",
             "--workers", "0", "--no-progress")
    after = measure(str(work / "adapted"), work / "test", work / "after", tasks="od")
    return {"pairs": pairs, "min_score": min_score, "epochs": epochs,
            "before": {k: before.od[k] for k in ("AP", "AP50")}, "after": {k: after.od[k] for k in ("AP", "AP50")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--n-test", type=int, default=60)
    ap.add_argument("--min-score", type=float, default=0.5)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-4)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        print(json.dumps(loop(work, args.n, args.n_test, args.min_score, args.epochs, args.lr), indent=1))


if __name__ == "__main__":
    main()
