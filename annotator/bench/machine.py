"""What the bench measures besides time: the machine's matmul ceiling (GFLOP/s), the FLOPs of a
call (torch's FlopCounterMode, taught the oneDNN Linear), peak memory, and a device sync so
that timings include the GPU's queued work."""

from __future__ import annotations

import contextlib
import resource
import sys
import time


def matmul_rates(dtype, device, n: int | None = None, reps: int = 5) -> dict[str, float]:
    """GFLOP/s of a large dense matmul in `dtype`: torch.mm, and on CPU also the oneDNN Linear
    the engine uses (on AMD the two differ by 2x). The best is the machine's ceiling."""
    import torch

    from annotator.model.cpu_kernels import onednn_available

    n = n or (8192 if device.type == "cuda" else 3072)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    kernels = {"torch.mm": lambda: torch.mm(a, b)}
    if device.type == "cpu" and onednn_available():
        kernels["onednn"] = lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")
    rates = {}
    for name, fn in kernels.items():
        fn()
        best = float("inf")
        for _ in range(reps):
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            best = min(best, time.perf_counter() - t)
        rates[name] = 2 * n ** 3 / best / 1e9
    return rates


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_bytes(device) -> int:
    """GPU: torch's peak allocation. CPU: the process's peak RSS (Linux reports KiB)."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024



def count_flops(fn) -> int:
    """FLOPs of fn() by torch's FlopCounterMode (matmuls, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    _register_onednn_flops()
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


_registered = False


def _register_onednn_flops() -> None:
    """Teach FlopCounterMode the oneDNN Linear (cpu_kernels.py): x [..., K] @ w[N, K]^T."""
    global _registered
    import torch

    from annotator.model.cpu_kernels import onednn_available

    if _registered or not onednn_available():
        return
    from torch.utils.flop_counter import register_flop_formula

    @register_flop_formula(torch.ops.mkldnn._linear_pointwise)
    def _linear_flops(x_shape, w_shape, *args, **kwargs) -> int:
        rows = 1
        for d in x_shape[:-1]:
            rows *= d
        return 2 * rows * x_shape[-1] * w_shape[0]

    _registered = True


@contextlib.contextmanager
def clocked(side, device):
    """Adds the block's wall and process CPU seconds to side.seconds / side.cpu_seconds (the device
    synchronized at its end: queued GPU work is counted where it was asked for)."""
    t, c = time.perf_counter(), time.process_time()
    try:
        yield
    finally:
        sync(device)
        side.seconds += time.perf_counter() - t
        side.cpu_seconds += time.process_time() - c
