"""Keys that identify a file across every run into one --out folder.

A row's `image` key is the file's path relative to its input folder (its *source*). Two inputs
can hold the same relative name (camera names like IMG_0001.jpg collide all the time), so a
folder records its sources in the manifest, `{id, root, prefix}`, and every row records its
source id. A source that joins a folder where its plain keys are already taken by another
source gets a prefix (its folder name, `b/x.png`), decided once and kept for every resume, so
`image` stays unique in the folder and exporters can keep keying on it.

An input folder that was moved or renamed is recognised, not annotated again under a second key:
when a new input holds most of the relative paths of a source whose folder is gone, and a sample
of those files has the width and height their rows recorded, the source's root moves to the new
folder (one log line says so) and its rows are reused. A sample that does not match refuses the
run with the fix.

Schema-1 folders (rows without a source) resume as before when they have one input; with
several inputs a key that exists under two of them cannot be attributed, and the run is refused
with the fix."""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import pyarrow.parquet as pq

from annotator.inputs import remote
from annotator.inputs.sources import Discovery, ImageRef, SourceError, image_source
from annotator.outdir.table import conform, part_files, scan_parts, write_table_atomic

log = logging.getLogger(__name__)
MOVE_SAMPLE = 32  # files of a moved folder whose image size is checked against their rows


class KeyConflict(SourceError):
    """The folder's rows cannot be matched to the inputs' files; the message says what to do."""


@dataclass(frozen=True)
class Source:
    id: str  # "s0", "s1", ... in the order the inputs joined the folder; the rows' `source`
    root: str  # absolute input folder (a single file's parent)
    prefix: str = ""  # what this source's keys start with in this folder ("" or "name/")
    legacy: bool = False  # an input of a schema-1 folder: its old rows carry no source id


def manifest_sources(manifest) -> list[Source]:
    """The folder's sources; a schema-1 manifest's inputs become legacy sources with plain keys."""
    if manifest is None:
        return []
    if manifest.schema_version >= 2:
        return [Source(**s) for s in manifest.sources]
    roots: list[str] = []
    for given in manifest.inputs:
        root = str(Path(given).parent) if Path(given).is_file() else str(given)
        if root not in roots:
            roots.append(root)
    return [Source(f"s{i}", r, "", legacy=True) for i, r in enumerate(roots)]


def sources_to_manifest(sources: list[Source]) -> list[dict]:
    return [asdict(s) for s in sources]


def folder_owners(out: Path) -> dict[str, str | None]:
    """key -> source id of the rows already in `out` (None: a schema-1 row, no source)."""
    parts = part_files(out)
    if not parts:
        return {}
    rows = scan_parts(parts).select("image", "source").unique("image", keep="first", maintain_order=True)
    return dict(rows.collect().iter_rows())


def _prefix_for(root: Path, rels: list[str], taken: set[str], used_prefixes: set[str]) -> str:
    """"" when none of the source's keys is taken, else the first free `name/`, `name-2/`, ..."""
    if not any(rel in taken for rel in rels):
        return ""
    name = root.name or "input"
    for n in range(1, 10_000):
        prefix = f"{name}/" if n == 1 else f"{name}-{n}/"
        if prefix not in used_prefixes and not any(prefix + rel in taken for rel in rels):
            return prefix
    raise KeyConflict(f"cannot find a free key prefix for {root}")


def assign_keys(found: Discovery, sources: list[Source], owners: dict[str, str | None],
                out: Path | None = None) -> tuple[list[ImageRef], list[Source]]:
    """Give every discovered image its folder key and source id. New inputs become new sources
    (only the folder's owner calls this: torchrun's other ranks get their shares from rank 0). A file whose key
    another source already holds is skipped and counted in `found.skipped`, never merged into
    that source's rows. With `out` (the folder), an input that is a known source moved elsewhere takes
    that source over (moved_source). Returns (refs sorted by key, the folder's sources)."""
    sources = list(sources)
    by_root = {s.root: s for s in sources}
    taken = set(owners)
    refs_by_root: dict[str, list[ImageRef]] = {}
    for ref in found.refs:
        refs_by_root.setdefault(str(ref.root), []).append(ref)
    for root, refs in refs_by_root.items():  # discovery order: the first input keeps plain keys
        if root not in by_root:
            moved = moved_source(root, refs, sources, owners, out) if out is not None else None
            if moved is not None:
                by_root[root] = sources[sources.index(moved)] = replace(moved, root=root)
                taken |= {moved.prefix + r.key for r in refs}
                continue
            prefix = _prefix_for(Path(root), [r.key for r in refs], taken, {s.prefix for s in sources})
            by_root[root] = Source(f"s{len(sources)}", root, prefix)
            sources.append(by_root[root])
        taken |= {by_root[root].prefix + r.key for r in refs}
    _check_legacy(found, sources, owners)
    out: list[ImageRef] = []
    claimed: dict[str, str] = {}  # key -> source id, this run
    for ref in found.refs:
        src = by_root[str(ref.root)]
        key = src.prefix + ref.key
        owner = owners[key] if key in owners else claimed.get(key, src.id)
        if owner != src.id and not (owner is None and src.legacy):
            found.skip(f"its key {key!r} is already used by a file of another input in this --out "
                       "(annotate it into another --out)", str(ref.path))
            continue
        claimed[key] = src.id
        out.append(replace(ref, key=key, source=src.id))
    out.sort(key=lambda r: r.key)
    return out, sources


