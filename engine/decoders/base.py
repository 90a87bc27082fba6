"""Shared pieces of the compact decoders: the static KV cache, attention masks, the base module.

Every decoder maps `inputs_embeds (B, T, H)` at `positions (B, T)` to fp32 logits `(B, T, V)`.
Without a cache the call is a plain causal forward over T tokens. With a cache the T new keys and
values are written in place at `cache.length` and attention runs over the first `cache.length + T`
cache slots. `key_mask (B, S)` marks real (non-pad) keys; S = T without a cache and
`cache.length + T` with one. Rows are left padded, so every row shares the same cache length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class KVCache:
    """Static key/value buffers for every layer, allocated once and written in place."""

    k: torch.Tensor  # (L, B, n_kv, max_len, Dh)
    v: torch.Tensor  # (L, B, n_kv, max_len, Dh)
    length: int = 0  # slots filled so far, the same for every row (host-side: no sync to read it)

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    @property
    def device(self) -> torch.device:
        return self.k.device

    def reset(self) -> None:
        """Forget the contents; the buffers are kept (stale slots are never read)."""
        self.length = 0

    def rows(self, batch_size: int) -> KVCache:
        """An empty cache over the first `batch_size` rows of these buffers (no copy)."""
        if not 0 < batch_size <= self.batch_size:
            raise ValueError(
                f"batch_size={batch_size} does not fit this cache of {self.batch_size} rows"
            )
        return KVCache(self.k[:, :batch_size], self.v[:, :batch_size], 0)

    def write(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store `k, v (B, n_kv, T, Dh)` at slots [length, length + T) of `layer`; return the
        keys and values of slots [0, length + T) as views `(B, n_kv, length + T, Dh)`.
        `length` itself is advanced by the decoder once every layer has written."""
        end = self.length + k.shape[2]
        self.k[layer, :, :, self.length : end].copy_(k)
        self.v[layer, :, :, self.length : end].copy_(v)
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


def attention_mask(
    batch_size: int, num_new: int, start: int, key_mask: torch.Tensor | None, device: torch.device
) -> tuple[torch.Tensor | None, bool]:
    """(mask, is_causal) for SDPA: queries at slots [start, start + T), keys at [0, start + T).

    mask is None when a plain (or no) causal mask is exact; otherwise it is bool (B|1, 1, T, S)
    with True = attend: key ≤ query, and the key is real or is the query itself (so the junk
    queries at pad slots keep one finite key instead of an all-masked, NaN row).
    """
    seq = start + num_new
    if key_mask is None:
        if num_new == 1:
            return None, False  # one new query sees every cached key
        if start == 0:
            return None, True
    elif key_mask.shape != (batch_size, seq):
        raise ValueError(
            f"key_mask has shape {tuple(key_mask.shape)}, expected (batch, keys) = "
            f"({batch_size}, {seq})"
        )
    q_idx = torch.arange(start, seq, device=device)[:, None]  # (T, 1)
    k_idx = torch.arange(seq, device=device)[None, :]  # (1, S)
    allowed = k_idx <= q_idx  # (T, S)
    if key_mask is not None:
        allowed = allowed & (key_mask[:, None, :].bool() | (k_idx == q_idx))  # (B, T, S)
    else:
        allowed = allowed[None]  # (1, T, S)
    return allowed[:, None], False  # (B|1, 1, T, S)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    is_causal: bool,
    scale: float | None = None,
) -> torch.Tensor:
    """SDPA with grouped-query heads: q (B, nh, T, Dh), k, v (B, nkv, S, Dh) → (B, T, nh·Dh)."""
    B, nh, T, Dh = q.shape
    nkv = k.shape[1]
    if T == 1 and nh != nkv:
        # one query per row: fold the G = nh / nkv query heads of each kv head into the query axis
        # (the mask is per key, so it broadcasts over them) and run plain multi-head attention.
        qg = q.reshape(B, nkv, nh // nkv, Dh)  # (B, nkv, G, Dh)
        o = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=scale)
        return o.reshape(B, 1, nh * Dh)
    o = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=nh != nkv
    )  # (B, nh, T, Dh)
    return o.transpose(1, 2).reshape(B, T, nh * Dh)


class Decoder(nn.Module):
    """Base of the decoders: the cache plumbing and the logits head; subclasses define
    `embed`, `blocks_forward` (embeddings → final-norm hidden states) and `lm_head_weight`."""

    config: object
    hidden_size: int
    vocab_size: int
    max_context: int
    num_layers: int
    num_kv_heads: int
    head_dim: int

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def blocks_forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache | None,
        mask: torch.Tensor | None,
        is_causal: bool,
    ) -> torch.Tensor:
        raise NotImplementedError

    def lm_head_weight(self) -> torch.Tensor:
        raise NotImplementedError

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head_weight().dtype

    @property
    def device(self) -> torch.device:
        return self.lm_head_weight().device

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return tuple(getattr(self.config, "eos_token_ids", ()))

    def new_cache(
        self,
        batch_size: int,
        max_len: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> KVCache:
        """Static buffers (L, B, n_kv, max_len, Dh), left uninitialised: written before read."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        if not 0 < max_len <= self.max_context:
            raise ValueError(
                f"max_len={max_len} must be in [1, max_context={self.max_context}] of this decoder"
            )
        shape = (self.num_layers, batch_size, self.num_kv_heads, max_len, self.head_dim)
        kw = {"dtype": dtype or self.dtype, "device": device or self.device}
        return KVCache(torch.empty(shape, **kw), torch.empty(shape, **kw), 0)

    def hidden_states(
        self,
        inputs_embeds: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache | None = None,
        key_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final-norm hidden states (B, T, H), the LM head's input (arguments as in forward)."""
        B, T, _ = inputs_embeds.shape
        if positions.shape != (B, T):
            raise ValueError(
                f"positions has shape {tuple(positions.shape)}, expected (batch, tokens) = "
                f"({B}, {T})"
            )
        start = 0
        if cache is not None:
            start = cache.length
            if cache.batch_size != B:
                raise ValueError(f"cache has {cache.batch_size} rows but the input has {B}")
            if start + T > cache.max_len:
                raise ValueError(
                    f"cache overflow: {start} + {T} tokens > max_len={cache.max_len}; "
                    "allocate a longer cache with new_cache(..., max_len=...)"
                )
        mask, is_causal = attention_mask(B, T, start, key_mask, inputs_embeds.device)
        h = self.blocks_forward(inputs_embeds, positions, cache, mask, is_causal)
        if cache is not None:
            cache.length = start + T
        return h

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM head: (B, T, H) final-norm hidden states → fp32 logits (B, T, V)."""
        return F.linear(hidden, self.lm_head_weight()).float()

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache | None = None,
        key_mask: torch.Tensor | None = None,
        *,
        last_only: bool = False,
    ) -> torch.Tensor:
        """fp32 logits (B, T, V), or (B, 1, V) for the last position only with `last_only`."""
        h = self.hidden_states(inputs_embeds, positions, cache, key_mask)
        if last_only:
            h = h[:, -1:]
        return self.logits(h)
