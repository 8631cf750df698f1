"""Half precision: what `--dtype auto` picks from the hardware, and bf16 Linear layers on the CPU
going through oneDNN (speed.py) with the answers of torch's own kernel."""

import pytest
import torch

from annotator.model.load import resolve_dtype
from annotator.model.precision import PIN_ENV, auto_dtype, cpu_choice, cpu_flags, cuda_choice
from annotator.model.cpu_kernels import onednn_available, onednn_dtypes, use_onednn_linear


def test_auto_follows_the_hardware(monkeypatch):
    monkeypatch.delenv(PIN_ENV, raising=False)  # the suite pins it (conftest)
    amx = cpu_choice(frozenset({"avx512f", "avx512_bf16", "amx_tile", "amx_bf16"}))
    assert amx.dtype == torch.bfloat16 and "AMX" in amx.reason
    # bf16 dot products without AMX: measured not faster end to end here, so float32 and the reason
    avx = cpu_choice(frozenset({"avx512f", "avx512_bf16"}))
    assert avx.dtype == torch.float32 and "no AMX" in avx.reason
    assert cpu_choice(frozenset({"avx2"})).dtype == torch.float32
    assert cuda_choice((9, 0)).dtype == cuda_choice((8, 0)).dtype == torch.bfloat16
    assert cuda_choice((7, 5)).dtype == torch.float16
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == auto_dtype(cpu).dtype
    assert resolve_dtype("float16", cpu) == torch.float32  # no fast fp16 CPU kernels


def test_the_pin_overrides_the_hardware_and_a_bad_one_is_ignored(monkeypatch, caplog):
    cpu = torch.device("cpu")
    monkeypatch.setattr("annotator.model.precision.cpu_flags", lambda: frozenset({"amx_tile", "amx_bf16"}))
    monkeypatch.delenv(PIN_ENV, raising=False)
    assert auto_dtype(cpu).dtype == torch.bfloat16  # an AMX CPU: bf16 ...
    monkeypatch.setenv(PIN_ENV, "float32")
    choice = auto_dtype(cpu)
    assert choice.dtype == torch.float32 and choice.reason == f"{PIN_ENV}=float32"
    assert resolve_dtype("auto", cpu) == torch.float32  # ... unless pinned
    monkeypatch.setenv(PIN_ENV, "fp8")
    assert auto_dtype(cpu).dtype == torch.bfloat16 and "is not one of" in caplog.text


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16\nbugs\t\t: none\n")
    assert cpu_flags(info) == {"fpu", "sse", "avx512f", "avx512_bf16"}
    assert isinstance(cpu_flags(tmp_path / "missing"), frozenset)  # not Linux: torch's own checks


@pytest.mark.skipif(not onednn_available() or torch.bfloat16 not in onednn_dtypes(),
                    reason="this CPU has no oneDNN bf16 kernels")
def test_bf16_linear_goes_through_onednn_with_the_same_answers():
    """torch's bf16 F.linear is addmm (bias copied into the output, then accumulated); the patched
    Linear must call the fused oneDNN op, and give what F.linear gives."""
    from torch.profiler import profile

    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 48).to(torch.bfloat16).requires_grad_(False)
    x = torch.randn(5, 1, 64, dtype=torch.bfloat16)
    want = torch.nn.functional.linear(x, layer.weight, layer.bias)
    assert use_onednn_linear(layer) == 1
    with profile() as prof:
        got = layer(x)
    ops = {e.key for e in prof.key_averages()}
    assert "mkldnn::_linear_pointwise" in ops and "aten::addmm" not in ops, ops
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2)


def test_finetune_autocast_on_the_cpu():
    """Fine-tuning keeps float32 weights; bf16 autocast on the CPU when asked, or with auto where
    inference runs bf16 too; fp16 never on the CPU."""
    from annotator.finetune import autocast_dtype

    cpu = torch.device("cpu")
    assert autocast_dtype("bf16", cpu) == torch.bfloat16
    assert autocast_dtype("fp16", cpu) is None and autocast_dtype("fp32", cpu) is None
    assert autocast_dtype("auto", cpu) == (torch.bfloat16 if auto_dtype(cpu).dtype == torch.bfloat16 else None)


def test_precision_check_fails_on_a_wrong_answer():
    """examples/precision_check.py (run by examples/gpu_check.sh) must exit 1 when the half dtype
    loses boxes or text, and pass when it only moves a box by a bin."""
    import argparse
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "examples" / "precision_check.py"
    spec = importlib.util.spec_from_file_location("precision_check", path)
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    args = argparse.Namespace(half="bfloat16", max_ap_drop=0.03, max_cer_rise=0.02, min_agreement=0.0)
    fine = {"od_ap50": (0.91, 0.90), "ocr_cer": (0.04, 0.045), "lines_exact": (0.83, 0.82),
            "rows_identical_to_fp32": 0.4, "batch1_rows_identical": 0.9}
    assert check.failures(fine, args) == []
    assert len(check.failures(dict(fine, od_ap50=(0.91, 0.5)), args)) == 1
    assert len(check.failures(dict(fine, ocr_cer=(0.04, 0.9)), args)) == 1
    assert len(check.failures(dict(fine, ocr_cer=(0.04, None)), args)) == 1  # read nothing
    assert len(check.failures(dict(fine, lines_exact=(0.83, 0.5)), args)) == 1
    assert len(check.failures(fine, argparse.Namespace(**dict(vars(args), min_agreement=0.5)))) == 1
