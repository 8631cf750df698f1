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
    """random:tiny loaded in memory (float32, CPU)."""
    from annotator.config import ModelSpec
    from annotator.model.load import load_model

    return load_model(ModelSpec("random:tiny"), "cpu")


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_lm, tmp_path_factory) -> Path:
    """random:tiny written with save_pretrained: a local directory like a downloaded checkpoint."""
    path = tmp_path_factory.mktemp("tiny-florence2")
    tiny_lm.model.save_pretrained(path)
    tiny_lm.processor.save_pretrained(path)
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
