"""The pseudo-label loop on a shift the demo model never saw (striped backgrounds), end to end with
the CLI a user would type, for one or more rounds and one or more filtering policies:

    annotate run shifted/ --model M --tasks od --tta flip         # pseudo-labels (M: round k-1's model)
    annotate export --format florence --filter P --min-score T    # the ones policy P trusts, as pairs
    annotate finetune export/ --model M                           # the localisation recipe, picked from the pairs
    then od AP on held-out shifted scenes after every round.

Round 1 starts from --model (its pseudo-labels are shared by every policy); round k labels the
unlabelled images with the model of round k-1 and fine-tunes that model further.

    python examples/pseudo_label_loop.py --work /tmp/loop --rounds 3 --filter instance,band [--seed 2000]
        [--tta none] [--finetune '--augment none'] [--afresh]     # the variants of the README's table
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


def annotate(*args: str) -> str:
    cmd = [sys.executable, "-m", "annotator", *args]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[2:])} failed ({res.returncode}):\n{res.stderr[-2000:]}")
    return res.stdout


def ap(q) -> dict:
    return {k: round(q.od[k], 4) for k in ("AP", "AP50")}


def pseudo_label(model: str, unlabelled: Path, out: Path, num_beams: int, tta: str = "none") -> Path:
    """`annotate run` over the unlabelled images (it resumes: a rerun of the loop skips what is done)."""
    annotate("run", str(unlabelled), "--model", model, "--tasks", "od", "--out", str(out), "--workers", "0",
             "--num-beams", str(num_beams), "--tta", tta, "--no-progress")
    return out


def one_round(work: Path, labels: Path, model: str, policy: str, k: int, opts: dict) -> tuple[str, dict]:
    """Export `labels` with `policy`, fine-tune `model` on them, measure: -> (new model, the round's record)."""
    tag = f"{policy}-r{k}"
    flags = ["--filter", policy, "--min-score", str(opts["min_score"])]
    if policy == "band" and opts.get("low_score") is not None:
        flags += ["--low-score", str(opts["low_score"])]
    summary = json.loads(annotate("export", str(labels), "--format", "florence", "--out", str(work / f"pairs-{tag}"),
                                  *flags, "--skip-empty", "--overwrite", "--json"))
    pairs = summary["records"]
    record = {"round": k, "pairs": pairs, "filter": summary["filter"]}
    if pairs == 0:  # nothing trusted: the model stays as it was
        record["after"] = opts["last"].get(policy)
        return model, record
    adapted = work / f"model-{tag}"
    extra = (["--epochs", str(opts["epochs"])] if opts.get("epochs") else []) + list(opts.get("finetune", ()))
    if not (adapted / "finetune.json").exists():  # a rerun of the loop keeps a finished round's model
        annotate("finetune", str(work / f"pairs-{tag}"), "--model", model, "--out", str(adapted), *extra,
                 "--workers", "0", "--overwrite", "--no-progress")
    record["after"] = ap(measure(str(adapted), work / "test", work / f"test-{tag}", tasks="od",
                                 num_beams=opts["num_beams"]))
    opts["last"][policy] = record["after"]
    return str(adapted), record


def scenes(folder: Path, n: int, seed: int) -> None:
    """n shifted scenes drawn from `seed`, unless a rerun finds them there already: drawn again, the
    images would be new files, and `annotate run` would label them all again instead of resuming."""
    truth = folder / "ground_truth.json"
    if truth.exists():
        names = [im["file_name"] for im in json.loads(truth.read_text())["images"]]
        if len(names) == n and all(f"_{seed}_" in name for name in names):  # scene_<seed>_<i>.png
            return
    samples.write(folder, n=n, seed=seed, kind="scenes", backgrounds=samples.SHIFTED_BACKGROUNDS)


def loop(work: Path, n: int = 96, n_test: int = 60, seed: int = 2000, policies=("instance",), rounds: int = 1,
         min_score: float = 0.7, low_score: float | None = None, epochs: int | None = None, model: str = "demo",
         num_beams: int = 3, finetune: tuple[str, ...] = (), afresh: bool = False,
         tta: str = "flip") -> dict:
    """-> {"before": AP, "policies": {policy: [one record per round]}} on seed's unlabelled/test sets."""
    scenes(work / "unlabelled", n, seed)  # its truth file is never read by the loop
    scenes(work / "test", n_test, seed + 1000)
    before = ap(measure(model, work / "test", work / "test-before", tasks="od", num_beams=num_beams))
    opts = dict(min_score=min_score, low_score=low_score, epochs=epochs, num_beams=num_beams, finetune=finetune,
                last={})
    first = pseudo_label(model, work / "unlabelled", work / "labels-r1", num_beams, tta)  # shared by every policy
    out = {"seed": seed, "n": n, "n_test": n_test, "min_score": min_score, "low_score": low_score,
           "num_beams": num_beams, "finetune": list(finetune), "afresh": afresh, "tta": tta, "before": before,
           "policies": {p: [] for p in policies}}
    current = dict.fromkeys(policies, model)
    opts["last"] = dict.fromkeys(policies, before)
    for k in range(1, rounds + 1):  # rounds outside: every policy's round 1 before any round 2
        for policy in policies:
            labels = first if k == 1 else pseudo_label(current[policy], work / "unlabelled",
                                                      work / f"labels-{policy}-r{k}", num_beams, tta)
            start = model if afresh else current[policy]  # afresh: fine-tune the first model on round k's labels
            current[policy], record = one_round(work, labels, start, policy, k, opts)
            out["policies"][policy].append(record)
            print(json.dumps({"seed": seed, "policy": policy, "before": before, **record}), file=sys.stderr,
                  flush=True)
    return out


def main() -> None:
    ap_ = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap_.add_argument("--work", type=Path, default=None)
    ap_.add_argument("--n", type=int, default=96, help="unlabelled shifted scenes")
    ap_.add_argument("--n-test", type=int, default=60, help="held-out shifted scenes")
    ap_.add_argument("--seed", type=int, default=2000, help="unlabelled set; the test set is seed + 1000")
    ap_.add_argument("--rounds", type=int, default=3, help="3: the best round on the README's table")
    ap_.add_argument("--filter", default="instance", help="policy or comma-separated policies (annotate export --filter)")
    ap_.add_argument("--min-score", type=float, default=0.7)
    ap_.add_argument("--low-score", type=float, default=None)
    ap_.add_argument("--epochs", type=int, default=None, help="[default: the finetune recipe's]")
    ap_.add_argument("--num-beams", type=int, default=3)
    ap_.add_argument("--tta", default="flip", help="annotate run --tta for the pseudo-labels: flip (mirrored pass "
                     "merged in) or none")
    ap_.add_argument("--afresh", action="store_true",
                     help="round k fine-tunes --model (not round k-1's model) on the labels of round k-1's model")
    ap_.add_argument("--finetune", default="", help="more `annotate finetune` flags, e.g. '--augment none'")
    args = ap_.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        res = loop(work, args.n, args.n_test, args.seed, tuple(args.filter.split(",")), args.rounds, args.min_score,
                   args.low_score, args.epochs, num_beams=args.num_beams, finetune=tuple(args.finetune.split()),
                   afresh=args.afresh, tta=args.tta)
        print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
