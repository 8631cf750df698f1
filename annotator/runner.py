"""One device's run: discover -> skip what is done -> DataLoader -> engine -> part files.

Also owns the run-level policy: manifest checks for resume, --overwrite, --retry-errors,
the summary and the exit code."""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Protocol

import torch

from . import __version__
from .clikit import EXIT_OK, EXIT_ROW_ERRORS, EXIT_WORKER_FAILED
from .config import RunConfig
from .engine import Engine
from .images import ImageDataset, WorkItem, collate
from .keys import assign_keys, folder_owners, manifest_sources, sources_to_manifest, upgrade_parts
from .model import LoadedModel, load_model, runtime_settings
from .sources import Discovery, ImageRef, SourceError, discover, input_label
from .store import ERROR, MANIFEST, OK, Manifest, PartWriter, drop_error_rows, part_files, read_status
from .tiling import TiledAnnotator, TilingDataset, collate_tiles, engine_tasks, tileable

log = logging.getLogger(__name__)


class RunError(RuntimeError):
    """The run cannot start as asked (e.g. the folder holds a different run); message says why."""


@dataclass
class Summary:
    images: int = 0  # images seen this run (pending work)
    rows_ok: int = 0
    rows_error: int = 0
    already_done: int = 0  # (image, task) pairs skipped because a previous run wrote them
    skipped: dict = field(default_factory=dict)
    seconds: float = 0.0
    per_worker: dict = field(default_factory=dict)  # rank -> images annotated
    quality: dict = field(default_factory=dict)  # parse.refine counters: duplicates removed, ...
    failed_workers: list = field(default_factory=list)  # "rank 1 (cuda:1): why"

    def add(self, rank, done: "BatchDone") -> None:
        self.images += done.images
        self.rows_ok += done.ok
        self.rows_error += done.error
        self.per_worker[rank] = self.per_worker.get(rank, 0) + done.images
        for name, n in done.quality.items():
            self.quality[name] = self.quality.get(name, 0) + n

    def to_dict(self) -> dict:
        return {**asdict(self), "images_per_s": round(self.images_per_s, 3), "exit_code": self.exit_code()}

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def exit_code(self) -> int:
        if self.failed_workers:
            return EXIT_WORKER_FAILED
        return EXIT_ROW_ERRORS if self.rows_error else EXIT_OK

    def lines(self) -> list[str]:
        out = [f"images: {self.images}  rows ok: {self.rows_ok}  rows error: {self.rows_error}  "
               f"time: {self.seconds:.1f}s  images/s: {self.images_per_s:.2f}"]
        if self.already_done:
            out.append(f"resumed: {self.already_done} rows were already done")
        for reason, n in self.skipped.items():
            out.append(f"skipped {n}: {reason}")
        if any(self.quality.values()):
            out.append("quality: " + ", ".join(f"{k.replace('_', ' ')}: {n}" for k, n in sorted(self.quality.items()) if n))
        if len(self.per_worker) > 1:
            out.append("images per worker: " + ", ".join(f"{r}: {n}" for r, n in sorted(self.per_worker.items())))
        for failure in self.failed_workers:
            out.append(f"worker failed: {failure} -- run the same command again to finish its work")
        return out


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def prepare_out(cfg: RunConfig) -> Manifest:
    """Create or check the output folder; returns the manifest to write. Nothing is deleted
    unless --overwrite."""
    out = cfg.out
    out.mkdir(parents=True, exist_ok=True)
    take_lock(out)  # before --overwrite deletes anything another run may be writing
    try:
        return _check_out(cfg)
    except BaseException:
        release_lock(out)
        raise


