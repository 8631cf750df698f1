"""Which dtype `--dtype auto` runs, decided from the hardware, and the reason (the bench prints it).

GPU: bfloat16 on compute capability >= 8.0 (Ampere and later: bf16 tensor cores, fp32's range, so
no overflow in the vision tower's activations), float16 below (tensor cores, but no bf16).

CPU: bfloat16 only where it is fast end to end, which takes Intel AMX (tile matmuls: 2348 GFLOP/s
bf16 against 321 fp32 on 2 threads, 7.3x, issue 28). AVX512-BF16 without AMX (AMD EPYC Zen 4/5,
Intel Cooper Lake) has bf16 dot products only: measured on a 2-core AMD EPYC, a 2048^3 matmul
ran 2-3x the fp32 rate, but the demo model's `annotate run` and random:base's bench were no
faster in bf16 end to end (README, "Half precision"), because at Florence-2's decode shapes the
time goes to memory-bound work (attention over the KV cache, layer norms, cache writes) that bf16
does not speed up on this CPU. So auto keeps float32 there; `--dtype bfloat16` still runs it.
CPUs with neither: float32 (bf16 is emulated, and float16 has no fast CPU kernels at all).

What stays float32 inside a bf16 run is listed in the README ("Half precision"): token log-softmax
and scores, beam scores, the fine-tuning loss."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from annotator.config import DTYPES


@dataclass(frozen=True)
class DtypeChoice:
    dtype: torch.dtype
    reason: str  # why auto picked it (printed by the bench, logged by a run)


# CPU flag (as /proc/cpuinfo spells it) -> what auto runs when the CPU has it; first match wins.
CPU_POLICY: list[tuple[str, DtypeChoice]] = [
    ("amx_bf16", DtypeChoice(torch.bfloat16, "CPU has AMX (amx_bf16): bf16 matmuls several times fp32")),
    ("avx512_bf16", DtypeChoice(torch.float32, "CPU has avx512_bf16 but no AMX: bf16 was not faster end to end "
                                               "on such a CPU (README, Half precision); --dtype bfloat16 to force")),
]
CPU_DEFAULT = DtypeChoice(torch.float32, "CPU without bf16 instructions: float32")

# Pins what auto means on every device, for sites (and the test suite) that need the same numbers on
# every machine: an AMX CPU would otherwise run bf16 where another runs float32, and bf16 is not exact.
PIN_ENV = "FLORENCE_ANNOTATE_AUTO_DTYPE"
PINNABLE = {name: getattr(torch, name) for name in DTYPES if name != "auto"}

log = logging.getLogger(__name__)


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The CPU's feature flags (Linux); elsewhere torch's own checks for the two that matter."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    probes = {"amx_bf16": "_is_amx_tile_supported", "avx512_bf16": "_is_avx512_bf16_supported"}
    return frozenset(flag for flag, fn in probes.items() if getattr(torch.cpu, fn, lambda: False)())


def cpu_choice(flags: frozenset[str]) -> DtypeChoice:
    return next((choice for flag, choice in CPU_POLICY if flag in flags), CPU_DEFAULT)


def cuda_choice(capability: tuple[int, int]) -> DtypeChoice:
    if capability >= (8, 0):
        return DtypeChoice(torch.bfloat16, f"GPU capability {capability[0]}.{capability[1]} >= 8.0: bf16")
    return DtypeChoice(torch.float16, f"GPU capability {capability[0]}.{capability[1]} < 8.0: no bf16, fp16")


def auto_dtype(device: torch.device) -> DtypeChoice:
    """What `--dtype auto` runs on `device`."""
    pinned = os.environ.get(PIN_ENV, "").strip()
    if pinned in PINNABLE:
        return DtypeChoice(PINNABLE[pinned], f"{PIN_ENV}={pinned}")
    if pinned:
        log.warning("%s=%s is not one of %s: ignored, auto follows the hardware", PIN_ENV, pinned, ", ".join(PINNABLE))
    if device.type == "cuda":
        return cuda_choice(torch.cuda.get_device_capability(device))
    if device.type == "cpu":
        return cpu_choice(cpu_flags())
    return DtypeChoice(torch.float32, f"{device.type}: float32")
