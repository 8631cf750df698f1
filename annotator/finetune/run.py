"""The entry point: one process, several spawned DDP processes (--devices), or a torchrun rank."""

from __future__ import annotations

import multiprocessing as mp
import os
import socket

import torch

from ..config import ConfigError, FinetuneConfig
from .data import FinetuneError
from .loop import FinetuneResult, train


def finetune(cfg: FinetuneConfig) -> FinetuneResult:
    """Entry point: one process, several spawned DDP processes (--devices), or a torchrun rank."""
    from annotator.run.launch import parse_devices, torch_device, torchrun_env

    env = torchrun_env()
    if env is not None and env.world > 1:
        device = f"cuda:{env.local_rank}" if torch.cuda.is_available() else "cpu"
        return train(cfg, env.rank, env.world, device)
    devices = parse_devices(cfg.devices)
    if len(devices) == 1:
        return train(cfg, 0, 1, torch_device(devices[0]))
    return _spawn(cfg, devices)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(cfg: FinetuneConfig, devices: list[str]) -> FinetuneResult:
    """One process per device, DDP over a local rendezvous (nccl on GPUs, gloo on CPU workers)."""
    from annotator.run.launch import cpu_threads, torch_device

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    threads = cpu_threads(devices)
    procs = [ctx.Process(target=_spawned, args=(cfg, rank, len(devices), torch_device(d), port, threads, results))
             for rank, d in enumerate(devices)]
    for p in procs:
        p.start()
    result = None
    try:
        while any(p.is_alive() for p in procs) and result is None:
            try:
                result = results.get(timeout=0.5)
            except Exception:  # noqa: BLE001 - queue.Empty
                continue
        for p in procs:
            p.join()
    except KeyboardInterrupt:
        for p in procs:
            if p.is_alive():
                p.terminate()
        raise
    failed = [f"rank {r} ({devices[r]}) exited with code {p.exitcode}" for r, p in enumerate(procs) if p.exitcode]
    if isinstance(result, str):
        raise FinetuneError(result)
    if failed or result is None:
        raise FinetuneError("; ".join(failed) or "no result from rank 0")
    return result


def _spawned(cfg, rank, world, device, port, threads, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    if threads:
        torch.set_num_threads(threads)
    try:
        result = train(cfg, rank, world, device)
    except (FinetuneError, ConfigError) as exc:
        if rank == 0:
            results.put(str(exc))
        raise SystemExit(2)
    if rank == 0:
        results.put(result)