def _check_out(cfg: RunConfig) -> Manifest:
    out = cfg.out
    if cfg.overwrite:
        for path in part_files(out) + [out / MANIFEST]:
            path.unlink(missing_ok=True)
    manifest = Manifest(identity=cfg.identity(), package_version=__version__,
                        inputs=[input_label(p) for p in cfg.inputs], tasks=[t.name for t in cfg.tasks],
                        started=now(), input_lists=[input_label(p) for p in cfg.input_lists],
                        path_column=cfg.path_column, follow_symlinks=cfg.follow_symlinks)
    old = previous_manifest(out)
    if old is not None:
        refusal = settings_refusal(cfg, old)
        if refusal:
            raise RunError(refusal)
        manifest.tasks = old.tasks + [t for t in manifest.tasks if t not in old.tasks]
        manifest.inputs = old.inputs + [p for p in manifest.inputs if p not in old.inputs]
        manifest.input_lists = old.input_lists + [p for p in manifest.input_lists if p not in old.input_lists]
        manifest.path_column = cfg.path_column or old.path_column
        manifest.follow_symlinks = cfg.follow_symlinks or old.follow_symlinks
        manifest.started = old.started
        manifest.sources = sources_to_manifest(manifest_sources(old))
    elif part_files(out) and not cfg.force:
        raise RunError(f"{out} has part files but no {MANIFEST}; use another --out, or --overwrite")
    return manifest


def previous_manifest(out: Path) -> Manifest | None:
    """The folder's manifest, if it holds rows: a run that wrote none (e.g. its model failed to
    load) never blocks the next try."""
    old = Manifest.load(out)
    return old if old is not None and part_files(out) else None


def settings_refusal(cfg: RunConfig, old: Manifest) -> str | None:
    """Why `cfg` may not resume into a folder made with `old`'s settings (None: it may)."""
    diff = {k: (old.identity.get(k), v) for k, v in cfg.identity().items() if old.identity.get(k) != v}
    if not diff or cfg.force:
        return None
    shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
    return (f"{cfg.out} holds a run with other settings ({shown}); use another --out, "
            "--overwrite to start fresh, or --force to mix them")


def pending_work(cfg: RunConfig, refs: list[ImageRef], summary: Summary, write: bool = True) -> list[WorkItem]:
    """(image, tasks) still to do: pairs with no row yet, and with --retry-errors pairs whose row failed.
    `refs` carry folder keys (keys.assign_keys): a row counts as done only for the file it came from."""
    status = read_status(cfg.out)
    work = []
    for ref in refs:
        todo = tuple(t.name for t in cfg.tasks
                     if status.get((ref.key, t.name)) is None or (cfg.retry_errors and status[(ref.key, t.name)] != OK))
        summary.already_done += len(cfg.tasks) - len(todo)
        if todo:
            work.append(WorkItem(ref, todo))
    work = work[: cfg.limit] if cfg.limit is not None else work
    if cfg.retry_errors and write:
        # Drop exactly the error rows this run redoes, so the new rows replace them instead of
        # sitting next to them; errors of other tasks, or beyond --limit, stay.
        redo = {(w.ref.key, t) for w in work for t in w.tasks if (w.ref.key, t) in status}
        if redo:
            log.info("--retry-errors: %d error rows will be redone", drop_error_rows(cfg.out, redo))
    return work


def make_loader(work: list[WorkItem], lm: LoadedModel, cfg: RunConfig,
                dataset: ImageDataset | None = None) -> torch.utils.data.DataLoader:
    dataset = dataset or ImageDataset(work, lm.processor.image_processor, cfg.max_image_pixels)
    workers = min(cfg.workers, len(work))
    return torch.utils.data.DataLoader(
        dataset, batch_size=cfg.batch_size, shuffle=False, num_workers=workers,
        collate_fn=collate_tiles if isinstance(dataset, TilingDataset) else collate,
        pin_memory=lm.device.type == "cuda",
        # a tiled sample is up to 17 processed images: keep fewer batches in flight
        prefetch_factor=(2 if isinstance(dataset, TilingDataset) else 4) if workers else None,
        persistent_workers=False,
    )


class Progress(Protocol):
    def start(self, total: int) -> None: ...
    def update(self, n: int) -> None: ...


