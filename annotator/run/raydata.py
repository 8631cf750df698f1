"""`annotate run --ray`: the same run on a Ray cluster, elastically, with Ray Data.

    pending work (driver) -> batches -> decode (Ray tasks on CPU workers: bytes -> RGB arrays)
      -> annotate (an actor pool: one model per GPU, or CPU actors; the same Engine as `annotate run`,
         built by decode/builder.py, tiles included)
      -> rows back to the driver -> Parquet parts in --out (PartWriter), manifest, summary.

Why this shape:
- Resume is decided before the dataset exists (device.plan_run, by the output folder), so a re-run only
  does what is missing.
- A unit of work is one engine batch with an id. Ray restarts a lost actor and retries its batch;
  a batch's rows reach the driver once (Ray Data emits a finished task's output once, and the driver
  also drops any batch id it has already written), and parts appear by atomic rename.
- The driver writes the parts, so --out needs to exist only where the driver runs; the inputs must
  be readable from every node (URLs, or a shared filesystem).
- Decoding keeps the original pixels (uint8); the processor's resize and normalisation (and with
  --tile the tile crops) run in the actor, through the same dataset the local DataLoader path uses,
  on the same decoded image, so the rows are the same.
- The manifest records the runtime the actors report (their device, dtype and attention)."""

from __future__ import annotations

import json
import logging
import os
import pickle
import socket
import time
from dataclasses import dataclass

import numpy as np

from annotator.config import ConfigError, RunConfig
from annotator.inputs.images import DecodedElsewhere, WorkItem, describe_error, load_rgb
from annotator.inputs.sources import image_source
from annotator.run.device import RowSink, Summary, merge_runtimes, plan_run
from annotator.run.progress import Bar

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
            out.append((item, np.asarray(load_rgb(image_source(item.ref), max_pixels))))
        except Exception as exc:  # data, not a crash: becomes error rows
            out.append((item, describe_error(exc)))
    return {"batch": row["batch"], "decoded": pickle.dumps(out, protocol=5)}


def decoded_opener(decoded: list):
    """ImageDataset's `open_image` for images a decode task already read (or failed to)."""
    from PIL import Image

    by_key = {item.ref.key: image for item, image in decoded}

    def open_image(item: WorkItem):
        image = by_key[item.ref.key]
        if isinstance(image, str):
            raise DecodedElsewhere(image)
        return Image.fromarray(image)

    return open_image


# Engine batches per actor call. Ray Data hands an actor whole batches and wants each call's output
# back before the call ends, so the engine's stream (stream.py: the next batches' prompts fill the
# slots long answers leave) drains at the end of every call; over 8 batches the drain costs little
# (README, "Ray": slot efficiency by batches per call, measured with `annotate bench --stream-batches`).
ACTOR_BATCHES = 8


class AnnotateActor:
    """One model (one GPU, or CPU) and the run's annotator (decode/builder.py, tiles included); annotates
    ACTOR_BATCHES engine batches per call through one engine stream."""

    def __init__(self, cfg: RunConfig, gpu: bool):
        from annotator.decode.builder import RunAnnotator
        from annotator.model.load import load_model

        lm = load_model(cfg.model, "cuda" if gpu else "cpu")  # Ray sets CUDA_VISIBLE_DEVICES
        self.annotator = RunAnnotator(cfg, lm)
        self.runtime = json.dumps(self.annotator.runtime)
        self.name = f"{socket.gethostname()}:{os.getpid()}"

    def __call__(self, calls: dict) -> dict:
        """Columns of engine batches in, columns of their rows out (one row per engine batch): the
        batches go through one engine stream, and come out as they finish."""
        ids = [int(b) for b in calls["batch"]]
        for b in ids:
            _maybe_die(b)
        decoded = [pickle.loads(d) for d in calls["decoded"]]
        pairs = [pair for batch in decoded for pair in batch]  # (work item, image or its error), call order
        dataset = self.annotator.dataset([item for item, _ in pairs], decoded_opener(pairs))
        owner, size, batches, start = {}, {}, [], 0
        for b, batch in zip(ids, decoded):
            owner.update((item.ref.key, b) for item, _ in batch)
            size[b] = len(batch)
            batches.append(dataset.collate([dataset[i] for i in range(start, start + len(batch))]))
            start += len(batch)
        out: dict[str, list] = {k: [] for k in ("batch", "images", "actor", "runtime", "rows", "quality")}
        for rows in self.annotator.annotate_stream(dataset, batches):
            b = owner[rows[0].image]
            for key, value in (("batch", b), ("images", size[b]), ("actor", self.name), ("runtime", self.runtime),
                               ("rows", pickle.dumps(rows)), ("quality", json.dumps(self.annotator.take_stats()))):
                out[key].append(value)
        return out


def _maybe_die(batch: int) -> None:
    spec = os.environ.get(TEST_KILL, "")
    if spec:
        wanted, _, marker = spec.partition(":")
        if int(wanted) == batch and not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(9)  # the actor dies holding the batch, without cleanup


def launch_ray(cfg: RunConfig) -> Summary:
    ray = import_ray()  # before the folder is touched: a missing Ray is a usage error
    start = time.monotonic()
    plan = plan_run(cfg)
    summary, work = plan.summary, plan.work
    bar = Bar(cfg.progress)
    writer = plan.folder.writer(cfg, rank=0)
    started = False
    runtimes: dict[str, dict] = {}  # actor -> what it ran with
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
                runtimes[row["actor"]] = runtime = json.loads(row["runtime"])
                if summary.decoding is None:  # the actors' decode path, said once (as `annotate run` does)
                    summary.decoding = runtime.get("decoding")
                    log.log(logging.INFO if summary.decoding == "scheduler" else logging.WARNING,
                            "decoding: %s", summary.decoding)
                bar.update(row["images"])
    except BaseException:
        writer.flush()
        plan.folder.abandon(plan.opened)
        raise
    finally:
        bar.close()
        if started:
            ray.shutdown()
    writer.flush()
    summary.seconds = time.monotonic() - start
    plan.finish(cfg, merge_runtimes(list(runtimes.values())))  # no actor ran: the folder's earlier record
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
    return ds.map_batches(AnnotateActor, batch_size=ACTOR_BATCHES, batch_format="numpy",
                          fn_constructor_args=(cfg, plan.gpu), compute=ray.data.ActorPoolStrategy(size=plan.actors),
                          num_gpus=1 if plan.gpu else 0, num_cpus=actor_cpus)
