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

Data parallel (called inside a process group, see dglm.engine.parallel): every rank draws the
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
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from dglm.engine import parallel
from dglm.engine.lora import LoraConfig, LoRALinear, add_lora, load_lora_state
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
    # stop (with a checkpoint) once this many minutes of this invocation have passed; 0: no
    # limit. A time-boxed run (e.g. a few minutes of a lent GPU) then resumes where it stopped.
    max_minutes: float = 0.0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_every", "save_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"TrainConfig.{name} must be a positive integer, got {v!r}")
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
    """Checkpointing, logging to <out>/log.jsonl and resuming, common to all trainers; in a
    process group also the gradient averaging, and rank 0 alone evaluates, logs and saves."""

    def __init__(
        self, out: Path, model: nn.Module, cfg: TrainConfig, kind: str, model_config: dict
    ) -> None:
        self.out, self.model, self.cfg, self.kind = out, model, cfg, kind
        self.world, self.main = parallel.world_size(), parallel.rank() == 0
        if cfg.batch_size % self.world:
            raise ValueError(
                f"TrainConfig.batch_size={cfg.batch_size} must be a multiple of the number of "
                f"processes ({self.world}): it is the batch of all processes together"
            )
        parallel.broadcast_parameters(model)  # every rank starts from rank 0's weights
        out.mkdir(parents=True, exist_ok=True)
        self.opt = _optimizer(model, cfg)
        self.ema = EMA(model, cfg.ema_decay)
        self.step = 0
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.extra: dict[str, torch.Tensor] = {}
        self.last_grad_norm = 0.0
        self.last_loss = 0.0  # the step's loss, averaged over the ranks
        self.started = time.monotonic()
        self.out_of_time = False  # set by optimizer_step, the same on every rank
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
        if step % 50 == 0:
            logger.info("%s step %d/%d: %s", self.kind, step, cfg.steps, logs)
        if progress:
            progress(step, logs)

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
    while run.running():
        idx = next(batches)
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
    while run.running():
        idx = next(batches)
        t = torch.rand(len(idx), generator=run.gen, dtype=torch.float64)
        eps = torch.randn(len(idx), lat.shape[1], generator=run.gen)
        mine = parallel.shard(len(idx))  # this rank's rows of the global batch
        idx, t, eps = idx[mine].tolist(), t[mine], eps[mine].to(device)
        batch = {
            k: v.to(device)
            for k, v in build_lm_batch(
                [prefix_ids[i] for i in idx],
                [cont_ids[i] for i in idx],
                pg.config.prompt_len,
                pad_id,
            ).items()
        }
        a2 = AUGMENT_SCHEDULE.alpha2(t).float().to(device)
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


# ------------------------------------------------------------------------- steering: prompt
# generator pre-training on token embeddings, then joint training with decoder adapters
@dataclass(frozen=True)
class SteerConfig:
    # per-example noise level of the latent fed to the prompt generator: alpha² ~ U[min, 1]
    # (inference re-noises the proposal to alpha² = 0.95)
    alpha2_min: float = 0.5
    skip_frequent: int = 150  # chamfer targets leave out the N most frequent continuation tokens
    norm_weight: float = 0.1  # chamfer: weight of matching the soft vectors' norms to the targets'
    # joint stage: weight of the chamfer loss kept beside the LM loss (0: LM loss alone), which
    # holds the soft vectors near the continuation's content words while the decoder adapts
    chamfer_weight: float = 0.0
    shuffle_rows: int = 128  # held-out rows of the matched / shuffled / no-prompt diagnostic
    autocast_bf16: bool = True  # bf16 autocast (AMX on CPU, tensor cores on CUDA); fp32 masters

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha2_min <= 1.0:
            raise ValueError(f"SteerConfig.alpha2_min must be in [0, 1], got {self.alpha2_min!r}")
        if (
            min(self.skip_frequent, self.norm_weight, self.chamfer_weight) < 0
            or self.shuffle_rows < 2
        ):
            raise ValueError(
                "SteerConfig.skip_frequent, norm_weight and chamfer_weight must be ≥ 0 and "
                "shuffle_rows ≥ 2"
            )


def bf16_is_fast(device: torch.device | str) -> bool:
    """Whether bf16 matmuls beat fp32 here: on CUDA, and on CPUs with AMX (Sapphire Rapids and
    later). AVX-512-BF16 alone is not enough: measured on such a CPU without AMX, bf16 matmuls of
    the decoder's shapes ran at ~80 GFLOP/s per core against ~140 in fp32."""
    device = torch.device(device)
    if device.type == "cuda":
        return True
    try:
        with open("/proc/cpuinfo") as f:
            return "amx_bf16" in f.read()
    except OSError:
        return False


