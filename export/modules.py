"""Export-friendly modules: each `forward` is exactly one ONNX graph, with tensors in and out.

They reuse the engine's modules and weights (nothing is copied); only the wiring differs where a
graph needs a fixed shape or an op the exporter handles:

    ScoreNetGraph   (z, context, alpha2, drop_context) → v             the CFG pair batched by the caller
    PromptGenGraph  (z, alpha2) → soft_prompt
    ProbesGraph     (embedding) → logits                                all probe rows stacked (K)
    ValueEditGraph  (hidden, coef, steps, step_size) → hidden            RE-Control's edit, unrolled
    PrefillGraph    (input_ids, soft_prompt, positions, key_mask) → (logits, k, v)
    DecodeGraph     (input_ids, positions, slot, key_mask, k_cache, v_cache) → (logits, k_new, v_new)

The two decoder graphs work over a static KV buffer (L, B, n_kv, S, Dh) that the runtime owns:
prefill returns the keys/values of its T0 tokens (the runtime stores them at slots [0, T0)); decode
reads the whole buffer, puts its own new key/value at `slot` (a `Where`, not a scatter), attends
over all S slots under `key_mask`, and returns the new key/value for the runtime to store. Every
shape in the decode graph is static except the batch, which the runtime fixes to its buckets; the
graph has no If/Loop/Scan and no Shape-dependent reshapes (all reshapes use −1 for the batch), so
ONNX Runtime's CUDA graphs can capture it.

Why not `Decoder.forward_static`: a functional form of it (read-only caches, the new keys and
values returned) exported too, but for SmolLM2 its decode graph carried 245 Shape ops and a folded
transposed copy of the tied LM head (651 MB of weights against 538 MB here); the wrapper below reuses the decoders' modules and weights, spells out only
the per-layer wiring with static shapes, and is checked against `Decoder.forward` in the tests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from dglm.engine.diffusion.score_network import ScoreNetwork
from dglm.engine.models.base import Decoder
from dglm.engine.models.gpt2 import GPT2Decoder
from dglm.engine.models.llama import LlamaDecoder
from dglm.engine.prompt.generator import PromptGenerator
from torch import nn


class ScoreNetGraph(nn.Module):
    def __init__(self, net: ScoreNetwork) -> None:
        super().__init__()
        self.net = net

    def forward(
        self,
        z: torch.Tensor,  # (B, d)
        context: torch.Tensor,  # (B, d)
        alpha2: torch.Tensor,  # (B,)
        last: torch.Tensor,  # (B,) bool drop_context (null-context rows), or the student's w
    ) -> torch.Tensor:
        if self.net.config.guidance_embedding:  # the distilled student: w is an input
            return self.net(z, context, alpha2, None, last)  # (B, d)
        return self.net(z, context, alpha2, last)  # (B, d)


class PromptGenGraph(nn.Module):
    def __init__(self, net: PromptGenerator) -> None:
        super().__init__()
        self.net = net

    def forward(self, z: torch.Tensor, alpha2: torch.Tensor) -> torch.Tensor:
        return self.net(z, alpha2)  # (B, P, H)


class ProbesGraph(nn.Module):
    """logits = normalize(emb)·Wᵀ + b over every probe row (fp32, as `Probe.logits`)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight.float().clone())  # (K, d)
        self.register_buffer("bias", bias.float().clone())  # (K,)

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:  # (B, d) → (B, K)
        u = F.normalize(embedding.float(), dim=-1)
        return u @ self.weight.T + self.bias


class ValueEditGraph(nn.Module):
    """RE-Control's edit of final-norm hidden states by one value network, unrolled for
    `max_steps` steps (the analytic gradient of `methods.re_control.value_ascent`, its reference):
    (hidden (B, H), coef (B, K) ±1/0, steps (B,) int64 ≤ max_steps, step_size (B,)) → hidden (B, H)
    fp32. Row r moves during its first steps[r] steps only (a `Where`, so a row with 0 steps comes
    back bit-identical); no If/Loop, every shape static but the batch."""

    def __init__(self, net: nn.Module, max_steps: int) -> None:
        super().__init__()
        for i, layer in enumerate(net.layers):
            self.register_buffer(f"w{i}", layer.weight.detach().float().clone())  # (out, in)
            self.register_buffer(f"b{i}", layer.bias.detach().float().clone())
        self.depth = len(net.layers)
        self.max_steps = max_steps

    def forward(
        self,
        hidden: torch.Tensor,  # (B, H)
        coef: torch.Tensor,  # (B, K)
        steps: torch.Tensor,  # (B,) int64
        step_size: torch.Tensor,  # (B,)
    ) -> torch.Tensor:
        ws = [getattr(self, f"w{i}") for i in range(self.depth)]
        bs = [getattr(self, f"b{i}") for i in range(self.depth)]
        h = hidden.float()
        size = step_size.float()[:, None]
        for i in range(self.max_steps):
            masks, x = [], h
            for w, b in zip(ws[:-1], bs[:-1], strict=True):
                z = x @ w.T + b
                masks.append(z > 0)
                x = torch.relu(z)
            v = x @ ws[-1].T + bs[-1]  # (B, K)
            g = (coef * torch.sigmoid(-coef * v)) @ ws[-1]
            for w, m in zip(reversed(ws[:-1]), reversed(masks), strict=True):
                g = torch.where(m, g, torch.zeros_like(g)) @ w
            h = torch.where((steps > i)[:, None], h + size * g, h)
        return h


