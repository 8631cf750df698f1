"""Where built and converted models are kept: the cache folder, and staging a model there then publishing it atomically."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from annotator.model import ModelLoadError


def cache_dir() -> Path:
    """Random models' processors and converted checkpoints (FLORENCE_ANNOTATE_CACHE, else ~/.cache/florence-annotate)."""
    root = os.environ.get("FLORENCE_ANNOTATE_CACHE") or Path.home() / ".cache" / "florence-annotate"
    return Path(root)


def staging_dir(dest: Path) -> Path:
    """A fresh folder beside `dest` to build it in (this process's own)."""
    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    return tmp


def publish(dest: Path) -> None:
    """Rename the staging dir into place. Another process may have won the race (dest is there: fine);
    any other failure is raised, so nobody reports success over a missing folder."""
    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
    try:
        os.replace(tmp, dest)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if not dest.is_dir():
            raise ModelLoadError(f"cannot move the new files into {dest}: {exc.strerror or exc}") from exc
