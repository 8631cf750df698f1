"""One self-attention call of a decoder step over rows of uneven length: the padded masked read
(every row up to the longest) against attention by length groups (annotator/decode/ragged.py), on
this CPU, one thread. What DecodeScheduler.RAGGED_WASTE is set from.

    OMP_NUM_THREADS=1 python examples/bench_ragged.py

Rows: a share p of long answers (600-800 keys), the rest short (10-40); waste = rows x longest /
sum of lengths (what the scheduler compares with RAGGED_WASTE). Shapes: 48 rows x 12 heads x 64
(Florence-2-base, 16 prompts x beams 3) and 768 rows x 2 heads x 16 (random:tiny, 256 x 3).
Each figure is the fastest of 10 calls."""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from annotator.decode import ragged


def fastest(fn, reps: int = 10) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def main() -> None:
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    print("rows x heads x dim | long share | waste | padded ms | groups ms")
    for n, heads, dim in ((48, 12, 64), (768, 2, 16)):
        for p in (0.5, 0.3, 0.2, 0.14, 0.1, 0.05):
            lengths = np.where(rng.random(n) < p, rng.integers(600, 800, n), rng.integers(10, 40, n))
            lengths[0] = 800
            k, v = torch.randn(n, heads, 1025, dim), torch.randn(n, heads, 1025, dim)
            q = torch.randn(n, heads, 1, dim)
            t = int(lengths.max())
            mask = (torch.arange(t)[None, :] < torch.as_tensor(lengths)[:, None])[:, None, None, :]
            groups = ragged.plan(lengths, torch.device("cpu"))
            padded = fastest(lambda: F.scaled_dot_product_attention(q, k[:, :, :t], v[:, :, :t], mask, scale=0.125))
            grouped = fastest(lambda: ragged.attend(q, k, v, groups, 0.125))
            print(f"{n} x {heads} x {dim} | {p} | {n * t / lengths.sum():.1f} | {padded:.2f} | {grouped:.2f}")


if __name__ == "__main__":
    main()
