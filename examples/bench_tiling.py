"""Does tiling help? Detection recall / AP50 (and optionally OCR character error rate) on a folder
of large images, with and without `--tile`, through the real CLI.

    python examples/bench_tiling.py IMAGES GT.json --model demo [--tile auto] [--ocr-gt texts.json]

GT.json is COCO ground truth whose images' `file_name` are the keys `annotate run` gives them
(paths relative to IMAGES). --ocr-gt, optional, maps the same keys to the full page text (a JSON
object, or the texts.jsonl that `annotate samples` writes beside its ground_truth.json); with it
the `ocr` task is scored by character error rate (edit distance / reference length).
Every run goes to --work (default ./bench-tiling) and is resumed if it is already there (then
its seconds mean nothing: delete --work for timings).
Prints one line per setting: AP50, recall (AR100 at IoU 0.5), CER, rows truncated, seconds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from annotator.finetune import levenshtein  # noqa: E402


def annotate(*args: str) -> None:
    rc = subprocess.run([sys.executable, "-m", "annotator", *args]).returncode
    if rc not in (0, 1):  # 1: some rows failed, which the scores then show
        sys.exit(f"annotate {args[0]} failed with exit code {rc}")


def cer(out: Path, texts: dict[str, str]) -> float:
    """Character error rate over the pages, whitespace runs folded to one space on both sides."""
    df = pl.scan_parquet(str(out / "part-*.parquet")).filter(pl.col("task") == "ocr").select("image", "text").collect()
    got = dict(df.iter_rows())
    norm = lambda s: " ".join((s or "").split())  # noqa: E731 - line breaks are not errors
    errors = sum(levenshtein(norm(got.get(k)), norm(ref)) for k, ref in texts.items())
    return errors / max(1, sum(len(norm(ref)) for ref in texts.values()))


def load_texts(path: Path) -> dict[str, str]:
    """{key: text} JSON, or the synthetic world's texts.jsonl (`annotate samples`: {"image", "ocr"})."""
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return {r["image"]: r["ocr"] for r in rows if r.get("ocr")}
    return json.loads(path.read_text())


def truncated(out: Path) -> int:
    return pl.scan_parquet(str(out / "part-*.parquet")).filter(pl.col("truncated")).select(pl.len()).collect().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("images", type=Path)
    ap.add_argument("gt", type=Path, help="COCO ground truth")
    ap.add_argument("--model", default="demo")
    ap.add_argument("--tile", default="auto", help="the tiled setting to compare with --tile off")
    ap.add_argument("--tile-overlap", default="0.2")
    ap.add_argument("--ocr-gt", type=Path, default=None, help="JSON {image key: page text}")
    ap.add_argument("--work", type=Path, default=Path("bench-tiling"))
    ap.add_argument("--run-args", default="", help="extra `annotate run` options, e.g. '--batch-size 16 --devices cuda'")
    args = ap.parse_args()

    from annotator.evaluate import EvalError, evaluate  # after argparse: --help stays fast

    tasks = "od,ocr" if args.ocr_gt else "od"
    texts = load_texts(args.ocr_gt) if args.ocr_gt else None
    print(f"{'tile':<12}{'AP50':>8}{'recall50':>10}{'CER':>8}{'truncated':>11}{'seconds':>9}")
    for tile in ("off", args.tile):
        out = args.work / f"run-{tile}"
        start = time.monotonic()
        annotate("run", str(args.images), "--tasks", tasks, "--model", args.model, "--out", str(out), "--tile", tile,
                 "--tile-overlap", args.tile_overlap, "--no-progress", *args.run_args.split())
        seconds = time.monotonic() - start
        annotate("export", str(out), "--format", "coco", "--task", "od", "--out", str(args.work / f"coco-{tile}"),
                 "--overwrite")
        try:
            report = evaluate(args.work / f"coco-{tile}", args.gt, iou=0.5)
            ap50, recall = report.stats["AP@0.5"], report.stats["AR100"]
        except EvalError as exc:  # e.g. no predicted label is a ground-truth class
            print(f"  ({tile}: {exc})")
            ap50 = recall = 0.0
        shown_cer = f"{cer(out, texts):.3f}" if texts else "-"
        print(f"{tile:<12}{ap50:>8.3f}{recall:>10.3f}{shown_cer:>8}{truncated(out):>11}{seconds:>9.1f}")


if __name__ == "__main__":
    main()
