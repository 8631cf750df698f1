"""Devices -> worker processes.

- one device: the run happens in this process;
- several devices on this machine: one spawned worker per device, each with its own model
  and DataLoader, pulling chunks of work from one queue (a slow device just takes fewer
  chunks; a chunk is handed out once), one progress bar in the parent;
- under torchrun (RANK / WORLD_SIZE / LOCAL_RANK set): this process takes its share of the
  images by global rank and uses its local device; rank 0 owns the folder and reports.
Several CPU workers behave exactly like several GPUs, which is how this is tested."""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
import time
from dataclasses import dataclass

import torch
from annotator.config import ConfigError, RunConfig
from annotator.decode.builder import RunAnnotator
from annotator.model import ModelLoadError
from annotator.model.load import load_model
from annotator.outdir.folder import OutputFolder
from annotator.run.device import BatchDone, Plan, Summary, announce_decoding, annotate_work, merge_runtimes, plan_run, run
from annotator.run.progress import Bar

log = logging.getLogger(__name__)


def parse_devices(spec: str) -> list[str]:
    """`auto` -> every visible GPU, else cpu; `cuda` -> every GPU; `cuda:0,1` or `cuda:0,cuda:1`;
    `cpu`; `cpu:0,cpu:1` -> two CPU workers (they share the cores)."""
    spec = spec.strip().lower()
    n_gpu = torch.cuda.device_count()
    if spec == "auto":
        return [f"cuda:{i}" for i in range(n_gpu)] or ["cpu"]
    if spec == "cuda":
        if not n_gpu:
            raise ConfigError("--devices cuda: no GPU is visible; use --devices cpu")
        return [f"cuda:{i}" for i in range(n_gpu)]
    devices, kind = [], None
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        if ":" in part or part in ("cpu", "cuda"):
            kind, _, index = part.partition(":")
        else:
            index = part  # `cuda:0,1`: a bare index repeats the previous kind
        if kind not in ("cpu", "cuda") or (index and not index.isdigit()):
            raise ConfigError(f"--devices: cannot read {part!r}; use auto, cpu, cuda, cuda:0,1 or cpu:0,cpu:1")
        if kind == "cuda" and index and int(index) >= n_gpu:
            raise ConfigError(f"--devices: cuda:{index} does not exist ({n_gpu} GPUs visible)")
        devices.append(f"{kind}:{index}" if index else kind)
    if not devices:
        raise ConfigError("--devices is empty; use auto, cpu, cuda or cuda:0,1")
    return devices


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world: int
    local_rank: int