@dataclass
class Plan:
    """What a run has to do, decided once before any model is loaded."""

    manifest: Manifest
    work: list[WorkItem]
    summary: Summary
    n_images: int  # every image discovered, done or not
    created: bool = False  # this run made the folder: a start that fails before any row removes it


def no_images_error(found: Discovery) -> SourceError:
    """An input with nothing to annotate is a mistake (a wrong path, a wrong extension), not a success."""
    why = [f"{n} {reason}" for reason, n in found.skipped.items()]
    why += [f"{n} {ext} file(s) (not an image type)" for ext, n in sorted(found.unsupported.items())]
    return SourceError("no images found in " + ", ".join(str(p) for p in found.roots or ["the inputs"])
                       + (f"; skipped: {'; '.join(why)}" if why else " (the inputs hold no files)"))


def plan_run(cfg: RunConfig, owner: bool = True) -> Plan:
    """Discover, check the folder, and list the pending (image, tasks). Only the `owner` (the one
    process of a run, or rank 0 under torchrun) may create, clean or rewrite the folder."""
    found = discover(cfg.inputs, cfg.follow_symlinks, cfg.input_lists, cfg.path_column)
    if not found.refs:
        raise no_images_error(found)
    created = not cfg.out.exists()
    if owner:
        manifest = prepare_out(cfg)
        try:
            refs, sources = assign_keys(found, manifest_sources(manifest), folder_owners(cfg.out), out=cfg.out)
        except BaseException:
            release_lock(cfg.out)
            raise
        if any(s.legacy for s in sources) and upgrade_parts(cfg.out):  # only once the folder is accepted
            log.info("%s: parts upgraded to annotation schema 2 (a null `source` column)", cfg.out)
        manifest.sources = sources_to_manifest(sources)
        summary = Summary(skipped=dict(found.skipped))
        work = pending_work(cfg, refs, summary)
        manifest.save(cfg.out)
    else:
        manifest = Manifest.load(cfg.out)
        refs, _ = assign_keys(found, manifest_sources(manifest), folder_owners(cfg.out), register=False)
        summary = Summary(skipped=dict(found.skipped))
        work = pending_work(replace(cfg, retry_errors=False), refs, summary)
    return Plan(manifest, work, summary, len(refs), created)


@dataclass(frozen=True)
class BatchDone:
    """What one annotated batch reports to its driver (progress bar, Summary, worker events)."""

    images: int
    ok: int  # rows
    error: int  # rows
    quality: dict = field(default_factory=dict)  # parse.refine counters: duplicates removed, ...


class RowSink:
    """Where annotated rows go, whoever annotated them (this process, a worker, a Ray actor):
    each row gets the id of the input its image came from (keys.py: resume matches rows on
    their input), then the part writer takes them."""

    def __init__(self, writer: PartWriter, work: list[WorkItem]):
        self.writer = writer
        self.source_of = {w.ref.key: w.ref.source for w in work}

    def add(self, rows: list, quality: dict, images: int | None = None) -> BatchDone:
        for row in rows:
            row.source = self.source_of.get(row.image)
        self.writer.add(rows)
        if images is None:
            images = len({r.image for r in rows})  # batch items include tiles; every image has a row
        return BatchDone(images, sum(r.status == OK for r in rows), sum(r.status == ERROR for r in rows), quality)


def annotate_work(cfg: RunConfig, lm: LoadedModel, work: list[WorkItem], writer: PartWriter,
                  on_batch: Callable[[BatchDone], None]) -> None:
    """The device loop: decode in DataLoader workers, annotate, hand rows to the writer;
    `on_batch` hears about every batch."""
    # prompts per generate call: every task of a batch together (see stream.py, BatchStream._advance)
    tasks = engine_tasks(list(cfg.tasks), cfg.tiling)
    engine = Engine(lm, tasks, cfg.task_inputs, cfg.generation, max_prompts=cfg.batch_size * len(cfg.tasks))
    annotator, dataset = engine, None
    if cfg.tiling.enabled:  # tiles are images to the engine; the annotator merges them back
        dataset = TilingDataset(work, lm.processor.image_processor, cfg.max_image_pixels, cfg.tiling,
                                tileable(tasks, engine.sources))
        annotator = TiledAnnotator(engine, dataset, vision_batch=cfg.batch_size)
    sink = RowSink(writer, work)
    # A stream, not a call per batch: prompts of the next batches join the decoding while long
    # answers still run; each batch's rows come back whole, once done (keys, not order, matter).
    for rows in annotator.annotate_stream(make_loader(work, lm, cfg, dataset)):
        on_batch(sink.add(rows, engine.take_stats()))


