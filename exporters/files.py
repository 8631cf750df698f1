"""Image files in an export: flattened unique names, deterministic train/val split, symlink or copy."""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterable

from exporters.safety import safe_component


def key_fraction(key: str) -> float:
    """A key's stable position in [0, 1): the same on every machine and every export."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2**64


@dataclass(frozen=True)
class SplitRule:
    """The train/val split as a rule rather than a table of every key: the key's hash, and the one
    key sent to val when the hash sends none there (2+ images, val wanted: trainers need a val set,
    so the key with the smallest hash goes). Built in one pass that holds one key."""

    val_fraction: float
    forced_val: str | None = None

    @classmethod
    def of(cls, keys: Iterable[str], val_fraction: float) -> "SplitRule":
        n, any_val, smallest = 0, False, None
        for key in keys:
            f = key_fraction(key)
            n += 1
            any_val = any_val or f < val_fraction
            if smallest is None or f < smallest[0]:  # the first of equal hashes, as min() picks
                smallest = (f, key)
        forced = smallest[1] if val_fraction > 0 and n >= 2 and not any_val else None
        return cls(val_fraction, forced)

    def split(self, key: str) -> str:
        return "val" if key == self.forced_val or key_fraction(key) < self.val_fraction else "train"


def assign_splits(keys: list[str], val_fraction: float) -> dict[str, str]:
    """key -> 'train' | 'val' (SplitRule), for callers that want the table."""
    rule = SplitRule.of(keys, val_fraction)
    return {k: rule.split(k) for k in keys}


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
