"""Find images: stable sorted order, keys relative to their root, symlink policy, sharding."""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})


class SourceError(ValueError):
    """Inputs that cannot be annotated as given (missing path, colliding keys)."""


@dataclass(frozen=True)
class ImageRef:
    key: str  # path relative to its root, POSIX separators, valid UTF-8: the table's `image`
    path: Path  # what to open
    root: Path | None = None  # the input folder the key is relative to (a single file's folder)
    source: str | None = None  # the folder's id for `root` (keys.assign_keys), stored in every row


@dataclass
class Discovery:
    refs: list[ImageRef]
    roots: list[Path]
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    unsupported: dict[str, int] = field(default_factory=dict)  # extension -> files ignored (not images)

    def skip(self, reason: str, path: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        log.warning("skipped %s: %s", path, reason)


def printable_key(rel: str) -> str:
    """A key that Arrow can store: undecodable bytes of non-UTF-8 names become \\x.. escapes."""
    return os.fsencode(rel).decode("utf-8", "backslashreplace").replace(os.sep, "/")


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except (ValueError, OSError, RuntimeError):
        return False


def discover(inputs: list[Path], follow_symlinks: bool = False) -> Discovery:
    """Every image under `inputs` (directories recursively, files as given), sorted by key.
    The same key may come from two roots: keys.assign_keys makes them unique for a folder.

    Symlinks that leave their root are skipped unless `follow_symlinks`; broken links and
    link loops are kept, so that they become error rows instead of vanishing silently."""
    found = Discovery(refs=[], roots=[])
    owner: dict[tuple[Path, str], Path] = {}  # (root, key) -> path
    for given in inputs:
        given = Path(given)
        if given.is_dir():
            root, paths = given, _walk(given, follow_symlinks, found)
        elif given.exists() or given.is_symlink():
            root, paths = given.parent, [given]
        else:
            raise SourceError(f"input not found: {given}")
        root = root.absolute()
        if root not in found.roots:
            found.roots.append(root)
        for path in paths:
            key = printable_key(os.path.relpath(path, root))
            first_path = owner.get((root, key))
            if first_path is not None:
                if Path(path).absolute() != first_path:  # two names that escape to the same key
                    found.skip(f"its key collides with {printable_key(str(first_path))}", printable_key(str(path)))
                continue  # the same file given twice: one row per task, not two
            owner[(root, key)] = Path(path).absolute()
            found.refs.append(ImageRef(key, path, root))
    found.refs.sort(key=lambda r: (r.key, str(r.root)))
    return found


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
