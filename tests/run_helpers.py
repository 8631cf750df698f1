"""Helpers for the resume / bad-input / fault tests: small configs, noise images whose outputs
differ per image (so comparisons mean something), reading a folder's rows, and the CLI as a
subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
from PIL import Image

from annotator.config import GenerationSettings, ModelSpec, RunConfig
from annotator.outdir.table import part_files
from annotator.tasks import parse_task_list

FAST = ["--model", "random:tiny", "--num-beams", "1", "--max-new-tokens", "6", "--workers", "0", "--no-progress"]


def noise_images(folder: Path, n: int, start: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + n):
        rng = np.random.default_rng(i)
        p = folder / f"img{i:02d}.png"
        Image.fromarray(rng.integers(0, 255, (20 + 3 * i, 30 + 2 * i, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def make_cfg(inputs, out: Path, tasks: str = "caption", **kw) -> RunConfig:
    gen = kw.pop("generation", GenerationSettings(num_beams=1, max_new_tokens=6))
    base = dict(batch_size=2, workers=0, progress=False)
    base.update(kw)
    inputs = tuple(inputs) if isinstance(inputs, (list, tuple)) else (inputs,)
    return RunConfig(inputs=inputs, tasks=tuple(parse_task_list(tasks)), out=out,
                     model=ModelSpec("random:tiny"), generation=gen, **base)


def rows(out: Path) -> pl.DataFrame:
    """Every row of the folder, sorted by key (duplicates kept: tests check for them)."""
    parts = part_files(out)
    if not parts:
        return pl.DataFrame(schema={"image": pl.String, "task": pl.String, "status": pl.String})
    return pl.read_parquet([str(p) for p in parts]).sort("image", "task")


def by_key(out: Path) -> dict[tuple[str, str], dict]:
    df = rows(out)
    keyed = {(r["image"], r["task"]): r for r in df.iter_rows(named=True)}
    assert len(keyed) == df.height, "duplicate (image, task) rows"
    return keyed


def comparable(out: Path) -> list[tuple]:
    """What must be equal between an interrupted-and-resumed run and an uninterrupted one."""
    df = rows(out)
    return list(df.select("image", "task", "status", "width", "height", "prompt", "raw", "text", "bboxes",
                          "labels", "truncated").iter_rows())


def annotate_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "annotator", *args]


def cli_env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(annotate_argv(*args), env=cli_env(), capture_output=True, text=True, timeout=timeout)
