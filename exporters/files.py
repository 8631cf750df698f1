"""Image files in an export: flattened unique names, deterministic train/val split, symlink or copy."""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
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


def natural_name(key: str) -> tuple[str, str]:
    """A safe key -> (stem, extension) of its flat name before any collision: 'a/b/img.jpg' ->
    ('a__b__img', '.jpg'). String operations with PurePosixPath's rules (parts, suffix), not a Path:
    pathlib interns every name it parses, and an export meets millions."""
    parts = [p for p in key.split("/") if p not in ("", ".")]
    last = parts[-1]
    dot = last.rfind(".")
    suffix = last[dot:] if 0 < dot < len(last) - 1 else ""
    if suffix and len(suffix) <= 8:
        return safe_component("__".join(parts[:-1] + [last[:dot]])), "." + safe_component(suffix[1:])
    return safe_component("__".join(parts)), ""


def hashed_stem(stem: str, key: str) -> str:
    return f"{stem}-{hashlib.sha256(key.encode('utf-8')).hexdigest()[:10]}"


def flat_names(keys: list[str]) -> dict[str, str]:
    """key -> a unique, safe, single-component file name ('a/b/img.jpg' -> 'a__b__img.jpg'), as a
    table (importers), by the one rule the exports use (FlatNames): when keys give the same stem
    (label files are stem + .txt, and some file systems ignore case), the later key in sorted order
    gets a short hash of the key added."""
    rule = FlatNames.of(sorted(keys))
    return {k: rule.name(k) for k in keys}


class FlatNames:
    """Flat file names as a rule plus the few keys whose stem collides, not a table of every key. One
    pass over the keys (in sorted order) finds the stems that more than one key gives (polars, on
    the stems alone: native memory, about 60 bytes a key for the pass, freed after it); every key
    but the first of such a stem gets the hash. Not unique only where a hashed stem equals another
    key's own stem (a key named like `x-<10 hex digits of x's hash>`)."""

    CHUNK = 1 << 16  # stems held as Python strings at once

    def __init__(self, hashed: set[str]):
        self.hashed = hashed

    @classmethod
    def of(cls, sorted_keys: Iterable[str]) -> "FlatNames":
        import polars as pl
        import pyarrow as pa

        chunks, keys, stems = [], [], []
        for key in sorted_keys:
            keys.append(key)
            stems.append(natural_name(key)[0].casefold())
            if len(keys) == cls.CHUNK:
                chunks.append(_key_stems(keys, stems))
                keys, stems = [], []
        chunks.append(_key_stems(keys, stems))
        table = pl.from_arrow(pa.concat_tables(chunks))
        later = table.filter(pl.col("stem").is_duplicated() & ~pl.col("stem").is_first_distinct())
        return cls(set(later["key"].to_list()))

    def name(self, key: str) -> str:
        stem, ext = natural_name(key)
        return (hashed_stem(stem, key) if key in self.hashed else stem) + ext


def _key_stems(keys: list[str], stems: list[str]):
    import pyarrow as pa

    return pa.table({"key": pa.array(keys, pa.string()), "stem": pa.array(stems, pa.string())})


def place_image(src: Path, dest: Path, copy: bool) -> None:
    """Symlink (absolute target) by default; copy with --copy-images."""
    if copy:
        shutil.copy2(src, dest)
    else:
        os.symlink(Path(src).resolve(), dest)