# ------------------------------------------------------------------------------------ decoder
class _StaticDecoder(nn.Module):
    """The per-family wiring of our decoders over explicit keys/values (weights shared)."""

    def __init__(self, decoder: Decoder, max_len: int) -> None:
        super().__init__()
        if not isinstance(decoder, (LlamaDecoder, GPT2Decoder)):
            raise ValueError(f"cannot export decoder {type(decoder).__name__}: Llama or GPT-2 only")
        if not 0 < max_len <= decoder.max_context:
            raise ValueError(f"max_len={max_len} must be in [1, {decoder.max_context}]")
        self.dec = decoder
        self.llama = isinstance(decoder, LlamaDecoder)
        c = decoder.config
        self.nh = c.num_heads
        self.nkv, self.dh = decoder.num_kv_heads, decoder.head_dim
        self.max_len = max_len
        w = decoder.lm_head_weight()
        self.register_buffer("head_bias", torch.zeros(w.shape[0], dtype=w.dtype), persistent=False)
        if self.llama:
            # only the positions a buffer of max_len slots can hold
            self.register_buffer("cos", decoder.rope_cos[:max_len].clone(), persistent=False)
            self.register_buffer("sin", decoder.rope_sin[:max_len].clone(), persistent=False)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.dec.layers if self.llama else self.dec.h

    def add_positions(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return x if self.llama else x + self.dec.wpe(positions)

    def qkv(self, block: nn.Module, x: torch.Tensor, positions: torch.Tensor, t: int):
        """(B, T, H) → q (B, nh, T, Dh), k, v (B, nkv, T, Dh); t = T, or −1 when B is static."""
        if self.llama:
            h = _rms_norm(x, block.attn_norm)
            qkv = block.wqkv(h).reshape(-1, t, self.nh + 2 * self.nkv, self.dh)  # (B, T, n, Dh)
            cos = self.cos[positions].unsqueeze(2)  # (B, T, 1, Dh)
            sin = self.sin[positions].unsqueeze(2)
            qk = qkv[:, :, : self.nh + self.nkv]
            # x·cos + rotate_half(x)·sin, as LlamaBlock (sin is signed [−, +])
            qk = qk * cos + torch.roll(qk, self.dh // 2, dims=-1) * sin
            q, k = qk[:, :, : self.nh], qk[:, :, self.nh :]
            v = qkv[:, :, self.nh + self.nkv :]
        else:
            qkv = block.wqkv(block.ln_1(x)).reshape(-1, t, 3, self.nh, self.dh)
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, T, nh, Dh)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def attn_scale(self, block: nn.Module) -> float:
        return block.scale if not self.llama else self.dh**-0.5

    def finish_block(self, block: nn.Module, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """Residual attention output (o (B, T, nh·Dh)) and the MLP, as the decoders' blocks."""
        x = x + block.wo(o)
        if self.llama:
            gu = block.w13(_rms_norm(x, block.mlp_norm))  # (B, T, 2I): gate; up
            i = block.w2.in_features  # static slices: chunk() would export Shape ops
            return x + block.w2(F.silu(gu[..., :i]) * gu[..., i:])
        return x + block.proj(block.act(block.fc(block.ln_2(x))))

    def final_logits(self, h: torch.Tensor) -> torch.Tensor:
        """(B, H) last hidden states → fp32 logits (B, V).

        With a (zero) bias the 2-D linear exports as one Gemm(transB=1) on W (V, H) as stored;
        without one the exporter folds a transposed copy of W (a second embedding matrix when
        they are tied), and W·hᵀ as MatMul runs ~1.6× slower on ORT's CPU EP.
        """
        h = _rms_norm(h, self.dec.norm) if self.llama else self.dec.ln_f(h)
        return F.linear(h, self.dec.lm_head_weight(), self.head_bias).float()

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor,
        scale: float,
        t: int,
    ) -> torch.Tensor:
        """q (B, nh, T, Dh), k, v (B, nkv, S, Dh), mask (B, 1, T, S) bool → (B, T, nh·Dh).

        softmax(q·kᵀ·scale) in fp32 with masked keys at −inf; the G = nh / nkv query heads of a
        kv head share its keys through a broadcast (B, nkv, G, T, ·) matmul, no repeat.
        """
        g = self.nh // self.nkv
        q5 = q.reshape(-1, self.nkv, g, t, self.dh)  # (B, nkv, G, T, Dh)
        s = torch.matmul(q5 * scale, k.unsqueeze(2).transpose(-1, -2)).float()  # (B, nkv, G, T, S)
        s = s.masked_fill(~mask.unsqueeze(1), float("-inf"))
        p = s.softmax(dim=-1).to(v.dtype)
        o = torch.matmul(p, v.unsqueeze(2))  # (B, nkv, G, T, Dh)
        return o.reshape(-1, self.nh, t, self.dh).transpose(1, 2).reshape(-1, t, self.nh * self.dh)


def _rms_norm(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    # y = x / sqrt(mean(x²) + ε) in fp32, cast back, times the gain (the decoders' HF order)
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm.eps)
    return norm.weight * y.type_as(x)


class PrefillGraph(nn.Module):
    """Pads, prefix tokens and P soft-prompt vectors in one causal pass over T0 = Tp + P tokens."""

    def __init__(self, decoder: Decoder, max_len: int) -> None:
        super().__init__()
        self.s = _StaticDecoder(decoder, max_len)

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, Tp) int64, left padded
        soft_prompt: torch.Tensor,  # (B, P, H)
        positions: torch.Tensor,  # (B, T0) int64, real tokens counted from 0
        key_mask: torch.Tensor,  # (B, T0) bool, False at pads
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s = self.s
        x = torch.cat((s.dec.embed(input_ids), soft_prompt.to(s.dec.dtype)), dim=1)
        x = s.add_positions(x, positions)  # (B, T0, H)
        t0 = x.shape[1]
        idx = torch.arange(t0, device=x.device)
        causal = idx[None, :] <= idx[:, None]  # (T0, T0): key ≤ query
        # a key is visible if it is real, or is the query itself (pad queries keep one key)
        visible = key_mask[:, None, :] | (idx[None, :] == idx[:, None])  # (B, T0, T0)
        mask = (causal & visible).unsqueeze(1)  # (B, 1, T0, T0)
        ks, vs = [], []
        for block in s.blocks:
            q, k, v = s.qkv(block, x, positions, t0)
            ks.append(k)
            vs.append(v)
            x = s.finish_block(block, x, s.attend(q, k, v, mask, s.attn_scale(block), t0))
        logits = s.final_logits(x[:, -1])  # (B, V): rows are left padded, the last slot is real
        return logits, torch.stack(ks), torch.stack(vs)  # (L, B, nkv, T0, Dh) each


