"""Diffusion-LM sampling: the reverse diffusion over a sequence of word embeddings, with the
clamping trick, fixed positions (length, infilling) and classifier guidance after each step.

One loop for the reference path (DDPM, Ho et al. 2020, with the paper's 200-2000 steps) and the
few-step path (DDIM with skipped steps, Song et al. 2021, η = 0: the uniform time grid of
`schedule.time_grid` with fewer steps skips steps of the training grid); the sampler only
changes the step coefficients, from the shared `schedule.multistep_coefficients` on the sqrt
schedule: z_s = c0·x̂0 + cz·z_t + n·ξ.

Per step (Li et al. 2022):
1. x̂0 = f(z_t, t) (a self-conditioned f also reads the previous step's raw x̂0); clamping: free positions snap to their nearest word embedding
   (kernels.nearest_embedding), fixed positions take their clean embedding E[w].
2. The DDPM/DDIM update z_s = μ + n·ξ with μ = c0·x̂0 + cz·z_t.
3. Classifier guidance (`ClassifierGuidance`, a step hook: it needs μ and σ, so it acts on the
   step's output, not through the model function): K Adagrad steps on z_s of
   Σ_c s_c·CE(classifier_c(z_s, s), y_c) + λ·‖z_s − μ‖²/σ_s (the fluency term).
4. Fixed positions are reset to their clean embedding noised to time s:
   z_s = α_s·E[w] + σ_s·ξ (infilling's left/right context; length's EOS and PADs).
The last step returns x̂0 (clamped, fixed positions exact); tokens are its rounding, and fixed
positions output their own tokens, so fixed tokens never change.

Noise is drawn per row from the row's own generator (a request's seed), step by step, so a row's
output does not depend on its neighbours' randomness. No `.item()` in the loop: every per-step
scalar is computed on the host before it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from dglm.engine.diffusion.schedule import Schedule, multistep_coefficients
from dglm.engine.methods.diffusion_lm.vocab import FIRST_WORD, UNK
from dglm.kernels.nearest_embedding import half_sq_norms, nearest_embedding

SAMPLERS = ("ddpm", "ddim")  # the shared schedule's samplers this model uses

# (z (B,L,d), alpha² (B,), previous x̂0 (B,L,d) or None at the first step) → x̂0 (B,L,d); the
# previous estimate matters to a self-conditioned denoiser only
ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
NoiseFn = Callable[[int], torch.Tensor]  # step i → ξ_i (B, L, d)
# (z_s (B,L,d), μ (B,L,d), σ_s, alpha²_s) → guided z_s
StepHook = Callable[[torch.Tensor, torch.Tensor, float, float], torch.Tensor]


@dataclass
class Layout:
    """Which positions of each row are fixed, to which tokens, and which free positions must be
    words (not PAD/BOS/EOS/UNK)."""

    fixed: torch.Tensor  # (B, L) bool
    ids: torch.Tensor  # (B, L) long: the token at fixed positions (PAD elsewhere)
    word_only: torch.Tensor  # (B, L) bool: free positions that round among words only


class Rounder:
    """Nearest-embedding rounding of a table: over every token but UNK, or over words only
    (ids ≥ 4), chosen per position; fixed positions keep their own token (UNK included).
    Precomputes ½‖E‖² once.

    UNK is never a free position's output: it stands for every word outside the vocabulary, so
    its embedding is trained toward their mean and sits where an uncertain x̂0 lands; with
    clamping, a position snapped to it stays a hole in the text (it renders as nothing)."""

    def __init__(self, table: torch.Tensor) -> None:
        self.table = table.detach().float()  # (V, d)
        self.half = half_sq_norms(self.table)
        self.any_half = self.half.clone()
        self.any_half[UNK] = float("inf")  # x·E − ½‖E‖² = −inf: never the nearest
        self.words = self.table[FIRST_WORD:]
        self.words_half = self.half[FIRST_WORD:]

    def __call__(self, x: torch.Tensor, layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids (B, L), snapped (B, L, d)) of x (B, L, d) under `layout`."""
        any_ids, any_x = nearest_embedding(x, self.table, self.any_half)
        word_ids, word_x = nearest_embedding(x, self.words, self.words_half)
        wo = layout.word_only
        ids = torch.where(wo, word_ids + FIRST_WORD, any_ids)
        ids = torch.where(layout.fixed, layout.ids, ids)
        snapped = torch.where(wo[..., None], word_x, any_x)
        snapped = torch.where(layout.fixed[..., None], self.table[layout.ids].to(x.dtype), snapped)
        return ids, snapped


