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
                                                          `dglm.engine.schedule.step_coefficients`)

`coefs` is a (B, 5) fp32 tensor [α_t, σ_t, c0, cz, n] so that rows may sit at different times and
the step can be replayed from a CUDA graph without baking Python floats into it.

Implementations sharing this contract: `guided_update_ref` (PyTorch, here) and the C++ op
`dglm.kernels._cpu.guided_update` (CPU). `select_guided_update` picks one once per engine.
"""

from __future__ import annotations

import logging
import math
import os

import numpy as np
import torch

logger = logging.getLogger(__name__)

COEF_ALPHA, COEF_SIGMA, COEF_X0, COEF_Z, COEF_NOISE = range(5)
_EPS = 1e-12


def _rescale(x: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1]
    return x * (math.sqrt(d) / x.norm(dim=-1, keepdim=True).clamp_min(_EPS))


def guided_update_ref(
    z: torch.Tensor,  # (B, D) current latent z_t
    v_cond: torch.Tensor,  # (B, D) conditional v prediction
    v_uncond: torch.Tensor | None,  # (B, D) unconditional v prediction, None = no CFG
    cfg_scale: torch.Tensor,  # (B,) CFG weight w (1 = conditional only)
    probe_weight: torch.Tensor,  # (K, D) probe rows, K may be 0
    probe_bias: torch.Tensor,  # (K,)
    probe_target: torch.Tensor,  # (B, K) targets y in [0, 1]
    probe_scale: torch.Tensor,  # (B, K) guidance scales s (0 = probe off for that row)
    noise: torch.Tensor,  # (B, D) standard normal ξ
    coefs: torch.Tensor,  # (B, 5) [alpha_t, sigma_t, coef_x0, coef_z, noise_std]
    rescale: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference fast guided step in fp32; returns (z_next (B, D), x0 (B, D)) in z's dtype."""
    out_dtype = z.dtype
    z, v_c = z.float(), v_cond.float()
    c = coefs.float()
    alpha, sigma = c[:, COEF_ALPHA : COEF_ALPHA + 1], c[:, COEF_SIGMA : COEF_SIGMA + 1]
    if v_uncond is not None:
        v = v_uncond.float() + cfg_scale.float()[:, None] * (v_c - v_uncond.float())
    else:
        v = v_c
    x0 = alpha * z - sigma * v
    if rescale:
        x0 = _rescale(x0)
    if probe_weight.shape[0] > 0:
        w = probe_weight.float()
        n = x0.norm(dim=-1, keepdim=True).clamp_min(_EPS)  # (B, 1)
        u = x0 / n
        logits = u @ w.T + probe_bias.float()  # (B, K)
        r = probe_scale.float() * (torch.sigmoid(logits) - probe_target.float())  # (B, K)
        g_u = r @ w  # (B, D)
        g = (g_u - (g_u * u).sum(-1, keepdim=True) * u) / n
        x0 = x0 - sigma * sigma * g
        if rescale:
            x0 = _rescale(x0)
    z_next = c[:, COEF_X0 : COEF_X0 + 1] * x0 + c[:, COEF_Z : COEF_Z + 1] * z
    z_next = z_next + c[:, COEF_NOISE : COEF_NOISE + 1] * noise.float()
    return z_next.to(out_dtype), x0.to(out_dtype)


def _check(
    z: torch.Tensor,
    v_cond: torch.Tensor,
    v_uncond: torch.Tensor | None,
    cfg_scale: torch.Tensor,
    probe_weight: torch.Tensor,
    probe_bias: torch.Tensor,
    probe_target: torch.Tensor,
    probe_scale: torch.Tensor,
    noise: torch.Tensor,
    coefs: torch.Tensor,
) -> None:
    b, d = z.shape
    k = probe_weight.shape[0]
    assert v_cond.shape == (b, d) and noise.shape == (b, d), (v_cond.shape, noise.shape)
    assert v_uncond is None or v_uncond.shape == (b, d)
    assert cfg_scale.shape == (b,) and coefs.shape == (b, 5), (cfg_scale.shape, coefs.shape)
    assert probe_weight.shape == (k, d) and probe_bias.shape == (k,)
    assert probe_target.shape == (b, k) and probe_scale.shape == (b, k)


