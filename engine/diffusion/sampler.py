"""Semantic diffusion sampling with classifier-free and probe guidance.

One sampler loop serves DDPM (Ho et al. 2020, `var_lambda` variance of Nichol & Dhariwal 2021),
DDIM (Song et al. 2021), DPM-Solver++(2M) (Lu et al. 2022; training-free, 8–20 steps) and the
multistep sampling of a distilled consistency student (1–4 steps, `dglm train distill`): the
sampler only changes the step coefficients (`dglm.engine.diffusion.schedule.multistep_coefficients`), the
update is z_s = c0·x̂0 + cz·z_t + n·ξ (+ c_prev·x̂0_prev for DPM-Solver++(2M)).
Probe guidance acts on x̂0 at every step of every sampler, so probes stay swappable: a distilled
student is steered by the same probes as its teacher, without retraining.

Probe guidance, two modes:
- `fast`: the gradient of the probes' BCE is taken analytically at the projected x̂0, no backward
  through the score network; the whole step is one fused call (`dglm.kernels.guided_update`).
- `exact`: the reference's estimate (DGLM, Lovelace et al. 2024): n Monte-Carlo copies
  x̂0 + √(σ²/α²)·ξ, L2-normalised, per-copy BCE, loss = Σ_b [logsumexp_n(ℓ) − log n] summed over
  probes, gradient ∂loss/∂z_t through the score network by autograd, ε̂ ← ε̂ + s·σ_t·∇, x̂0 from ε̂.

No host sync in the loop on the fast path: all per-step scalars are precomputed on the host.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from dglm.engine.diffusion.schedule import SAMPLERS, NoiseSchedule, multistep_coefficients
from dglm.kernels.guided_update import GuidedUpdate, GuidedUpdateInputs

# (z (B,d), alpha2 (B,)) → (v_cond (B,d), v_uncond (B,d) | None)
ModelFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]
GUIDANCE_MODES = ("fast", "exact")
MAX_INFERENCE_STEPS = 10_000
# num_inference_steps each sampler takes, [lo, hi]: the distilled student was trained and is
# evaluated for 1, 2 and 4 steps (`dglm train distill`); more steps would run it off its training
# grid at many times the cost, so they are refused, not run.
STEP_RANGES: dict[str, tuple[int, int]] = {
    "ddpm": (1, MAX_INFERENCE_STEPS),
    "ddim": (1, MAX_INFERENCE_STEPS),
    "dpmpp-2m": (1, MAX_INFERENCE_STEPS),
    "consistency": (1, 4),
}
assert set(STEP_RANGES) == set(SAMPLERS)


def is_number(value: object) -> bool:
    """A real int or float (not a bool, not a string), finite."""
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)


@dataclass(frozen=True)
class SamplerConfig:
    sampler: str = "ddpm"  # "ddpm" | "ddim" | "dpmpp-2m" | "consistency" (the distilled student)
    num_inference_steps: int = 50  # score-network evaluations (×2 rows with CFG); STEP_RANGES
    var_lambda: float = 0.2  # DDPM log-variance interpolation: 0 posterior, 1 upper bound
    schedule_scale: float = 1.0  # log-SNR shift of the sampling schedule
    guidance_mode: str = "fast"  # probe guidance: "fast" (analytic, fused) | "exact" (autograd)
    mc_samples: int = 32  # Monte-Carlo copies for `exact` guidance
    rescale: bool = True  # project x̂0 onto the √d sphere at every step
    renoise_alpha2: float = 0.95  # noise level of the latent handed to the prompt generator

    def __post_init__(self) -> None:
        if not isinstance(self.sampler, str) or self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        check_steps(self.sampler, self.num_inference_steps)
        if not is_number(self.var_lambda) or not 0.0 <= self.var_lambda <= 1.0:
            raise ValueError(f"var_lambda must be a number in [0, 1], got {self.var_lambda!r}")
        if not is_number(self.schedule_scale) or self.schedule_scale <= 0:
            raise ValueError(
                f"schedule_scale must be a positive number, got {self.schedule_scale!r}"
            )
        if not isinstance(self.guidance_mode, str) or self.guidance_mode not in GUIDANCE_MODES:
            raise ValueError(
                f"guidance_mode must be one of {GUIDANCE_MODES}, got {self.guidance_mode!r}"
            )
        m = self.mc_samples
        if isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= 65_536:
            raise ValueError(f"mc_samples must be an integer in [1, 65536], got {m!r}")
        if not isinstance(self.rescale, bool):
            raise ValueError(f"rescale must be true or false, got {self.rescale!r}")
        if not is_number(self.renoise_alpha2) or not 0.0 <= self.renoise_alpha2 <= 1.0:
            raise ValueError(
                f"renoise_alpha2 must be a number in [0, 1], got {self.renoise_alpha2!r}"
            )


def check_steps(sampler: str, steps: object) -> None:
    """ValueError naming num_inference_steps unless it is an integer in the sampler's
    STEP_RANGES, with the samplers that take that many steps."""
    lo, hi = STEP_RANGES[sampler]
    if not isinstance(steps, bool) and isinstance(steps, int) and lo <= steps <= hi:
        return
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise ValueError(f"num_inference_steps must be an integer, got {steps!r}")
    others = [s for s, (a, b) in STEP_RANGES.items() if a <= steps <= b]
    fix = f", or one of the samplers that run {steps} steps, {others}" if others else ""
    raise ValueError(
        f"num_inference_steps={steps} is outside [{lo}, {hi}], the range of sampler {sampler!r}: "
        f"pass num_inference_steps in [{lo}, {hi}]{fix}"
    )


SAMPLER_PRESETS: dict[str, SamplerConfig] = {
    "default": SamplerConfig(),
    # The reference's sampler: 250 DDPM steps, Monte-Carlo guidance through the score network.
    "reference": SamplerConfig(num_inference_steps=250, guidance_mode="exact"),
    "ddim-20": SamplerConfig(sampler="ddim", num_inference_steps=20),
    "dpmpp-2m-16": SamplerConfig(sampler="dpmpp-2m", num_inference_steps=16),
    "student-4": SamplerConfig(sampler="consistency", num_inference_steps=4),
}


@dataclass
class Guidance:
    """Probe rows and per-request targets/scales for one batch (see `ProbeSet.batch_targets`)."""

    weight: torch.Tensor  # (K, d)
    bias: torch.Tensor  # (K,)
    target: torch.Tensor  # (B, K)
    scale: torch.Tensor  # (B, K) 0 = off

    @property
    def active(self) -> bool:
        return self.weight.shape[0] > 0 and bool((self.scale != 0).any())


def draw_noise(
    generators: list[torch.Generator], n: int, dim: int, device: torch.device
) -> torch.Tensor:
    """(n, B, dim) standard normal noise, row b drawn only from generators[b].

    A request's noise therefore never depends on its batch neighbours.
    """
    cols = [torch.randn(n, dim, generator=g, device=g.device) for g in generators]
    return torch.stack(cols, dim=1).to(device)


def exact_guided_x0(
    model_fn: ModelFn,
    z: torch.Tensor,  # (B, d)
    alpha2: torch.Tensor,  # (B,)
    cfg_scale: torch.Tensor,  # (B,)
    guidance: Guidance,
    mc_noise: torch.Tensor,  # (B, n, d)
) -> torch.Tensor:
    """The reference's Monte-Carlo probe guidance with autograd through the score network → x̂0."""
    a2 = alpha2[:, None].float()
    alpha, sigma = a2.sqrt(), (1 - a2).sqrt()
    with torch.enable_grad():
        z = z.detach().float().requires_grad_(True)
        v_c, v_u = model_fn(z, alpha2)
        v = (
            v_c.float()
            if v_u is None
            else v_u.float() + cfg_scale[:, None] * (v_c.float() - v_u.float())
        )
        x0 = alpha * z - sigma * v
        eps = sigma * z + alpha * v
        copies = x0[:, None, :] + (sigma / alpha)[:, None, :] * mc_noise  # (B, n, d)
        u = F.normalize(copies, dim=-1)
        logits = u @ guidance.weight.T.float() + guidance.bias.float()  # (B, n, K)
        target = guidance.target[:, None, :].expand_as(logits).float()
        bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")  # (B, n, K)
        n = mc_noise.shape[1]
        per_row = torch.logsumexp(bce, dim=1) - math.log(n)  # (B, K)
        loss = (guidance.scale.float() * per_row).sum()
        (grad,) = torch.autograd.grad(loss, z)
    eps = eps.detach() + sigma * grad
    return (z.detach() - sigma * eps) / alpha


