"""The fused `fast` guided sampler step: one call per diffusion step for a whole batch.

Math, per row b (D = latent width, K = probes, all in fp32):

    v    = v_u + w_b · (v_c − v_u)                       classifier-free guidance (skipped without v_u)
    x̂0   = α_b · z − σ_b · v                              v-prediction → x̂0
    x̂0  ← x̂0 · √D / ‖x̂0‖                                 projection to the √D sphere (if rescale)
    u    = x̂0 / ‖x̂0‖,  ℓ_k = W_k·u + b_k                   probe logits on the unit-norm embedding
    g_u  = Σ_k s_bk · (sigmoid(ℓ_k) − y_bk) · W_k         ∂/∂u of Σ_k s_bk · BCE(ℓ_k, y_bk)
    g    = (g_u − (g_u·u) u) / ‖x̂0‖                        chain rule through the normalisation
    x̂0  ← x̂0 − σ_b² · g                                   ε̂ ← ε̂ + σ_b·∇_z L with ∇_z L ≈ α_b·g
    x̂0  ← x̂0 · √D / ‖x̂0‖                                 (if rescale)
    z'   = c0_b · x̂0 + cz_b · z + n_b · ξ                 DDPM / DDIM update (coefficients from
                                                          `dglm.engine.diffusion.schedule.step_coefficients`)

`coefs` is a (B, 5) fp32 tensor [α_t, σ_t, c0, cz, n] so that rows may sit at different times and
the step can be replayed from a CUDA graph without baking Python floats into it.

Implementations sharing this contract (`GuidedUpdate`: a `GuidedUpdateInputs` and `rescale` in,
(z_next, x̂0) out): `guided_update_ref` (PyTorch, here), `guided_update_cpu` (the C++ op
`dglm.kernels.cpu_ops.guided_update` behind a tensor wrapper) and `guided_update_triton` (Triton,
here; CUDA, or CPU under TRITON_INTERPRET=1). `select_guided_update` picks one once per engine.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch

try:  # the compiled C++ twins: absent when the package was installed without building them
    from dglm.kernels import cpu_ops
except ImportError:
    cpu_ops = None

logger = logging.getLogger(__name__)

COEF_ALPHA, COEF_SIGMA, COEF_X0, COEF_Z, COEF_NOISE = range(5)
_EPS = 1e-12


class GuidedUpdateInputs(NamedTuple):
    """One guided step's inputs: B rows, latent width D, K probes. The field order is the C++
    op's argument order."""

    z: torch.Tensor  # (B, D) current latent z_t
    v_cond: torch.Tensor  # (B, D) conditional v prediction
    v_uncond: torch.Tensor | None  # (B, D) unconditional v prediction, None = no CFG
    cfg_scale: torch.Tensor  # (B,) CFG weight w (1 = conditional only)
    probe_weight: torch.Tensor  # (K, D) probe rows, K may be 0
    probe_bias: torch.Tensor  # (K,)
    probe_target: torch.Tensor  # (B, K) targets y in [0, 1]
    probe_scale: torch.Tensor  # (B, K) guidance scales s (0 = probe off for that row)
    noise: torch.Tensor  # (B, D) standard normal ξ
    coefs: torch.Tensor  # (B, 5) [alpha_t, sigma_t, coef_x0, coef_z, noise_std]

    def check(self) -> tuple[int, int, int]:
        """(B, D, K), asserting every shape against z's (B, D) and probe_weight's K."""
        b, d = self.z.shape
        k = self.probe_weight.shape[0]
        assert self.v_cond.shape == (b, d) and self.noise.shape == (b, d), (
            self.v_cond.shape,
            self.noise.shape,
        )
        assert self.v_uncond is None or self.v_uncond.shape == (b, d)
        assert self.cfg_scale.shape == (b,) and self.coefs.shape == (b, 5), (
            self.cfg_scale.shape,
            self.coefs.shape,
        )
        assert self.probe_weight.shape == (k, d) and self.probe_bias.shape == (k,)
        assert self.probe_target.shape == (b, k) and self.probe_scale.shape == (b, k)
        return b, d, k


