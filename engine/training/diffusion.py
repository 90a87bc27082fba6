"""Training the score network (the diffusion prior over continuation latents)."""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

import torch
from dglm.engine.diffusion.score_network import ScoreNetwork
from dglm.engine.training import parallel
from dglm.engine.training.loop import (
    EMA,
    GAMMA_MAX,
    GAMMA_MIN,
    LatentPairs,
    LogNormalVWeighting,
    LossEMASampler,
    Progress,
    Run,
    TrainConfig,
)

logger = logging.getLogger(__name__)


def diffusion_loss(
    net: ScoreNetwork,
    prefix: torch.Tensor,  # (B, d) prefix latents
    target: torch.Tensor,  # (B, d) continuation latents
    gamma: torch.Tensor,  # (B,) log-SNR
    weight: torch.Tensor,  # (B,) loss weight / sampling density
    drop: torch.Tensor,  # (B,) bool: null context
    eps: torch.Tensor,  # (B, d)
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scalar loss, per-example unweighted v-MSE)."""
    a2 = torch.sigmoid(gamma)[:, None]
    z = a2.sqrt() * target + (1 - a2).sqrt() * eps
    v_target = a2.sqrt() * eps - (1 - a2).sqrt() * target
    v = net(z, prefix, a2[:, 0], drop)
    mse = (v.float() - v_target).pow(2).mean(-1)
    return (weight * mse).mean(), mse


def train_diffusion(
    net: ScoreNetwork,
    train: LatentPairs,
    held_out: LatentPairs,
    out: str | Path,
    cfg: TrainConfig,
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
) -> EMA:
    """Train the score network as the DGLM reference does; returns the EMA (its `.model` is what
    bundles ship).

    v-prediction MSE on continuation latents given prefix latents, with a log-normal v-weighting
    of the log-SNR γ (Kingma & Gao 2023 conversion, made monotonic in ε-space); γ ∈ [−15, 15]
    drawn by importance sampling from a loss-EMA histogram; the prefix dropped with probability
    `cfg.cfg_dropout` for classifier-free guidance.
    """
    device = torch.device(device)
    run = Run(out, net, cfg, "diffusion", asdict(net.config), device)
    weighting, sampler = LogNormalVWeighting(), LossEMASampler()
    if "gamma_bins" in run.extra:
        sampler.bins = run.extra["gamma_bins"].double()
    prefix, cont = (t.to(device).float() for t in train)
    for idx in run.batches(prefix.shape[0], device):
        b = idx.shape[0]
        gamma, density = sampler.sample(b, run.gen)
        drop = torch.rand(b, generator=run.gen) < cfg.cfg_dropout
        eps = torch.randn(b, prefix.shape[1], generator=run.gen)
        mine = parallel.shard(b)  # this rank's rows of the global batch
        idx, gamma, density, drop, eps = (t[mine] for t in (idx, gamma, density, drop, eps))
        gamma, density, drop, eps = (t.to(device) for t in (gamma, density, drop, eps))
        w = weighting(gamma)
        loss, mse = diffusion_loss(net, prefix[idx], cont[idx], gamma, w / density, drop, eps)
        # every rank updates the histogram with the whole batch, so their γ draws stay equal
        sampler.update(
            parallel.all_gather_rows(gamma), parallel.all_gather_rows((w * mse).detach())
        )
        run.optimizer_step(loss)
        run.extra["gamma_bins"] = sampler.bins  # the live histogram: checkpoints save its values
        run.finish_step(loss, lambda: evaluate_diffusion(run.ema.model, held_out, device), progress)
    return run.ema


@torch.no_grad()
def evaluate_diffusion(
    net: ScoreNetwork,
    held_out: LatentPairs,
    device: torch.device,
    seed: int = 0,
) -> dict[str, float]:
    """Held-out weighted v-loss at fixed γ draws, and unweighted MSE at γ ∈ {−5, 0, 5}."""
    net.eval()
    prefix, cont = (t[:2048].to(device).float() for t in held_out)
    g = torch.Generator().manual_seed(seed)
    n = prefix.shape[0]
    gamma = (torch.rand(n, generator=g) * (GAMMA_MAX - GAMMA_MIN) + GAMMA_MIN).to(device)
    eps = torch.randn(n, prefix.shape[1], generator=g).to(device)
    no_drop = torch.zeros(n, dtype=torch.bool, device=device)
    w = LogNormalVWeighting()(gamma)
    loss, _ = diffusion_loss(net, prefix, cont, gamma, w, no_drop, eps)
    logs = {"eval_loss": float(loss)}
    for gv in (-5.0, 0.0, 5.0):
        _, mse = diffusion_loss(
            net, prefix, cont, torch.full((n,), gv, device=device), w, no_drop, eps
        )
        logs[f"eval_mse_gamma{gv:+.0f}"] = float(mse.mean())
    net.train()
    return logs
