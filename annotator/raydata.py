"""`annotate run --ray`: the same run on a Ray cluster, elastically, with Ray Data.

    pending work (driver) -> batches -> decode (Ray tasks on CPU workers: bytes -> RGB arrays)
      -> annotate (an actor pool: one model per GPU, or CPU actors; the same Engine as `annotate run`)
      -> rows back to the driver -> Parquet parts in --out (PartWriter), manifest, summary.

Why this shape:
- Resume is decided before the dataset exists (runner.plan_run), so a re-run only does what is missing.
- A unit of work is one engine batch with an id. Ray restarts a lost actor and retries its batch;
  a batch's rows reach the driver once (Ray Data emits a finished task's output once, and the driver
  also drops any batch id it has already written), and parts appear by atomic rename.
- The driver writes the parts, so --out needs to exist only where the driver runs; the inputs must
  be readable from every node (URLs, or a shared filesystem).
- Decoding keeps the original pixels (uint8); the processor's resize and normalisation run in the
  actor, on exactly the arrays the local DataLoader path would give it, so the rows are the same."""

from __future__ import annotations

import json
import logging
import os
import pickle
import socket
import time
from dataclasses import dataclass

import numpy as np

from .config import ConfigError, RunConfig
from .images import Batch, DecodeFailure, ImageItem, WorkItem, collate, describe_error, load_rgb
from .runner import RowSink, Summary, finish_run, new_writer, plan_run, release_lock
from .sources import image_source

log = logging.getLogger(__name__)

INSTALL_HINT = "--ray needs Ray Data: pip install 'florence-annotate[ray]' (or: pip install 'ray[data]')"
TEST_KILL = "FLORENCE_ANNOTATE_TEST_KILL_RAY_BATCH"  # tests: "<batch id>:<marker file>" dies once


def import_ray():
    try:
        import ray
        import ray.data  # noqa: F401  (the [data] extra)
    except ImportError:
        raise ConfigError(INSTALL_HINT) from None
    return ray


@dataclass(frozen=True)
class ActorPlan:
    actors: int
    gpu: bool


def actor_plan(devices: str, cluster_gpus: float) -> ActorPlan:
    """--devices read for a cluster: auto -> one actor per GPU in the cluster, else one CPU actor;
    cuda -> every GPU; cuda:0,1 -> two GPU actors; cpu:0,cpu:1 -> two CPU actors."""
    spec = devices.strip().lower()
    if spec in ("auto", "cuda"):
        if cluster_gpus >= 1:
            return ActorPlan(int(cluster_gpus), True)
        if spec == "cuda":
            raise ConfigError("--devices cuda: the Ray cluster has no GPU; use --devices cpu")
        return ActorPlan(1, False)
    parts = [p for p in spec.split(",") if p.strip()]
    return ActorPlan(max(1, len(parts)), spec.startswith("cuda"))


def connect(ray, address: str) -> bool:
    """Join the cluster; returns True when this call started Ray (and so must stop it).
    `auto`: a running cluster (RAY_ADDRESS or the local one) if there is one, else a local Ray."""
    if ray.is_initialized():
        return False
    kwargs = dict(logging_level=logging.WARNING, include_dashboard=False)
    if address != "auto":
        ray.init(address=address, **kwargs)
        return True
    try:
        ray.init(address="auto", **kwargs)
    except ConnectionError:
        ray.init(**kwargs)
    return True


def decode_batch(row: dict, max_pixels: int) -> dict:
    """A Ray task: read and decode one batch's images; failures travel as their message."""
    out = []  # load_rgb applies max_pixels itself, with PIL's own limit off only while it decodes
    for item in pickle.loads(row["work"]):
        try:
            out.append((item.ref.key, item.tasks, np.asarray(load_rgb(image_source(item.ref), max_pixels))))
        except Exception as exc:  # data, not a crash: becomes error rows
            out.append((item.ref.key, item.tasks, describe_error(exc)))
    return {"batch": row["batch"], "decoded": pickle.dumps(out, protocol=5)}


