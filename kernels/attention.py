"""Fused attention core of the score network: per-head qk-RMSNorm + softmax(q·kᵀ/√Dh)·v.

Math, per batch item b and head h (T tokens, bidirectional, all in fp32):

    q̃   = q / √(mean_d q² + eps) · g_q                  per-head RMSNorm (learned weight g_q)
    k̃   = k / √(mean_d k² + eps) · g_k
    o    = softmax(q̃·k̃ᵀ / √Dh) · v                     (T, T) scores, rows sum to 1

The score network's sequences are short (T = 8..64) and its heads narrow (Dh = 32 or 64), so the
whole (T, T) score tile of one (b, h) fits in one program: one launch covers the batch and every
head, with no online softmax and no intermediate in global memory. The eager path costs ~16 kernels
per layer here (two RMSNorms of ~7 ops each, three transposes' copies, SDPA).

Layout: q, k and v are read as (B, T, H, Dh) with any strides as long as the last one is 1, so the
three `unbind` views of `to_qkv(h).view(B, T, 3, H, Dh)` go in without a copy, and o comes out as
(B, T, H, Dh) contiguous, i.e. already in `to_out`'s (B, T, H·Dh) layout: no transposes either way.

Implementations sharing this contract: `qk_norm_attention` (Triton, here; CUDA, or CPU under
TRITON_INTERPRET=1) and `qk_norm_attention_ref` (PyTorch, the exact math of
`dglm.engine.layers.Attention`).
"""

from __future__ import annotations

import functools
import logging
import math
import os

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

