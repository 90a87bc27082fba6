"""Nearest-embedding rounding: the chunked fused pass against the float64 definition."""

from __future__ import annotations

import pytest
import torch
from dglm.kernels.nearest_embedding import (
    half_sq_norms,
    nearest_embedding,
    nearest_embedding_ref,
)


@pytest.mark.parametrize(
    ("shape", "vocab", "chunk", "dtype"),
    [
        ((9, 41, 16), 341, 100, torch.float32),  # odd shapes, several chunks, a short last one
        ((4, 32), 4096, 4096, torch.float32),
        ((3, 7, 8), 64, 1, torch.float32),  # one row per chunk: the cross-chunk merge
        ((5, 12, 32), 1000, 300, torch.bfloat16),
    ],
)
def test_nearest_embedding_equals_reference(gen, shape, vocab, chunk, dtype):
    d = shape[-1]
    table = torch.randn(vocab, d, generator=gen).to(dtype)
    # points near random rows, plus points anywhere
    near = table.float()[torch.randint(0, vocab, shape[:-1], generator=gen)]
    x = (near + 0.3 * torch.randn(shape, generator=gen)).to(dtype)
    x.view(-1, d)[::3] = torch.randn(x.view(-1, d)[::3].shape, generator=gen).to(dtype)
    ids, snapped = nearest_embedding(x, table, half_sq_norms(table), chunk=chunk)
    ref_ids, ref_snapped = nearest_embedding_ref(x, table)
    assert ids.shape == shape[:-1] and snapped.shape == shape and snapped.dtype == dtype
    # where they differ, the two rows are equally near up to fp32 rounding of the scores
    dist = torch.cdist(x.reshape(-1, d).double(), table.double())  # (N, V)
    picked = dist.gather(1, ids.reshape(-1, 1)).squeeze(1)
    best = dist.gather(1, ref_ids.reshape(-1, 1)).squeeze(1)
    gap = (picked.pow(2) - best.pow(2)).abs()
    assert (gap <= 1e-4 * (1 + best.pow(2))).all()
    assert (ids == ref_ids).float().mean() > 0.99
    torch.testing.assert_close(snapped, table[ids])
    same = ids == ref_ids
    torch.testing.assert_close(snapped[same], ref_snapped[same])


def test_nearest_embedding_exact_rows_map_to_themselves(gen):
    table = torch.randn(77, 24, generator=gen)
    ids, snapped = nearest_embedding(table, table, chunk=10)
    assert torch.equal(ids, torch.arange(77))
    assert torch.equal(snapped, table)


def test_nearest_embedding_refuses_bad_chunk(gen):
    with pytest.raises(ValueError, match="chunk"):
        nearest_embedding(
            torch.randn(2, 4, generator=gen), torch.randn(5, 4, generator=gen), chunk=0
        )
