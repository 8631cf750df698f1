"""fsspec URLs (s3://, gs://, https://, memory://, ...): resolve, list, and read bytes with retries.

Object stores fail transiently (throttling, resets, timeouts), so every remote call goes through
`retrying`: exponential back-off with jitter, then the last error propagates. A failed image read
therefore becomes error rows (images.ImageDataset turns any exception into a DecodeFailure) and
never stops the run; a failed listing stops it before anything starts, with the reason."""

from __future__ import annotations

import logging
import random
import re
import time
from dataclasses import dataclass
from typing import Callable, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
# Retrying these cannot help: the object is not there or not ours. Everything else might be transient.
PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, ImportError)


@dataclass(frozen=True)
class Backoff:
    tries: int = 4  # total attempts
    first_delay_s: float = 0.5
    max_delay_s: float = 8.0

    def delay(self, attempt: int) -> float:
        """Sleep after failed attempt `attempt` (0-based): doubling, capped, with jitter so that
        many workers hit by the same outage do not retry in lockstep."""
        return min(self.max_delay_s, self.first_delay_s * 2 ** attempt) * random.uniform(0.5, 1.0)


BACKOFF = Backoff()  # module-level so tests can make it fast; read at call time


class RemoteReadError(OSError):
    """A remote call that still failed after the last try; its message names the first cause."""


def retrying(fn: Callable[[], T], what: str) -> T:
    backoff = BACKOFF
    for attempt in range(backoff.tries):
        try:
            return fn()
        except PERMANENT:
            raise
        except Exception as exc:
            if attempt + 1 >= backoff.tries:
                raise RemoteReadError(f"{what}: {type(exc).__name__}: {exc} "
                                      f"(gave up after {backoff.tries} tries)") from exc
            log.warning("retrying %s after %s: %s", what, type(exc).__name__, exc)
            time.sleep(backoff.delay(attempt))
    raise AssertionError("unreachable")


def is_url(spec: str) -> bool:
    """`proto://...` or a chained fsspec URL (`simplecache::s3://...`); `file://` is a URL too."""
    return bool(_URL.match(spec)) or ("::" in spec and bool(_URL.search(spec.split("::")[-1])))


def local_path(spec: str) -> str | None:
    """The local path of a `file://` URL, else None: local files take the local code path
    (symlink policy, FIFO checks, lazy header reads)."""
    return spec[len("file://"):] if spec.startswith("file://") else None


def filesystem(url: str):
    """(fs, path without protocol). A protocol whose package is missing says what to install."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as exc:
        raise ImportError(f"cannot open {url}: {exc}") from None
    except ValueError as exc:  # unknown protocol
        raise ImportError(f"cannot open {url}: {exc}") from None


def join(url: str, rel: str) -> str:
    return url.rstrip("/") + "/" + rel


def is_dir(url: str) -> bool:
    if url.split("://", 1)[0].lower() in ("http", "https"):
        return False  # HTTP has no folders; isdir would download the object to look for links
    fs, path = filesystem(url)
    return retrying(lambda: fs.isdir(path), f"isdir {url}")


def list_files(url: str) -> list[str]:
    """Paths under a folder URL, relative to it, sorted."""
    fs, root = filesystem(url)
    root = root.rstrip("/")
    found = retrying(lambda: fs.find(root, withdirs=False), f"listing {url}")
    return sorted(p[len(root):].lstrip("/") for p in found)


def glob(url: str) -> tuple[str, list[str]]:
    """(URL of the folder before the first wildcard, the files matched relative to it, sorted)."""
    fs, pattern = filesystem(url)
    head = url[: min(url.index(c) for c in "*?[" if c in url)]
    proto_end = url.index("://") + 3 if "://" in url else 0
    base_url = head[: max(head.rfind("/"), proto_end)]
    base = filesystem(base_url)[1].rstrip("/")
    found = retrying(lambda: fs.glob(pattern, detail=True), f"glob {url}")
    return base_url, sorted(p[len(base):].lstrip("/") for p, info in found.items() if info.get("type") != "directory")


def read_bytes(url: str, span: tuple[int, int] | None = None) -> bytes:
    """The whole object, or `span` = (offset, size) of it (a tar member), retried."""
    fs, path = filesystem(url)
    if span is None:
        return retrying(lambda: fs.cat_file(path), f"reading {url}")
    offset, size = span
    return retrying(lambda: fs.cat_file(path, start=offset, end=offset + size), f"reading {url}")


def open_file(url: str):
    """A seekable binary file object (tar indexing, input lists); reads are fsspec's own."""
    fs, path = filesystem(url)
    return retrying(lambda: fs.open(path, "rb"), f"opening {url}")
