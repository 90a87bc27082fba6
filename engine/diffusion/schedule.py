"""Noise schedules and sampler step coefficients (variance preserving).

Cosine with a log-SNR shift (`NoiseSchedule`, DGLM's): alpha²(t) = cos²(π t / 2), clipped to
≥ 1e-9; log-SNR λ(t) = clamp(logit(alpha²), ±20) + 2·ln(scale); the shifted alpha² = sigmoid(λ).
Sqrt (`SqrtSchedule`, Diffusion-LM's, Li et al. 2022): alpha²(t) = 1 − √(t + s), s = 1e-4, so
the noise rises fast from t = 0 (σ² = 0.01 there already) and slowly near t = 1; λ clamped to
±20 likewise. Both: σ² = 1 − alpha², z_t = α·x + σ·ε; every step function below takes either
(`Schedule`: anything with `log_snr`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch

LOGSNR_CLAMP = 20.0


@dataclass(frozen=True)
class NoiseSchedule:
    # log-SNR shift: λ += 2·ln(scale). 1.0 for the diffusion sampler; 3.0 for the prompt
    # generator's noise augmentation (the reference's settings).
    scale: float = 1.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"NoiseSchedule.scale must be a positive number, got {self.scale!r}")

    def log_snr(self, t: torch.Tensor) -> torch.Tensor:
        """λ(t) for t in [0, 1] (fp64-safe: computed in t's dtype, use float64 for step math)."""
        a2 = torch.cos(t * (math.pi / 2)).pow(2).clamp_min(1e-9)
        lam = torch.log(a2.clamp_min(1e-12)) - torch.log((1 - a2).clamp_min(1e-12))
        return lam.clamp(-LOGSNR_CLAMP, LOGSNR_CLAMP) + 2 * math.log(self.scale)

    def alpha2(self, t: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.log_snr(t))


@dataclass(frozen=True)
class SqrtSchedule:
    # s: the offset of alpha²(t) = 1 − √(t + s); the paper's 1e-4 leaves σ² = 0.01 at t = 0
    offset: float = 1e-4

    def __post_init__(self) -> None:
        if not (math.isfinite(self.offset) and 0 < self.offset < 1):
            raise ValueError(f"SqrtSchedule.offset must be in (0, 1), got {self.offset!r}")

    def log_snr(self, t: torch.Tensor) -> torch.Tensor:
        """λ(t) = logit(1 − √(t + s)) for t in [0, 1], clamped to ±20 (as `NoiseSchedule`)."""
        root = (t + self.offset).sqrt()
        a2 = (1 - root).clamp_min(1e-9)
        lam = torch.log(a2) - torch.log(root.clamp_max(1 - 1e-12))
        return lam.clamp(-LOGSNR_CLAMP, LOGSNR_CLAMP)

    def alpha2(self, t: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.log_snr(t))


class Schedule(Protocol):
    def log_snr(self, t: torch.Tensor) -> torch.Tensor: ...


def alpha2_to_log_snr(alpha2: torch.Tensor) -> torch.Tensor:
    return torch.log(alpha2) - torch.log1p(-alpha2)


def time_grid(steps: int) -> list[tuple[float, float]]:
    """(t, s) pairs from t=1 down to s=0 in `steps` uniform steps (the reference's linspace)."""
    if steps < 1:
        raise ValueError(f"num_inference_steps must be ≥ 1, got {steps}")
    ts = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()
    return list(zip(ts[:-1], ts[1:], strict=True))


SAMPLERS = ("ddpm", "ddim", "dpmpp-2m", "consistency")
# Samplers that need the previous step's x̂0 (the fused update does not carry it).
MULTISTEP_SAMPLERS = ("dpmpp-2m",)


def step_coefficients(
    schedule: Schedule, t: float, s: float, sampler: str, var_lambda: float = 0.2
) -> tuple[float, float, float, float, float]:
    """[α_t, σ_t, c0, cz, n] with z_s = c0·x̂0 + cz·z_t + n·ξ, computed in float64.

    DDPM (Ho et al. 2020, variance as in Nichol & Dhariwal 2021): posterior mean
    c0 = α_s·c, cz = (α_t/α_s)·σ_s²/σ_t² with c = 1 − SNR_t/SNR_s, and log-variance interpolated
    between the posterior c·σ_s² (var_lambda = 0) and the upper bound c·σ_t² (var_lambda = 1).
    DDIM (Song et al. 2021, η = 0): z_s = α_s·x̂0 + σ_s·ε̂ with ε̂ = (z_t − α_t·x̂0)/σ_t; this is
    also DPM-Solver++'s first-order step, which "dpmpp-2m" takes here (its second-order correction
    needs the previous x̂0: see `multistep_coefficients`).
    Consistency (multistep sampling of a consistency model, Song et al. 2023): z_s = α_s·x̂0 + σ_s·ξ,
    fresh noise, nothing kept of z_t.
    The last step (s = 0) returns x̂0 exactly, as the reference does.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if not 0.0 <= var_lambda <= 1.0:
        raise ValueError(f"var_lambda must be in [0, 1], got {var_lambda!r}")
    lam_t, lam_s = schedule.log_snr(torch.tensor([t, s], dtype=torch.float64)).tolist()
    a2_t, a2_s = 1 / (1 + math.exp(-lam_t)), 1 / (1 + math.exp(-lam_s))
    alpha_t, sigma_t = math.sqrt(a2_t), math.sqrt(1 - a2_t)
    if s <= 0.0:
        return alpha_t, sigma_t, 1.0, 0.0, 0.0
    alpha_s, sigma_s = math.sqrt(a2_s), math.sqrt(1 - a2_s)
    if sampler == "consistency":
        return alpha_t, sigma_t, alpha_s, 0.0, sigma_s
    if sampler in ("ddim", "dpmpp-2m"):
        return alpha_t, sigma_t, alpha_s - sigma_s * alpha_t / sigma_t, sigma_s / sigma_t, 0.0
    c = -math.expm1(lam_t - lam_s)  # 1 − SNR_t / SNR_s
    c0 = alpha_s * c
    cz = (alpha_t / alpha_s) * (1 - a2_s) / (1 - a2_t)
    log_var = math.log(c) + var_lambda * math.log(1 - a2_t) + (1 - var_lambda) * math.log(1 - a2_s)
    return alpha_t, sigma_t, c0, cz, math.exp(0.5 * log_var)


def multistep_coefficients(
    schedule: Schedule, steps: int, sampler: str, var_lambda: float = 0.2
) -> tuple[list[tuple[float, float, float, float, float]], list[float]]:
    """Per step [α_t, σ_t, c0, cz, n] and c_prev: z_s = c0·x̂0 + cz·z_t + n·ξ + c_prev·x̂0_prev.

    c_prev is 0 except for DPM-Solver++(2M) (Lu et al. 2022, data prediction, multistep): from its
    second step on, D = (1 + 1/2r)·x̂0 − (1/2r)·x̂0_prev with r = h_prev/h, h = λ_s − λ_t
    (λ = log(α/σ)), and
    z_s = (σ_s/σ_t)·z_t + α_s·(1 − e^−h)·D. The first step is first order (DDIM); the last step
    (s = 0) returns x̂0, as every sampler here does ("lower order final").
    """
    grid = time_grid(steps)
    rows = [step_coefficients(schedule, t, s, sampler, var_lambda) for t, s in grid]
    prev = [0.0] * steps
    if sampler not in MULTISTEP_SAMPLERS:
        return rows, prev
    ts = [grid[0][0]] + [s for _, s in grid]
    log_snr = schedule.log_snr(torch.tensor(ts, dtype=torch.float64)).tolist()
    lam = [x / 2 for x in log_snr]  # DPM-Solver's λ = log(α/σ), half the log-SNR
    for i in range(1, steps):
        if grid[i][1] <= 0.0:
            continue
        h, h_prev = lam[i + 1] - lam[i], lam[i] - lam[i - 1]
        r = h_prev / h
        alpha_s = math.sqrt(1 / (1 + math.exp(-log_snr[i + 1])))
        k = alpha_s * -math.expm1(-h)  # α_s·(1 − e^−h)
        alpha_t, sigma_t, _, cz, _ = rows[i]
        rows[i] = (alpha_t, sigma_t, k * (1 + 1 / (2 * r)), cz, 0.0)
        prev[i] = -k / (2 * r)
    return rows, prev