def torchrun_env() -> DistEnv | None:
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return DistEnv(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    return None


def torch_device(name: str) -> str:
    """`cpu:1` names the second CPU worker, not a device torch knows."""
    return "cpu" if name.startswith("cpu") else name


def cpu_threads(devices: list[str]) -> int:
    """Torch threads for each spawned worker (0: leave the default): CPU workers share the
    cores, so each gets its part instead of all of them contending for every core."""
    cpu = sum(d.startswith("cpu") for d in devices)
    return max(1, (os.cpu_count() or 1) // cpu) if cpu else 0


def launch(cfg: RunConfig) -> Summary:
    if cfg.ray:
        from annotator.run.raydata import launch_ray  # Ray is an optional extra

        return launch_ray(cfg)
    env = torchrun_env()
    if env is not None and env.world > 1:
        return launch_torchrun(cfg, env)
    devices = parse_devices(cfg.devices)
    if len(devices) == 1:
        bar = Bar(cfg.progress)
        try:
            return run(cfg, torch_device(devices[0]), progress=bar)
        finally:
            bar.close()
    return launch_local(cfg, devices)


# ------------------------------------------------------------------ one machine, many devices

@dataclass(frozen=True)
class WorkerEvent:
    """What a spawned worker tells the parent: a batch is done, or it failed (and is exiting)."""

    rank: int
    done: BatchDone | None = None
    failure: str | None = None  # first line of the error
    runtime: dict | None = None  # the model is loaded: what it runs with (the manifest records it)


def chunk_size(cfg: RunConfig) -> int:
    return cfg.batch_size * 4  # small enough to balance the tail, large enough to keep decoders busy


def launch_local(cfg: RunConfig, devices: list[str]) -> Summary:
    start = time.monotonic()
    plan = plan_run(cfg)
    summary = plan.summary
    work = plan.work
    step = chunk_size(cfg)
    ctx = mp.get_context("spawn")  # never fork a process that may have touched CUDA
    jobs, events = ctx.Queue(), ctx.Queue()
    for i in range(0, len(work), step):
        jobs.put(work[i:i + step])
    for _ in devices:
        jobs.put(None)  # one stop sign per worker
    threads = cpu_threads(devices)
    procs = [ctx.Process(target=worker_main, args=(rank, dev, cfg, jobs, events, threads))
             for rank, dev in enumerate(devices)]
    summary.per_worker = {rank: 0 for rank in range(len(devices))}  # a worker that got no chunk shows 0
    bar = Bar(cfg.progress)
    bar.start(len(work))
    runtimes: list[dict] = []
    try:
        for p in procs:
            p.start()
        _supervise(procs, devices, events, summary, bar, runtimes)
        summary.seconds = time.monotonic() - start
        load_errors = [f for f in summary.failed_workers if "cannot load model" in f]
        if load_errors and len(load_errors) == len(devices):
            raise ModelLoadError(load_errors[0].split(": ", 1)[1])
    except BaseException:
        for p in procs:
            if p.is_alive():
                p.terminate()  # SIGTERM (Ctrl-C): each worker flushes its finished rows and stops
        for p in procs:
            if p.pid is not None:
                p.join(timeout=30)
        plan.folder.abandon(plan.opened)
        raise
    finally:
        bar.close()
    plan.finish(cfg, merge_runtimes(runtimes), torch_device(devices[0]))
    return summary


def _supervise(procs, devices, events, summary: Summary, bar: Bar, runtimes: list[dict]) -> None:
    """Relay progress until every worker has exited; note those that died or failed, and what
    the others ran with."""
    reported: set[int] = set()

    def handle(event: WorkerEvent) -> None:
        if event.runtime is not None:
            runtimes.append(event.runtime)
            summary.decoding = summary.decoding or event.runtime.get("decoding")
        if event.done is not None:
            summary.add(event.rank, event.done)
            bar.update(event.done.images)
        if event.failure is not None:
            reported.add(event.rank)
            summary.failed_workers.append(f"rank {event.rank} ({devices[event.rank]}): {event.failure}")

    while any(p.is_alive() for p in procs):
        try:
            handle(events.get(timeout=0.5))
        except queue.Empty:
            pass
    while True:  # what the workers sent just before they exited
        try:
            handle(events.get(timeout=0.1))
        except queue.Empty:
            break
    for rank, p in enumerate(procs):
        p.join()
        if p.exitcode != 0 and rank not in reported:
            summary.failed_workers.append(f"rank {rank} ({devices[rank]}): exited with code {p.exitcode}")


def worker_main(rank: int, device: str, cfg: RunConfig, jobs, events, threads: int) -> None:
    """One device: load the model once, then take chunks until the stop sign."""
    from annotator.run.signals import stop_on_signals

    if threads:
        torch.set_num_threads(threads)
    writer = OutputFolder(cfg.out).writer(cfg, rank)
    try:
        with stop_on_signals(130):
            lm = load_model(cfg.model, torch_device(device))
            annotator = RunAnnotator(cfg, lm)
            announce_decoding(annotator, log_it=rank == 0)
            events.put(WorkerEvent(rank, runtime=annotator.runtime))
            on_batch = lambda done: events.put(WorkerEvent(rank, done=done))  # noqa: E731
            while True:
                chunk = jobs.get()
                if chunk is None:
                    break
                _test_kill_hook(chunk)
                annotate_work(cfg, annotator, chunk, writer, on_batch)
    except KeyboardInterrupt:
        raise SystemExit(130)
    except BaseException as exc:  # report, then die non-zero: the parent names the failed worker
        events.put(WorkerEvent(rank, failure=str(exc).splitlines()[0] if str(exc) else type(exc).__name__))
        raise SystemExit(1)
    finally:
        writer.flush()


def _test_kill_hook(chunk) -> None:
    """Test hook (tests/test_launch.py), never set in use: FLORENCE_ANNOTATE_TEST_KILL_IMAGE=<key>
    makes whichever worker takes the chunk holding that image die like a killed process (no
    cleanup, no report), so that chunk's rows are lost and must come back on resume. Keyed by
    image, not by rank: which rank gets which chunk is a race, which chunk is lost is not."""
    key = os.environ.get("FLORENCE_ANNOTATE_TEST_KILL_IMAGE")
    if key and any(w.ref.key == key for w in chunk):
        os._exit(9)


# ------------------------------------------------------------------ torchrun: many machines

def launch_torchrun(cfg: RunConfig, env: DistEnv) -> Summary:
    """Rank 0 discovers, prepares the folder and hands every rank its share, work[rank::world], so all
    ranks split one list (each rank discovering for itself would split different lists if the folder
    changed in between: rows doubled or missed); rank 0 reports. torch.distributed (gloo, over the
    rendezvous torchrun already runs) carries the shares."""
    import torch.distributed as dist

    if "MASTER_ADDR" not in os.environ:
        raise ConfigError("RANK and WORLD_SIZE are set but MASTER_ADDR is not: start several processes "
                          "with torchrun (or set the torch.distributed variables)")
    if not dist.is_initialized():
        dist.init_process_group("gloo", rank=env.rank, world_size=env.world)
    owner = env.rank == 0
    plan = plan_run(cfg) if owner else None
    shares = [plan.work[r::env.world] for r in range(env.world)] if owner else None
    mine: list = [None]
    dist.scatter_object_list(mine, shares, src=0)  # also the barrier: rank 0 has checked the folder
    share = mine[0]
    if not owner:  # counts of its own rows only: rank 0 reports skipped and already-done files
        plan = Plan(OutputFolder(cfg.out), OutputFolder(cfg.out).joined(share), Summary())
    device = f"cuda:{env.local_rank}" if torch.cuda.is_available() else "cpu"
    start = time.monotonic()
    bar = Bar(cfg.progress and owner)
    bar.start(len(share))
    writer = plan.folder.writer(cfg, env.rank)
    annotator = None
    try:
        if share:
            annotator = RunAnnotator(cfg, load_model(cfg.model, device))
            plan.summary.decoding = announce_decoding(annotator, log_it=owner)

        def on_batch(done: BatchDone) -> None:
            plan.summary.add(env.rank, done)
            bar.update(done.images)

        if share:
            annotate_work(cfg, annotator, share, writer, on_batch)
    except BaseException:
        if owner:
            plan.folder.abandon(plan.opened)
        raise
    finally:
        writer.flush()
        bar.close()
    plan.summary.seconds = time.monotonic() - start
    reports: list = [None] * env.world
    dist.all_gather_object(reports, (plan.summary, annotator.runtime if annotator is not None else None))
    if owner:
        plan.summary = _merge([summary for summary, _ in reports])
        plan.finish(cfg, merge_runtimes([runtime for _, runtime in reports if runtime]), device)
    dist.destroy_process_group()
    return plan.summary


def _merge(parts: list[Summary]) -> Summary:
    total = Summary(skipped=parts[0].skipped, already_done=parts[0].already_done,
                    decoding=next((s.decoding for s in parts if s.decoding), None))
    for s in parts:
        total.images += s.images
        total.rows_ok += s.rows_ok
        total.rows_error += s.rows_error
        total.per_worker.update(s.per_worker)
        total.add(0, BatchDone(0, 0, 0, s.quality))
        total.seconds = max(total.seconds, s.seconds)
    return total
