"""Batch buckets for anything captured or exported with a fixed batch: one helper for the CUDA-graph
decode runner, the captured diffusion sampler and the ONNX Runtime graphs.

A batch of n rows runs in the smallest bucket ≥ n (`round_up`, by `bisect`); a batch above the
largest bucket is split into chunks of it (`row_chunks`); rows past n are filler (`pad_rows`) and
sliced off afterwards.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import torch


def round_up(sizes: Sequence[int], n: int, setting: str) -> int:
    """The smallest of the sorted bucket `sizes` ≥ n (bisect); ValueError naming `setting` (the
    option that holds the buckets) when n is < 1 or above the largest."""
    i = bisect.bisect_left(sizes, n)
    if n < 1 or i == len(sizes):
        raise ValueError(f"{n} does not fit the largest bucket {sizes[-1]}: raise {setting}")
    return sizes[i]


def bucket_index(sizes: Sequence[int], n: int) -> int:
    """Index of n in the sorted bucket `sizes`, or −1 when n is not a bucket."""
    i = bisect.bisect_left(sizes, n)
    return i if i < len(sizes) and sizes[i] == n else -1


def row_chunks(n: int, size: int) -> list[slice]:
    """Rows [0, n) in consecutive chunks of at most `size` rows."""
    return [slice(s, min(s + size, n)) for s in range(0, n, size)]


def pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """Pad dim 0 to `rows` with copies of row 0 (valid inputs, independent of the live rows)."""
    n = t.shape[0]
    return t if n == rows else torch.cat((t, t[:1].expand(rows - n, *t.shape[1:])))


__all__ = ["bucket_index", "pad_rows", "round_up", "row_chunks"]
