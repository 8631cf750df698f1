"""CPU kernels: route float32 Linear layers (and bfloat16 ones, where the CPU has bf16 instructions)
through oneDNN instead of MKL.

Why: torch's fp32 `F.linear` on x86 calls MKL's sgemm, and MKL takes its AVX2 code path on
non-Intel CPUs. oneDNN uses AVX-512 there. Measured on the 2-core AMD EPYC (AVX-512) CI
machine: 2.1-2.4x the GFLOP/s at every shape Florence-2 uses, from decode steps (M=1..24 rows)
to the 577-token encoder (M=2308): same fp32 precision, only the summation order differs
(~1e-7 relative). On Intel CPUs both libraries are fast, and this is about neutral.

bfloat16 goes through the same op where oneDNN has bf16 kernels (AVX512-BF16 or AMX): torch's own
`F.linear` is addmm, which first copies the bias into the output and then accumulates into it,
where oneDNN fuses the bias. In a torch.profiler trace of the demo model's od run (16 scenes, AMD
EPYC with avx512_bf16) bf16 had one more copy_ per Linear than fp32: 2360 calls, 9 s of 180 s.

The patch replaces each Linear's bound `forward`, nothing else: parameters, state_dict,
save_pretrained and training are untouched (with grad enabled, or off CPU, or for other dtypes
it falls back to F.linear, because the oneDNN op has no backward).
"""

from __future__ import annotations

import contextlib
import types

import torch
import torch.nn.functional as F

_MARK = "_annotator_onednn"


def onednn_dtypes() -> frozenset[torch.dtype]:
    """The dtypes oneDNN's Linear runs natively here: float32 always, bfloat16 where the CPU has
    bf16 instructions (without them oneDNN refuses or emulates, and F.linear is the better path)."""
    bf16 = hasattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported") and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return frozenset({torch.float32, torch.bfloat16} if bf16 else {torch.float32})


_DTYPES: frozenset[torch.dtype] = frozenset()  # set by use_onednn_linear (one CPU query per process)


def _onednn_linear(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if (x.device.type != "cpu" or x.dtype not in _DTYPES or self.weight.dtype != x.dtype
            or (self.bias is not None and self.bias.dtype != x.dtype)
            or (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))):
        return F.linear(x, self.weight, self.bias)
    return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def use_onednn_linear(model: torch.nn.Module) -> int:
    """Patch every nn.Linear of `model` (idempotent). Returns how many were patched."""
    global _DTYPES
    if not onednn_available():
        return 0
    _DTYPES = _DTYPES or onednn_dtypes()
    n = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and not getattr(module, _MARK, False):
            module.forward = types.MethodType(_onednn_linear, module)
            setattr(module, _MARK, True)
            n += 1
    return n


def use_stock_linear(model: torch.nn.Module) -> int:
    """Undo use_onednn_linear. Returns how many were restored."""
    n = 0
    for module in model.modules():
        if getattr(module, _MARK, False):
            del module.forward  # the class's forward shows through again
            delattr(module, _MARK)
            n += 1
    return n


@contextlib.contextmanager
def stock_linear(model: torch.nn.Module):
    """Run a block with torch's own Linear kernels (the reference loop; FLOP counting, which
    does not see the oneDNN op), then put the patch back if it was there."""
    restored = use_stock_linear(model)
    try:
        yield
    finally:
        if restored:
            use_onednn_linear(model)
