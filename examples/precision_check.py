"""Half precision against float32 on the demo model, measured: does bf16 (or fp16) keep the answers?

    python examples/precision_check.py --half bfloat16 --scenes 60 --pages 30 [--device cpu] [--json out.json]

On held-out samples (seed 1000; the demo model trains on seed 0's stream) it runs `annotate run`'s
own path (annotator.quality.measure: run -> Parquet -> COCO export -> pycocotools) in float32 and in
the half dtype: od on scenes, ocr and ocr_with_region on pages, and od once more in the half dtype
with batch size 1. It prints one table and exits non-zero when the half dtype gives wrong answers:

  - od AP50 more than --max-ap-drop (0.03) below float32, OCR CER more than --max-cer-rise (0.02) above,
    the share of ocr_with_region lines read exactly more than 0.05 below;
  - with --min-agreement X: fewer than X of the rows identical to float32 (raw text, token for
    token), or batched vs batch 1 in the half dtype. Off by default: bf16 legitimately moves a
    box by a location bin (measured: 1 of 3 rows identical on one scene and one page, the same AP
    and CER), so identical rows are reported, and the answers are judged by their quality.

float32 is the exact mode (batched == batch 1 to the token, tests/test_engine.py); half precision
is not, because a row's numbers depend on the kernels' blocking, which depends on the batch. The
thresholds catch a broken half path (garbage, a dtype mismatch, scores in the wrong precision), not
rounding. examples/gpu_check.sh runs this on a GPU with float16 and bfloat16."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import polars as pl

from annotator.demo import world as samples
from annotator.readback.quality import measure
from annotator.outdir.table import part_files


def rows_of(work: Path) -> dict[tuple[str, str], str | None]:
    table = pl.read_parquet([str(p) for p in part_files(work / "annotations")])
    return {(Path(r["image"]).name, r["task"]): r["raw"] for r in table.select("image", "task", "raw").iter_rows(named=True)}


def agreement(a: dict, b: dict) -> float:
    keys = a.keys() | b.keys()
    return sum(a.get(k) == b.get(k) and a.get(k) is not None for k in keys) / max(1, len(keys))


def run_one(name: str, folder: Path, work: Path, tasks: str, dtype: str, batch_size: int = 8) -> dict:
    t = time.perf_counter()
    q = measure("demo", folder, work / name, tasks=tasks, batch_size=batch_size, dtype=dtype)
    seconds = time.perf_counter() - t
    print(f"  {name}: {seconds:.1f} s", flush=True)
    return {"quality": q, "seconds": seconds, "rows": rows_of(work / name)}


def measure_all(args, work: Path) -> dict:
    scenes, pages = work / "scenes", work / "pages"
    samples.write(scenes, n=args.scenes, seed=1000, kind="scenes")
    samples.write(pages, n=args.pages, seed=1000, kind="documents")
    out = {}
    for dtype in ("float32", args.half):
        out[f"od {dtype}"] = run_one(f"od-{dtype}", scenes, work, "od", dtype)
        out[f"text {dtype}"] = run_one(f"text-{dtype}", pages, work, "ocr,ocr_with_region", dtype)
    out[f"od {args.half} batch 1"] = run_one(f"od-{args.half}-b1", scenes, work, "od", args.half, batch_size=1)
    return out


def table(res: dict, half: str) -> tuple[list[str], dict]:
    f_od, h_od, f_tx, h_tx = (res[k]["quality"] for k in ("od float32", f"od {half}", "text float32", f"text {half}"))
    fig = {
        "od_ap50": (f_od.od["AP50"], h_od.od["AP50"]), "od_ap": (f_od.od["AP"], h_od.od["AP"]),
        "ocr_cer": (f_tx.ocr_cer, h_tx.ocr_cer),
        "lines_exact": (f_tx.ocr_lines.get("exact"), h_tx.ocr_lines.get("exact")),
        "od_seconds": (res["od float32"]["seconds"], res[f"od {half}"]["seconds"]),
        "text_seconds": (res["text float32"]["seconds"], res[f"text {half}"]["seconds"]),
        "rows_identical_to_fp32": agreement(res["od float32"]["rows"] | res["text float32"]["rows"],
                                            res[f"od {half}"]["rows"] | res[f"text {half}"]["rows"]),
        "batch1_rows_identical": agreement(res[f"od {half}"]["rows"], res[f"od {half} batch 1"]["rows"]),
    }
    cal = {d: ", ".join(f"{c['bin']}: {c['boxes']} {c['matched']:.2f}" for c in q.calibration)
           for d, q in (("float32", f_od), (half, h_od))}
    lines = [f"| measure | float32 | {half} |", "|---|---|---|"]
    for key in ("od_ap50", "od_ap", "ocr_cer", "lines_exact", "od_seconds", "text_seconds"):
        a, b = fig[key]
        lines.append(f"| {key} | {_fmt(a)} | {_fmt(b)} |")
    lines.append(f"| calibration (bin: boxes share-right) | {cal['float32']} | {cal[half]} |")
    lines.append(f"| rows identical to float32 | 1 | {fig['rows_identical_to_fp32']:.3f} |")
    lines.append(f"| batched vs batch 1, rows identical | (exact) | {fig['batch1_rows_identical']:.3f} |")
    return lines, fig


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def failures(fig: dict, args) -> list[str]:
    bad = []
    (f_ap, h_ap), (f_cer, h_cer) = fig["od_ap50"], fig["ocr_cer"]
    if h_ap < f_ap - args.max_ap_drop:
        bad.append(f"od AP50 {h_ap:.3f} in {args.half} vs {f_ap:.3f} in float32 (allowed drop {args.max_ap_drop})")
    if f_cer is not None and (h_cer is None or h_cer > f_cer + args.max_cer_rise):
        bad.append(f"OCR CER {h_cer} in {args.half} vs {f_cer:.3f} in float32 (allowed rise {args.max_cer_rise})")
    f_ex, h_ex = fig["lines_exact"]
    if f_ex is not None and (h_ex is None or h_ex < f_ex - 0.05):
        bad.append(f"ocr_with_region lines read exactly {h_ex} in {args.half} vs {f_ex:.3f} in float32 (allowed drop 0.05)")
    for key, what in (("rows_identical_to_fp32", "rows identical to float32"),
                      ("batch1_rows_identical", "rows identical batched vs batch 1")):
        if fig[key] < args.min_agreement:
            bad.append(f"{what}: {fig[key]:.3f} < {args.min_agreement}")
    return bad


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--half", default="bfloat16", choices=("bfloat16", "float16"))
    ap.add_argument("--scenes", type=int, default=60)
    ap.add_argument("--pages", type=int, default=30)
    ap.add_argument("--max-ap-drop", type=float, default=0.03)
    ap.add_argument("--max-cer-rise", type=float, default=0.02)
    ap.add_argument("--min-agreement", type=float, default=0.0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        res = measure_all(args, Path(tmp))
    lines, fig = table(res, args.half)
    print(f"demo model, {args.scenes} held-out scenes (od) and {args.pages} pages (ocr, ocr_with_region), seed 1000")
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(fig, indent=1) + "\n")
    bad = failures(fig, args)
    for line in bad:
        print(f"FAIL: {line}", file=sys.stderr)
    print("precision check: " + ("FAILED" if bad else "ok"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
