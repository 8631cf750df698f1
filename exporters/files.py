"""Image files in an export: flattened unique names, deterministic train/val split, symlink or copy."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path, PurePosixPath

from exporters.safety import safe_component


def key_fraction(key: str) -> float:
    """A key's stable position in [0, 1): the same on every machine and every export."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2**64


def assign_splits(keys: list[str], val_fraction: float) -> dict[str, str]:
    """key -> 'train' | 'val', by key hash. When the hash puts no image in val but val is wanted
    and there are 2+ images, the image with the smallest hash goes there (trainers need a val set)."""
    split = {k: ("val" if key_fraction(k) < val_fraction else "train") for k in keys}
    if val_fraction > 0 and len(keys) >= 2 and "val" not in split.values():
        split[min(keys, key=key_fraction)] = "val"
    return split


def flat_names(keys: list[str]) -> dict[str, str]:
    """key -> a unique, safe, single-component file name. 'a/b/img.jpg' -> 'a__b__img.jpg'; when two
    keys would give the same name or the same stem (label files are stem + .txt, and some file
    systems ignore case), the later key in sorted order gets a short hash of the key added."""
    names: dict[str, str] = {}
    used_stems: set[str] = set()
    for key in sorted(keys):
        p = PurePosixPath(key)
        ext = p.suffix if len(p.suffix) <= 8 else ""
        stem = safe_component("__".join(p.with_suffix("").parts) if ext else "__".join(p.parts))
        ext = "." + safe_component(ext[1:]) if ext else ""
        name = stem + ext
        if stem.casefold() in used_stems:
            stem = f"{stem}-{hashlib.sha256(key.encode('utf-8')).hexdigest()[:10]}"
            name = stem + ext
        used_stems.add(stem.casefold())
        names[key] = name
    return names


def place_image(src: Path, dest: Path, copy: bool) -> None:
    """Symlink (absolute target) by default; copy with --copy-images."""
    if copy:
        shutil.copy2(src, dest)
    else:
        os.symlink(Path(src).resolve(), dest)