def sample_sequence(
    model_fn: ModelFn,
    z: torch.Tensor,  # (B, L, d) z_T
    noise_fn: NoiseFn,
    schedule: Schedule,
    sampler: str,
    steps: int,
    layout: Layout,
    rounder: Rounder,
    clamp: bool = True,
    step_hook: StepHook | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reverse diffusion from z_T → (ids (B, L) long, x̂0 (B, L, d) fp32); see the module doc."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    rows, _ = multistep_coefficients(schedule, steps, sampler)
    b = z.shape[0]
    clean = rounder.table[layout.ids].to(z.device)  # (B, L, d) E[w] at fixed positions
    fixed = layout.fixed[..., None]
    z = z.float()
    x0, prev = z, None
    for i, (alpha_t, _, c0, cz, n) in enumerate(rows):
        last = i == len(rows) - 1
        a2 = torch.full((b,), alpha_t * alpha_t, device=z.device)
        x0 = prev = model_fn(z, a2, prev).float()  # the raw estimate (as self-conditioning trains)
        if clamp or last:
            _, snapped = rounder(x0, layout)
            x0 = snapped if clamp else torch.where(fixed, clean, x0)
        else:
            x0 = torch.where(fixed, clean, x0)
        if last:
            break
        mu = c0 * x0 + cz * z
        xi = noise_fn(i + 1)
        z = mu + n * xi if n > 0 else mu
        # the noise level at s: α_s, σ_s from the next row's α_t (rows share the grid)
        alpha_s = rows[i + 1][0]
        sigma_s = math.sqrt(max(0.0, 1 - alpha_s * alpha_s))
        if step_hook is not None:
            z = step_hook(z, mu, n if n > 0 else sigma_s, alpha_s * alpha_s)
        z = torch.where(fixed, alpha_s * clean + sigma_s * xi, z)
    ids, _ = rounder(x0, layout)
    return ids, x0


@dataclass
class ClassifierTerm:
    """One classifier's pull on the rows of a batch."""

    net: torch.nn.Module  # (z (B,L,d), alpha² (B,)) → logits (B, K)
    target: torch.Tensor  # (B,) long label index (any value where scale = 0)
    scale: torch.Tensor  # (B,) fp32 weight of its cross-entropy, 0 = off for the row


class ClassifierGuidance:
    """The paper's control step (a `StepHook`): `steps` Adagrad steps of size `step_size` on z_s
    of Σ_c scale_c·CE(c(z_s, alpha²_s), y_c) + λ·‖z_s − μ‖²/σ_s, per row; rows with no active
    term are returned bit-identical. Autograd through the (small) classifiers."""

    def __init__(
        self,
        terms: list[ClassifierTerm],
        fluency: torch.Tensor,  # (B,) λ
        steps: torch.Tensor,  # (B,) long: Adagrad steps per denoising step, per row
        step_size: torch.Tensor,  # (B,) fp32
    ) -> None:
        self.terms, self.fluency = terms, fluency.float()
        self.steps, self.step_size = steps, step_size.float()
        active = torch.zeros_like(fluency, dtype=torch.bool)
        for t in terms:
            active |= t.scale != 0
        self.active = active & (steps > 0) & (step_size > 0)
        self.max_steps = int(steps.max()) if steps.numel() else 0  # host-side, once

    def __call__(
        self, z: torch.Tensor, mu: torch.Tensor, sigma: float, alpha2: float
    ) -> torch.Tensor:
        if not self.terms or self.max_steps == 0:
            return z
        b = z.shape[0]
        a2 = torch.full((b,), alpha2, device=z.device)
        x, acc = z.detach().clone(), torch.zeros_like(z)
        lam = (self.fluency / max(sigma, 1e-12))[:, None, None]  # (B, 1, 1)
        for k in range(self.max_steps):
            with torch.enable_grad():
                xg = x.requires_grad_(True)
                loss = (lam * (xg - mu).pow(2)).sum()
                for t in self.terms:
                    ce = F.cross_entropy(t.net(xg, a2), t.target, reduction="none")  # (B,)
                    loss = loss + (t.scale * ce).sum()
                (g,) = torch.autograd.grad(loss, xg)
            x = x.detach()
            acc = acc + g * g  # Adagrad: x ← x − η·g/(√Σg² + ε)
            move = (self.active & (self.steps > k)).float() * self.step_size  # (B,)
            x = x - move[:, None, None] * g / (acc.sqrt() + 1e-10)
        return torch.where(self.active[:, None, None], x, z)
