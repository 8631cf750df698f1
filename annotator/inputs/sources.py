"""Find images: stable sorted order, stable keys, symlink policy, sharding.

An input is a folder (searched recursively), a file, a glob (`imgs/**/*.jpg`), a brace pattern
(`shard-{00000..00099}.tar`), or any of these as an fsspec URL (`s3://`, `gs://`, `https://`,
`memory://`, `file://`); `--input-list` files name one path or URL per row. Keys:
- folders, files, globs, brace patterns: the path relative to the input's folder (a pattern's folder
  is the one before its first wildcard), as it always was for local folders;
- input lists: the entry as written (a URL stays the URL);
- tar shards (webdataset / img2dataset), wherever they come from: `<shard key>/<member>`.
The same data gives the same keys on every run, which is what resume relies on."""

from __future__ import annotations

import dataclasses
import glob as globlib
import io
import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterable

from annotator.inputs import remote, shards

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})


class SourceError(ValueError):
    """Inputs that cannot be annotated as given (missing path, colliding keys)."""


@dataclass(frozen=True)
class ImageRef:
    key: str  # the table's `image`: relative path, list entry, or shard key + member; valid UTF-8
    path: Path | None = None  # a local file (a local tar shard when `span` is set)
    url: str | None = None  # an fsspec URL (a remote tar shard when `span` is set)
    span: tuple[int, int] | None = None  # (offset, size) of a tar member's bytes
    root: str | None = None  # the input the key is relative to (a folder, a file's folder, a list, a URL)
    source: str | None = None  # the folder's id for `root` (keys.assign_keys), stored in every row


@dataclass(frozen=True)
class WorkItem:
    """An image and the tasks still to do for it (here, not in images.py: the run folder reads it without torch)."""

    ref: ImageRef
    tasks: tuple[str, ...]


def image_source(ref: ImageRef) -> Path | io.BytesIO:
    """What PIL opens: a local file by path (it reads the header first, then decodes), anything
    else as bytes read here, remote reads retried (remote.retrying)."""
    if ref.path is not None:
        return ref.path if ref.span is None else io.BytesIO(shards.read_member(ref.path, ref.span))
    return io.BytesIO(remote.read_bytes(ref.url, ref.span))