def new_writer(cfg: RunConfig, rank: int) -> PartWriter:
    return PartWriter(cfg.out, rank=rank, every_rows=cfg.flush_every_rows, every_seconds=cfg.flush_every_seconds)


LOCK = ".annotate.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def take_lock(out: Path) -> None:
    """One `annotate run` per folder: two writers would both redo the same pending rows.
    The lock names host and pid; a lock whose process is gone (killed run) is taken over."""
    path, me = out / LOCK, f"{socket.gethostname()} {os.getpid()}"
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            host, _, pid = path.read_text().partition(" ")
            mine = host == socket.gethostname()
            if mine and pid.strip().isdigit() and (int(pid) == os.getpid() or not _alive(int(pid))):
                path.unlink(missing_ok=True)  # stale, or ours from an earlier call in this process
                continue
            raise RunError(f"{out} is being written by another annotate run ({host} pid {pid.strip()}); "
                           f"wait for it, or delete {path} if that run is gone")
        with os.fdopen(fd, "w") as fh:
            fh.write(me)
        return


def release_lock(out: Path) -> None:
    path = out / LOCK
    if path.exists() and path.read_text() == f"{socket.gethostname()} {os.getpid()}":
        path.unlink(missing_ok=True)


def finish_run(cfg: RunConfig, plan: Plan, device: str = "cpu") -> None:
    manifest = plan.manifest
    manifest.finished = now()
    if not manifest.runtime:
        manifest.runtime = runtime_settings(cfg.model, device)
    manifest.counts = {"images": plan.n_images, "rows_ok_this_run": plan.summary.rows_ok,
                       "rows_error_this_run": plan.summary.rows_error,
                       "images_per_worker": plan.summary.per_worker, "quality": plan.summary.quality}
    manifest.save(cfg.out)
    release_lock(cfg.out)


def run(cfg: RunConfig, device: str = "cpu", lm: LoadedModel | None = None,
        progress: Progress | None = None, rank: int = 0) -> Summary:
    """Annotate everything pending in cfg in this process, on one device."""
    start = time.monotonic()
    plan = plan_run(cfg)
    summary = plan.summary
    if progress:
        progress.start(len(plan.work))

    def on_batch(done: BatchDone) -> None:
        summary.add(rank, done)
        if progress:
            progress.update(done.images)

    writer = new_writer(cfg, rank)
    try:
        if plan.work:
            lm = lm or load_model(cfg.model, device)
            annotate_work(cfg, lm, plan.work, writer, on_batch)
    except BaseException:
        writer.flush()  # first: on Ctrl-C what is finished is kept, and a folder with rows is never removed
        release_lock(cfg.out)  # the folder is free again, even for a caller that goes on living
        if plan.created and not part_files(cfg.out):
            remove_empty_run(cfg.out)
        raise
    finally:
        writer.flush()  # a no-op after the except branch
        summary.seconds = time.monotonic() - start
    if lm is not None:
        plan.manifest.runtime = {"dtype": str(lm.dtype).removeprefix("torch."), "attention": lm.attention,
                                 "device": str(lm.device)}
    finish_run(cfg, plan, device)
    return summary


def remove_empty_run(out: Path) -> None:
    """Undo a start that wrote no rows (e.g. the model failed to load): no folder is left behind."""
    (out / MANIFEST).unlink(missing_ok=True)
    try:
        out.rmdir()
    except OSError:  # something else is in there: leave it
        pass