class DecodeGraph(nn.Module):
    """One token per row over the static buffer; returns the new keys/values, writes nothing."""

    def __init__(self, decoder: Decoder, max_len: int) -> None:
        super().__init__()
        self.s = _StaticDecoder(decoder, max_len)

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, 1) int64
        positions: torch.Tensor,  # (B, 1) int64
        slot: torch.Tensor,  # (1,) int64: the buffer slot of this token (every row)
        key_mask: torch.Tensor,  # (B, S) bool: filled slots, `slot` included
        k_cache: torch.Tensor,  # (L, B, nkv, S, Dh)
        v_cache: torch.Tensor,  # (L, B, nkv, S, Dh)
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s = self.s
        x = s.add_positions(s.dec.embed(input_ids), positions)  # (B, 1, H)
        here = (torch.arange(s.max_len, device=x.device) == slot)[None, None, :, None]  # (1,1,S,1)
        mask = key_mask[:, None, None, :]  # (B, 1, 1, S)
        ks, vs = [], []
        for i, block in enumerate(s.blocks):
            q, k, v = s.qkv(block, x, positions, 1)  # k, v (B, nkv, 1, Dh)
            ks.append(k)
            vs.append(v)
            k_all = torch.where(here, k, k_cache[i])  # (B, nkv, S, Dh)
            v_all = torch.where(here, v, v_cache[i])
            x = s.finish_block(block, x, s.attend(q, k_all, v_all, mask, s.attn_scale(block), 1))
        logits = s.final_logits(x[:, 0])  # (B, V)
        return logits, torch.stack(ks), torch.stack(vs)  # (L, B, nkv, 1, Dh) each
