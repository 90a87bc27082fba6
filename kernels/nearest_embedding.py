"""Nearest-embedding rounding: each vector to its nearest row of an embedding table (L2).

Math, per vector x (d) and table E (V, d):

    id  = argmin_v ‖x − E_v‖² = argmax_v (x·E_v − ½‖E_v‖²)       (‖x‖² is the same for every v)
    x'  = E_id                                                   the snapped vector

`nearest_embedding` is one fused pass: the scores of a chunk of the table are one addmm
(−½‖E‖² + x·Eᵀ), reduced to a running (max, argmax) and gathered at the end, so memory is
O(N · chunk) whatever V; no host sync (no `.item()`, no branch on values). It is Diffusion-LM's
"clamping trick" and its final rounding (dglm.engine.methods.diffusion_lm). `nearest_embedding_ref`
is the plain definition in float64 (cdist, argmin). On CUDA the same PyTorch pass runs (a Triton
twin is future work: the chunked addmm is already one GEMM per chunk).
"""

from __future__ import annotations

import torch

DEFAULT_CHUNK = 4096  # table rows scored per addmm


def half_sq_norms(table: torch.Tensor) -> torch.Tensor:
    """½‖E_v‖² (V,) fp32: precompute once per table and pass to `nearest_embedding`."""
    return 0.5 * table.float().pow(2).sum(-1)


def nearest_embedding(
    x: torch.Tensor,  # (..., d)
    table: torch.Tensor,  # (V, d)
    half_norms: torch.Tensor | None = None,  # (V,) ½‖E_v‖², from `half_sq_norms`
    chunk: int = DEFAULT_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (...,) long, snapped (..., d) in x's dtype): the nearest table row of each vector.

    Scores in fp32, chunked over the table; ties go to the lowest id within a chunk (argmax's
    rule) and to the earlier chunk across chunks."""
    if chunk < 1:
        raise ValueError(f"chunk must be a positive integer, got {chunk!r}")
    lead, d = x.shape[:-1], x.shape[-1]
    assert table.shape[1] == d, (table.shape, x.shape)
    flat = x.reshape(-1, d).float()  # (N, d)
    tab = table.float()
    hn = half_sq_norms(tab) if half_norms is None else half_norms.float()
    best = ids = None
    for start in range(0, tab.shape[0], chunk):
        part = tab[start : start + chunk]  # (C, d)
        scores = torch.addmm(-hn[start : start + chunk], flat, part.T)  # (N, C) x·E − ½‖E‖²
        val, idx = scores.max(dim=-1)  # (N,)
        idx = idx + start
        if best is None:
            best, ids = val, idx
        else:
            better = val > best
            best, ids = torch.where(better, val, best), torch.where(better, idx, ids)
    assert ids is not None, "empty table"
    return ids.reshape(lead), table[ids].to(x.dtype).reshape(x.shape)


def nearest_embedding_ref(
    x: torch.Tensor,
    table: torch.Tensor,
    half_norms: torch.Tensor | None = None,
    chunk: int = DEFAULT_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The definition: argmin of the float64 L2 distances (same signature; `half_norms` and
    `chunk` are ignored)."""
    lead, d = x.shape[:-1], x.shape[-1]
    dist = torch.cdist(x.reshape(-1, d).double(), table.double())  # (N, V)
    ids = dist.argmin(dim=-1)
    return ids.reshape(lead), table[ids].to(x.dtype).reshape(x.shape)


__all__ = ["half_sq_norms", "nearest_embedding", "nearest_embedding_ref"]
