"""Ctrl-C and SIGTERM: the first stops the run the way Ctrl-C does (finished rows are flushed,
then the process exits with EXIT_INTERRUPTED); the second exits at once.

SIGTERM is what schedulers and `kill` send before SIGKILL, so it gets the same clean stop
as Ctrl-C instead of Python's default of dying without running any `finally`."""

from __future__ import annotations

import os
import signal
import sys
from contextlib import contextmanager
from typing import Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def stop_on_signals(exit_code: int) -> Iterator[None]:
    """Within the block, the first SIGINT/SIGTERM raises KeyboardInterrupt; the second (also
    after the block, while the process winds down) calls os._exit(exit_code): no cleanup,
    which is safe because part files only appear by rename.
    Must be entered in the main thread (a Python rule for signal handlers)."""
    stopping = False

    def handler(signum, frame):
        nonlocal stopping
        if stopping:
            os._exit(exit_code)
        stopping = True
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        if not stopping:  # once stopping, keep the handler: a second signal during exit still exits at once
            for s, h in previous.items():
                signal.signal(s, h)


def exit_now(code: int) -> None:
    """Exit without interpreter teardown, after a stop. Teardown (torch, threads) can take seconds
    and resets signal handlers first, so a second Ctrl-C in it would kill the process with the
    default action instead of `code`. Nothing is lost: part files are synced before their rename."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
