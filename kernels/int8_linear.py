"""Weight-only int8 linear layer for CPU decoding: `torch.ops.dglm.int8_linear`.

    y = x · (q · s)ᵀ + b     x (..., K) fp32, q (N, K) int8, s (N,) fp32 per-row scales, b (N,)

The C++ kernel (kernels/cpp/int8_linear.cpp, in `dglm.kernels.cpu_ops`) widens each weight byte
to fp32 in registers and sums in fp32 (no bf16 rounding of the activations, unlike
`torch._weight_int8pack_mm`), four output rows × up to four activation rows per tile, with
software prefetch of the next rows. Decoding at batch 1 reads every weight once per token, so
the speed is the rate at which int8 bytes stream from memory: measured here (SmolLM2-135M's 30
layers, 106 MB of int8 weights, one thread, the other core busy) ~11-16 ms per pass against
~22-28 ms for `torch._weight_int8pack_mm` (benchmarks/bench_decode.py has the end-to-end rows).
AVX-512 (F, BW, VL), AVX2+FMA or scalar code is chosen at run time.

From `LARGE_M` activation rows on (prefill of a batch), the operator widens the weights to fp32
block by block and hands the product to BLAS instead where that is faster on this CPU (timed once,
at the first such call: `blas_pays`).

The operator is registered with `torch.library`, so traced decode steps (TorchScript) record it
and call it like any aten op. It runs on CPU tensors only; `int8_linear_ref` is the reference the
tests hold it to.
"""

from __future__ import annotations

import torch

try:  # the compiled C++ kernels: absent when the package was installed without building them
    from dglm.kernels import cpu_ops
except ImportError:
    cpu_ops = None

__all__ = [
    "LARGE_BLOCK", "LARGE_M", "available", "bf16_supported", "blas_pays", "int8_linear",
    "int8_linear_ref", "isa",
]  # fmt: skip

# From this many activation rows on, the product is compute-bound and BLAS on the weights widened
# to fp32 (once per call) is as fast as the kernel or faster: measured on SmolLM2's weight set,
# one core, ms per pass kernel / widen + BLAS: M=32 77 / 106, M=64 145 / 150, M=128 323 / 285,
# M=320 847 / 588 (a batch's prefill); a decode step at batch 64 took 414 ms through the kernel
# against 322 ms for the fp32 decoder.
# That held on the Intel Xeon those numbers come from; on an AMD EPYC the kernel was 2x faster
# than BLAS at every M up to 256 (prefill of a batch of 8: 0.26 s through BLAS), so the choice is
# timed on the CPU it runs on.
LARGE_M = 64
# Output rows widened at a time on that path: widening a whole matrix first wrote and re-read
# 4 bytes per weight from memory (M=64, one core: SmolLM2's gate/up 12.5 ms, LM head 132 ms);
# 256-row blocks stay in cache (2.4 ms, 56 ms; the fp32 weights' BLAS: 1.9 ms, 61 ms).
LARGE_BLOCK = 256


def available() -> bool:
    """Whether the compiled kernel is importable (it is built with the package)."""
    return cpu_ops is not None and hasattr(cpu_ops, "int8_linear")


def isa() -> str:
    """The instruction set the kernel uses on this CPU ("avx512", "avx2", "scalar"), or "none"."""
    return str(cpu_ops.int8_linear_isa) if available() else "none"


