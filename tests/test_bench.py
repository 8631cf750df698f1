"""`annotate bench` on the tiny random model: output structure and equal work on both sides.
No timing assertions: timed tests flake; the speed figures live in the README's bench table."""

import json
import re

import pytest
from click.testing import CliRunner

from annotator.cli import cli

TOKENS = {"caption": 3, "od": 5, "dense_region_caption": 7, "ocr": 4}
LAST_LINE = re.compile(r"^speedup=(\d+\.\d+|n/a) ceiling=\d+\.\d+$")


def invoke(*args):
    return CliRunner().invoke(cli, ["bench", "--model", "random:tiny", "--images", "2", "--batch-size", "2",
                                    "--matmul-size", "512",
                                    "--tokens", ",".join(f"{k}={v}" for k, v in TOKENS.items() if k in tasks_of(args).split(",")), *args])


def tasks_of(args) -> str:
    return args[args.index("--tasks") + 1] if "--tasks" in args else ",".join(TOKENS)


def test_bench_with_baseline(tmp_path):
    out = tmp_path / "bench.json"
    result = invoke("--num-beams", "2", "--baseline", "--json", str(out))
    assert result.exit_code == 0, result.output
    last = result.output.strip().splitlines()[-1]
    assert LAST_LINE.match(last) and not last.startswith("speedup=n/a"), last

    data = json.loads(out.read_text())
    for key in ("model", "dtype", "device", "threads", "tasks", "num_beams", "images", "batch_size", "forced_tokens",
                "matmul_gflops", "ceiling_gflops", "fp32_ceiling_gflops", "engine", "baseline", "tokens_equal", "speedup", "cpu_speedup", "ceiling"):
        assert key in data, key
    for side in ("engine", "baseline"):
        for key in ("images", "seconds", "cpu_seconds", "images_per_s", "gflops", "flops_per_image", "tokens"):
            assert key in data[side], (side, key)
        assert data[side]["cpu_seconds"] > 0
        assert data[side]["images"] == 2
        assert data[side]["flops_per_image"] > 0
    assert "peak_memory_bytes" in data["engine"] and data["engine"]["peak_memory_bytes"] > 0
    # Forced lengths: exactly n new tokens per task and image, the same on both sides.
    expected = {task: 2 * n for task, n in TOKENS.items()}
    assert data["engine"]["tokens"] == expected
    assert data["baseline"]["tokens"] == expected
    assert data["tokens_equal"] is True
    assert last == f"speedup={data['speedup']:.2f} ceiling={data['ceiling']:.3f}"
    assert data["cpu_speedup"] == data["baseline"]["cpu_seconds"] / data["engine"]["cpu_seconds"]
    assert f"-> {data['cpu_speedup']:.2f}x (process CPU time" in result.output


def test_bench_without_baseline_says_na():
    result = invoke("--num-beams", "1")
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1].startswith("speedup=n/a ceiling=")
    assert "(auto: " in result.output  # --dtype auto says why it picked what it ran


def test_bench_in_bf16_prints_the_fp32_ceiling_beside(tmp_path):
    out = tmp_path / "bench.json"
    result = invoke("--num-beams", "1", "--dtype", "bfloat16", "--tasks", "caption,od", "--json", str(out))
    assert result.exit_code == 0, result.output
    ceiling = next(line for line in result.output.splitlines() if line.startswith("matmul ceiling (best"))
    assert ceiling.startswith("matmul ceiling (best of start and end): bfloat16 ") and "|  float32 " in ceiling
    data = json.loads(out.read_text())
    assert data["dtype"] == "bfloat16" and data["fp32_ceiling_gflops"] > 0 and data["dtype_reason"] is None


def test_bench_rejects_bad_tokens_and_input_tasks():
    bad = CliRunner().invoke(cli, ["bench", "--model", "random:tiny", "--tokens", "od=zero"])
    assert bad.exit_code == 2 and "--tokens" in bad.output
    region = CliRunner().invoke(cli, ["bench", "--model", "random:tiny", "--tasks", "od,region_to_category"])
    assert region.exit_code == 2 and "region_to_category" in region.output


@pytest.mark.parametrize("num_beams", ["1", "2"])
def test_bench_realistic_lengths_are_drawn_per_row_and_equal_on_both_sides(tmp_path, num_beams):
    """--lengths realistic: each (image, task) gets its seeded length; the engine (greedy or
    beams: the scheduler) and the reference write exactly those; slot efficiency is reported."""
    from annotator.bench.lengths import draw_lengths

    out = tmp_path / "bench.json"
    result = CliRunner().invoke(cli, ["bench", "--model", "random:tiny", "--tasks", "caption", "--images", "3",
                                      "--batch-size", "2", "--matmul-size", "256", "--num-beams", num_beams,
                                      "--lengths", "realistic", "--seed", "5", "--baseline", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "slot efficiency" in result.output
    data = json.loads(out.read_text())
    drawn = draw_lengths("realistic", ["caption"], 3, {}, seed=5)
    assert len({row["caption"] for row in drawn}) > 1  # lengths differ between images
    assert data["engine"]["tokens"] == data["baseline"]["tokens"] == {"caption": sum(r["caption"] for r in drawn)}
    assert data["lengths"] == "realistic" and data["decode"]["scheduler"] is True
    assert data["decode"]["efficiency"] == 1.0 and 0 < data["decode"]["occupancy"] <= 1.0
