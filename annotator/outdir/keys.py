"""Keys that identify a file across every run into one --out folder.

A row's `image` key is the file's path relative to its input folder (its *source*). Two inputs
can hold the same relative name (camera names like IMG_0001.jpg collide all the time), so a
folder records its sources in the manifest, `{id, root, prefix}`, and every row records its
source id. A source that joins a folder where its plain keys are already taken by another
source gets a prefix (its folder name, `b/x.png`), decided once and kept for every resume, so
`image` stays unique in the folder and exporters can keep keying on it.

Schema-1 folders (rows without a source) resume as before when they have one input; with
several inputs a key that exists under two of them cannot be attributed, and the run is refused
with the fix."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from annotator.inputs.sources import Discovery, ImageRef, SourceError
from annotator.outdir.table import SCHEMA, part_files, write_table_atomic


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
    owners: dict[str, str | None] = {}
    for part in part_files(out):
        names = pq.read_schema(part).names
        t = pq.read_table(part, columns=["image", "source"] if "source" in names else ["image"])
        sources = t.column("source").to_pylist() if "source" in names else [None] * t.num_rows
        for key, src in zip(t.column("image").to_pylist(), sources):
            owners.setdefault(key, src)
    return owners


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
                register: bool = True) -> tuple[list[ImageRef], list[Source]]:
    """Give every discovered image its folder key and source id. New inputs become new sources
    (when `register`; torchrun's other ranks read the ones rank 0 registered). A file whose key
    another source already holds is skipped and counted in `found.skipped`, never merged into
    that source's rows. Returns (refs sorted by key, the folder's sources)."""
    sources = list(sources)
    by_root = {s.root: s for s in sources}
    taken = set(owners)
    refs_by_root: dict[str, list[ImageRef]] = {}
    for ref in found.refs:
        refs_by_root.setdefault(str(ref.root), []).append(ref)
    for root, refs in refs_by_root.items():  # discovery order: the first input keeps plain keys
        if root not in by_root:
            if not register:
                raise KeyConflict(f"input {root} is not in the folder's manifest; rank 0 should have added it")
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
        t = pq.read_table(part)
        for f in SCHEMA:
            if f.name not in t.column_names:
                t = t.append_column(f.name, pa.nulls(t.num_rows, f.type))
        write_table_atomic(t.select(SCHEMA.names).cast(SCHEMA), part)
        n += 1
    return n
