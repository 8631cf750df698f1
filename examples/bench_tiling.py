"""Does tiling help? Detection recall / AP50 and OCR character error rate on a folder of large
images or long pages, with and without `--tile`, through the real CLI.

    python examples/bench_tiling.py IMAGES GT.json --model demo [--tile auto] [--ocr-gt texts.jsonl]

GT.json is COCO ground truth whose images' `file_name` are the keys `annotate run` gives them
(paths relative to IMAGES); `od` is run and scored when it holds any object. --ocr-gt maps the same
keys to the full page text (a JSON object, or the texts.jsonl that `annotate samples` writes beside
its ground_truth.json); with it `ocr` is scored by character error rate (edit distance / reference
length, whitespace runs folded), and with texts.jsonl's line quads `ocr_with_region` too: its lines
are matched one to one to the true lines at IoU >= 0.5 (recall), and its CER counts every
character of a matched line's text that is wrong, of a missed line, and of a line that matches none.
Every run goes to --work (default ./bench-tiling) and is resumed if it is already there (then
its seconds mean nothing: delete --work for timings).
Prints one line per setting: AP50, recall (AR100 at IoU 0.5), CER, region recall and CER, images
tiled / tiles, rows truncated, seconds.
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

from annotator.readback.quality import LineScore, score_lines, text_errors  # noqa: E402


def annotate(*args: str) -> None:
    rc = subprocess.run([sys.executable, "-m", "annotator", *args]).returncode
    if rc not in (0, 1):  # 1: some rows failed, which the scores then show
        sys.exit(f"annotate {args[0]} failed with exit code {rc}")


def task_rows(out: Path, task: str) -> dict[str, dict]:
    df = pl.scan_parquet(str(out / "part-*.parquet")).filter(pl.col("task") == task).collect()
    return {r["image"]: r for r in df.iter_rows(named=True)}


def cer(out: Path, texts: dict[str, str]) -> float:
    """`ocr` character error rate over the pages (annotator.readback.quality's, whitespace runs folded)."""
    got = task_rows(out, "ocr")
    errors, chars = map(sum, zip(*(text_errors((got.get(k) or {}).get("text"), ref) for k, ref in texts.items())))
    return errors / max(1, chars)


def region_scores(out: Path, regions: dict[str, list]) -> tuple[float, float]:
    """`ocr_with_region` against the true lines: (line recall at IoU 0.5, CER of the lines), lines
    matched one to one by annotator.readback.quality.score_lines: a missed true line costs its length, an
    unmatched predicted line its length, a matched pair their edit distance."""
    got = task_rows(out, "ocr_with_region")
    total = sum((score_lines(got.get(key) or {}, truth) for key, truth in regions.items()), LineScore())
    return total.boxed / max(1, total.lines), total.errors / max(1, total.chars)


def load_texts(path: Path) -> tuple[dict[str, str], dict[str, list]]:
    """{key: text} JSON, or the synthetic world's texts.jsonl ({"image", "ocr", "ocr_regions"});
    returns the page texts and, from texts.jsonl, each page's [quad, text] lines."""
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        rows = [r for r in rows if r.get("ocr")]
        return {r["image"]: r["ocr"] for r in rows}, {r["image"]: r.get("ocr_regions") or [] for r in rows}
    return json.loads(path.read_text()), {}


def tiled(out: Path) -> tuple[int, int]:
    """(images tiled, tiles run): an image's tiles serve all its tasks, so its largest count."""
    df = (pl.scan_parquet(str(out / "part-*.parquet")).group_by("image").agg(pl.col("tiles").max())
          .filter(pl.col("tiles") > 0).collect())
    return df.height, int(df["tiles"].sum() or 0)


def truncated(out: Path) -> int:
    return pl.scan_parquet(str(out / "part-*.parquet")).filter(pl.col("truncated")).select(pl.len()).collect().item()


def detection(work: Path, out: Path, tile: str, gt: Path) -> tuple[float, float]:
    from annotator.readback.coco_eval import EvalError, evaluate

    annotate("export", str(out), "--format", "coco", "--task", "od", "--out", str(work / f"coco-{tile}"), "--overwrite")
    try:
        report = evaluate(work / f"coco-{tile}", gt, iou=0.5)
        return report.stats["AP@0.5"], report.stats["AR100"]
    except EvalError as exc:  # e.g. no predicted label is a ground-truth class
        print(f"  ({tile}: {exc})")
        return 0.0, 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("images", type=Path)
    ap.add_argument("gt", type=Path, help="COCO ground truth")
    ap.add_argument("--model", default="demo")
    ap.add_argument("--tile", default="auto", help="the tiled setting to compare with --tile off")
    ap.add_argument("--tile-overlap", default="0.2")
    ap.add_argument("--ocr-gt", type=Path, default=None, help="JSON {image key: page text}, or texts.jsonl")
    ap.add_argument("--work", type=Path, default=Path("bench-tiling"))
    ap.add_argument("--run-args", default="", help="extra `annotate run` options, e.g. '--batch-size 16 --devices cuda'")
    args = ap.parse_args()

    has_objects = bool(json.loads(args.gt.read_text()).get("annotations"))
    texts, regions = load_texts(args.ocr_gt) if args.ocr_gt else ({}, {})
    tasks = (["od"] if has_objects else []) + (["ocr"] if texts else []) + (["ocr_with_region"] if regions else [])
    if not tasks:
        sys.exit("nothing to score: the ground truth holds no objects and no --ocr-gt was given")
    print(f"{'tile':<10}{'AP50':>7}{'recall50':>9}{'CER':>7}{'lines50':>8}{'lineCER':>8}{'tiled':>7}{'tiles':>7}"
          f"{'truncated':>10}{'seconds':>9}")
    for tile in ("off", args.tile):
        out = args.work / f"run-{tile}"
        start = time.monotonic()
        annotate("run", str(args.images), "--tasks", ",".join(tasks), "--model", args.model, "--out", str(out),
                 "--tile", tile, "--tile-overlap", args.tile_overlap, "--no-progress", *args.run_args.split())
        seconds = time.monotonic() - start
        ap50, recall = detection(args.work, out, tile, args.gt) if has_objects else (None, None)
        page_cer = cer(out, texts) if texts else None
        lines, line_cer = region_scores(out, regions) if regions else (None, None)
        show = lambda v, w: f"{v:>{w}.3f}" if v is not None else f"{'-':>{w}}"  # noqa: E731
        n_tiled, n_tiles = tiled(out)
        print(f"{tile:<10}{show(ap50, 7)}{show(recall, 9)}{show(page_cer, 7)}{show(lines, 8)}{show(line_cer, 8)}"
              f"{n_tiled:>7}{n_tiles:>7}{truncated(out):>10}{seconds:>9.1f}")


if __name__ == "__main__":
    main()
