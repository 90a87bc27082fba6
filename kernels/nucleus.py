"""Nucleus sampling on CPU without a vocabulary sort: `sample_nucleus` (C++, kernels/cpp/sampling.cpp).

The decode loop's sampler (dglm.engine.decoding.sampling) draws each token as the Gumbel-max
sample over the top-k / top-p filtered scores. Its torch path finds the nucleus with torch.topk
(256, 2048, 8192 candidates) and, for flat rows, a full sort of the vocabulary: ~2.5 ms per token
at batch 1 on SmolLM2's 49k tokens, one core (an eighth of a fused int8 decode step). The C++
path makes one pass for the max and one for the fp64 normaliser, then sorts only the tokens within
a few nats of the best (widening the window until the mass left outside is itself dropped, so
the decision is the full sort's) and takes the argmax of score + Gumbel noise over the nucleus.
Same inputs, same tokens as the torch path, up to the last bit of a log (a near-tie).
"""

from __future__ import annotations

import torch
from dglm.kernels.native import built, cpu_ops

__all__ = ["available", "sample_nucleus"]


def available() -> bool:
    """Whether the compiled sampler is importable (it is built with the package)."""
    return built("sample_nucleus")


def sample_nucleus(
    logits: torch.Tensor,  # (B, V) fp32 CPU, rows contiguous
    uniforms: torch.Tensor,  # (S, V) fp32: U, the noise is −log(−log U)
    temperature: torch.Tensor,  # (S, 1) or (S,) fp32, > 0
    top_k: torch.Tensor,  # (S, 1) or (S,) long, 0 = off
    top_p: torch.Tensor,  # (S, 1) or (S,) fp64, in (0, 1]
    rows: torch.Tensor | None = None,  # (S,) long: the logits row of each sampled row
) -> torch.Tensor:
    """Sampled token ids (S,) long for the S sampled rows (see the module docstring)."""
    if not available():
        raise RuntimeError("dglm.kernels.cpu_ops is not built; reinstall the package")
    B, V = logits.shape
    S = uniforms.shape[0]
    if logits.dtype != torch.float32 or logits.device.type != "cpu":
        raise ValueError(f"sample_nucleus: logits must be fp32 on CPU, got {logits.dtype} on "
                         f"{logits.device}")  # fmt: skip
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    if uniforms.shape != (S, V) or uniforms.dtype != torch.float32:
        raise ValueError(f"sample_nucleus: uniforms must be fp32 ({S}, {V})")
    if rows is None and S != B:
        raise ValueError(f"sample_nucleus: {S} sampled rows of {B} need `rows`")
    temperature = temperature.reshape(-1).to(torch.float32).contiguous()
    top_k = top_k.reshape(-1).to(torch.long).contiguous()
    top_p = top_p.reshape(-1).to(torch.float64).contiguous()
    if not temperature.shape == top_k.shape == top_p.shape == (S,):
        raise ValueError(f"sample_nucleus: temperature, top_k and top_p need {S} entries")
    if rows is not None:
        rows = rows.to(torch.long).contiguous()
        if rows.shape != (S,) or (S and (int(rows.min()) < 0 or int(rows.max()) >= B)):
            raise ValueError(f"sample_nucleus: rows must be {S} indices into {B} logits rows")
    uniforms = uniforms.contiguous()
    out = torch.empty(S, dtype=torch.long)
    cpu_ops.sample_nucleus(
        logits.data_ptr(), logits.stride(0), 0 if rows is None else rows.data_ptr(),
        uniforms.data_ptr(), temperature.data_ptr(), top_k.data_ptr(), top_p.data_ptr(), S, V,
        out.data_ptr(),
    )  # fmt: skip
    return out
