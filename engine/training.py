"""Training the score network (diffusion prior) and the prompt generator, resumably.

Recipes follow the DGLM reference (shared/design/reference.md):
- diffusion: v-prediction MSE on continuation latents given prefix latents, log-normal v-weighting
  of the log-SNR γ (Kingma & Gao 2023 conversion, made monotonic in ε-space), γ ∈ [−15, 15] drawn by
  importance sampling from a loss-EMA histogram, prefix dropped with p = 0.1 for classifier-free
  guidance, EMA of the weights for sampling;
- prompt generator: the frozen decoder's LM loss on the continuation, given the soft prompt made
  from the continuation's latent noised by the cosine schedule with scale 3 (noise augmentation).

Checkpoints (`<out>/checkpoint.pt`, loaded with `weights_only=True`) hold the model, EMA,
optimizer, data-order state and step; training resumes from them. The exported networks go to
bundles as safetensors. Progress is reported through a callback: the CLI draws the bar.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from dglm.engine.networks import PromptGenerator, ScoreNetwork
from dglm.engine.schedule import NoiseSchedule
from torch import nn

logger = logging.getLogger(__name__)

Progress = Callable[[int, dict[str, float]], None]  # (step, logs) after every step


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 20_000  # optimizer steps in total (resuming continues up to this)
    batch_size: int = 256  # examples per step
    lr: float = 3e-4  # peak learning rate (AdamW), linear warm-up then cosine decay
    warmup: int = 500  # warm-up steps
    weight_decay: float = 0.01  # AdamW decoupled weight decay
    grad_clip: float = 1.0  # max global grad norm (0 = off)
    ema_decay: float = 0.999  # EMA of weights (the reference uses 0.9999 over far more steps)
    cfg_dropout: float = 0.1  # diffusion: probability of replacing the prefix by the null context
    eval_every: int = 500  # steps between held-out evaluations
    save_every: int = 1000  # steps between checkpoints
    seed: int = 0  # data order, noise and dropout draws

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_every", "save_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"TrainConfig.{name} must be a positive integer, got {v!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"TrainConfig.lr must be positive, got {self.lr!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"TrainConfig.ema_decay must be in [0, 1), got {self.ema_decay!r}")
        if not 0.0 <= self.cfg_dropout < 1.0:
            raise ValueError(f"TrainConfig.cfg_dropout must be in [0, 1), got {self.cfg_dropout!r}")


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))


# ------------------------------------------------------------------------- loss weighting, γ sampling
GAMMA_MIN, GAMMA_MAX = -15.0, 15.0


class LogNormalVWeighting:
    """w_v(γ) ∝ N(γ; mean, std), converted to ε-weights w_ε = w_v·(e^−γ + 1), made non-increasing
    in γ (cumulative max from the right), and back to v-weights; normalised to max 1."""

    def __init__(self, mean: float = 0.0, std: float = 2.4, n: int = 10_000) -> None:
        self.grid = torch.linspace(GAMMA_MIN, GAMMA_MAX, n, dtype=torch.float64)
        w_v = torch.exp(torch.distributions.Normal(mean, std).log_prob(self.grid))
        w_eps = w_v * (torch.exp(-self.grid) + 1)
        w_eps = torch.flip(torch.cummax(torch.flip(w_eps, [0]), 0).values, [0])
        w_v = w_eps / (torch.exp(-self.grid) + 1)
        self.table = (w_v / w_v.max()).float()

    def __call__(self, gamma: torch.Tensor) -> torch.Tensor:
        idx = torch.bucketize(gamma.double().cpu(), self.grid).clamp(max=len(self.grid) - 1)
        return self.table[idx].to(gamma.device)


class LossEMASampler:
    """Importance sampling of γ from a histogram of EMA'd weighted losses (100 bins on [−15, 15])."""

    def __init__(self, n_bins: int = 100, decay: float = 0.9) -> None:
        self.n_bins, self.decay = n_bins, decay
        self.bins = torch.ones(n_bins, dtype=torch.float64)
        self.width = (GAMMA_MAX - GAMMA_MIN) / n_bins

    def sample(self, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(γ (n,), density (n,)) with density normalised so that uniform sampling gives 1."""
        probs = self.bins / self.bins.sum()
        idx = torch.multinomial(probs, n, replacement=True, generator=gen)
        gamma = GAMMA_MIN + (idx + torch.rand(n, generator=gen, dtype=torch.float64)) * self.width
        return gamma.float(), (probs[idx] * self.n_bins).float()

    def update(self, gamma: torch.Tensor, losses: torch.Tensor) -> None:
        idx = ((gamma.double().cpu() - GAMMA_MIN) / self.width).long().clamp(0, self.n_bins - 1)
        sums = torch.zeros(self.n_bins, dtype=torch.float64).index_add_(
            0, idx, losses.detach().double().cpu()
        )
        counts = torch.bincount(idx, minlength=self.n_bins).double()
        hit = counts > 0
        self.bins[hit] = self.decay * self.bins[hit] + (1 - self.decay) * sums[hit] / counts[hit]


# ------------------------------------------------------------------------- shared loop machinery
class EMA:
    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))  # warm-up of the EMA horizon
        for e, p in zip(self.model.parameters(), model.parameters(), strict=True):
            e.lerp_(p.detach(), 1 - d)


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and p.requires_grad]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 and p.requires_grad]
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=(0.9, 0.99),
    )


class _Run:
    """Checkpointing, logging to <out>/log.jsonl and resuming, common to both trainers."""

    def __init__(
        self, out: Path, model: nn.Module, cfg: TrainConfig, kind: str, model_config: dict
    ) -> None:
        self.out, self.model, self.cfg, self.kind = out, model, cfg, kind
        out.mkdir(parents=True, exist_ok=True)
        self.opt = _optimizer(model, cfg)
        self.ema = EMA(model, cfg.ema_decay)
        self.step = 0
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.extra: dict[str, torch.Tensor] = {}
        self.last_grad_norm = 0.0
        self.meta = {"kind": kind, "model_config": model_config, "train_config": asdict(cfg)}
        ckpt = out / "checkpoint.pt"
        if ckpt.exists():
            state = torch.load(ckpt, map_location="cpu", weights_only=True)
            if state["meta"]["kind"] != kind or state["meta"]["model_config"] != model_config:
                raise ValueError(
                    f"{ckpt} belongs to a different run ({state['meta']['kind']}); use another --out"
                )
            model.load_state_dict(state["model"])
            self.ema.model.load_state_dict(state["ema"])
            self.opt.load_state_dict(state["opt"])
            self.step = int(state["step"])
            self.gen.set_state(state["rng"])
            self.extra = state.get("extra", {})
            logger.info("resumed %s from step %d", kind, self.step)

    def save(self) -> None:
        state = {
            "model": self.model.state_dict(),
            "ema": self.ema.model.state_dict(),
            "opt": self.opt.state_dict(),
            "step": self.step,
            "rng": self.gen.get_state(),
            "extra": self.extra,
            "meta": self.meta,
        }
        tmp = self.out / "checkpoint.pt.tmp"
        torch.save(state, tmp)
        tmp.replace(self.out / "checkpoint.pt")

    def log(self, row: dict) -> None:
        with open(self.out / "log.jsonl", "a") as f:
            f.write(json.dumps({"step": self.step, "time": time.time(), **row}) + "\n")

    def finish_step(
        self,
        loss: torch.Tensor,
        evaluate: Callable[[], dict[str, float]],
        progress: Progress | None,
    ) -> None:
        """After an optimizer step: held-out evaluation + log.jsonl, checkpoint, progress."""
        cfg, step = self.cfg, self.step
        logs = {
            "loss": float(loss.detach()),
            "grad_norm": self.last_grad_norm,
            "lr": lr_at(step - 1, cfg),
        }
        if step % cfg.eval_every == 0 or step == cfg.steps:
            logs.update(evaluate())
            self.log(logs)
        if step % cfg.save_every == 0 or step == cfg.steps:
            self.save()
        if step % 50 == 0:
            logger.info("%s step %d/%d: %s", self.kind, step, cfg.steps, logs)
        if progress:
            progress(step, logs)

    def optimizer_step(self, loss: torch.Tensor) -> float:
        for group in self.opt.param_groups:
            group["lr"] = lr_at(self.step, self.cfg)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = 0.0
        if self.cfg.grad_clip > 0:
            norm = float(nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip))
        self.opt.step()
        self.step += 1
        self.ema.update(self.model, self.step)
        self.last_grad_norm = norm
        return norm


def _batches(n: int, batch: int, gen: torch.Generator, device: torch.device):
    """Endless shuffled index batches (a fresh permutation per epoch, drawn from `gen`)."""
    while True:
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n - batch + 1, batch):
            yield perm[i : i + batch].to(device)


# ------------------------------------------------------------------------- diffusion prior
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
    train: tuple[torch.Tensor, torch.Tensor],  # (prefix (N, d), continuation (N, d)) latents
    held_out: tuple[torch.Tensor, torch.Tensor],
    out: str | Path,
    cfg: TrainConfig,
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
) -> EMA:
    """Train the score network; returns the EMA (its `.model` is what bundles ship)."""
    device = torch.device(device)
    net.to(device).train()
    run = _Run(Path(out), net, cfg, "diffusion", asdict(net.config))
    run.ema.model.to(device)
    weighting, sampler = LogNormalVWeighting(), LossEMASampler()
    if "gamma_bins" in run.extra:
        sampler.bins = run.extra["gamma_bins"].double()
    prefix, cont = (t.to(device).float() for t in train)
    batches = _batches(prefix.shape[0], min(cfg.batch_size, prefix.shape[0]), run.gen, device)
    while run.step < cfg.steps:
        idx = next(batches)
        b = idx.shape[0]
        gamma, density = sampler.sample(b, run.gen)
        drop = torch.rand(b, generator=run.gen) < cfg.cfg_dropout
        eps = torch.randn(b, prefix.shape[1], generator=run.gen)
        gamma, density, drop, eps = (t.to(device) for t in (gamma, density, drop, eps))
        w = weighting(gamma)
        loss, mse = diffusion_loss(net, prefix[idx], cont[idx], gamma, w / density, drop, eps)
        sampler.update(gamma, w * mse)
        run.optimizer_step(loss)
        run.extra["gamma_bins"] = sampler.bins  # the live histogram: checkpoints save its values
        run.finish_step(loss, lambda: evaluate_diffusion(run.ema.model, held_out, device), progress)
    return run.ema


@torch.no_grad()
def evaluate_diffusion(
    net: ScoreNetwork,
    held_out: tuple[torch.Tensor, torch.Tensor],
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


# ------------------------------------------------------------------------- prompt generator
AUGMENT_SCHEDULE = NoiseSchedule(scale=3.0)


def build_lm_batch(
    prefix_ids: list[list[int]], cont_ids: list[list[int]], prompt_len: int, pad_id: int
) -> dict[str, torch.Tensor]:
    """Right-padded rows [prefix ; P soft slots ; continuation] for teacher forcing.

    Returns ids (B, S) with pad at soft slots, soft_mask (B, S) bool marking soft slots,
    key_mask (B, S) bool marking real positions, labels (B, S) with −100 except where the next
    token is a continuation token (logits at position j predict token j + 1).
    """
    rows = len(prefix_ids)
    lens = [len(p) + prompt_len + len(c) for p, c in zip(prefix_ids, cont_ids, strict=True)]
    s = max(lens)
    ids = torch.full((rows, s), pad_id, dtype=torch.long)
    soft = torch.zeros(rows, s, dtype=torch.bool)
    key = torch.zeros(rows, s, dtype=torch.bool)
    labels = torch.full((rows, s), -100, dtype=torch.long)
    for r, (p, c) in enumerate(zip(prefix_ids, cont_ids, strict=True)):
        lp = len(p)
        ids[r, :lp] = torch.tensor(p)
        soft[r, lp : lp + prompt_len] = True
        start = lp + prompt_len
        ids[r, start : start + len(c)] = torch.tensor(c, dtype=torch.long)
        key[r, : lens[r]] = True
        labels[r, start - 1 : start - 1 + len(c)] = torch.tensor(c, dtype=torch.long)
    return {"ids": ids, "soft_mask": soft, "key_mask": key, "labels": labels}


def lm_loss_with_soft_prompt(
    decoder: nn.Module,
    batch: dict[str, torch.Tensor],
    soft_prompt: torch.Tensor | None,  # (B, P, H); None: the batch has no soft slots
) -> torch.Tensor:
    """Mean next-token cross-entropy over continuation tokens, decoder frozen."""
    ids = batch["ids"]
    emb = decoder.embed(ids)
    if soft_prompt is not None:
        emb = emb.masked_scatter(batch["soft_mask"][..., None], soft_prompt.to(emb.dtype))
    positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    hidden = decoder.hidden_states(emb, positions, key_mask=batch["key_mask"])  # (B, S, H)
    labels = batch["labels"]
    keep = labels != -100  # the LM head runs only where a continuation token is predicted
    logits = decoder.logits(hidden[keep][None])[0]  # (N, V) fp32
    return F.cross_entropy(logits, labels[keep])


def train_prompt_generator(
    pg: PromptGenerator,
    decoder: nn.Module,
    train: tuple[
        list[list[int]], list[list[int]], torch.Tensor
    ],  # prefix ids, continuation ids, latents (N, d)
    held_out: tuple[list[list[int]], list[list[int]], torch.Tensor],
    pad_id: int,
    out: str | Path,
    cfg: TrainConfig,
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
) -> EMA:
    """Train the prompt generator against the frozen decoder's LM loss (noise-augmented latents)."""
    device = torch.device(device)
    pg.to(device).train()
    decoder.requires_grad_(False).eval()
    run = _Run(Path(out), pg, cfg, "prompt_generator", asdict(pg.config))
    run.ema.model.to(device)
    prefix_ids, cont_ids, lat = train
    batches = _batches(
        len(prefix_ids), min(cfg.batch_size, len(prefix_ids)), run.gen, torch.device("cpu")
    )
    while run.step < cfg.steps:
        idx = next(batches).tolist()
        batch = {
            k: v.to(device)
            for k, v in build_lm_batch(
                [prefix_ids[i] for i in idx],
                [cont_ids[i] for i in idx],
                pg.config.prompt_len,
                pad_id,
            ).items()
        }
        t = torch.rand(len(idx), generator=run.gen, dtype=torch.float64)
        a2 = AUGMENT_SCHEDULE.alpha2(t).float().to(device)
        eps = torch.randn(len(idx), lat.shape[1], generator=run.gen).to(device)
        z = a2[:, None].sqrt() * lat[idx].to(device) + (1 - a2[:, None]).sqrt() * eps
        loss = lm_loss_with_soft_prompt(decoder, batch, pg(z, a2))
        run.optimizer_step(loss)
        run.finish_step(
            loss,
            lambda: evaluate_prompt_generator(run.ema.model, decoder, held_out, pad_id, device),
            progress,
        )
    return run.ema


@torch.no_grad()
def evaluate_prompt_generator(
    pg: PromptGenerator,
    decoder: nn.Module,
    held_out: tuple[list[list[int]], list[list[int]], torch.Tensor],
    pad_id: int,
    device: torch.device,
    alpha2s: tuple[float, ...] = (1.0, 0.95, 0.0),
    max_rows: int = 64,
    batch_size: int = 16,
) -> dict[str, float]:
    """Held-out continuation loss with the soft prompt from the clean / noised / pure-noise latent,
    and with no soft prompt at all (plain decoding of prefix → continuation)."""
    pg.eval()
    prefix_ids, cont_ids, lat = held_out
    n = min(max_rows, len(prefix_ids))
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(n, lat.shape[1], generator=g)
    totals = {f"eval_loss_a2_{a:.2f}": 0.0 for a in alpha2s} | {"eval_loss_no_prompt": 0.0}
    for s in range(0, n, batch_size):
        e = min(n, s + batch_size)
        batch = {
            k: v.to(device)
            for k, v in build_lm_batch(
                prefix_ids[s:e], cont_ids[s:e], pg.config.prompt_len, pad_id
            ).items()
        }
        for a in alpha2s:
            z = math.sqrt(a) * lat[s:e].to(device) + math.sqrt(1 - a) * eps[s:e].to(device)
            sp = pg(z, torch.full((e - s,), a, device=device))
            totals[f"eval_loss_a2_{a:.2f}"] += float(
                lm_loss_with_soft_prompt(decoder, batch, sp)
            ) * (e - s)
        plain = {
            k: v.to(device)
            for k, v in build_lm_batch(prefix_ids[s:e], cont_ids[s:e], 0, pad_id).items()
        }
        totals["eval_loss_no_prompt"] += float(lm_loss_with_soft_prompt(decoder, plain, None)) * (
            e - s
        )
    pg.train()
    return {k: v / n for k, v in totals.items()}
