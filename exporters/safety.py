"""Exports never write outside --out, whatever an image key or a label contains.

Keys come from the annotation table and are relative POSIX paths made by `annotate run`; a table
edited by hand (or by an attacker) may hold `../x`, `/etc/x`, `C:\\x` or NUL bytes. Keys are
checked before they are used to find an image, output file names are single sanitized path
components, and every output path is checked to resolve inside the output folder."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path, PurePosixPath

from exporters.errors import ExportError, UnsafePath

MARKER = ".annotate-export"  # written into every export folder; --overwrite only clears folders with it
_WIN_DRIVE = re.compile(r"^[A-Za-z]:")
_BAD_CHARS = re.compile(r"[^\w.\-]+")  # \w is unicode-aware: letters of any script are kept


def check_key(key: str) -> PurePosixPath:
    """A key as a safe relative path, or UnsafePath."""
    if not is_safe_key(key):
        raise UnsafePath(f"unsafe image key {key!r}")
    return PurePosixPath(key)


def is_safe_key(key: str) -> bool:
    """Plain string checks, no PurePosixPath: pathlib interns every path component it parses, so
    checking a million keys that way keeps a million file names alive for the whole export."""
    if not key or "\x00" in key or "\\" in key or key.startswith("/") or _WIN_DRIVE.match(key):
        return False
    parts = [p for p in key.split("/") if p not in ("", ".")]  # what PurePosixPath's parts would hold
    return bool(parts) and ".." not in parts


def safe_component(name: str, max_len: int = 180) -> str:
    """Any string -> one harmless file-name component ('../a b/c.jpg' -> '.._a_b_c.jpg' minus
    leading dots). Keeps the extension when it trims."""
    s = _BAD_CHARS.sub("_", name.replace("\x00", "")).lstrip(".")
    if not s:
        s = "_"
    if len(s) > max_len:
        stem, dot, ext = s.rpartition(".")
        ext = ext[:16] if dot else ""
        s = (stem if dot else s)[: max_len - len(ext) - 1] + (f".{ext}" if ext else "")
    return s


def _clear(root: Path, subfolders: tuple[str, ...] | None) -> None:
    if subfolders is None:
        for child in root.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
        return
    for sub in (root / s for s in subfolders):
        if sub.is_dir() and not sub.is_symlink():
            for child in sub.iterdir():
                if child.is_file() and not child.is_symlink():
                    child.unlink()


class OutDir:
    """The output folder. `path("labels", "train", name)` gives a path that is guaranteed to lie
    inside it (components are checked, then the resolved parent is compared)."""

    def __init__(self, root: Path):
        self.root = Path(root).resolve()

    @classmethod
    def prepare(cls, root: Path, overwrite: bool, marker: str = MARKER, made_by: str = "annotate export",
                clear: tuple[str, ...] | None = None) -> "OutDir":
        """An empty --out, or (with --overwrite) one this command made before, as its `marker`
        file says: anything else is refused. `clear`: only the plain files of these subfolders
        are removed (preview); None: everything in the folder (exports)."""
        root = Path(root)
        if root.exists() and not root.is_dir():
            raise ExportError(f"--out {root} exists and is not a folder")
        if root.exists() and any(root.iterdir()):
            if not overwrite:
                raise ExportError(f"output folder {root} is not empty; pass --overwrite to replace it")
            if not (root / marker).exists():
                raise ExportError(
                    f"refusing to clear {root}: it was not made by `{made_by}` (no {marker} file); "
                    "choose an empty --out"
                )
            _clear(root, clear)
        root.mkdir(parents=True, exist_ok=True)
        (root / marker).write_text(f"made by `{made_by}`; --overwrite may clear this folder\n")
        return cls(root)

    def path(self, *parts: str) -> Path:
        for part in parts:
            if not part or part in (".", "..") or "/" in part or "\\" in part or "\x00" in part:
                raise UnsafePath(f"unsafe output name {part!r}")
        dest = self.root.joinpath(*parts)
        parent = Path(os.path.realpath(dest.parent))
        if parent != self.root and self.root not in parent.parents:
            raise UnsafePath(f"output path {dest} leaves {self.root}")
        return dest

    def mkdir(self, *parts: str) -> Path:
        d = self.path(*parts)
        d.mkdir(parents=True, exist_ok=True)
        return d
