"""Where built and converted models are kept: the cache folder, and staging a model there then publishing it atomically."""

from __future__ import annotations

import os
from pathlib import Path


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
    """Rename the staging dir into place; another process may have won the race, which is fine."""
    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
    try:
        os.replace(tmp, dest)
    except OSError:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
