"""Training the prompt generator against a frozen decoder (the reference's first recipe)."""

from __future__ import annotations

import logging
import math
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from dglm.engine.diffusion.schedule import NoiseSchedule
from dglm.engine.prompt.generator import PromptGenerator
from dglm.engine.training import parallel
from dglm.engine.training.loop import EMA, Progress, Run, TrainConfig
from torch import nn

logger = logging.getLogger(__name__)


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
    """Train the prompt generator as the DGLM reference does: the frozen decoder's LM loss on the
    continuation, given the soft prompt made from the continuation's latent noised by the cosine
    schedule with scale 3 (noise augmentation, `AUGMENT_SCHEDULE`). Returns the EMA."""
    device = torch.device(device)
    decoder.requires_grad_(False).eval()
    run = Run(out, pg, cfg, "prompt_generator", asdict(pg.config), device)
    prefix_ids, cont_ids, lat = train
    for idx in run.batches(len(prefix_ids)):
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