def _autocast(device: torch.device, enabled: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def frequent_tokens(cont_ids: list[list[int]], n: int) -> torch.Tensor:
    """The n most frequent token ids over the continuations (chamfer targets skip them)."""
    counts: dict[int, int] = {}
    for row in cont_ids:
        for t in row:
            counts[t] = counts.get(t, 0) + 1
    top = sorted(counts, key=counts.__getitem__, reverse=True)[:n]
    return torch.tensor(top, dtype=torch.long)


def content_targets(
    cont_ids: list[list[int]], skip: torch.Tensor, max_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (B, T), mask (B, T)) of each continuation's tokens outside `skip`, right padded."""
    skip_set = set(skip.tolist())
    rows = [[t for t in r if t not in skip_set][:max_tokens] for r in cont_ids]
    width = max(1, max(map(len, rows)))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for r, row in enumerate(rows):
        ids[r, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[r, : len(row)] = True
    return ids, mask


def chamfer_loss(
    soft: torch.Tensor,  # (B, P, H) soft-prompt vectors
    target: torch.Tensor,  # (B, T, H) input embeddings of the continuation's content tokens
    mask: torch.Tensor,  # (B, T) bool: real target tokens
    norm_weight: float = 0.0,
) -> torch.Tensor:
    """Symmetric chamfer distance on cosine: every soft vector near some content token's embedding
    and every content token near some soft vector, −(mean max cos P→T + mean max cos T→P)/2, plus
    norm_weight·(‖s‖ − mean ‖e‖)² / mean ‖e‖² so the vectors also take the embeddings' scale.
    Rows without a content token are left out."""
    soft, target = soft.float(), target.float()
    cos = F.normalize(soft, dim=-1) @ F.normalize(target, dim=-1).transpose(1, 2)  # (B, P, T)
    m = mask[:, None, :]
    p2t = cos.masked_fill(~m, -2.0).amax(-1).mean(-1)  # (B,)
    t2p = (cos.amax(1) * mask).sum(-1) / mask.sum(-1).clamp(min=1)  # (B,)
    rows = mask.any(-1).float()
    loss = -(((p2t + t2p) / 2) * rows).sum() / rows.sum().clamp(min=1)
    if norm_weight > 0 and bool(mask.any()):
        e_norm = (target.norm(dim=-1) * mask).sum() / mask.sum()
        loss = loss + norm_weight * ((soft.norm(dim=-1) - e_norm) ** 2).mean() / e_norm**2
    return loss


def _noised(
    lat: torch.Tensor, alpha2_min: float, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(z, alpha²): latents noised at alpha² ~ U[alpha2_min, 1] (drawn from `gen` on the CPU)."""
    a2 = alpha2_min + (1 - alpha2_min) * torch.rand(lat.shape[0], generator=gen)
    eps = torch.randn(lat.shape, generator=gen)
    a2, eps = a2.to(lat.device), eps.to(lat.device)
    return a2[:, None].sqrt() * lat + (1 - a2[:, None]).sqrt() * eps, a2


def pretrain_prompt_generator(
    pg: PromptGenerator,
    token_embeddings: torch.Tensor,  # (V, H) the decoder's input embedding matrix
    train: tuple[list[list[int]], torch.Tensor],  # continuation ids, continuation latents (N, d)
    held_out: tuple[list[list[int]], torch.Tensor],
    out: str | Path,
    cfg: TrainConfig,
    steer: SteerConfig = SteerConfig(),
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
) -> EMA:
    """Teach the prompt generator the decoder's input space without running the decoder: its P
    vectors are pulled toward the input embeddings of the continuation's content tokens
    (`chamfer_loss`), from the noised continuation latent. Cheap (no decoder pass), and it gives
    the joint stage a soft prompt that already names the continuation's words."""
    device = torch.device(device)
    pg.to(device).train()
    run = _Run(Path(out), pg, cfg, "prompt_generator_chamfer", asdict(pg.config))
    run.ema.model.to(device)
    emb = token_embeddings.detach().to(device)
    cont_ids, lat = train
    skip = frequent_tokens(cont_ids, steer.skip_frequent)
    ids, mask = content_targets(cont_ids, skip, 64)
    h_ids, h_mask = content_targets(held_out[0], skip, 64)
    h_z, h_a2 = _noised(held_out[1][:512].to(device), 0.95, torch.Generator().manual_seed(0))
    h_target = emb[h_ids[:512].to(device)]

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        run.ema.model.eval()
        soft = run.ema.model(h_z, torch.full_like(h_a2, 0.95))
        loss = chamfer_loss(soft, h_target, h_mask[:512].to(device))
        return {"eval_chamfer": float(loss)}

    batches = _batches(
        len(cont_ids), min(cfg.batch_size, len(cont_ids)), run.gen, torch.device("cpu")
    )
    while run.running():
        idx = next(batches)
        z, a2 = _noised(lat[idx].to(device), steer.alpha2_min, run.gen)
        mine = parallel.shard(len(idx))  # this rank's rows of the global batch
        idx, z, a2 = idx[mine], z[mine], a2[mine]
        with _autocast(device, steer.autocast_bf16):
            soft = pg(z, a2)
        loss = chamfer_loss(soft, emb[ids[idx].to(device)], mask[idx].to(device), steer.norm_weight)
        run.optimizer_step(loss)
        run.finish_step(loss, evaluate, progress)
    return run.ema


def build_steer_batch(
    prefix_ids: list[list[int]], cont_ids: list[list[int]], prompt_len: int, pad_id: int
) -> dict[str, torch.Tensor]:
    """The two parts of a teacher-forced row, laid out as the engine decodes it.

    prefix (B, Sp): left padded, run once without gradients into a KV cache;
    new (B, P + Tc): P soft slots then the continuation, right padded, run with gradients.
    Returns prefix_ids, prefix_mask, prefix_pos; new_ids (pad at soft slots), new_mask, new_pos,
    soft_mask; labels (B, P + Tc): at position j the next token when it is a continuation token,
    else −100; first (B,): with P = 0 the first continuation token, which the prefix's last
    position predicts (−100 otherwise). Positions count real tokens (a left-padded row starts at
    0), as in the engine's decode.
    """
    if any(not c for c in cont_ids):
        raise ValueError("every continuation needs at least one token")
    b = len(prefix_ids)
    sp = max(1, max(map(len, prefix_ids)))
    tn = prompt_len + max(map(len, cont_ids))
    out = {
        "prefix_ids": torch.full((b, sp), pad_id, dtype=torch.long),
        "prefix_mask": torch.zeros(b, sp, dtype=torch.bool),
        "new_ids": torch.full((b, tn), pad_id, dtype=torch.long),
        "new_mask": torch.zeros(b, tn, dtype=torch.bool),
        "labels": torch.full((b, tn), -100, dtype=torch.long),
        "first": torch.full((b,), -100, dtype=torch.long),
    }
    for r, (p, c) in enumerate(zip(prefix_ids, cont_ids, strict=True)):
        if p:
            out["prefix_ids"][r, sp - len(p) :] = torch.tensor(p, dtype=torch.long)
            out["prefix_mask"][r, sp - len(p) :] = True
        c_t = torch.tensor(c, dtype=torch.long)
        out["new_ids"][r, prompt_len : prompt_len + len(c)] = c_t
        out["new_mask"][r, : prompt_len + len(c)] = True
        if prompt_len:
            out["labels"][r, prompt_len - 1 : prompt_len - 1 + len(c)] = c_t
        else:
            out["labels"][r, : len(c) - 1] = c_t[1:]
            out["first"][r] = c_t[0] if p else -100
    out["prefix_pos"] = (out["prefix_mask"].long().cumsum(1) - 1).clamp(min=0)
    lp = out["prefix_mask"].sum(1, keepdim=True)  # (B, 1)
    out["new_pos"] = lp + torch.arange(tn)[None, :]
    out["soft_mask"] = torch.zeros(b, tn, dtype=torch.bool)
    out["soft_mask"][:, :prompt_len] = True
    return out


class _PrefixKV:
    """KV store for the blocks: the cached prefix keys/values (no gradient) with the new tokens'
    appended (with gradient), without writing in place (autograd keeps every layer's copy)."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k, self.v = k, v  # (L, B, n_kv, Sp, Dh)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        return torch.cat([self.k[layer], k], dim=2), torch.cat([self.v[layer], v], dim=2)


def steer_lm_loss(
    decoder: nn.Module,
    batch: dict[str, torch.Tensor],
    soft_prompt: torch.Tensor | None,  # (B, P, H); None when the batch was built with P = 0
    per_row: bool = False,
) -> torch.Tensor:
    """Next-token cross-entropy over continuation tokens: the mean, or (B,) per row.

    The prefix runs once without gradients and its KV cache feeds the soft prompt and the
    continuation, which run with gradients (into the soft prompt and any adapters); the LM head
    runs only where a continuation token is predicted, on a 2-D (N, H) slice (a 3-D slice would
    become a batched matmul over copies of the (V, H) weight).
    """
    pmask, nmask, labels = batch["prefix_mask"], batch["new_mask"], batch["labels"]
    b, sp = pmask.shape
    with torch.no_grad():
        cache = decoder.new_cache(b, sp)
        h_prefix = decoder.hidden_states(
            decoder.embed(batch["prefix_ids"]), batch["prefix_pos"], cache, pmask
        )  # (B, Sp, H)
    x = decoder.embed(batch["new_ids"])  # (B, Tn, H)
    if soft_prompt is not None:
        x = x.masked_scatter(batch["soft_mask"][..., None], soft_prompt.to(x.dtype))
    tn = x.shape[1]
    q = torch.arange(tn, device=x.device)
    own = q[None, :] == q[:, None]  # (Tn, Tn)
    causal = (q[None, :] <= q[:, None])[None] & (nmask[:, None, :] | own[None])  # (B, Tn, Tn)
    allowed = torch.cat([pmask[:, None, :].expand(b, tn, sp), causal], dim=-1)[:, None]
    hidden = decoder.blocks_forward(
        x, batch["new_pos"], _PrefixKV(cache.k, cache.v), allowed, False
    )
    keep = labels != -100  # (B, Tn)
    h, targets, rows = hidden[keep], labels[keep], keep.nonzero()[:, 0]
    first = batch["first"] != -100  # (B,) only when the batch has no soft slots
    if bool(first.any()):
        h = torch.cat([h_prefix[first, -1].to(h.dtype), h])
        targets = torch.cat([batch["first"][first], targets])
        rows = torch.cat([first.nonzero()[:, 0], rows])
    losses = F.cross_entropy(decoder.logits(h), targets, reduction="none")  # (N,) fp32
    if not per_row:
        return losses.mean()
    total = torch.zeros(b, device=losses.device).index_add_(0, rows, losses)
    return total / torch.bincount(rows, minlength=b).clamp(min=1)


class SteerModules(nn.Module):
    """What the joint stage trains: the prompt generator and the decoder's adapters (the same
    Parameter objects as inside the decoder's LoRALinear layers), for one optimizer and one
    checkpoint."""

    def __init__(self, pg: PromptGenerator, adapters: dict[str, LoRALinear]) -> None:
        super().__init__()
        self.pg = pg
        self.lora = nn.ParameterDict(
            {
                f"{path.replace('.', '__')}__{w}": getattr(m, f"lora_{w}")
                for path, m in adapters.items()
                for w in "ab"
            }
        )

    def lora_state(self) -> dict[str, torch.Tensor]:
        """Adapter weights under their decoder paths ("<path>.lora_a"), as bundles store them."""
        return split_steering_state(
            {k: v.detach().float().cpu().contiguous() for k, v in self.state_dict().items()}
        )[1]


@torch.no_grad()
def evaluate_steering(
    pg: PromptGenerator,
    decoder: nn.Module,
    held_out: tuple[list[list[int]], list[list[int]], torch.Tensor],
    pad_id: int,
    device: torch.device,
    rows: int = 128,
    batch_size: int = 32,
    alpha2: float = 0.95,
    autocast: bool = True,
) -> dict[str, float]:
    """The held-out diagnostic: continuation loss with the soft prompt from the matched latent,
    from latents shuffled across the batch (each row gets the next row's), and with no soft
    prompt. matched ≪ shuffled means the soft prompt carries the latent; matched < no prompt
    means it helps the decoder. Latents are noised to `alpha2` as at inference."""
    was_training = pg.training
    pg.eval()
    prefix_ids, cont_ids, lat = held_out
    n = min(rows, len(prefix_ids))
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(n, lat.shape[1], generator=g).to(device)
    z = math.sqrt(alpha2) * lat[:n].to(device) + math.sqrt(1 - alpha2) * eps
    sums = {"eval_matched": 0.0, "eval_shuffled": 0.0, "eval_no_prompt": 0.0}
    p = pg.config.prompt_len
    for s in range(0, n, batch_size):
        e = min(n, s + batch_size)
        batch = _to(build_steer_batch(prefix_ids[s:e], cont_ids[s:e], p, pad_id), device)
        plain = _to(build_steer_batch(prefix_ids[s:e], cont_ids[s:e], 0, pad_id), device)
        a2 = torch.full((e - s,), alpha2, device=device)
        with _autocast(device, autocast):
            sp = pg(z[s:e], a2)
            shuffled = pg(torch.roll(z[s:e], 1, dims=0), a2)
            sums["eval_matched"] += float(steer_lm_loss(decoder, batch, sp, True).sum())
            sums["eval_shuffled"] += float(steer_lm_loss(decoder, batch, shuffled, True).sum())
            sums["eval_no_prompt"] += float(steer_lm_loss(decoder, plain, None, True).sum())
    pg.train(was_training)
    logs = {k: v / n for k, v in sums.items()}
    logs["eval_gap"] = logs["eval_shuffled"] - logs["eval_matched"]
    return logs


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def train_steering(
    pg: PromptGenerator,
    decoder: nn.Module,
    train: tuple[list[list[int]], list[list[int]], torch.Tensor],  # prefix ids, cont ids, latents
    held_out: tuple[list[list[int]], list[list[int]], torch.Tensor],
    pad_id: int,
    out: str | Path,
    cfg: TrainConfig,
    lora: LoraConfig | None,
    steer: SteerConfig = SteerConfig(),
    init_lora: dict[str, torch.Tensor] | None = None,
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
) -> SteerModules:
    """Train the prompt generator jointly with low-rank adapters on the decoder (lora=None: the
    decoder stays frozen) on the decoder's LM loss of the continuation, given the soft prompt
    from the continuation's noised latent. The decoder's base weights stay frozen (keep them in
    bf16 to train on AMX / tensor cores; the adapters and the prompt generator are fp32 masters
    under bf16 autocast). `init_lora` resumes adapters shipped in a bundle. Logs the held-out
    matched / shuffled / no-prompt diagnostic every `cfg.eval_every` steps. Returns the live
    (not EMA) modules; the decoder keeps its adapters (see dglm.engine.lora.unwrap_lora)."""
    device = torch.device(device)
    decoder.requires_grad_(False).eval()
    adapters = add_lora(decoder, lora) if lora is not None else {}
    for m in adapters.values():
        m.to(device)
    if init_lora:
        load_lora_state(decoder, init_lora)
    pg.to(device).train()
    modules = SteerModules(pg, adapters)
    meta = {
        "prompt_generator": asdict(pg.config),
        "lora": None if lora is None else lora.to_dict(),
        "steer": asdict(steer),
    }
    run = _Run(Path(out), modules, cfg, "steering", meta)
    run.ema.model.to(device)
    prefix_ids, cont_ids, lat = train
    batches = _batches(
        len(prefix_ids), min(cfg.batch_size, len(prefix_ids)), run.gen, torch.device("cpu")
    )

    def evaluate() -> dict[str, float]:
        return evaluate_steering(
            pg, decoder, held_out, pad_id, device, steer.shuffle_rows, autocast=steer.autocast_bf16
        )

    if steer.chamfer_weight > 0:
        skip = frequent_tokens(cont_ids, steer.skip_frequent)
        content, content_mask = content_targets(cont_ids, skip, 64)
    if run.main and run.step == 0 and not (Path(out) / "log.jsonl").exists():
        run.log({"phase": "start", **evaluate()})
    while run.running():
        idx = next(batches)
        z, a2 = _noised(lat[idx].to(device), steer.alpha2_min, run.gen)
        mine = parallel.shard(len(idx))  # this rank's rows of the global batch
        idx, z, a2 = idx[mine], z[mine], a2[mine]
        ids = idx.tolist()
        batch = _to(
            build_steer_batch(
                [prefix_ids[i] for i in ids],
                [cont_ids[i] for i in ids],
                pg.config.prompt_len,
                pad_id,
            ),
            device,
        )
        with _autocast(device, steer.autocast_bf16):
            soft = pg(z, a2)
            loss = steer_lm_loss(decoder, batch, soft)
        if steer.chamfer_weight > 0:
            with torch.no_grad():
                target = decoder.embed(content[idx].to(device)).float()
            loss = loss + steer.chamfer_weight * chamfer_loss(
                soft, target, content_mask[idx].to(device), steer.norm_weight
            )
        run.optimizer_step(loss)
        run.finish_step(loss, evaluate, progress)
    return modules


def split_steering_state(
    state: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A SteerModules state dict → (prompt-generator state, adapter state under decoder paths)."""
    pg = {k[len("pg.") :]: v for k, v in state.items() if k.startswith("pg.")}
    lora = {
        f"{k[len('lora.') : -3].replace('__', '.')}.lora_{k[-1]}": v
        for k, v in state.items()
        if k.startswith("lora.")
    }
    return pg, lora