# every implementation: (inputs, rescale) → (z_next (B, D), x̂0 (B, D)) in z's dtype
GuidedUpdate = Callable[[GuidedUpdateInputs, bool], tuple[torch.Tensor, torch.Tensor]]


def _rescale(x: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1]
    return x * (math.sqrt(d) / x.norm(dim=-1, keepdim=True).clamp_min(_EPS))


def guided_update_ref(
    x: GuidedUpdateInputs, rescale: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference fast guided step in fp32 (float64 for float64 inputs); returns
    (z_next (B, D), x0 (B, D)) in z's dtype."""
    out_dtype = x.z.dtype
    ct = torch.promote_types(out_dtype, torch.float32)  # compute dtype: fp32 at least
    z, v_c = x.z.to(ct), x.v_cond.to(ct)
    c = x.coefs.to(ct)
    alpha, sigma = c[:, COEF_ALPHA : COEF_ALPHA + 1], c[:, COEF_SIGMA : COEF_SIGMA + 1]
    if x.v_uncond is not None:
        v_u = x.v_uncond.to(ct)
        v = v_u + x.cfg_scale.to(ct)[:, None] * (v_c - v_u)
    else:
        v = v_c
    x0 = alpha * z - sigma * v
    if rescale:
        x0 = _rescale(x0)
    if x.probe_weight.shape[0] > 0:
        w = x.probe_weight.to(ct)
        n = x0.norm(dim=-1, keepdim=True).clamp_min(_EPS)  # (B, 1)
        u = x0 / n
        logits = u @ w.T + x.probe_bias.to(ct)  # (B, K)
        r = x.probe_scale.to(ct) * (torch.sigmoid(logits) - x.probe_target.to(ct))  # (B, K)
        g_u = r @ w  # (B, D)
        g = (g_u - (g_u * u).sum(-1, keepdim=True) * u) / n
        x0 = x0 - sigma * sigma * g
        if rescale:
            x0 = _rescale(x0)
    z_next = c[:, COEF_X0 : COEF_X0 + 1] * x0 + c[:, COEF_Z : COEF_Z + 1] * z
    z_next = z_next + c[:, COEF_NOISE : COEF_NOISE + 1] * x.noise.to(ct)
    return z_next.to(out_dtype), x0.to(out_dtype)


def _f32(t: torch.Tensor) -> np.ndarray:
    # fp32 tensors go in as zero-copy views (the op copies a non-contiguous one itself)
    if t.dtype != torch.float32 or t.requires_grad:
        t = t.detach().to(torch.float32)
    return t.numpy()


def guided_update_cpu(
    x: GuidedUpdateInputs, rescale: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """The C++ twin (`dglm.kernels.cpu_ops.guided_update`) on CPU tensors: fp32 math, outputs in
    z's dtype."""
    assert cpu_ops is not None, "select_guided_update checks cpp_available() first"
    out = np.empty((2, *x.z.shape), dtype=np.float32)  # (2, B, D): [z_next, x0]
    cpu_ops.guided_update(
        *(None if t is None else _f32(t) for t in x), bool(rescale), out[0], out[1]
    )
    z_next, x0 = torch.from_numpy(out[0]), torch.from_numpy(out[1])
    if x.z.dtype != torch.float32:
        z_next, x0 = z_next.to(x.z.dtype), x0.to(x.z.dtype)
    return z_next, x0


def _build_triton_kernel():
    """Decorate the kernel on first use: TRITON_INTERPRET is read when @triton.jit runs."""
    # triton is optional (the `gpu` extra): imported on the first launch only
    import triton
    import triton.language as tl

    @triton.jit
    def _guided_update_kernel(
        z_ptr, vc_ptr, vu_ptr, cfg_ptr, w_ptr, bias_ptr, tgt_ptr, scl_ptr, noise_ptr, coef_ptr,
        z_next_ptr, x0_ptr,
        D, K, sqrt_d, eps,
        HAS_UNCOND: tl.constexpr, HAS_PROBES: tl.constexpr, RESCALE: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        # one program = one batch row; the module docstring has the math
        row = tl.program_id(0).to(tl.int64)
        d = tl.arange(0, BLOCK_D)
        ok = d < D
        offs = row * D + d
        z = tl.load(z_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        v = tl.load(vc_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        alpha = tl.load(coef_ptr + row * 5 + 0).to(tl.float32)
        sigma = tl.load(coef_ptr + row * 5 + 1).to(tl.float32)
        c_x0 = tl.load(coef_ptr + row * 5 + 2).to(tl.float32)
        c_z = tl.load(coef_ptr + row * 5 + 3).to(tl.float32)
        c_noise = tl.load(coef_ptr + row * 5 + 4).to(tl.float32)
        if HAS_UNCOND:  # v = v_u + w·(v_c − v_u)
            v_u = tl.load(vu_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            v = v_u + tl.load(cfg_ptr + row).to(tl.float32) * (v - v_u)
        x0 = alpha * z - sigma * v  # v-prediction → x̂0
        if RESCALE:  # x̂0 · √D / ‖x̂0‖
            x0 = x0 * (sqrt_d / tl.maximum(tl.sqrt(tl.sum(x0 * x0, axis=0)), eps))
        if HAS_PROBES:
            n = tl.maximum(tl.sqrt(tl.sum(x0 * x0, axis=0)), eps)
            u = x0 / n
            g_u = tl.zeros([BLOCK_D], dtype=tl.float32)
            for k in range(K):  # g_u = Σ_k s_k·(sigmoid(W_k·u + b_k) − y_k)·W_k, W_k read once
                w = tl.load(w_ptr + k * D + d, mask=ok, other=0.0).to(tl.float32)
                logit = tl.sum(w * u, axis=0) + tl.load(bias_ptr + k).to(tl.float32)
                s = tl.load(scl_ptr + row * K + k).to(tl.float32)
                y = tl.load(tgt_ptr + row * K + k).to(tl.float32)
                g_u += s * (tl.sigmoid(logit) - y) * w
            g = (g_u - tl.sum(g_u * u, axis=0) * u) / n  # through the normalisation
            x0 = x0 - sigma * sigma * g
            if RESCALE:
                x0 = x0 * (sqrt_d / tl.maximum(tl.sqrt(tl.sum(x0 * x0, axis=0)), eps))
        noise = tl.load(noise_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        z_next = c_x0 * x0 + c_z * z + c_noise * noise
        tl.store(z_next_ptr + offs, z_next.to(z_next_ptr.dtype.element_ty), mask=ok)
        tl.store(x0_ptr + offs, x0.to(x0_ptr.dtype.element_ty), mask=ok)

    return _guided_update_kernel


_triton_kernel = functools.cache(_build_triton_kernel)
TRITON_MAX_DIM = 4096  # D in one block per row


def guided_update_triton(
    x: GuidedUpdateInputs, rescale: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton twin: one launch, one program per row, the K probes looped in-register.

    Any float dtypes in, fp32 math, outputs in z's dtype. No host sync (safe to capture in a CUDA
    graph once compiled by a first call). Runs on CUDA, or on CPU under TRITON_INTERPRET=1.
    """
    b, d, k = x.check()
    if d > TRITON_MAX_DIM:
        raise ValueError(f"guided_update_triton handles D ≤ {TRITON_MAX_DIM}, got D={d}")
    z_next = torch.empty((b, d), dtype=x.z.dtype, device=x.z.device)
    x0 = torch.empty((b, d), dtype=x.z.dtype, device=x.z.device)
    if b == 0:
        return z_next, x0
    z, v_cond, noise, coefs, cfg_scale = (
        t.contiguous() for t in (x.z, x.v_cond, x.noise, x.coefs, x.cfg_scale)
    )
    has_uncond = x.v_uncond is not None
    v_uncond = x.v_uncond.contiguous() if has_uncond else v_cond  # v_cond: a dummy, never read
    if k > 0:
        w, bias, tgt, scl = (t.contiguous() for t in (x.probe_weight, x.probe_bias,
                                                      x.probe_target, x.probe_scale))  # fmt: skip
    else:  # zero-size tensors may have no storage: pass z, never read
        w = bias = tgt = scl = z
    block_d = max(16, 1 << (d - 1).bit_length())
    _triton_kernel()[(b,)](
        z, v_cond, v_uncond, cfg_scale, w, bias, tgt, scl, noise, coefs, z_next, x0,
        d, k, math.sqrt(d), _EPS,
        HAS_UNCOND=has_uncond, HAS_PROBES=k > 0, RESCALE=bool(rescale),
        BLOCK_D=block_d, num_warps=4 if block_d <= 1024 else 8,
    )  # fmt: skip
    return z_next, x0


IMPLEMENTATIONS = ("auto", "reference", "cpp", "triton")


def cpp_available() -> bool:
    return cpu_ops is not None


def triton_available() -> bool:
    try:  # optional dependency (the `gpu` extra)
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def select_guided_update(device: torch.device | str, prefer: str = "auto") -> GuidedUpdate:
    """Pick the guided-update implementation for `device` once; logs the choice.

    prefer: "auto" (Triton on CUDA, C++ on CPU, the reference otherwise), or force "reference",
    "cpp" (CPU) or "triton" (CUDA; CPU only under TRITON_INTERPRET=1, for tests).
    The environment variable DGLM_GUIDED_UPDATE overrides "auto".
    """
    if prefer not in IMPLEMENTATIONS:
        raise ValueError(
            f"guided_update implementation must be one of {IMPLEMENTATIONS}, got {prefer!r}"
        )
    device = torch.device(device)
    if prefer == "auto":
        prefer = os.environ.get("DGLM_GUIDED_UPDATE", "auto")
    if prefer == "auto":
        if device.type == "cuda" and triton_available():
            logger.info("guided_update: Triton kernel")
            return guided_update_triton
        if device.type == "cpu" and cpp_available():
            logger.info("guided_update: C++ op (dglm.kernels.cpu_ops)")
            return guided_update_cpu
        why = "triton is not installed" if device.type == "cuda" else "C++ extension not built"
        logger.info("guided_update: PyTorch reference (%s)", why)
        return guided_update_ref
    if prefer == "reference":
        logger.info("guided_update: PyTorch reference (forced)")
        return guided_update_ref
    if prefer == "triton":
        if not triton_available():
            raise RuntimeError(
                "guided_update 'triton' needs triton (pip install triton); "
                "or set the guided_update implementation to 'auto'"
            )
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                f"guided_update 'triton' runs on CUDA (on {device.type} only with "
                "TRITON_INTERPRET=1, for tests); set the guided_update implementation to 'auto'"
            )
        logger.info("guided_update: Triton kernel (forced)")
        return guided_update_triton
    # prefer == "cpp"
    if device.type != "cpu":
        raise RuntimeError("guided_update 'cpp' runs on CPU only; set the implementation to 'auto'")
    if not cpp_available():
        raise RuntimeError(
            "dglm.kernels.cpu_ops is not built; reinstall the package (pip install -e .) "
            "or set the guided_update implementation to 'reference'"
        )
    logger.info("guided_update: C++ op (forced)")
    return guided_update_cpu


__all__ = [
    "COEF_ALPHA",
    "COEF_NOISE",
    "COEF_SIGMA",
    "COEF_X0",
    "COEF_Z",
    "IMPLEMENTATIONS",
    "GuidedUpdate",
    "GuidedUpdateInputs",
    "cpp_available",
    "guided_update_cpu",
    "guided_update_ref",
    "guided_update_triton",
    "select_guided_update",
    "triton_available",
]