def to_batch(decoded: list, image_processor) -> Batch:
    from PIL import Image

    samples: list[ImageItem | DecodeFailure] = []
    for key, tasks, image in decoded:
        if isinstance(image, str):
            samples.append(DecodeFailure(key, image, tasks))
            continue
        try:
            pixels = image_processor(images=Image.fromarray(image), return_tensors="pt")["pixel_values"][0]
        except Exception as exc:
            samples.append(DecodeFailure(key, describe_error(exc), tasks))
            continue
        samples.append(ImageItem(key, image.shape[1], image.shape[0], pixels, tasks))
    return collate(samples)


class AnnotateActor:
    """One model (one GPU, or CPU) and the engine; annotates one batch per call."""

    def __init__(self, cfg: RunConfig, gpu: bool):
        from .engine import Engine
        from .model import load_model

        self.lm = load_model(cfg.model, "cuda" if gpu else "cpu")  # Ray sets CUDA_VISIBLE_DEVICES
        self.engine = Engine(self.lm, list(cfg.tasks), cfg.task_inputs, cfg.generation,
                             max_prompts=cfg.batch_size * len(cfg.tasks))
        self.name = f"{socket.gethostname()}:{os.getpid()}"

    def __call__(self, row: dict) -> dict:
        _maybe_die(row["batch"])
        batch = to_batch(pickle.loads(row["decoded"]), self.lm.processor.image_processor)
        rows = self.engine.annotate(batch)
        quality = self.engine.take_stats()
        return {"batch": row["batch"], "images": len(batch), "actor": self.name,
                "rows": pickle.dumps(rows), "quality": json.dumps(quality)}


def _maybe_die(batch: int) -> None:
    spec = os.environ.get(TEST_KILL, "")
    if spec:
        wanted, _, marker = spec.partition(":")
        if int(wanted) == batch and not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(9)  # the actor dies holding the batch, without cleanup


def launch_ray(cfg: RunConfig) -> Summary:
    ray = import_ray()  # before the folder is touched: a missing Ray is a usage error
    from .launch import Bar

    start = time.monotonic()
    plan = plan_run(cfg)
    summary, work = plan.summary, plan.work
    bar = Bar(cfg.progress)
    writer = new_writer(cfg, rank=0)
    started = False
    try:
        if work:
            started = connect(ray, cfg.ray or "auto")
            bar.start(len(work))
            seen: set[int] = set()
            sink = RowSink(writer, work)
            for row in _dataset(ray, cfg, work).iter_rows():
                if row["batch"] in seen:
                    continue  # cannot happen with Ray Data's exactly-once output; never write twice anyway
                seen.add(row["batch"])
                done = sink.add(pickle.loads(row["rows"]), json.loads(row["quality"]), row["images"])
                summary.add(row["actor"], done)
                bar.update(row["images"])
    except BaseException:
        writer.flush()
        release_lock(cfg.out)
        raise
    finally:
        bar.close()
        if started:
            ray.shutdown()
    writer.flush()
    summary.seconds = time.monotonic() - start
    finish_run(cfg, plan)
    return summary


def _dataset(ray, cfg: RunConfig, work: list[WorkItem]):
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # ours counts images; Ray's count blocks
    step = cfg.batch_size
    batches = [{"batch": i // step, "work": pickle.dumps(work[i:i + step])} for i in range(0, len(work), step)]
    resources = ray.cluster_resources()
    plan = actor_plan(cfg.devices, resources.get("GPU", 0))
    # CPU actors leave a core to the decode tasks, or a small machine would have none for them
    actor_cpus = 0 if plan.gpu else max(0.25, min(1.0, (resources.get("CPU", 1) - 1) / plan.actors))
    ds = ray.data.from_items(batches, override_num_blocks=len(batches))
    ds = ds.map(decode_batch, fn_kwargs={"max_pixels": cfg.max_image_pixels}, num_cpus=1)
    return ds.map(AnnotateActor, fn_constructor_args=(cfg, plan.gpu),
                  compute=ray.data.ActorPoolStrategy(size=plan.actors),
                  num_gpus=1 if plan.gpu else 0, num_cpus=actor_cpus)
