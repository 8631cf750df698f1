"""The output folder as one object: its lock, manifest, keys, parts, row status, and the resume and overwrite decisions."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from annotator import __version__
from annotator.config import RunConfig
from annotator.inputs.sources import Discovery, ImageRef, WorkItem, input_label
from annotator.outdir.keys import Source, assign_keys, folder_owners, manifest_sources, sources_to_manifest, upgrade_parts
from annotator.outdir.lock import FolderLock
from annotator.outdir.table import MANIFEST, OK, Manifest, PartWriter, drop_error_rows, part_files, read_status

log = logging.getLogger(__name__)


class RunError(RuntimeError):
    """The run cannot start on this folder as asked (it holds a different run, or another run writes it)."""


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class Opened:
    """What the folder tells a run that opened it: the manifest to finish, and the work still to do."""

    manifest: Manifest
    work: list[WorkItem]
    already_done: int  # (image, task) pairs a previous run wrote
    n_images: int  # every image discovered, done or not
    created: bool = False  # this run made the folder: a start that fails before any row removes it
    new_sources: list[Source] | None = None  # inputs new to the folder (the dry run names them)


class OutputFolder:
    """One `--out` folder. Reading it needs nothing; changing it needs the lock, which `open` takes
    and holds until `finish` or `abandon` (the OS drops it when the process dies)."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.lock = FolderLock(self.out, busy=RunError)

    # ------------------------------------------------------------------ reading
    def previous_manifest(self) -> Manifest | None:
        """The folder's manifest, if it holds rows: a run that wrote none (e.g. its model failed to
        load) never blocks the next try."""
        old = Manifest.load(self.out)
        return old if old is not None and part_files(self.out) else None

    def refusal(self, cfg: RunConfig, old: Manifest) -> str | None:
        """Why `cfg` may not resume into a folder made with `old`'s settings (None: it may)."""
        diff = {k: (old.identity.get(k), v) for k, v in cfg.identity().items() if old.identity.get(k) != v}
        if not diff or cfg.force:
            return None
        shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
        return (f"{self.out} holds a run with other settings ({shown}); use another --out, "
                "--overwrite to start fresh, or --force to mix them")

    def state(self, cfg: RunConfig) -> str:
        """The folder in one phrase, for the dry run."""
        if not self.out.exists():
            return "absent (would be created)"
        if cfg.overwrite:
            return f"would be emptied (--overwrite): {len(part_files(self.out))} part files"
        old = self.previous_manifest()
        if old is None:
            return "holds no rows" + (" (parts without a manifest: refused)" if part_files(self.out) else "")
        refusal = self.refusal(cfg, old)
        return f"refused: {refusal}" if refusal else f"resumable ({len(part_files(self.out))} part files, {MANIFEST} matches)"

    def pending(self, cfg: RunConfig, refs: list[ImageRef], write: bool = True) -> tuple[list[WorkItem], int]:
        """(image, tasks) still to do, and how many pairs are done: pairs with no row yet, and with
        --retry-errors pairs whose row failed. `refs` carry folder keys (keys.assign_keys): a row
        counts as done only for the file it came from."""
        status = read_status(self.out) if self.out.is_dir() else {}
        work, done = [], 0
        for ref in refs:
            todo = tuple(t.name for t in cfg.tasks
                         if status.get((ref.key, t.name)) is None or (cfg.retry_errors and status[(ref.key, t.name)] != OK))
            done += len(cfg.tasks) - len(todo)
            if todo:
                work.append(WorkItem(ref, todo))
        work = work[: cfg.limit] if cfg.limit is not None else work
        if cfg.retry_errors and write:
            # Drop exactly the error rows this run redoes, so the new rows replace them instead of
            # sitting next to them; errors of other tasks, or beyond --limit, stay.
            redo = {(w.ref.key, t) for w in work for t in w.tasks if (w.ref.key, t) in status}
            if redo:
                log.info("--retry-errors: %d error rows will be redone", drop_error_rows(self.out, redo))
        return work, done

    def preview(self, cfg: RunConfig, found: Discovery) -> Opened:
        """What `open` would decide, touching nothing (the dry run)."""
        gone = cfg.overwrite or not self.out.is_dir()
        old = None if gone else self.previous_manifest()
        known = manifest_sources(old)
        refs, sources = assign_keys(found, known, {} if gone else folder_owners(self.out),
                                    out=None if gone else self.out)
        if gone:  # nothing is done yet: every image and task
            work = [WorkItem(r, tuple(t.name for t in cfg.tasks)) for r in refs]
            work, done = (work[: cfg.limit] if cfg.limit is not None else work), 0
        else:
            work, done = self.pending(cfg, refs, write=False)
        return Opened(old or self._new_manifest(cfg), work, done, len(refs), not self.out.exists(), sources[len(known):])

    # ------------------------------------------------------------------ owning
    def open(self, cfg: RunConfig, found: Discovery) -> Opened:
        """Lock the folder, check it against `cfg` (or empty it: --overwrite), give the files their
        keys and save the manifest; the lock stays held until finish or abandon."""
        created = not self.out.exists()
        self.out.mkdir(parents=True, exist_ok=True)
        self.lock.acquire()  # before --overwrite deletes anything another run may be writing
        try:
            manifest = self._check(cfg)
            refs, sources = assign_keys(found, manifest_sources(manifest), folder_owners(self.out), out=self.out)
            if any(s.legacy for s in sources) and upgrade_parts(self.out):  # only once the folder is accepted
                log.info("%s: parts upgraded to annotation schema 2 (a null `source` column)", self.out)
            manifest.sources = sources_to_manifest(sources)
            work, done = self.pending(cfg, refs)
            manifest.save(self.out)
        except BaseException:
            self.lock.release()
            raise
        return Opened(manifest, work, done, len(refs), created)

    def joined(self, work: list[WorkItem]) -> Opened:
        """The folder as its owner (torchrun's rank 0) opened it, for a rank handed `work` by the owner:
        nothing is changed, nothing is discovered again (launch.launch_torchrun)."""
        return Opened(Manifest.load(self.out), work, 0, len(work))

    def writer(self, cfg: RunConfig, rank: int) -> PartWriter:
        return PartWriter(self.out, rank=rank, every_rows=cfg.flush_every_rows, every_seconds=cfg.flush_every_seconds)

    def finish(self, opened: Opened, counts: dict, runtime: dict) -> None:
        """Record how the run ended, and let the folder go."""
        manifest = opened.manifest
        manifest.finished = now()
        manifest.runtime = runtime
        manifest.counts = counts
        manifest.save(self.out)
        self.lock.release()

    def abandon(self, opened: Opened) -> None:
        """A run that stops early: the folder is free again, and a start that wrote no rows (e.g.
        the model failed to load) leaves no folder behind."""
        self.lock.release()
        if opened.created and not part_files(self.out):
            (self.out / MANIFEST).unlink(missing_ok=True)
            try:
                self.out.rmdir()
            except OSError:  # something else is in there (or another run just took it): leave it
                pass

    def _new_manifest(self, cfg: RunConfig) -> Manifest:
        return Manifest(identity=cfg.identity(), package_version=__version__,
                        inputs=[input_label(p) for p in cfg.inputs], tasks=[t.name for t in cfg.tasks],
                        started=now(), input_lists=[input_label(p) for p in cfg.input_lists],
                        path_column=cfg.path_column, follow_symlinks=cfg.follow_symlinks)

    def _check(self, cfg: RunConfig) -> Manifest:
        """The manifest this run will write: a fresh one, or the previous one grown by this run's
        tasks and inputs. Refuses a folder with other settings, or with parts but no manifest."""
        if cfg.overwrite:
            for path in part_files(self.out) + [self.out / MANIFEST]:
                path.unlink(missing_ok=True)
        manifest = self._new_manifest(cfg)
        old = self.previous_manifest()
        if old is None:
            if part_files(self.out) and not cfg.force:
                raise RunError(f"{self.out} has part files but no {MANIFEST}; use another --out, or --overwrite")
            return manifest
        refusal = self.refusal(cfg, old)
        if refusal:
            raise RunError(refusal)
        manifest.tasks = old.tasks + [t for t in manifest.tasks if t not in old.tasks]
        manifest.inputs = old.inputs + [p for p in manifest.inputs if p not in old.inputs]
        manifest.input_lists = old.input_lists + [p for p in manifest.input_lists if p not in old.input_lists]
        manifest.path_column = cfg.path_column or old.path_column
        manifest.follow_symlinks = cfg.follow_symlinks or old.follow_symlinks
        manifest.started = old.started
        manifest.sources = sources_to_manifest(manifest_sources(old))
        return manifest
