"""Training machinery shared by every trainer: config, learning-rate schedule, the diffusion
loss's γ weighting and sampling, EMA, the resumable run (checkpoints, logs, progress, the data
order). The trainers themselves: training.diffusion, .prompt, .steering, .distill.

Checkpoints (`<out>/checkpoint.pt`, loaded with `weights_only=True`) hold the model, EMA,
optimizer, data-order state and step; training resumes from them. The exported networks go to
bundles as safetensors. Progress is reported through a callback: the CLI draws the bar.

Data parallel (called inside a process group, see dglm.engine.training.parallel): every rank draws the
same global batch of `TrainConfig.batch_size` rows and the same noise from the shared generator,
and trains on its own share of the rows; gradients are averaged between backward and clipping,
so the weights stay identical and N processes compute what one process would (up to summation
order). Rank 0 alone evaluates, logs, saves and reports progress; every rank resumes from the
same checkpoint.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from dglm.engine.training import parallel
from torch import nn

logger = logging.getLogger(__name__)

Progress = Callable[[int, dict[str, float]], None]  # (step, logs) after every step
LatentPairs = tuple[torch.Tensor, torch.Tensor]  # (prefix (N, d), continuation (N, d)) latents


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
    # keep a snapshot of the weights (model + EMA, no optimizer) every this many steps as
    # snapshots/step-<n>.pt, never overwritten: the points of a learning curve; 0: none
    keep_every: int = 0
    seed: int = 0  # data order, noise and dropout draws
    # stop (with a checkpoint) once this many minutes of this invocation have passed; 0: no
    # limit. A time-boxed run (e.g. a few minutes of a lent GPU) then resumes where it stopped.
    max_minutes: float = 0.0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_every", "save_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"TrainConfig.{name} must be a positive integer, got {v!r}")
        if isinstance(self.keep_every, bool) or not isinstance(self.keep_every, int):
            raise ValueError(
                f"TrainConfig.keep_every must be an integer ≥ 0, got {self.keep_every!r}"
            )
        if self.keep_every < 0:
            raise ValueError(f"TrainConfig.keep_every must be ≥ 0, got {self.keep_every!r}")
        if not (self.max_minutes >= 0 and math.isfinite(self.max_minutes)):
            raise ValueError(f"TrainConfig.max_minutes must be ≥ 0, got {self.max_minutes!r}")
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


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
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


class Run:
    """Checkpointing, logging to <out>/log.jsonl and resuming, common to all trainers; in a
    process group also the gradient averaging, and rank 0 alone evaluates, logs and saves.

    Puts `model` on `device` in training mode, then makes its optimizer and EMA there; a
    checkpoint of the same kind and model config in `out` is resumed from.
    """

    def __init__(
        self,
        out: str | Path,
        model: nn.Module,
        cfg: TrainConfig,
        kind: str,
        model_config: dict,
        device: str | torch.device = "cpu",
    ) -> None:
        self.out, self.model, self.cfg, self.kind = Path(out), model, cfg, kind
        self.device = torch.device(device)
        model.to(self.device).train()
        self.world, self.main = parallel.world_size(), parallel.rank() == 0
        if cfg.batch_size % self.world:
            raise ValueError(
                f"TrainConfig.batch_size={cfg.batch_size} must be a multiple of the number of "
                f"processes ({self.world}): it is the batch of all processes together"
            )
        parallel.broadcast_parameters(model)  # every rank starts from rank 0's weights
        self.out.mkdir(parents=True, exist_ok=True)
        self.opt = make_optimizer(model, cfg)
        self.ema = EMA(model, cfg.ema_decay)
        self.step = 0
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.extra: dict[str, torch.Tensor] = {}
        self.last_grad_norm = 0.0
        self.last_loss = 0.0  # the step's loss, averaged over the ranks
        self.started = time.monotonic()
        self.out_of_time = False  # set by optimizer_step, the same on every rank
        self.meta = {"kind": kind, "model_config": model_config, "train_config": asdict(cfg)}
        ckpt = self.out / "checkpoint.pt"
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
            if self.main:
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

    def snapshot(self) -> Path:
        """The weights at this step (model, EMA, step, meta; no optimizer) as
        snapshots/step-<n>.pt, for a learning curve."""
        path = self.out / "snapshots" / f"step-{self.step:07d}.pt"
        path.parent.mkdir(exist_ok=True)
        state = {"model": self.model.state_dict(), "ema": self.ema.model.state_dict(),
                 "step": self.step, "meta": self.meta}  # fmt: skip
        torch.save(state, path.with_suffix(".tmp"))
        path.with_suffix(".tmp").replace(path)
        return path

    def log(self, row: dict) -> None:
        with open(self.out / "log.jsonl", "a") as f:
            f.write(json.dumps({"step": self.step, "time": time.time(), **row}) + "\n")

    def finish_step(
        self,
        loss: torch.Tensor,
        evaluate: Callable[[], dict[str, float]],
        progress: Progress | None,
    ) -> None:
        """After an optimizer step: held-out evaluation + log.jsonl, checkpoint, progress (rank 0
        only: the other ranks return at once)."""
        if not self.main:
            return
        cfg, step = self.cfg, self.step
        logs = {
            "loss": self.last_loss if self.world > 1 else float(loss.detach()),
            "grad_norm": self.last_grad_norm,
            "lr": lr_at(step - 1, cfg),
        }
        if step % cfg.eval_every == 0 or step == cfg.steps:
            logs.update(evaluate())
            self.log(logs)
        if step % cfg.save_every == 0 or step == cfg.steps:
            self.save()
        if cfg.keep_every and step % cfg.keep_every == 0:
            self.snapshot()
        if step % 50 == 0:
            logger.info("%s step %d/%d: %s", self.kind, step, cfg.steps, logs)
        if progress:
            progress(step, logs)

    def batches(self, n: int, device: torch.device | None = None) -> Iterator[torch.Tensor]:
        """The row indices of each step still to take (see `running`): batches of
        cfg.batch_size (n at most) from a fresh permutation of range(n) per epoch, drawn from the
        run's generator, on `device` (default CPU: indices into Python lists)."""
        batch = min(self.cfg.batch_size, n)
        batches = shuffled_batches(n, batch, self.gen, device or torch.device("cpu"))
        while self.running():
            yield next(batches)

    def running(self) -> bool:
        """Whether to take another step: steps left and time left (a time-boxed run checkpoints
        before it stops)."""
        if self.out_of_time and self.step < self.cfg.steps:
            if self.main:
                self.save()
                logger.info("%s: max_minutes reached at step %d; saved", self.kind, self.step)
            return False
        return self.step < self.cfg.steps

    def optimizer_step(self, loss: torch.Tensor) -> float:
        for group in self.opt.param_groups:
            group["lr"] = lr_at(self.step, self.cfg)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        elapsed = torch.tensor(time.monotonic() - self.started)
        if self.world > 1:  # the clock rides along, so every rank stops at the same step
            mean_loss, elapsed = parallel.average_gradients(self.model.parameters(), loss, elapsed)
            self.last_loss = float(mean_loss)
        self.out_of_time = 0 < self.cfg.max_minutes * 60 <= float(elapsed)
        norm = 0.0
        if self.cfg.grad_clip > 0:
            norm = float(nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip))
        self.opt.step()
        self.step += 1
        self.ema.update(self.model, self.step)
        self.last_grad_norm = norm
        return norm


def shuffled_batches(n: int, batch: int, gen: torch.Generator, device: torch.device):
    """Endless shuffled index batches (a fresh permutation per epoch, drawn from `gen`)."""
    while True:
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n - batch + 1, batch):
            yield perm[i : i + batch].to(device)
