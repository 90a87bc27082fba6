"""Shared pieces of the compact decoders: the static KV cache, attention masks, the base module.

Every decoder maps `inputs_embeds (B, T, H)` at `positions (B, T)` to fp32 logits `(B, T, V)`.
Without a cache the call is a plain causal forward over T tokens. With a cache the T new keys and
values are written in place at `cache.length` and attention runs over the first `cache.length + T`
cache slots. `key_mask (B, S)` marks real (non-pad) keys; S = T without a cache and
`cache.length + T` with one. Rows are left padded, so every row shares the same cache length.

`Decoder.forward_static` is the same computation with every shape fixed by its buffers: it writes
at slots given by a device tensor and attends over all S slots under a mask, which is what a CUDA
graph and `torch.compile` need (see its docstring for the exact contract; the ONNX export
spells out its own static step, `dglm.export.modules`).

Both take an optional `hidden_hook` (`HiddenHook`): an edit (B, T, H) → (B, T, H) applied to the final-norm
hidden states right before the LM head (where a method such as RE-Control nudges them); rows it
leaves alone give bit-identical logits. And an optional `residual (B, L, H)`: a vector per row and
decoder block added to the residual stream after that block, at every position (contrastive
activation addition, methods.caa); zero where a row or a block is not steered, and x + 0 = x, so a
zero residual gives bit-identical logits. Its shape is fixed by the batch and the decoder, never
by which blocks are steered: the static form a trace or a CUDA graph records.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn


class HiddenHook(Protocol):
    """A method's edit of the final-norm hidden states (B, T, H) → (B, T, H), before the LM head.

    `__call__` is the edit; the other members are optional capabilities, each off in the defaults
    a hook inherits by subclassing this protocol (`FunctionHook` wraps a plain function):
    - `head_extra` / `see_head_extra`: logits of other states from the same LM-head call
      (`Decoder.hooked_logits`; RE-Control's unedited states for its plausibility mask);
    - `with_companions`: the hook over the batch's rows and then companion rows (the decode loop's
      prompt-guidance stream; default: the same hook over every row of the step);
    - `static_key` / `static_copy`: a static form a CUDA graph can record (`StaticHook`;
      default: none, so the hook runs op by op or after a traced step).
    """

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor: ...

    def head_extra(self) -> torch.Tensor | None:
        """States (M, H) whose logits the same LM-head call computes beside the edited ones (T = 1),
        handed back through `see_head_extra`; None: none."""
        return None

    def see_head_extra(self, logits: torch.Tensor) -> None:
        """The logits (M, V) of the states `head_extra` gave."""

    def with_companions(self, follow: list[int]) -> HiddenHook:
        """This hook over the batch's rows and then companion rows, companion j following row
        follow[j]."""
        return self

    def static_key(self) -> Hashable | None:
        """What a graph recording the static form depends on beyond per-row values; None: the hook
        has no static form."""
        return None

    def static_copy(self, capacity: int) -> StaticHook:
        """The static form over buffers of `capacity` rows (only when `static_key` is not None)."""
        raise NotImplementedError(f"{type(self).__name__} has no static form")


class StaticHook(HiddenHook, Protocol):
    """A hook's static form (`HiddenHook.static_copy`): per-row settings in fixed buffers, what a
    CUDA graph records once and replays for every batch whose hook has the same `static_key`."""

    def load(self, hook: HiddenHook) -> None:
        """Copy `hook`'s per-row settings into the buffers (before a batch's first step)."""
        ...

    def publish(self) -> None:
        """After each replayed step: hand the loaded hook what the step computed for it (through
        the loaded hook's own members, e.g. `see_head_extra`)."""
        ...


class FunctionHook(HiddenHook):
    """A plain function (B, T, H) → (B, T, H) as a hook with no other capability."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.fn = fn

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.fn(hidden)


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


class StaticKV:
    """The key/value store `forward_static` hands to the blocks, with KVCache's `write` interface:
    `write` stores the T new keys/values of a layer at slots `write_pos` of the full buffers with
    `index_copy_` and returns the full buffers (B, n_kv, S, Dh)."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, write_pos: torch.Tensor) -> None:
        self.k, self.v, self.write_pos = k, v, write_pos

    def write(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.k[layer].index_copy_(2, self.write_pos, k)  # slots write_pos of (B, n_kv, S, Dh)
        self.v[layer].index_copy_(2, self.write_pos, v)
        return self.k[layer], self.v[layer]


def static_attention_mask(write_pos: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
    """Bool mask (B, 1, T, S) for `forward_static`, True = attend.

    Query t sits at slot p_t = write_pos[t]. Key slot j is visible iff j ≤ p_t and (key_mask[b, j]
    or j = p_t): the self key keeps a pad query's row finite, and slots after p_t (stale or not yet
    written) are never read. Built from tensors only: no host sync, static shapes.
    """
    S = key_mask.shape[1]
    slots = torch.arange(S, device=key_mask.device)  # (S,)
    q = write_pos[:, None]  # (T, 1)
    allowed = (slots <= q) & (key_mask[:, None, :] | (slots == q))  # (B, T, S)
    return allowed[:, None]


def check_residual(residual: torch.Tensor | None, decoder: Decoder, batch: int) -> None:
    """ValueError unless `residual` is None or (batch, L, H) for this decoder."""
    if residual is None:
        return
    expected = (batch, decoder.num_layers, decoder.hidden_size)
    if residual.shape != expected:
        raise ValueError(
            f"residual has shape {tuple(residual.shape)}, expected (batch, layers, hidden) = "
            f"{expected}"
        )


def add_residual(x: torch.Tensor, residual: torch.Tensor | None, layer: int) -> torch.Tensor:
    """The residual stream x (B, T, H) after block `layer`, plus that block's row vectors
    residual[:, layer] (B, H) at every position; x itself when residual is None."""
    if residual is None:
        return x
    return x + residual[:, layer, None]  # (B, 1, H) broadcast over T


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
        q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=bool(nh != nkv)
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

    def __init__(self, config, num_kv_heads: int, head_dim: int) -> None:
        """The geometry every caller reads, from a config with hidden_size, vocab_size,
        max_context and num_layers (the family gives its kv heads and head width)."""
        super().__init__()
        self.config = config
        self.hidden_size, self.vocab_size = config.hidden_size, config.vocab_size
        self.max_context, self.num_layers = config.max_context, config.num_layers
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def blocks_forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache | None,
        mask: torch.Tensor | None,
        is_causal: bool,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Embeddings (B, T, H) → final-norm hidden states (B, T, H); `residual (B, L, H)` (or
        None) is added to the residual stream after block l (`add_residual`)."""
        raise NotImplementedError

    def blocks(self) -> nn.ModuleList:
        """The decoder's L transformer blocks in order (each maps the residual stream
        (B, T, H) → (B, T, H)): what `training.caa` reads activations from."""
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

    @torch.no_grad()
    def use_input_major_weights(self) -> Decoder:
        """Store every matrix a decode step reads in full (each nn.Linear weight, and a tied LM
        head's embedding) as the transpose of a contiguous (in, out) array; returns self.

        F.linear(x, W) then hands MKL a plain x @ Wt product (Wt contiguous), which on one CPU
        core at batch 1 streams ~15% faster than the (out, in) dot-product form (measured on
        SmolLM2: traced step 69 vs 80 ms CPU). Values are unchanged, sums run in another order:
        logits move by ~1e-5. Meant for CPU decoding; the embedding lookup reads a strided row.
        """
        head = self.lm_head_weight()
        for module in self.modules():
            is_head = isinstance(module, nn.Embedding) and module.weight is head
            if isinstance(module, nn.Linear) or is_head:
                w = module.weight
                module.weight = nn.Parameter(w.t().contiguous().t(), requires_grad=w.requires_grad)
        return self

    def new_cache(
        self,
        batch_size: int,
        max_len: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> KVCache:
        """Static buffers (L, B, n_kv, max_len, Dh), zero-filled: `forward` never reads a slot
        before writing it, but `forward_static` reads every slot (masked ones with weight 0, and
        0 · NaN from uninitialised memory would poison the output)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        if not 0 < max_len <= self.max_context:
            raise ValueError(
                f"max_len={max_len} must be in [1, max_context={self.max_context}] of this decoder"
            )
        shape = (self.num_layers, batch_size, self.num_kv_heads, max_len, self.head_dim)
        kw = {"dtype": dtype or self.dtype, "device": device or self.device}
        return KVCache(torch.zeros(shape, **kw), torch.zeros(shape, **kw), 0)

    def hidden_states(
        self,
        inputs_embeds: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache | None = None,
        key_mask: torch.Tensor | None = None,
        residual: torch.Tensor | None = None,
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
        check_residual(residual, self, B)
        mask, is_causal = attention_mask(B, T, start, key_mask, inputs_embeds.device)
        h = self.blocks_forward(inputs_embeds, positions, cache, mask, is_causal, residual)
        if cache is not None:
            cache.length = start + T
        return h

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM head: (B, T, H) final-norm hidden states → fp32 logits (B, T, V) (through the
        int8 head of a quantized decoder, see models.quant)."""
        head = self.__dict__["_modules"].get("quant_head")
        if head is not None:
            return head(hidden).float()
        return F.linear(hidden, self.lm_head_weight()).float()

    @property
    def quantized(self) -> str:
        """ "none", or the weight quantization of `models.quant.quantize_decoder` ("int8")."""
        return self.__dict__.get("_quantized", "none")

    def head(
        self,
        hidden: torch.Tensor,
        last_only: bool,
        hidden_hook: HiddenHook | None,
        return_hidden: bool = False,
    ) -> torch.Tensor:
        """(B, T, H) final-norm hidden states → fp32 logits (B, T | 1, V): the last position
        only with `last_only`, through `hidden_hook` (if any) before the LM head; with
        `return_hidden` the (B, T | 1, H) hidden states themselves (no hook, no head)."""
        if last_only:
            hidden = hidden[:, -1:]
        if return_hidden:
            return hidden
        return self.hooked_logits(hidden, hidden_hook)

    def hooked_logits(self, hidden: torch.Tensor, hidden_hook: HiddenHook | None) -> torch.Tensor:
        """LM head through `hidden_hook` (if any): (B, T, H) → fp32 logits (B, T, V) of the edited
        states. A hook that also wants the logits of other states (`head_extra()` → (M, H) or
        None; `see_head_extra(logits (M, V))`, e.g. RE-Control's unedited states for its
        plausibility mask) gets them from the same LM-head call when T = 1: at small batch one
        pass over the head's weights serves both."""
        if hidden_hook is None:
            return self.logits(hidden)
        edited = hidden_hook(hidden)
        states = hidden_hook.head_extra()
        if states is None or edited.shape[1] != 1:
            return self.logits(edited)
        B = edited.shape[0]
        out = self.logits(torch.cat((edited, states[:, None].to(edited.dtype))))
        hidden_hook.see_head_extra(out[B:, 0])
        return out[:B]

    def forward_static(
        self,
        inputs_embeds: torch.Tensor,
        positions: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        write_pos: torch.Tensor,
        key_mask: torch.Tensor,
        *,
        last_only: bool = False,
        hidden_hook: HiddenHook | None = None,
        return_hidden: bool = False,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One static-shape step: the form for CUDA graphs and `torch.compile`.

        Arguments (every shape fixed by the buffers, nothing read back to the host):
            inputs_embeds (B, T, H): embeddings of the T new tokens (`embed(ids)` or soft-prompt
                vectors); T = prompt length at prefill, 1 per decode step.
            positions (B, T) long: position ids (RoPE / learned positions) of the new tokens,
                counting real tokens only (a left-padded row starts at 0 after its pads).
            k_cache, v_cache (L, B, n_kv, S, Dh) in the decoder's dtype: the static KV buffers of
                S slots (S = max context of the run; `new_cache(B, S).k / .v`).
            write_pos (T,) long: the slot each new token goes to, the same for every row (rows are
                left padded to a common length); slot = step index, not position.
            key_mask (B, S) bool: False at pad slots, True elsewhere. Slots beyond the query need
                no clearing: key slot j is visible to the query at slot p iff j ≤ p and
                (key_mask[b, j] or j = p), so the mask can stay constant for a whole generation.
            last_only: logits for the last of the T positions only, (B, 1, V).
            hidden_hook: applied to the final-norm hidden states before the LM head.
            return_hidden: return those final-norm hidden states (B, T | 1, H) instead of the
                logits (a traced step whose hook and head run outside the trace).
            residual (B, L, H) in the decoder's dtype: added to the residual stream after each
                block, at every position (zero rows and blocks: bit-identical); None: nothing.

        Returns fp32 logits. Equals `forward` with a KVCache holding the same slots (the parity
        tests check < 1e-5 in fp32); attention runs over all S slots, so cost grows with S.
        """
        B, T, _ = inputs_embeds.shape
        S = k_cache.shape[3] if k_cache.ndim == 5 else -1
        expected = (self.num_layers, B, self.num_kv_heads, S, self.head_dim)
        if k_cache.shape != expected or v_cache.shape != expected:
            raise ValueError(
                f"k_cache / v_cache have shapes {tuple(k_cache.shape)} / {tuple(v_cache.shape)}, "
                f"expected (layers, batch, kv_heads, slots, head_dim) = {expected}"
            )
        if positions.shape != (B, T) or write_pos.shape != (T,) or key_mask.shape != (B, S):
            raise ValueError(
                f"positions {tuple(positions.shape)}, write_pos {tuple(write_pos.shape)}, "
                f"key_mask {tuple(key_mask.shape)}: expected ({B}, {T}), ({T},), ({B}, {S})"
            )
        check_residual(residual, self, B)
        kv = StaticKV(k_cache, v_cache, write_pos)  # the new keys / values written in place
        allowed = static_attention_mask(write_pos, key_mask)  # (B, 1, T, S)
        # additive form, built once for all layers (SDPA would convert a bool mask per call)
        mask = torch.zeros(allowed.shape, dtype=inputs_embeds.dtype, device=allowed.device)
        mask = mask.masked_fill_(~allowed, float("-inf"))
        h = self.blocks_forward(inputs_embeds, positions, kv, mask, False, residual)  # (B, T, H)
        return self.head(h, last_only, hidden_hook, return_hidden)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache | None = None,
        key_mask: torch.Tensor | None = None,
        *,
        last_only: bool = False,
        hidden_hook: HiddenHook | None = None,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """fp32 logits (B, T, V), or (B, 1, V) for the last position only with `last_only`;
        `hidden_hook` edits the final-norm hidden states before the LM head; `residual (B, L, H)`
        is added to the residual stream after each block."""
        h = self.hidden_states(inputs_embeds, positions, cache, key_mask, residual)
        return self.head(h, last_only, hidden_hook)