def _guided_update_cpu(
    z: torch.Tensor,
    v_cond: torch.Tensor,
    v_uncond: torch.Tensor | None,
    cfg_scale: torch.Tensor,
    probe_weight: torch.Tensor,
    probe_bias: torch.Tensor,
    probe_target: torch.Tensor,
    probe_scale: torch.Tensor,
    noise: torch.Tensor,
    coefs: torch.Tensor,
    rescale: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The C++ twin (`dglm.kernels._cpu.guided_update`) on fp32 CPU tensors."""
    from dglm.kernels import _cpu

    def f32(t: torch.Tensor) -> np.ndarray:
        # fp32 tensors go in as zero-copy views (the op copies a non-contiguous one itself)
        if t.dtype != torch.float32 or t.requires_grad:
            t = t.detach().to(torch.float32)
        return t.numpy()

    out = np.empty((2, *z.shape), dtype=np.float32)  # (2, B, D): [z_next, x0]
    _cpu.guided_update(
        f32(z),
        f32(v_cond),
        None if v_uncond is None else f32(v_uncond),
        f32(cfg_scale),
        f32(probe_weight),
        f32(probe_bias),
        f32(probe_target),
        f32(probe_scale),
        f32(noise),
        f32(coefs),
        bool(rescale),
        out[0],
        out[1],
    )
    z_next, x0 = torch.from_numpy(out[0]), torch.from_numpy(out[1])
    if z.dtype != torch.float32:
        z_next, x0 = z_next.to(z.dtype), x0.to(z.dtype)
    return z_next, x0


IMPLEMENTATIONS = ("auto", "reference", "cpp")


def cpp_available() -> bool:
    try:
        from dglm.kernels import _cpu  # noqa: F401
    except ImportError:
        return False
    return True


def select_guided_update(device: torch.device | str, prefer: str = "auto"):
    """Pick the guided-update implementation for `device` once; logs the choice.

    prefer: "auto" (C++ on CPU, the reference elsewhere), or force "reference" or "cpp".
    The environment variable DGLM_GUIDED_UPDATE overrides "auto".
    """
    if prefer not in IMPLEMENTATIONS:
        raise ValueError(f"guided_update implementation must be one of {IMPLEMENTATIONS}, got {prefer!r}")
    device = torch.device(device)
    if prefer == "auto":
        prefer = os.environ.get("DGLM_GUIDED_UPDATE", "auto")
    if prefer == "auto":
        if device.type == "cpu" and cpp_available():
            logger.info("guided_update: C++ op (dglm.kernels._cpu)")
            return _guided_update_cpu
        logger.info("guided_update: PyTorch reference (C++ extension not built)")
        return guided_update_ref
    if prefer == "reference":
        logger.info("guided_update: PyTorch reference (forced)")
        return guided_update_ref
    # prefer == "cpp"
    if device.type != "cpu":
        raise RuntimeError("guided_update 'cpp' runs on CPU only; set the implementation to 'auto'")
    if not cpp_available():
        raise RuntimeError(
            "dglm.kernels._cpu is not built; reinstall the package (pip install -e .) "
            "or set the guided_update implementation to 'reference'"
        )
    logger.info("guided_update: C++ op (forced)")
    return _guided_update_cpu


__all__ = [
    "COEF_ALPHA",
    "COEF_NOISE",
    "COEF_SIGMA",
    "COEF_X0",
    "COEF_Z",
    "IMPLEMENTATIONS",
    "cpp_available",
    "guided_update_ref",
    "select_guided_update",
]
