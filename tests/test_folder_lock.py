"""One writer per output folder, always (issue 30, item 3): the lock is an OS lock held for the run's
life, so neither a lock's text (a dead pid, or no text yet) nor a race between starts can let a
second run in, and a killed run never blocks the next one."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap

import pytest

from annotator.outdir.folder import RunError
from annotator.outdir.lock import LOCK, FolderLock
from run_helpers import FAST, annotate_argv, by_key, cli_env, noise_images

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="the holder scripts use fcntl")


def hold(out, write: bool = True) -> subprocess.Popen:
    """Another process that holds the folder's lock until killed; `write=False`: it has taken the
    OS lock but not written its name yet (a run caught between create and write)."""
    code = textwrap.dedent(f"""
        import fcntl, os, sys, time
        fd = os.open({str(out / LOCK)!r}, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if {write!r}:
            import socket
            os.write(fd, f"{{socket.gethostname()}} {{os.getpid()}}".encode())
        print("held", flush=True)
        time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)  # like a killed run: no cleanup
    proc.wait()


def test_a_busy_folder_is_refused_and_a_killed_runs_lock_is_free(tmp_path):
    holder = hold(tmp_path)
    try:
        with pytest.raises(RunError, match=f"pid {holder.pid}"):
            FolderLock(tmp_path, busy=RunError).acquire()
    finally:
        stop(holder)
    lock = FolderLock(tmp_path, busy=RunError)
    lock.acquire()  # the killed run's file is still there; its OS lock went with its process
    assert (tmp_path / LOCK).read_text().endswith(f" {os.getpid()}")
    lock.release()
    assert not (tmp_path / LOCK).exists()


def test_a_lock_naming_a_dead_process_is_not_taken_while_its_holder_lives(tmp_path):
    """Two starts that both judged a lock stale by its text used to both take it: the text is no
    longer what decides."""
    holder = hold(tmp_path)
    try:
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        (tmp_path / LOCK).write_text(f"{os.uname().nodename} {dead.pid}")  # reads as stale
        with pytest.raises(RunError, match="another annotate run"):
            FolderLock(tmp_path, busy=RunError).acquire()
    finally:
        stop(holder)


def test_a_lock_caught_between_create_and_write(tmp_path):
    """Held but not yet named: refused as a run that is starting (not as a foreign host's run);
    and an unnamed lock file nobody holds (its run died right after creating it) is free."""
    holder = hold(tmp_path, write=False)
    try:
        with pytest.raises(RunError, match="a run that is starting"):
            FolderLock(tmp_path, busy=RunError).acquire()
    finally:
        stop(holder)
    assert (tmp_path / LOCK).read_text() == ""
    lock = FolderLock(tmp_path, busy=RunError)
    lock.acquire()
    lock.release()


def test_several_runs_started_at_once_on_one_out(tmp_path):
    """Exactly one writes; the others exit 2 with one line; no part or row is doubled. A stale
    lock (a dead process's name) is there before they start, so each of them also judges it."""
    images, out = tmp_path / "images", tmp_path / "out"
    noise_images(images, 12)
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / LOCK).write_text(f"{os.uname().nodename} {dead.pid}")
    # long answers (a random model writes to max-new-tokens): the winner still runs when the others start
    argv = annotate_argv("run", str(images), "--out", str(out), "--tasks", "caption,od", *FAST,
                         "--max-new-tokens", "40", "--batch-size", "1")
    procs = [subprocess.Popen(argv, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    results = [(p.wait(timeout=600), p.stdout.read(), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2, 2, 2], results
    for code, _, err in results:
        if code == 2:
            lines = err.strip().splitlines()
            assert len(lines) == 1 and re.match(r"Error: .* is being written by another annotate run", lines[0]), err
    got = by_key(out)  # asserts: no (image, task) twice
    assert len(got) == 12 * 2
    assert len({p.name.split("-")[2] for p in out.glob("part-*.parquet")}) == 1  # one run wrote every part
    assert not (out / LOCK).exists()
