"""Consistency distillation of the score network into a few-step student (`dglm train distill`).

Why consistency distillation (Song et al. 2023; with the guidance weight as an input, as latent
consistency models do, Luo et al. 2023) rather than progressive distillation (Salimans & Ho 2022;
Meng et al. 2023):
- one training stage gives a student that samples in 1, 2 or 4 steps (multistep consistency
  sampling), where progressive distillation needs one stage per halving (250 → … → 4 → 2 → 1);
- the student predicts x̂0 directly at every step, which is exactly where this engine's probe
  guidance acts (`fast`: the analytic probe gradient at the projected x̂0; `exact`: autograd through
  the network), so probes stay plug-and-play: any probe steers the student without retraining;
- the guidance weight w is an input of the student (zero-initialised embedding added to the time
  embedding), so classifier-free guidance costs one network evaluation per step instead of two.

The student is a `ScoreNetwork` with `guidance_embedding=True`, initialised from the teacher, and
keeps the v-parameterisation: f_θ(z_t, t, w) = proj(α_t·z_t − σ_t·v_θ(z_t, t, w)), which meets the
boundary condition f(z, 0) = z by construction (α_0 = 1, σ_0 ≈ 0). Each training step:

    n ~ U{skip, …, grid};  t = n/grid,  s = (n − skip)/grid;  w ~ U[cfg_range]
    z_t = α_t·x + σ_t·ε                                        (x: a continuation latent)
    x̂0 = proj(α_t·z_t − σ_t·v_teacher^w(z_t, t))               (CFG with weight w, frozen teacher)
    z_s = α_s·x̂0 + σ_s·(z_t − α_t·x̂0)/σ_t                      (one DDIM step of the teacher's ODE)
    loss = pseudo-Huber(f_θ(z_t, t, w) − sg[f_θ⁻(z_s, s, w)])

with θ⁻ the target network: an EMA of θ with `target_ema` (0 = the stop-gradient student itself, as
improved consistency training recommends), and pseudo-Huber c = 0.00054·√d (Song & Dhariwal 2023).
The time grid (default 64 intervals) contains every point of the 1-, 2-, 4- and 8-step samplers.
"""

from __future__ import annotations

import copy
import hashlib
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from dglm.engine.diffusion.sampler import SamplerConfig, sample
from dglm.engine.diffusion.schedule import NoiseSchedule
from dglm.engine.diffusion.score_network import ScoreNetwork
from dglm.engine.training import parallel
from dglm.engine.training.loop import LatentPairs, Progress, Run, TrainConfig
from dglm.kernels.guided_update import guided_update_ref

SCHEDULE = NoiseSchedule(1.0)  # the sampler's schedule (schedule_scale 1)


@dataclass(frozen=True)
class DistillConfig:
    grid: int = 64  # teacher ODE discretisation: t_n = n / grid
    skip: int = 1  # grid intervals one teacher DDIM step spans (LCM's skipping-step k)
    cfg_range: tuple[float, float] = (1.0, 1.0)  # guidance weights w the student learns
    target_ema: float = 0.0  # target network θ⁻ = EMA(θ); 0: the stop-gradient student
    huber_c: float | None = None  # pseudo-Huber c; None: 0.00054·√d
    rescale: bool = True  # project x̂0 onto the √d sphere, as the sampler does
    eval_rows: int = 256  # held-out rows of the evaluation

    def __post_init__(self) -> None:
        object.__setattr__(self, "cfg_range", tuple(float(x) for x in self.cfg_range))
        if not (isinstance(self.grid, int) and self.grid >= 1):
            raise ValueError(f"DistillConfig.grid must be a positive integer, got {self.grid!r}")
        if not (isinstance(self.skip, int) and 1 <= self.skip <= self.grid):
            raise ValueError(
                f"DistillConfig.skip must be in [1, grid={self.grid}], got {self.skip!r}"
            )
        lo, hi = self.cfg_range
        if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
            raise ValueError(f"DistillConfig.cfg_range must be (lo, hi), lo ≤ hi, got {(lo, hi)}")
        if not 0.0 <= self.target_ema < 1.0:
            raise ValueError(f"DistillConfig.target_ema must be in [0, 1), got {self.target_ema!r}")
        if self.huber_c is not None and not self.huber_c > 0:
            raise ValueError(f"DistillConfig.huber_c must be positive, got {self.huber_c!r}")
        if not (isinstance(self.eval_rows, int) and self.eval_rows >= 1):
            raise ValueError(f"DistillConfig.eval_rows must be positive, got {self.eval_rows!r}")


