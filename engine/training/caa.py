"""CAA's steering vectors from labelled texts: mean differences of the decoder's residual activations.

For texts x with label c, a_l(x) is the residual stream after block l, read at the text's last
token ("last") or averaged over its tokens ("mean"); the vector of label c at block l is

    v_c[l] = mean_{x: label c} a_l(x) − mean_{x: label ≠ c} a_l(x)

(Panickssery et al. 2024 take the difference at the answer token of contrastive prompt pairs;
labelled review texts have no pairs, so the classes' means are compared, as repeng's mean-difference
vectors do.) Every block's vector is kept, so the blocks to add at are chosen later, on dev
(`dglm eval --caa-layers`), without recomputing.
"""

from __future__ import annotations

import logging
import random

import torch
from dglm.engine.methods.caa import POSITIONS, SteeringVector, SteeringVectorConfig, check_layers
from dglm.engine.models.base import Decoder

logger = logging.getLogger(__name__)

# leading positions "mean" leaves out: from block 11 on, SmolLM2's residual stream carries a massive
# activation (one dimension ~10x the rest of the vector's norm) at a text's first position, the
# attention sink; with it the mean difference was that one dimension (measured: |v| 73 at block 11,
# 72 of it in dimension 507; 10 at block 10)
SINK_POSITIONS = 1


@torch.inference_mode()
def residual_activations(
    decoder: Decoder,
    tokenizer,
    texts: list[str],
    position: str = "mean",
    max_tokens: int = 64,
    batch_size: int = 16,
) -> torch.Tensor:
    """(N, L, H) fp32: each text's residual stream after every block, at its last token or
    averaged over its tokens but the first (SINK_POSITIONS), among its first `max_tokens` (rows
    right padded, so a causal pass never lets a real token see a pad)."""
    if position not in POSITIONS:
        raise ValueError(f"position must be one of {POSITIONS}, got {position!r}")
    if not texts:
        raise ValueError("texts is empty: pass labelled texts")
    blocks = decoder.blocks()
    captured: list[torch.Tensor] = []
    handles = [b.register_forward_hook(lambda m, i, out: captured.append(out)) for b in blocks]
    out = torch.empty(len(texts), len(blocks), decoder.hidden_size)
    try:
        for lo in range(0, len(texts), batch_size):
            ids = [tokenizer.encode(t)[:max_tokens] or [0] for t in texts[lo : lo + batch_size]]
            B, T = len(ids), max(map(len, ids))
            tok = torch.zeros(B, T, dtype=torch.long)
            real = torch.zeros(B, T, dtype=torch.bool)
            for r, row in enumerate(ids):
                tok[r, : len(row)] = torch.tensor(row)
                real[r, : len(row)] = True
            tok, real = tok.to(decoder.device), real.to(decoder.device)
            positions = torch.arange(T, device=decoder.device).expand(B, T)
            captured.clear()
            decoder.hidden_states(decoder.embed(tok), positions)
            acts = torch.stack(captured, dim=1).float()  # (B, L, T, H)
            if position == "last":
                last = real.sum(1) - 1  # (B,)
                sel = acts[torch.arange(B), :, last]  # (B, L, H)
            else:  # the first token left out (SINK_POSITIONS) where a text has more
                keep = real.clone()
                keep[:, :SINK_POSITIONS] &= real.sum(1, keepdim=True) <= SINK_POSITIONS
                w = keep.float()[:, None, :, None]  # (B, 1, T, 1)
                sel = (acts * w).sum(2) / w.sum(2)
            out[lo : lo + B] = sel.cpu()
    finally:
        for h in handles:
            h.remove()
    return out


def mean_differences(acts: torch.Tensor, labels: torch.Tensor, num_labels: int) -> torch.Tensor:
    """acts (N, L, H), labels (N,) class ids → (C, L, H): per label, its texts' mean minus the
    other texts' mean."""
    out = []
    for c in range(num_labels):
        own = labels == c
        if not own.any() or own.all():
            raise ValueError(f"label {c} needs texts of its own and of other labels")
        out.append(acts[own].mean(0) - acts[~own].mean(0))
    return torch.stack(out)


def steering_vector(
    probe: str,
    decoder: Decoder,
    tokenizer,
    texts: list[str],
    labels: list[str],
    label_names: tuple[str, ...],
    layers: tuple[int, ...],
    multiplier: float = 1.0,
    position: str = "mean",
    per_label: int = 256,
    seed: int = 0,
    max_tokens: int = 64,
) -> SteeringVector:
    """The steering vector of `probe` from labelled texts: `per_label` texts of each label drawn
    with `seed` (fewer when a label has fewer), the mean differences at every block; `layers` and
    `multiplier` are its defaults."""
    layers = check_layers(tuple(layers), decoder.num_layers)
    rng = random.Random(seed)
    chosen: list[str] = []
    ids: list[int] = []
    for c, name in enumerate(label_names):
        pool = [t for t, y in zip(texts, labels, strict=True) if y == name]
        pick = rng.sample(pool, min(per_label, len(pool)))
        chosen += pick
        ids += [c] * len(pick)
    counts = [ids.count(c) for c in range(len(label_names))]
    logger.info("steering vector %s: %s texts per label", probe, counts)
    acts = residual_activations(decoder, tokenizer, chosen, position, max_tokens)
    vectors = mean_differences(acts, torch.tensor(ids), len(label_names))
    config = SteeringVectorConfig(
        probe, tuple(label_names), decoder.num_layers, decoder.hidden_size, layers,
        float(multiplier), position, min(counts),
    )  # fmt: skip
    return SteeringVector(config, vectors)


__all__ = ["mean_differences", "residual_activations", "steering_vector"]
