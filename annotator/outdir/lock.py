"""The one-writer lock of an output folder: an OS lock (flock) on `.annotate.lock`, held for the run's life."""

from __future__ import annotations

import os
import socket
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: msvcrt's byte-range lock instead
    fcntl = None
    import msvcrt

LOCK = ".annotate.lock"


def _try_lock(fd: int) -> bool:
    """Take the OS lock without waiting; False when another open file holds it."""
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    except OSError:  # BlockingIOError (flock), PermissionError (msvcrt)
        return False
    return True


class FolderLock:
    """One owner, always. Creating the file is atomic (O_CREAT) and ownership is the OS lock on it,
    not the file's existence or its text: two runs can never both hold it, a killed run's lock is
    free again the moment its process is gone (the OS drops it), and a lock whose holder has not
    yet written its name is still held. The text (host and pid) only names the holder in the refusal.

    The file is unlinked on release; a run that opened it just before then finds, once it holds
    the lock, that the name now points elsewhere (or nowhere) and tries again on the new file."""

    def __init__(self, out: Path, busy: type[Exception] = RuntimeError):
        self.path = Path(out) / LOCK
        self.busy = busy  # the error a refused run raises
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        if self._fd is not None:
            return
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if not _try_lock(fd):
                holder = os.read(fd, 200).decode("utf-8", "replace").strip()
                os.close(fd)
                raise self.busy(self._refusal(holder))
            if self._same_file(fd):
                break
            os.close(fd)  # released and unlinked while we opened it: lock the file there now
        os.ftruncate(fd, 0)
        os.write(fd, f"{socket.gethostname()} {os.getpid()}".encode())
        self._fd = fd

    def release(self) -> None:
        """Unlink, then close (which drops the OS lock): whoever opened the old file retries."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            self.path.unlink(missing_ok=True)
        except OSError:  # Windows cannot unlink an open file: the next run reuses it
            pass
        os.close(fd)

    def _same_file(self, fd: int) -> bool:
        try:
            here = os.stat(self.path)
        except FileNotFoundError:
            return False
        mine = os.fstat(fd)
        return (here.st_dev, here.st_ino) == (mine.st_dev, mine.st_ino)

    def _refusal(self, holder: str) -> str:
        host, _, pid = holder.partition(" ")
        who = f"{host} pid {pid}" if pid else "a run that is starting"
        return (f"{self.path.parent} is being written by another annotate run ({who}); wait for it to end "
                "(a run that was killed frees the folder by itself)")

    def __del__(self):  # a lock object dropped without release (a caller's bug) must not lock the folder forever
        if self._fd is not None:
            os.close(self._fd)
