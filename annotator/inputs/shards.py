"""webdataset / img2dataset tar shards: the image members of a shard and where their bytes are.

A shard is indexed once at discovery (its headers are read, not its images): each image member
becomes an ImageRef holding (offset, size) of its bytes, so that decoding reads just those bytes,
in any order, in any process (DataLoader workers, Ray tasks), and resume can skip done members
without reading them."""

from __future__ import annotations

import re
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from annotator.inputs import remote

# `shard-{00000..00099}.tar`, `{a,b}`: webdataset's brace notation (numeric ranges keep zero padding)
_BRACES = re.compile(r"\{([^{}]*)\}")


@dataclass(frozen=True)
class Member:
    name: str  # member path inside the tar, POSIX, no leading "./"
    offset: int  # of its data in the tar file
    size: int


def is_shard(name: str) -> bool:
    return name.lower().endswith(".tar")


def has_braces(spec: str) -> bool:
    return any(".." in m or "," in m for m in _BRACES.findall(spec))


def expand_braces(spec: str) -> list[str]:
    """Every name a brace pattern stands for, in order: `a{1..3}` -> a1 a2 a3, `{x,y}` -> x y."""
    for m in _BRACES.finditer(spec):
        body = m.group(1)
        lo, dots, hi = body.partition("..")
        if dots and lo.isdigit() and hi.isdigit():
            width = len(lo) if len(lo) == len(hi) or lo.startswith("0") else 0
            step = 1 if int(hi) >= int(lo) else -1
            options = [str(i).zfill(width) for i in range(int(lo), int(hi) + step, step)]
        elif "," in body:
            options = body.split(",")
        else:
            continue  # a literal brace
        head, tail = spec[: m.start()], spec[m.end():]
        return [out for opt in options for out in expand_braces(head + opt + tail)]
    return [spec]


def members(location: Path | str, image_suffixes: frozenset[str]) -> list[Member]:
    """Image members of a local tar (Path) or a remote one (fsspec URL), in tar order.
    Other members (captions, json, ...) are ignored; so are links and folders."""
    fh = open(location, "rb") if isinstance(location, Path) else remote.open_file(location)
    out = []
    with fh, tarfile.open(fileobj=fh, mode="r:") as tar:  # "r:": seekable, uncompressed (webdataset)
        for info in tar:
            name = str(PurePosixPath(info.name.lstrip("/")))  # normalises "./x"
            if info.isreg() and PurePosixPath(name).suffix.lower() in image_suffixes:
                out.append(Member(name, info.offset_data, info.size))
    return out


def read_member(path: Path, span: tuple[int, int]) -> bytes:
    offset, size = span
    with open(path, "rb") as fh:
        fh.seek(offset)
        data = fh.read(size)
    if len(data) != size:
        raise OSError(f"tar member cut short: {len(data)} of {size} bytes")
    return data