@dataclass
class Discovery:
    refs: list[ImageRef]
    roots: list[str]
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    unsupported: dict[str, int] = field(default_factory=dict)  # extension -> files ignored (not images)

    def skip(self, reason: str, path: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        log.warning("skipped %s: %s", path, reason)


def printable_key(rel: str) -> str:
    """A key that Arrow can store: undecodable bytes of non-UTF-8 names become \\x.. escapes."""
    return os.fsencode(rel).decode("utf-8", "backslashreplace").replace(os.sep, "/")


def input_label(spec: str | Path) -> str:
    """How the manifest records an input: URLs as given, local paths absolute."""
    spec = str(spec)
    return spec if remote.is_url(spec) else str(Path(spec).absolute())


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except (ValueError, OSError, RuntimeError):
        return False


Target = Path | str  # a local file, or an fsspec URL


def discover(inputs: Iterable[str | Path], follow_symlinks: bool = False, input_lists: Iterable[str] = (),
             path_column: str | None = None) -> Discovery:
    """Every image of `inputs` and `input_lists`, tar shards opened into their members, sorted by key.
    The same key may come from two roots: keys.assign_keys makes them unique for a folder.

    Symlinks that leave their root are skipped unless `follow_symlinks`; broken links and
    link loops are kept, so that they become error rows instead of vanishing silently."""
    found = Discovery(refs=[], roots=[])
    owner: dict[tuple[str, str], str] = {}  # (root, key) -> location
    sources = [_resolve(str(spec), follow_symlinks, found) for spec in inputs]
    sources += [_list_targets(str(spec), path_column) for spec in input_lists]
    for root, targets in sources:
        if root not in found.roots:
            found.roots.append(root)
        for key, target in targets:
            for ref in _refs(key, target, found):
                where = str(target.absolute()) if isinstance(target, Path) else target
                location = f"{where}#{ref.span}" if ref.span else where
                first = owner.get((root, ref.key))
                if first is not None:
                    if location != first:  # two names that escape to the same key
                        found.skip(f"its key collides with {printable_key(first)}", printable_key(location))
                    continue  # the same file given twice: one row per task, not two
                owner[(root, ref.key)] = location
                found.refs.append(dataclasses.replace(ref, root=root))
    found.refs.sort(key=lambda r: (r.key, r.root or ""))
    return found


def _refs(key: str, target: Target, found: Discovery) -> list[ImageRef]:
    """One ref for an image; one per image member for a tar shard."""
    local = isinstance(target, Path)
    if not shards.is_shard(str(target)):
        return [ImageRef(key, path=target) if local else ImageRef(key, url=target)]
    try:
        members = shards.members(target, IMAGE_EXTENSIONS)
    except Exception as exc:  # a missing or broken shard must not hide the others
        found.skip(f"tar shard not readable ({type(exc).__name__}: {exc})", printable_key(str(target)))
        return []
    return [ImageRef(f"{key}/{m.name}", path=target if local else None, url=None if local else target,
                     span=(m.offset, m.size)) for m in members]


def _resolve(spec: str, follow_symlinks: bool, found: Discovery) -> tuple[str, list[tuple[str, Target]]]:
    """(root, [(key, target)]) of one input."""
    if remote.is_url(spec) and remote.local_path(spec) is None:
        return _resolve_url(spec)
    spec = remote.local_path(spec) or spec
    given = Path(spec)
    if given.is_dir():
        root = given.absolute()
        return str(root), [(printable_key(os.path.relpath(p, root)), p) for p in _walk(given, follow_symlinks, found)]
    if given.exists() or given.is_symlink():
        return str(given.parent.absolute()), [(printable_key(given.name), given)]
    if globlib.has_magic(spec) or shards.has_braces(spec):
        root = Path(_pattern_root(spec) or ".").absolute()
        return str(root), [(printable_key(os.path.relpath(p, root)), Path(p)) for p in _local_matches(spec, found)]
    raise SourceError(f"input not found: {given}")


def _pattern_root(spec: str) -> str:
    """The folder before a pattern's first wildcard or brace: keys of its matches are relative to it."""
    head = spec[: min((spec.index(c) for c in "*?[{" if c in spec), default=len(spec))]
    floor = spec.index("://") + 3 if "://" in spec else 0  # never cut into `proto://`
    slash = head.rfind("/")
    return head[:floor] if slash < floor else ("/" if slash == 0 else head[:slash])


def _wanted(name: str) -> bool:
    suffix = PurePosixPath(name).suffix.lower()
    return suffix in IMAGE_EXTENSIONS or shards.is_shard(name)


def _local_matches(spec: str, found: Discovery) -> list[str]:
    out = []
    for part in shards.expand_braces(spec):
        if globlib.has_magic(part):
            out += [p for p in sorted(globlib.glob(part, recursive=True)) if os.path.isfile(p) and _wanted(p)]
        elif os.path.exists(part):
            out.append(part)
        else:  # img2dataset leaves gaps where a shard failed: name them, go on
            found.skip("not found (named by a brace pattern)", printable_key(part))
    if not out:
        raise SourceError(f"{spec} matches no file")
    return out


def _resolve_url(spec: str) -> tuple[str, list[tuple[str, Target]]]:
    try:
        if globlib.has_magic(spec) or shards.has_braces(spec):
            root = _pattern_root(spec)
            urls = []
            for part in shards.expand_braces(spec):
                if globlib.has_magic(part):
                    base, rels = remote.glob(part)
                    urls += [remote.join(base, r) for r in rels if _wanted(r)]
                else:
                    urls.append(part)  # not checked here: a missing one becomes error rows
            if not urls:
                raise SourceError(f"{spec} matches no file")
            return root, [(u[len(root):].lstrip("/"), u) for u in urls]
        if remote.is_dir(spec):
            rels = [r for r in remote.list_files(spec) if PurePosixPath(r).suffix.lower() in IMAGE_EXTENSIONS]
            return spec.rstrip("/"), [(r, remote.join(spec, r)) for r in rels]
    except (ImportError, OSError) as exc:
        raise SourceError(f"cannot list {spec}: {exc}") from None
    parent, _, name = spec.rstrip("/").rpartition("/")
    return parent, [(name, spec)]


def read_list(spec: str, column: str | None = None) -> list[str]:
    """Entries of an input list: Parquet or CSV/TSV (one column of paths or URLs), else text
    (one per line; blank lines and `#` comments skipped). The list itself may be a URL."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    suffix = PurePosixPath(spec.split("?", 1)[0]).suffix.lower()
    local = remote.local_path(spec) or (None if remote.is_url(spec) else spec)
    try:
        with (open(local, "rb") if local else remote.open_file(spec)) as fh:
            if suffix not in (".parquet", ".csv", ".tsv"):
                lines = fh.read().decode("utf-8").splitlines()
                return [s for s in (line.strip() for line in lines) if s and not s.startswith("#")]
            if suffix == ".parquet":
                pf = pq.ParquetFile(fh)
                name = _column(pf.schema_arrow.names, column, spec)
                values = pf.read(columns=[name]).column(0)
            else:
                table = pacsv.read_csv(fh, parse_options=pacsv.ParseOptions(delimiter="\t" if suffix == ".tsv" else ","))
                values = table.column(_column(table.column_names, column, spec))
    except (OSError, ImportError, UnicodeDecodeError) as exc:
        raise SourceError(f"cannot read the input list {spec}: {exc}") from None
    return [str(v).strip() for v in values.to_pylist() if v is not None and str(v).strip()]


def _column(names: list[str], wanted: str | None, spec: str) -> str:
    """--path-column, else the only column, else `url`, else `path` (img2dataset lists use `url`)."""
    if wanted is not None:
        if wanted not in names:
            raise SourceError(f"{spec} has no column {wanted!r} (it has: {', '.join(names)})")
        return wanted
    for choice in ([names[0]] if len(names) == 1 else []) + ["url", "path"]:
        if choice in names:
            return choice
    raise SourceError(f"{spec}: which column holds the paths? pass --path-column (columns: {', '.join(names)})")


def _list_targets(spec: str, column: str | None) -> tuple[str, list[tuple[str, Target]]]:
    """Each entry's key is the entry itself; relative entries are relative to the list's folder."""
    local = remote.local_path(spec) or (None if remote.is_url(spec) else spec)
    base: Target = Path(local).absolute().parent if local else spec.rpartition("/")[0]
    targets = []
    for entry in read_list(spec, column):
        if remote.is_url(entry):
            target: Target = Path(remote.local_path(entry)) if remote.local_path(entry) else entry
        elif isinstance(base, Path):
            target = base / entry  # an absolute entry stays absolute
        else:
            target = remote.join(base, entry)
        key = entry[2:] if entry.startswith("./") else entry
        targets.append((printable_key(key), target))
    return input_label(spec), targets


def _walk(root: Path, follow_symlinks: bool, found: Discovery) -> list[Path]:
    out: list[Path] = []
    seen_dirs: set[tuple[int, int]] = set()
    def unreadable(err: OSError) -> None:  # os.walk drops these silently by default
        found.skip(f"folder not readable ({err.strerror})", printable_key(str(err.filename)))

    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable, followlinks=follow_symlinks):
        here = Path(dirpath)
        if follow_symlinks:  # guard against directory link loops
            st = here.stat()
            if (st.st_dev, st.st_ino) in seen_dirs:
                dirnames[:] = []
                continue
            seen_dirs.add((st.st_dev, st.st_ino))
        dirnames.sort()
        for name in sorted(filenames):
            path = here / name
            if path.suffix.lower() not in IMAGE_EXTENSIONS:  # counted, not logged: sidecars are common
                ext = path.suffix.lower() or "(none)"
                found.unsupported[ext] = found.unsupported.get(ext, 0) + 1
                continue
            try:
                mode = path.stat().st_mode  # follows links
            except OSError:  # broken link, link loop, vanished: kept, so it becomes an error row that says why
                out.append(path)
                continue
            if not stat.S_ISREG(mode):
                found.skip("not a regular file (a FIFO or device would block the decoder)", printable_key(str(path)))
                continue
            if not follow_symlinks and path.is_symlink() and not _inside(path, root):
                found.skip("symlink points outside the input root (pass --follow-symlinks to follow it)",
                           printable_key(str(path)))
                continue
            out.append(path)
    return out


def shard(refs: list[ImageRef], rank: int, world: int) -> list[ImageRef]:
    """Round-robin share of a global rank: balanced, and stable as long as the folder is."""
    return refs[rank::world]
