"""Steering training: the prompt generator with the decoder's LoRA adapters, jointly."""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from dglm.engine.models.lora import LoraConfig, LoRALinear, add_lora, load_lora_state
from dglm.engine.prompt.generator import PromptGenerator
from dglm.engine.training import parallel
from dglm.engine.training.loop import EMA, Progress, Run, TrainConfig
from torch import nn

logger = logging.getLogger(__name__)


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


def maybe_autocast(device: torch.device, enabled: bool):
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


def noised(
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
    run = Run(out, pg, cfg, "prompt_generator_chamfer", asdict(pg.config), device)
    emb = token_embeddings.detach().to(device)
    cont_ids, lat = train
    skip = frequent_tokens(cont_ids, steer.skip_frequent)
    ids, mask = content_targets(cont_ids, skip, 64)
    h_ids, h_mask = content_targets(held_out[0], skip, 64)
    h_z, h_a2 = noised(held_out[1][:512].to(device), 0.95, torch.Generator().manual_seed(0))
    h_target = emb[h_ids[:512].to(device)]

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        run.ema.model.eval()
        soft = run.ema.model(h_z, torch.full_like(h_a2, 0.95))
        loss = chamfer_loss(soft, h_target, h_mask[:512].to(device))
        return {"eval_chamfer": float(loss)}

    for idx in run.batches(len(cont_ids)):
        z, a2 = noised(lat[idx].to(device), steer.alpha2_min, run.gen)
        mine = parallel.shard(len(idx))  # this rank's rows of the global batch
        idx, z, a2 = idx[mine], z[mine], a2[mine]
        with maybe_autocast(device, steer.autocast_bf16):
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


class PrefixKV:
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
    hidden = decoder.blocks_forward(x, batch["new_pos"], PrefixKV(cache.k, cache.v), allowed, False)
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
        batch = to_device(build_steer_batch(prefix_ids[s:e], cont_ids[s:e], p, pad_id), device)
        plain = to_device(build_steer_batch(prefix_ids[s:e], cont_ids[s:e], 0, pad_id), device)
        a2 = torch.full((e - s,), alpha2, device=device)
        with maybe_autocast(device, autocast):
            sp = pg(z[s:e], a2)
            shuffled = pg(torch.roll(z[s:e], 1, dims=0), a2)
            sums["eval_matched"] += float(steer_lm_loss(decoder, batch, sp, True).sum())
            sums["eval_shuffled"] += float(steer_lm_loss(decoder, batch, shuffled, True).sum())
            sums["eval_no_prompt"] += float(steer_lm_loss(decoder, plain, None, True).sum())
    pg.train(was_training)
    logs = {k: v / n for k, v in sums.items()}
    logs["eval_gap"] = logs["eval_shuffled"] - logs["eval_matched"]
    return logs


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
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
    (not EMA) modules; the decoder keeps its adapters (see dglm.engine.models.lora.unwrap_lora)."""
    device = torch.device(device)
    decoder.requires_grad_(False).eval()
    adapters = add_lora(decoder, lora) if lora is not None else {}
    for m in adapters.values():
        m.to(device)
    if init_lora:
        load_lora_state(decoder, init_lora)
    modules = SteerModules(pg, adapters)
    meta = {
        "prompt_generator": asdict(pg.config),
        "lora": None if lora is None else lora.to_dict(),
        "steer": asdict(steer),
    }
    run = Run(out, modules, cfg, "steering", meta, device)
    prefix_ids, cont_ids, lat = train

    def evaluate() -> dict[str, float]:
        return evaluate_steering(
            pg, decoder, held_out, pad_id, device, steer.shuffle_rows, autocast=steer.autocast_bf16
        )

    if steer.chamfer_weight > 0:
        skip = frequent_tokens(cont_ids, steer.skip_frequent)
        content, content_mask = content_targets(cont_ids, skip, 64)
    if run.main and run.step == 0 and not (Path(out) / "log.jsonl").exists():
        run.log({"phase": "start", **evaluate()})
    for idx in run.batches(len(prefix_ids)):
        z, a2 = noised(lat[idx].to(device), steer.alpha2_min, run.gen)
        mine = parallel.shard(len(idx))  # this rank's rows of the global batch
        idx, z, a2 = idx[mine], z[mine], a2[mine]
        ids = idx.tolist()
        batch = to_device(
            build_steer_batch(
                [prefix_ids[i] for i in ids],
                [cont_ids[i] for i in ids],
                pg.config.prompt_len,
                pad_id,
            ),
            device,
        )
        with maybe_autocast(device, steer.autocast_bf16):
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