def student_from_teacher(teacher: ScoreNetwork) -> ScoreNetwork:
    """A guidance-embedding copy of the teacher: at init it predicts what the teacher does at w=1."""
    student = ScoreNetwork(replace(teacher.config, guidance_embedding=True))
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("guidance_mlp.") for k in missing), (
        missing,
        unexpected,
    )
    return student.to(next(teacher.parameters()).device)


def _coefs(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(α, σ) columns (B, 1) for times t (B,) in float64 → float32."""
    a2 = SCHEDULE.alpha2(t.double()).float()[:, None]
    return a2.sqrt(), (1 - a2).sqrt()


def _project(x0: torch.Tensor, rescale: bool) -> torch.Tensor:
    return F.normalize(x0, dim=-1) * math.sqrt(x0.shape[-1]) if rescale else x0


def teacher_v(
    teacher: ScoreNetwork, z: torch.Tensor, ctx: torch.Tensor, a2: torch.Tensor, w: torch.Tensor
) -> torch.Tensor:
    """The teacher's classifier-free-guided v̂ = v_u + w·(v_c − v_u) (one pass when all w = 1)."""
    if bool((w == 1.0).all()):
        return teacher(z, ctx, a2).float()
    b = z.shape[0]
    drop = torch.arange(2 * b, device=z.device) >= b
    v = teacher(torch.cat((z, z)), torch.cat((ctx, ctx)), torch.cat((a2, a2)), drop).float()
    v_c, v_u = v[:b], v[b:]
    return v_u + w[:, None] * (v_c - v_u)


def consistency_fn(
    net: ScoreNetwork,
    z: torch.Tensor,
    ctx: torch.Tensor,
    t: torch.Tensor,
    w: torch.Tensor,
    rescale: bool,
) -> torch.Tensor:
    """f(z_t, t, w) = proj(α_t·z_t − σ_t·v_θ(z_t, t, w))."""
    alpha, sigma = _coefs(t)
    v = net(z, ctx, (alpha**2)[:, 0], None, w).float()
    return _project(alpha * z - sigma * v, rescale)


def distill_loss(
    student: ScoreNetwork,
    target_net: ScoreNetwork,
    teacher: ScoreNetwork,
    ctx: torch.Tensor,  # (B, d) prefix latents
    x: torch.Tensor,  # (B, d) continuation latents
    n: torch.Tensor,  # (B,) grid index of t (skip ≤ n ≤ grid)
    w: torch.Tensor,  # (B,) guidance weights
    eps: torch.Tensor,  # (B, d)
    cfg: DistillConfig,
) -> torch.Tensor:
    t = n.double() / cfg.grid
    s = (n - cfg.skip).double() / cfg.grid
    alpha_t, sigma_t = _coefs(t)
    alpha_s, sigma_s = _coefs(s)
    z_t = alpha_t * x + sigma_t * eps
    with torch.no_grad():
        v = teacher_v(teacher, z_t, ctx, (alpha_t**2)[:, 0], w)
        x0 = _project(alpha_t * z_t - sigma_t * v, cfg.rescale)
        z_s = alpha_s * x0 + sigma_s * (z_t - alpha_t * x0) / sigma_t
        target = consistency_fn(target_net, z_s, ctx, s, w, cfg.rescale)
    pred = consistency_fn(student, z_t, ctx, t, w, cfg.rescale)
    c = cfg.huber_c if cfg.huber_c is not None else 0.00054 * math.sqrt(x.shape[-1])
    dist2 = (pred - target).pow(2).sum(-1)
    return ((dist2 + c * c).sqrt() - c).mean()


@torch.no_grad()
def teacher_ode(
    teacher: ScoreNetwork, z_T: torch.Tensor, ctx: torch.Tensor, w: torch.Tensor, steps: int
) -> torch.Tensor:
    """The teacher's deterministic (DDIM) sample from z_T: what the 1-step student should reach."""
    cfg = SamplerConfig(sampler="ddim", num_inference_steps=steps)
    noise = torch.cat((z_T[None], torch.zeros(steps, *z_T.shape, device=z_T.device)))

    def model_fn(z, a2):
        return teacher_v(teacher, z, ctx, a2, w), None

    return sample(model_fn, noise, cfg, w, None, guided_update_ref)


@torch.no_grad()
def evaluate_student(
    student: ScoreNetwork,
    teacher_x0: torch.Tensor,  # (N, d) the teacher's ODE samples from z_T
    z_T: torch.Tensor,
    ctx: torch.Tensor,
    w: torch.Tensor,
    reference: torch.Tensor,  # (N, d) the true continuation latents
    seed: int = 0,
) -> dict[str, float]:
    """Cosine of the student's 1/2/4-step samples to the teacher's ODE sample from the same z_T,
    and to the true continuation; the teacher's own cosine to the continuation for scale."""
    was_training = student.training
    student.eval()

    def model_fn(z, a2):
        return student(z, ctx, a2, None, w).float(), None

    logs = {"eval_teacher_cos_ref": float(F.cosine_similarity(teacher_x0, reference).mean())}
    g = torch.Generator().manual_seed(seed)
    for k in (1, 2, 4):
        cfg = SamplerConfig(sampler="consistency", num_inference_steps=k)
        extra = torch.randn(k, *z_T.shape, generator=g).to(z_T.device)
        x0 = sample(model_fn, torch.cat((z_T[None], extra)), cfg, w, None, guided_update_ref)
        logs[f"eval_cos_teacher_{k}step"] = float(F.cosine_similarity(x0, teacher_x0).mean())
        logs[f"eval_cos_ref_{k}step"] = float(F.cosine_similarity(x0, reference).mean())
    student.train(was_training)
    return logs


def train_distill(
    teacher: ScoreNetwork,
    train: LatentPairs,
    held_out: LatentPairs,
    out: str | Path,
    cfg: TrainConfig,
    distill: DistillConfig,
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
    teacher_eval_steps: int = 64,
):
    """Distil `teacher` into a student; returns the run's EMA (its `.model` is what bundles ship).

    Resumable like the other trainers (`<out>/checkpoint.pt`); the teacher must be the same on
    resume (its config is part of the run's identity). Data parallel inside a process group, as
    the trainers of dglm.engine.training.
    """
    device = torch.device(device)
    teacher = teacher.to(device).eval().requires_grad_(False)
    student = student_from_teacher(teacher)
    model_config = {
        "student": asdict(student.config),
        "distill": asdict(distill),
        "teacher_sha": _fingerprint(teacher),
    }
    run = Run(out, student, cfg, "distill", model_config, device)
    target_net = student
    if distill.target_ema > 0:
        target_net = copy.deepcopy(student).eval().requires_grad_(False)
        if "target" in run.extra:
            target_net.load_state_dict(
                dict(zip(target_net.state_dict(), run.extra["target"], strict=True))
            )
        # live views of the target's weights: checkpoints save their current values, no copies
        run.extra["target"] = list(target_net.state_dict().values())
    prefix, cont = (t.to(device).float() for t in train)
    lo, hi = distill.cfg_range

    # the held-out evaluation set: fixed z_T, w and the teacher's ODE samples (computed once)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    m = min(distill.eval_rows, held_out[0].shape[0])
    ev_ctx, ev_ref = (t[:m].to(device).float() for t in held_out)
    ev_z = torch.randn(m, prefix.shape[1], generator=g).to(device)
    ev_w = (lo + (hi - lo) * torch.rand(m, generator=g)).to(device)
    ev_teacher = teacher_ode(teacher, ev_z, ev_ctx, ev_w, teacher_eval_steps)

    def evaluate() -> dict[str, float]:
        return evaluate_student(run.ema.model, ev_teacher, ev_z, ev_ctx, ev_w, ev_ref)

    for idx in run.batches(prefix.shape[0], device):
        b = idx.shape[0]
        n = torch.randint(distill.skip, distill.grid + 1, (b,), generator=run.gen)
        w = lo + (hi - lo) * torch.rand(b, generator=run.gen)
        eps = torch.randn(b, prefix.shape[1], generator=run.gen)
        mine = parallel.shard(b)  # this rank's rows of the global batch (all of it alone)
        idx, n, w, eps = idx[mine], n[mine], w[mine], eps[mine]
        n, w, eps = n.to(device), w.to(device), eps.to(device)
        loss = distill_loss(
            student, target_net, teacher, prefix[idx], cont[idx], n, w, eps, distill
        )
        run.optimizer_step(loss)
        if target_net is not student:
            with torch.no_grad():
                for p_t, p in zip(target_net.parameters(), student.parameters(), strict=True):
                    p_t.lerp_(p.detach(), 1 - distill.target_ema)
        run.finish_step(loss, evaluate, progress)
    return run.ema


def _fingerprint(net: torch.nn.Module) -> str:
    """A short, stable identity of a network's weights (resuming needs the same teacher)."""
    h = hashlib.sha256()
    for k, v in sorted(net.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


__all__ = [
    "DistillConfig",
    "consistency_fn",
    "distill_loss",
    "evaluate_student",
    "student_from_teacher",
    "teacher_ode",
    "teacher_v",
    "train_distill",
]
