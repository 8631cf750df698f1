"""Self-attention of one decoder step over rows far apart in length (scheduler.py), without a
Python loop over rows: the rows are grouped by length in powers of two (1, 2, 3-4, 5-8, ...), and
each group is one masked attention over its own longest row, so no group reads more than twice its
rows' real keys. The number of groups is bounded by log2(longest answer) + 1 (11 at 1024 tokens),
whatever the rows in flight: the ops a step dispatches stay flat in the rows.

The grouping is planned on the host from the rows' lengths the host already keeps
(SlotCache.host_pos): nothing is read back from the device."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Group:
    rows: torch.Tensor  # [m] slot indices
    keys: int  # the group's longest row
    mask: torch.Tensor  # [m, 1, 1, keys]: True where a row has a key


def plan(lengths: np.ndarray, device: torch.device) -> list[Group]:
    """lengths [n] (keys per row, >= 1, on the host) -> the groups, once per step (every layer uses them)."""
    bucket = np.ceil(np.log2(lengths)).astype(np.int64)
    groups = []
    for b in np.unique(bucket):
        rows = np.flatnonzero(bucket == b)
        keys = int(lengths[rows].max())
        have = torch.as_tensor(lengths[rows], device=device)
        mask = (torch.arange(keys, device=device)[None, :] < have[:, None])[:, None, None, :]
        groups.append(Group(torch.as_tensor(rows, device=device), keys, mask))
    return groups


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: list[Group], scale: float) -> torch.Tensor:
    """q [n, H, 1, hd], one layer's cache k, v [slots, H, T, hd] -> attention output [n, H, 1, hd]."""
    out = torch.empty_like(q)
    for g in groups:
        o = F.scaled_dot_product_attention(q.index_select(0, g.rows), k[:, :, :g.keys].index_select(0, g.rows),
                                           v[:, :, :g.keys].index_select(0, g.rows), g.mask, scale=scale)
        out.index_copy_(0, g.rows, o)
    return out
