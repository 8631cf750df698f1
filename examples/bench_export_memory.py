"""Peak memory of `annotate export` on a synthetic annotation folder (no model, no images).

    python examples/bench_export_memory.py make /tmp/ann400k --images 400000
    python examples/bench_export_memory.py measure /tmp/ann400k --formats coco,labelstudio,labelstudio:score,cvat

`make` writes N images x 2 tasks (od, dense_region_caption), 2 boxes per row (so 2N rows, 4N boxes),
in part files of 1000 rows (PartWriter's default), and a manifest, as `annotate run` would. `measure` runs one export in a
child process per format (`labelstudio:score`: with --order score) and prints its CPU time (user + system)
and peak RSS (the child's ru_maxrss)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa

from annotator.outdir.table import SCHEMA, Manifest, write_table_atomic

LABELS = ["car", "person", "dog", "tree", "house", "sign", "bike", "cat"]


def make(folder: Path, n_images: int, part_rows: int = 1000) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    tasks = ["od", "dense_region_caption"]
    rows_total = 2 * n_images
    for part, start in enumerate(range(0, rows_total, part_rows)):
        idx = np.arange(start, min(start + part_rows, rows_total))
        img, task = idx // 2, idx % 2
        n = len(idx)
        x = rng.uniform(0, 300, (n, 2)).astype(np.float32)
        y = rng.uniform(0, 200, (n, 2)).astype(np.float32)
        boxes = [[[float(x[i, j]), float(y[i, j]), float(x[i, j]) + 20.0, float(y[i, j]) + 30.0] for j in range(2)]
                 for i in range(n)]
        labels = [[LABELS[(i + j) % len(LABELS)] for j in range(2)] for i in idx]
        cols = {
            "image": [f"dir{i // 1000:05d}/img{i:08d}.jpg" for i in img], "source": ["s0"] * n,
            "width": [640] * n, "height": [480] * n, "task": [tasks[t] for t in task], "status": ["ok"] * n,
            "bboxes": boxes, "labels": labels, "scores": [[0.9, 0.8]] * n, "truncated": [False] * n,
            "tiles": [0] * n,
        }
        table = pa.table({f.name: pa.array(cols.get(f.name, [None] * n), f.type) for f in SCHEMA}, schema=SCHEMA)
        write_table_atomic(table, folder / f"part-r0000-{part:05d}.parquet")
    Manifest(identity={}, package_version="bench", inputs=["/nonexistent/images"], tasks=tasks,
             started="bench", sources=[{"id": "s0", "root": "/nonexistent/images", "prefix": ""}]).save(folder)


def measure(folder: Path, formats: list[str], out_root: Path) -> None:
    for spec in formats:
        fmt, _, order = spec.partition(":")
        argv = [sys.executable, "-m", "annotator", "export", str(folder), "--format", fmt,
                "--out", str(out_root / fmt), "--overwrite"] + (["--order", order] if order else [])
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        err = proc.stderr.read()
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage: its peak RSS and CPU time
        rc = os.waitstatus_to_exitcode(status)
        cpu = usage.ru_utime + usage.ru_stime
        print(f"{spec:<18} exit {rc}  CPU {cpu:7.1f} s  peak RSS {usage.ru_maxrss / 1024:7.0f} MiB", flush=True)
        if rc not in (0, 1):
            print(err[-2000:])


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("folder", type=Path)
    m.add_argument("--images", type=int, default=100_000)
    r = sub.add_parser("measure")
    r.add_argument("folder", type=Path)
    r.add_argument("--formats", default="coco")
    r.add_argument("--out", type=Path, default=Path("/tmp/bench-export"))
    a = ap.parse_args()
    if a.cmd == "make":
        make(a.folder, a.images)
    else:
        measure(a.folder, a.formats.split(","), a.out)