MAX_TOKENS = 64  # the score network's T; larger (T, T) fp32 tiles spill and compile slowly
MAX_HEAD_DIM = 128


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = x / sqrt(mean(x²) + eps) · g over the last dim, in fp32 (fp64 stays fp64), cast back to
    x's dtype: `layers.RMSNorm`'s math as a function."""
    ct = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(ct)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.to(ct)).to(x.dtype)


def qk_norm_attention_ref(
    q: torch.Tensor,  # (B, T, H, Dh)
    k: torch.Tensor,  # (B, T, H, Dh)
    v: torch.Tensor,  # (B, T, H, Dh)
    q_norm_weight: torch.Tensor,  # (Dh,)
    k_norm_weight: torch.Tensor,  # (Dh,)
    eps: float = 1e-6,
) -> torch.Tensor:
    """Reference: `layers.Attention`'s core in PyTorch → o (B, T, H, Dh) in q's dtype.

    Norms in fp32 cast back to the input dtype, then SDPA in the input dtype, exactly as the eager
    layer does; float64 inputs stay float64 throughout (the tests' high-precision reference).
    """
    q, k = rms_norm(q, q_norm_weight, eps), rms_norm(k, k_norm_weight, eps)
    q, k, v = (y.transpose(1, 2) for y in (q, k, v))  # (B, H, T, Dh)
    o = F.scaled_dot_product_attention(q, k, v)  # softmax(q·kᵀ/√Dh)·v, bidirectional
    return o.transpose(1, 2)  # (B, T, H, Dh)


def _build_kernel():
    """Decorate the kernel on first use: TRITON_INTERPRET is read when @triton.jit runs."""
    # triton is optional (the `gpu` extra): imported on the first launch only
    import triton
    import triton.language as tl

    @triton.jit
    def _qk_norm_attention_kernel(
        q_ptr, k_ptr, v_ptr, qw_ptr, kw_ptr, o_ptr,
        T, H, Dh,
        sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, so_b, so_t, so_h,
        eps, qk_scale,  # qk_scale = log2(e) / √Dh: the softmax runs in base 2
        BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):  # fmt: skip
        # one program = one (b, h): the whole (T, T) tile in registers
        pid = tl.program_id(0)
        b = (pid // H).to(tl.int64)
        h = (pid % H).to(tl.int64)
        t = tl.arange(0, BLOCK_T)
        d = tl.arange(0, BLOCK_D)
        t_ok = t < T
        d_ok = d < Dh
        tile_ok = t_ok[:, None] & d_ok[None, :]

        q_offs = b * sq_b + h * sq_h + t[:, None] * sq_t + d[None, :]  # (BLOCK_T, BLOCK_D)
        k_offs = b * sk_b + h * sk_h + t[:, None] * sk_t + d[None, :]
        v_offs = b * sv_b + h * sv_h + t[:, None] * sv_t + d[None, :]
        q = tl.load(q_ptr + q_offs, mask=tile_ok, other=0.0).to(tl.float32)
        k = tl.load(k_ptr + k_offs, mask=tile_ok, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + v_offs, mask=tile_ok, other=0.0).to(tl.float32)
        gq = tl.load(qw_ptr + d, mask=d_ok, other=0.0).to(tl.float32)
        gk = tl.load(kw_ptr + d, mask=d_ok, other=0.0).to(tl.float32)

        # q̃ = q · rsqrt(mean(q²) + eps) · g_q, likewise k̃  (padded columns stay 0)
        q = q * tl.rsqrt(tl.sum(q * q, axis=1) / Dh + eps)[:, None] * gq[None, :]
        k = k * tl.rsqrt(tl.sum(k * k, axis=1) / Dh + eps)[:, None] * gk[None, :]

        # s = q̃·k̃ᵀ · log2(e)/√Dh; padded keys → −inf; p = 2^(s − max s); o = p·v / Σp
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BT, BT)
        s = tl.where(t_ok[None, :], s, float("-inf"))
        p = tl.exp2(s - tl.max(s, axis=1)[:, None])
        o = tl.dot(p, v, input_precision=DOT_PRECISION) / tl.sum(p, axis=1)[:, None]

        o_offs = b * so_b + h * so_h + t[:, None] * so_t + d[None, :]
        tl.store(o_ptr + o_offs, o.to(o_ptr.dtype.element_ty), mask=tile_ok)

    return _qk_norm_attention_kernel


_kernel = functools.cache(_build_kernel)


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def qk_norm_attention(
    q: torch.Tensor,  # (B, T, H, Dh), last stride 1
    k: torch.Tensor,  # (B, T, H, Dh), last stride 1
    v: torch.Tensor,  # (B, T, H, Dh), last stride 1
    q_norm_weight: torch.Tensor,  # (Dh,)
    k_norm_weight: torch.Tensor,  # (Dh,)
    eps: float = 1e-6,
) -> torch.Tensor:
    """One Triton launch for all B·H (item, head) pairs → o (B, T, H, Dh) contiguous, q's dtype.

    fp32 / bf16 / fp16 inputs, fp32 math. fp32 inputs use exact fp32 dot products; 16-bit inputs
    use TF32 ones (more mantissa than the inputs carry). No autograd. No host sync: safe to capture
    in a CUDA graph once the kernel has been compiled by a first call.
    """
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(
            f"q, k, v must share one (B, T, H, Dh) shape, got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    bsz, t, h, dh = q.shape
    if not (1 <= t <= MAX_TOKENS and 1 <= dh <= MAX_HEAD_DIM):
        raise ValueError(
            f"qk_norm_attention handles T ≤ {MAX_TOKENS} tokens and head_dim ≤ {MAX_HEAD_DIM}, "
            f"got T={t}, head_dim={dh}; use qk_norm_attention_ref"
        )
    if q_norm_weight.shape != (dh,) or k_norm_weight.shape != (dh,):
        raise ValueError(
            f"q_norm_weight and k_norm_weight must be ({dh},), got "
            f"{tuple(q_norm_weight.shape)}, {tuple(k_norm_weight.shape)}"
        )
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"qk_norm_attention supports fp32/bf16/fp16, got {q.dtype}")
    q, k, v = (y if y.stride(-1) == 1 else y.contiguous() for y in (q, k, v))
    o = torch.empty((bsz, t, h, dh), device=q.device, dtype=q.dtype)
    block_t, block_d = max(16, _next_pow2(t)), max(16, _next_pow2(dh))
    _kernel()[(bsz * h,)](
        q, k, v, q_norm_weight.contiguous(), k_norm_weight.contiguous(), o,
        t, h, dh,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        o.stride(0), o.stride(1), o.stride(2),
        float(eps), math.log2(math.e) / math.sqrt(dh),
        BLOCK_T=block_t, BLOCK_D=block_d,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=4 if block_t * block_d <= 64 * 64 else 8,
    )  # fmt: skip
    return o


@functools.cache
def triton_available() -> bool:
    """Whether the Triton kernel can run (triton importable); logs the attention choice once."""
    try:  # optional dependency (the `gpu` extra)
        import triton  # noqa: F401
    except ImportError:
        logger.info("attention: PyTorch SDPA path (triton is not installed)")
        return False
    interp = os.environ.get("TRITON_INTERPRET", "0") == "1"
    logger.info("attention: fused Triton qk-norm attention%s", " (interpreter)" if interp else "")
    return True


def fused_attention_supported(num_tokens: int, head_dim: int) -> bool:
    """Whether `qk_norm_attention` can serve a layer of this shape on this install."""
    return num_tokens <= MAX_TOKENS and head_dim <= MAX_HEAD_DIM and triton_available()


__all__ = [
    "MAX_HEAD_DIM",
    "MAX_TOKENS",
    "fused_attention_supported",
    "qk_norm_attention",
    "qk_norm_attention_ref",
    "rms_norm",
    "triton_available",
]