@torch.no_grad()
def sample(
    model_fn: ModelFn,
    noise: torch.Tensor,  # (steps + 1, B, d): [0] is z_T, [i] the noise of step i
    config: SamplerConfig,
    cfg_scale: torch.Tensor,  # (B,)
    guidance: Guidance | None,
    update_fn: GuidedUpdate,  # a guided_update implementation (kernels.guided_update)
    mc_noise: Callable[[int], torch.Tensor] | None = None,  # step → (B, n, d), `exact` mode only
) -> torch.Tensor:
    """Run the reverse diffusion from z_T = noise[0]; returns the final x̂0 (B, d) in fp32."""
    steps = config.num_inference_steps
    assert noise.shape[0] == steps + 1, (noise.shape, steps)
    schedule = NoiseSchedule(config.schedule_scale)
    b, d = noise.shape[1:]
    device = noise.device
    z = noise[0].float()
    rows, prev = multistep_coefficients(schedule, steps, config.sampler, config.var_lambda)
    coefs = torch.tensor(rows, dtype=torch.float32).to(device)  # (steps, 5)
    alpha2s = (coefs[:, 0] ** 2).tolist()
    guided = guidance is not None and guidance.active
    exact = guided and config.guidance_mode == "exact"
    if guided and not exact:
        weight, bias, target, scale = (
            guidance.weight,
            guidance.bias,
            guidance.target,
            guidance.scale,
        )
    else:
        weight, bias = torch.zeros(0, d, device=device), torch.zeros(0, device=device)
        target = scale = torch.zeros(b, 0, device=device)
    x0 = x0_prev = z
    for i in range(steps):
        a2 = torch.full((b,), alpha2s[i], device=device)
        row_coefs = coefs[i].expand(b, 5)
        if exact:
            assert mc_noise is not None
            x0 = exact_guided_x0(model_fn, z, a2, cfg_scale, guidance, mc_noise(i))
            c = row_coefs
            z = c[:, 2:3] * x0 + c[:, 3:4] * z + c[:, 4:5] * noise[i + 1]
        else:
            v_c, v_u = model_fn(z, a2)
            inputs = GuidedUpdateInputs(
                z, v_c, v_u, cfg_scale, weight, bias, target, scale, noise[i + 1], row_coefs
            )
            z, x0 = update_fn(inputs, config.rescale)
        if prev[i] != 0.0:  # DPM-Solver++(2M): the second-order correction
            z = z + prev[i] * x0_prev
        x0_prev = x0
    return x0.float()


def renoise(x0: torch.Tensor, alpha2: float, noise: torch.Tensor) -> torch.Tensor:
    """z = √alpha²·x0 + √(1 − alpha²)·ξ: the latent handed to the prompt generator."""
    return math.sqrt(alpha2) * x0 + math.sqrt(1.0 - alpha2) * noise
