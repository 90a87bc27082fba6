"""Left padding of a batch of prefixes (+ soft prompts): the one layout every decode backend reads.

Row layout in the KV slots: left padding, prefix tokens, P soft-prompt vectors, generated tokens.
Positions count real tokens only (pads excluded), as HF does from an attention mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PaddedBatch:
    """One batch, left padded, on its device."""

    ids: torch.Tensor  # (B, Tp) long: prefix tokens, left padded with the pad id
    soft_prompt: torch.Tensor | None  # (B, P, H) vectors after each prefix, or None (P = 0)
    positions: torch.Tensor  # (B, T0) long, T0 = Tp + P: real tokens counted from 0
    key_mask: torch.Tensor  # (B, slots) bool: False at the left pads, True elsewhere
    padded: bool  # some row has pads (otherwise every key is real and no mask is needed)

    @property
    def batch_size(self) -> int:
        return self.ids.shape[0]

    @property
    def prefill_len(self) -> int:
        """T0: prefix tokens + soft-prompt vectors, the slots the prefill fills."""
        return self.positions.shape[1]

    @property
    def slots(self) -> int:
        """KV slots the whole generation needs (prefill + new tokens)."""
        return self.key_mask.shape[1]

    def next_positions(self) -> torch.Tensor:
        """(B, 1) long: the position of each row's first generated token."""
        return self.positions[:, -1:] + 1

    def embeds(self, decoder) -> torch.Tensor:
        """The prefill's input (B, T0, H): token embeddings, then the soft prompt."""
        x = decoder.embed(self.ids)  # (B, Tp, H)
        if self.soft_prompt is None:
            return x
        return torch.cat([x, self.soft_prompt.to(device=x.device, dtype=x.dtype)], dim=1)


def left_pad(
    prefix_ids: list[list[int]],
    pad: int,
    slots: int,
    soft_prompt: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
    width: int = 0,
) -> PaddedBatch:
    """Rows of token ids (a row may be empty when a soft prompt follows) → PaddedBatch with a key
    mask over `slots` KV slots (≥ longest prefix + P); `width`: pad the prefixes to at least this
    many columns (to stack the batch under one of that prefill length, see `stack`)."""
    B = len(prefix_ids)
    lens = [len(p) for p in prefix_ids]
    t_prefix = max(max(lens), width)
    P = 0 if soft_prompt is None else soft_prompt.shape[1]
    t0 = t_prefix + P
    assert slots >= t0, (slots, t0)
    ids = torch.full((B, t_prefix), pad, dtype=torch.long)
    key_mask = torch.ones(B, slots, dtype=torch.bool)  # prefix + soft + generated are real
    for b, row in enumerate(prefix_ids):
        if row:
            ids[b, t_prefix - len(row) :] = torch.tensor(row, dtype=torch.long)
        key_mask[b, : t_prefix - len(row)] = False
    positions = (key_mask[:, :t0].long().cumsum(-1) - 1).clamp_min(0)  # (B, T0)
    ids, key_mask, positions = (t.to(device) for t in (ids, key_mask, positions))
    return PaddedBatch(ids, soft_prompt, positions, key_mask, min(lens) < t_prefix)


@dataclass
class StackedBatch:
    """Batches of one prefill length and KV slots as one: the rows of `parts` in order (e.g. a
    batch with soft prompts and companion rows without, run by the same forward). It reads like a
    PaddedBatch to the torch step backends (no `ids` / `soft_prompt`: ONNX Runtime refuses it)."""

    parts: tuple[PaddedBatch, ...]
    # Two parts whose second repeats prefixes of the first without its soft prompt (prompt
    # guidance's companion rows): row i of parts[1] has the prefix of row follow[i] of parts[0].
    # A DecodeRunner then prefills parts[0] only and copies those prefixes' keys and values,
    # shifted past the soft prompt, instead of computing them again. None: no such relation.
    follow: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        first = self.parts[0]
        for part in self.parts[1:]:
            if (part.prefill_len, part.slots) != (first.prefill_len, first.slots):
                raise ValueError(
                    f"stacked batches need one prefill length and slot count: "
                    f"{(part.prefill_len, part.slots)} vs {(first.prefill_len, first.slots)}"
                )
        self.positions = torch.cat([p.positions for p in self.parts])
        self.key_mask = torch.cat([p.key_mask for p in self.parts])
        self.padded = any(p.padded for p in self.parts)
        if self.follow is not None:
            if len(self.parts) != 2 or len(self.follow) != self.parts[1].batch_size:
                raise ValueError(
                    "follow needs two parts and one followed row per row of the second"
                )
            if self.parts[1].soft_prompt is not None:
                raise ValueError("follow: the second part must have no soft prompt")

    @property
    def batch_size(self) -> int:
        return sum(p.batch_size for p in self.parts)

    @property
    def prefill_len(self) -> int:
        return self.parts[0].prefill_len

    @property
    def slots(self) -> int:
        return self.parts[0].slots

    def next_positions(self) -> torch.Tensor:
        return self.positions[:, -1:] + 1

    def embeds(self, decoder) -> torch.Tensor:
        return torch.cat([p.embeds(decoder) for p in self.parts])


def stack(*parts: PaddedBatch, follow: tuple[int, ...] | None = None) -> StackedBatch:
    """The rows of `parts` as one batch (same prefill length and slots: pad with `width`);
    `follow`: see StackedBatch."""
    return StackedBatch(tuple(parts), follow)


__all__ = ["PaddedBatch", "StackedBatch", "left_pad", "stack"]
