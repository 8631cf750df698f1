"""One device's run: discover -> the output folder's pending work -> DataLoader -> engine -> part files, and the summary.

What the folder holds and what may be written to it (lock, manifest, resume, --overwrite,
--retry-errors) is the output folder's (outdir/folder.py); this module drives the work."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Protocol

import torch

from annotator.clikit import EXIT_OK, EXIT_ROW_ERRORS, EXIT_WORKER_FAILED
from annotator.config import RunConfig
from annotator.decode.builder import RunAnnotator
from annotator.inputs.images import ImageDataset, WorkItem
from annotator.inputs.sources import Discovery, SourceError, discover
from annotator.inputs.tiles import TilingDataset
from annotator.model.load import LoadedModel, load_model, runtime_settings
from annotator.outdir.folder import Opened, OutputFolder
from annotator.outdir.table import ERROR, OK, PartWriter


log = logging.getLogger(__name__)

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
    decoding: str | None = None  # "scheduler" or "generate: <why>" (announce_decoding)

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
        if self.decoding:
            out.append(f"decoding: {self.decoding}")
        for failure in self.failed_workers:
            out.append(f"worker failed: {failure} -- run the same command again to finish its work")
        return out


def announce_decoding(annotator: RunAnnotator, log_it: bool = True) -> str:
    """The run's decode path (the model's generation config with the run's overrides), logged once
    at start by whoever reports the run: off the scheduler it is a warning that says why."""
    path = annotator.engine.decoding
    if log_it:
        if path == "scheduler":
            log.info("decoding: scheduler (continuous batching)")
        else:
            log.warning("decoding: %s; every wave decodes through generate (slower)", path)
    return path


def make_loader(dataset: ImageDataset, lm: LoadedModel, cfg: RunConfig) -> torch.utils.data.DataLoader:
    workers = min(cfg.workers, len(dataset))
    tiled = isinstance(dataset, TilingDataset)
    return torch.utils.data.DataLoader(
        dataset, batch_size=cfg.batch_size, shuffle=False, num_workers=workers, collate_fn=dataset.collate,
        pin_memory=lm.device.type == "cuda",
        # a tiled sample is up to 17 processed images: keep fewer batches in flight
        prefetch_factor=(2 if tiled else 4) if workers else None,
        persistent_workers=False,
    )


class Progress(Protocol):
    def start(self, total: int) -> None: ...
    def update(self, n: int) -> None: ...


@dataclass
class Plan:
    """What a run has to do, decided once before any model is loaded: the folder it opened, what
    the folder says is pending, and the summary the run fills in."""

    folder: OutputFolder
    opened: Opened
    summary: Summary

    @property
    def work(self) -> list[WorkItem]:
        return self.opened.work

    def finish(self, cfg: RunConfig, runtime: dict | None, device: str = "cpu") -> None:
        """The manifest records the run's counts and the runtime its models really used (`runtime`;
        None when no model ran here: the folder's earlier record, else what a load on `device` would
        use); the folder is let go."""
        runtime = runtime or self.opened.manifest.runtime or runtime_settings(cfg.model, device)
        s = self.summary
        counts = {"images": self.opened.n_images, "rows_ok_this_run": s.rows_ok, "rows_error_this_run": s.rows_error,
                  "images_per_worker": s.per_worker, "quality": s.quality}
        self.folder.finish(self.opened, counts, runtime)


def merge_runtimes(runtimes: list[dict]) -> dict | None:
    """What several workers or actors ran with, as one record: a setting they share keeps its
    value, one they differ in lists the values ("cuda:0, cuda:1"). None when no model ran."""
    if not runtimes:
        return None
    keys = dict.fromkeys(k for r in runtimes for k in r)
    return {k: ", ".join(dict.fromkeys(str(r.get(k)) for r in runtimes)) for k in keys}


def no_images_error(found: Discovery) -> SourceError:
    """An input with nothing to annotate is a mistake (a wrong path, a wrong extension), not a success."""
    why = [f"{n} {reason}" for reason, n in found.skipped.items()]
    why += [f"{n} {ext} file(s) (not an image type)" for ext, n in sorted(found.unsupported.items())]
    return SourceError("no images found in " + ", ".join(str(p) for p in found.roots or ["the inputs"])
                       + (f"; skipped: {'; '.join(why)}" if why else " (the inputs hold no files)"))


def plan_run(cfg: RunConfig) -> Plan:
    """Discover, open the folder (its lock, checks and keys), and list the pending (image, tasks).
    The one process of a run, or torchrun's rank 0, which hands the other ranks their shares."""
    found = discover(cfg.inputs, cfg.follow_symlinks, cfg.input_lists, cfg.path_column)
    if not found.refs:
        raise no_images_error(found)
    folder = OutputFolder(cfg.out)
    opened = folder.open(cfg, found)
    return Plan(folder, opened, Summary(skipped=dict(found.skipped), already_done=opened.already_done))


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


def annotate_work(cfg: RunConfig, annotator: RunAnnotator, work: list[WorkItem], writer: PartWriter,
                  on_batch: Callable[[BatchDone], None]) -> None:
    """The device loop: decode in DataLoader workers, annotate, hand rows to the writer;
    `on_batch` hears about every batch."""
    dataset = annotator.dataset(work)
    sink = RowSink(writer, work)
    # A stream, not a call per batch: prompts of the next batches join the decoding while long
    # answers still run; each batch's rows come back whole, once done (keys, not order, matter).
    for rows in annotator.annotate_stream(dataset, make_loader(dataset, annotator.lm, cfg)):
        on_batch(sink.add(rows, annotator.take_stats()))


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

    writer = plan.folder.writer(cfg, rank)
    annotator = None
    try:
        if plan.work:
            annotator = RunAnnotator(cfg, lm or load_model(cfg.model, device))
            summary.decoding = announce_decoding(annotator)
            annotate_work(cfg, annotator, plan.work, writer, on_batch)
    except BaseException:
        writer.flush()  # first: on Ctrl-C what is finished is kept, and a folder with rows is never removed
        plan.folder.abandon(plan.opened)  # the folder is free again, even for a caller that goes on living
        raise
    finally:
        writer.flush()  # a no-op after the except branch
        summary.seconds = time.monotonic() - start
    plan.finish(cfg, annotator.runtime if annotator is not None else None, device)
    return summary