def moved_source(root: str, refs: list[ImageRef], sources: list[Source], owners: dict[str, str | None],
                 out: Path) -> Source | None:
    """The source whose folder was moved to `root`, if any: its folder no longer exists, `root` holds at
    least half of its keys, and a sample of them has the image size their rows recorded. A match by
    name alone but not by size is refused: annotating it would put one image name under two keys."""
    rels = {r.key: r for r in refs}
    for src in sources:
        if src.legacy or remote.is_url(src.root) or os.path.exists(src.root):
            continue
        mine = [k[len(src.prefix):] for k, owner in owners.items() if owner == src.id and k.startswith(src.prefix)]
        common = sorted(k for k in mine if k in rels)
        if not common or 2 * len(common) < len(mine):
            continue
        sample = common[:: max(1, len(common) // MOVE_SAMPLE)][:MOVE_SAMPLE]
        recorded = _recorded_sizes(out, src, {src.prefix + k for k in sample})
        differ = [k for k in sample if recorded.get(src.prefix + k) not in (None, _header_size(rels[k]))]
        if differ:
            raise KeyConflict(
                f"input {root} holds {len(common)} of the file names of {src.root}, which no longer exists, but "
                f"{differ[0]!r} is not the image annotated under that name (another size): annotate {root} "
                "into another --out, or put the old folder back")
        log.warning("input %s: recognised as %s moved (%d of its %d images found by relative path and image "
                    "size); their rows are reused", root, src.root, len(common), len(mine))
        return src
    return None


def _recorded_sizes(out: Path, src: Source, keys: set[str]) -> dict[str, tuple[int, int]]:
    """(width, height) that the folder's rows of `src` recorded for `keys` (error rows may record none)."""
    import polars as pl

    rows = (scan_parts(part_files(out))
            .filter((pl.col("source") == src.id) & pl.col("image").is_in(sorted(keys))
                    & pl.col("width").is_not_null() & pl.col("height").is_not_null())
            .select("image", "width", "height").collect())
    return {key: (w, h) for key, w, h in rows.iter_rows()}


def _header_size(ref: ImageRef) -> tuple[int, int] | None:
    """The size `annotate run` records for the file (EXIF-rotated), read from its header only."""
    from PIL import Image

    try:
        with Image.open(image_source(ref)) as im:
            w, h = im.size
            return (h, w) if im.getexif().get(0x0112, 1) in (5, 6, 7, 8) else (w, h)
    except Exception:  # unreadable, not an image, a decompression bomb: not the same image
        return None


def _check_legacy(found: Discovery, sources: list[Source], owners: dict[str, str | None]) -> None:
    """A schema-1 row names no input: with several legacy inputs it must exist under just one."""
    legacy = [s for s in sources if s.legacy]
    if len(legacy) < 2:
        return
    for ref in found.refs:
        if owners.get(ref.key, "") is not None:
            continue
        holders = [s.root for s in legacy if os.path.lexists(os.path.join(s.root, ref.key))]
        if len(holders) > 1:
            raise KeyConflict(
                f"this --out was written by an older florence-annotate whose rows do not say which input they "
                f"came from, and {ref.key!r} exists under both {holders[0]} and {holders[1]}: its rows cannot be "
                "matched to a file. Annotate the later input into a new --out, or start fresh with --overwrite")


def folder_keys(found: Discovery, manifest) -> list[str]:
    """The keys the folder uses for the discovered files (info's completeness check)."""
    prefix = {s.root: s.prefix for s in manifest_sources(manifest)}
    return [prefix.get(str(r.root), "") + r.key for r in found.refs]


def upgrade_parts(out: Path) -> int:
    """Give a schema-1 folder's parts the `source` column (null: legacy rows), atomically, so that
    old and new parts read as one table. Returns parts rewritten."""
    n = 0
    for part in part_files(out):
        if "source" in pq.read_schema(part).names:
            continue
        write_table_atomic(conform(pq.read_table(part)), part)
        n += 1
    return n
