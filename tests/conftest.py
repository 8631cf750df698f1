"""Shared fixtures: a tiny random Florence-2 saved as a real local checkpoint, and image folders.

Everything is built offline; the model directory is made once per test session."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may touch the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The dtype the model-running tests load random:tiny in. CI runs the engine, scheduler and scores
# tests a second time with ANNOTATE_RUN_DTYPE=bfloat16: the half-precision path (KV cache, token
# scores, beam scores, location parsing) is then exercised end to end.
RUN_DTYPE = os.environ.get("ANNOTATE_RUN_DTYPE", "float32")
# ... and what `--dtype auto` means in every command the tests run (in process or in a subprocess):
# on a CPU with AMX auto picks bf16, and the CLI runs, the demo model's quality floors and the
# fine-tuning runs would no longer be the float32 ones the tests were measured with (bf16 is not
# token-exact). tests/test_precision.py unsets it where it tests the hardware's choice.
os.environ.setdefault("FLORENCE_ANNOTATE_AUTO_DTYPE", RUN_DTYPE)


def consumer_import(name: str):
    """Import a third-party consumer that checks an export (ultralytics, cv2, datasets): skipped
    where it is not installed, but with FLORENCE_ANNOTATE_STRICT_CONSUMERS=1 (set by .ci/run) a
    failed import (ultralytics is installed --no-deps, so a missing dependency of it shows up here)
    fails the test: in CI a consumer check must run, not quietly skip."""
    if os.environ.get("FLORENCE_ANNOTATE_STRICT_CONSUMERS") != "1":
        return pytest.importorskip(name)
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        pytest.fail(f"consumer check: `import {name}` failed ({exc!r}); FLORENCE_ANNOTATE_STRICT_CONSUMERS=1 "
                    "turns this skip into a failure", pytrace=False)


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Random-model processor cache inside the test session, never in the user's home."""
    os.environ["FLORENCE_ANNOTATE_CACHE"] = str(tmp_path_factory.mktemp("fa-cache"))


@pytest.fixture(scope="session")
def tiny_lm():
    """random:tiny loaded in memory (CPU), in ANNOTATE_RUN_DTYPE (float32 unless set)."""
    from annotator.config import ModelSpec
    from annotator.model.load import load_model

    return load_model(ModelSpec("random:tiny", dtype=RUN_DTYPE), "cpu")


def model_inputs(lm, **kwargs):
    """The processor's tensors for a direct model call, pixels in the model's dtype (the processor
    always returns float32; a bf16 model refuses them)."""
    inputs = lm.processor(return_tensors="pt", **kwargs)
    inputs["pixel_values"] = inputs["pixel_values"].to(lm.dtype)
    return inputs


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """random:tiny written with save_pretrained (float32, whatever ANNOTATE_RUN_DTYPE says): a local
    directory like a downloaded checkpoint."""
    from annotator.config import ModelSpec
    from annotator.model.load import load_model

    lm = load_model(ModelSpec("random:tiny"), "cpu")
    path = tmp_path_factory.mktemp("tiny-florence2")
    lm.model.save_pretrained(path)
    lm.processor.save_pretrained(path)
    return path


def write_images(folder: Path, sizes=((120, 80), (64, 64), (200, 100), (90, 150), (33, 47))) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (w, h) in enumerate(sizes):
        p = folder / f"img{i}.png"
        im = Image.new("RGB", (w, h), (40 * i % 255, 120, 200 - 30 * i))
        im.paste((255, 255, 0), (w // 4, h // 4, w // 2, h // 2))
        im.save(p)
        paths.append(p)
    return paths


@pytest.fixture
def image_dir(tmp_path) -> Path:
    folder = tmp_path / "images"
    write_images(folder)
    return folder