def int8_linear_ref(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """The same product in fp32 from the dequantised weights (plain PyTorch)."""
    w = q.float() * scale.float()[:, None]
    return torch.nn.functional.linear(x.float(), w, None if bias is None else bias.float())


_BLAS_PAYS: bool | None = None  # timed at the first call with ≥ LARGE_M rows; tests may set it


def _blas_product(x2: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    M, N = x2.shape[0], q.shape[0]
    y = torch.empty(M, N, dtype=torch.float32)
    for n0 in range(0, N, LARGE_BLOCK):
        n1 = min(n0 + LARGE_BLOCK, N)
        y[:, n0:n1] = x2 @ q[n0:n1].float().t()
    return y


def blas_pays() -> bool:
    """Whether BLAS on widened weight blocks beats the kernel at LARGE_M rows on this CPU: timed
    once (best of 3 on a 512 × 576 product, a few ms) and remembered for the process."""
    global _BLAS_PAYS
    if _BLAS_PAYS is None:
        import time

        gen = torch.Generator().manual_seed(0)
        q = torch.randint(-127, 128, (512, 576), generator=gen, dtype=torch.int8)
        scale = torch.ones(512)
        x = torch.randn(LARGE_M, 576, generator=gen)
        y = torch.empty(LARGE_M, 512)
        best = [float("inf"), float("inf")]
        for _ in range(3):
            t = time.perf_counter()
            cpu_ops.int8_linear(
                x.data_ptr(), q.data_ptr(), scale.data_ptr(), 0, y.data_ptr(), LARGE_M, 576, 512,
                torch.get_num_threads(),
            )  # fmt: skip
            best[0] = min(best[0], time.perf_counter() - t)
            t = time.perf_counter()
            _blas_product(x, q)
            best[1] = min(best[1], time.perf_counter() - t)
        _BLAS_PAYS = best[1] < best[0]
    return _BLAS_PAYS


def _check(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
    if q.dtype != torch.int8 or q.dim() != 2:
        raise ValueError(
            f"int8_linear: q must be a 2-D int8 tensor, got {q.dtype} {tuple(q.shape)}"
        )
    N, K = q.shape
    if x.shape[-1] != K:
        raise ValueError(f"int8_linear: x's last dim {x.shape[-1]} != q's in-features {K}")
    if scale.dtype != torch.float32 or tuple(scale.shape) != (N,):
        raise ValueError(
            f"int8_linear: scale must be fp32 ({N},), got {scale.dtype} {tuple(scale.shape)}"
        )
    if bias is not None and (bias.dtype != torch.float32 or tuple(bias.shape) != (N,)):
        raise ValueError(
            f"int8_linear: bias must be fp32 ({N},), got {bias.dtype} {tuple(bias.shape)}"
        )
    for name, t in (("x", x), ("q", q), ("scale", scale), ("bias", bias)):
        if t is not None and t.device.type != "cpu":
            raise ValueError(f"int8_linear: {name} is on {t.device}; the kernel runs on CPU")


def bf16_supported() -> bool:
    """Whether this CPU runs the bf16-activation mode (AVX512-BF16; see `int8_linear`)."""
    return available() and bool(cpu_ops.int8_linear_bf16_supported())


def _int8_linear_cpu(
    x: torch.Tensor,
    q: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    bf16: bool = False,
) -> torch.Tensor:
    _check(x, q, scale, bias)
    if not (q.is_contiguous() and scale.is_contiguous()):
        q, scale = q.contiguous(), scale.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    N, K = q.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K).to(torch.float32).contiguous()
    M = x2.shape[0]
    if bf16 and not bf16_supported():
        raise ValueError("int8_linear: bf16 activations need AVX512-BF16, which this CPU lacks")
    # compute-bound: BLAS on the weights widened block by block (prefill of long batches, big
    # decode batches), where this CPU's BLAS is faster; a widened block stays in cache while BLAS
    # reads it
    if M >= LARGE_M and not bf16 and blas_pays():
        y = _blas_product(x2, q)
        y.mul_(scale)
        if bias is not None:
            y.add_(bias)
        y = y.view(*lead, N)
        return y if x.dtype == torch.float32 else y.to(x.dtype)
    y = torch.empty(*lead, N, dtype=torch.float32)
    if M:
        cpu_ops.int8_linear(
            x2.data_ptr(), q.data_ptr(), scale.data_ptr(), 0 if bias is None else bias.data_ptr(),
            y.data_ptr(), M, K, N, torch.get_num_threads(), "", -1, bool(bf16),
        )  # fmt: skip
    return y if x.dtype == torch.float32 else y.to(x.dtype)


_LIB = None
if available():
    _LIB = torch.library.Library("dglm", "DEF")
    _LIB.define(
        "int8_linear(Tensor x, Tensor q, Tensor scale, Tensor? bias, bool bf16=False) -> Tensor"
    )
    _LIB.impl("int8_linear", _int8_linear_cpu, "CPU")


def int8_linear(
    x: torch.Tensor,
    q: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    bf16: bool = False,
) -> torch.Tensor:
    """y (..., N) = x (..., K) · (q · scale)ᵀ + bias through the compiled kernel (CPU tensors;
    x in any float dtype, computed in fp32, returned in x's dtype). bf16: the activations rounded
    to bf16 and multiplied by AVX512-BF16 instructions (bf16_supported()), fp32 sums: ~1.5-2x
    faster where the product is compute-bound (batches), the same result for a row alone or
    batched."""
    if not available():
        raise RuntimeError(
            "dglm.kernels.cpu_ops is not built; reinstall the package (pip install -e .)"
        )
    return torch.ops.dglm.int8_linear(x, q, scale, bias, bf16)
