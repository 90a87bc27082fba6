"""Llama-family decoder (Llama 1-3, SmolLM, Mistral and Qwen2 without sliding windows).

Pre-RMSNorm blocks, grouped-query attention with rotary positions (HF "rotate half" convention),
SwiGLU feed-forward. q, k, v share one fused projection and gate, up another: fewer, larger
matmuls per decode step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from dglm.engine.models.base import Decoder, KVCache, StaticKV, add_residual, attend
from dglm.engine.models.configs import check_positive, hf_lm_head, hf_special_ids
from torch import nn

ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int  # V: rows of the embedding and the LM head
    hidden_size: int  # H: residual width
    intermediate_size: int  # I: SwiGLU inner width
    num_layers: int  # L: transformer blocks
    num_heads: int  # nh: query heads
    num_kv_heads: int  # nkv: key/value heads; nh % nkv == 0 (GQA when nkv < nh)
    head_dim: int = 0  # Dh; 0 = hidden_size // num_heads
    max_context: int = 2048  # positions the RoPE table covers (max sequence length)
    rms_norm_eps: float = 1e-6  # ε inside RMSNorm
    rope_theta: float = 10000.0  # RoPE base
    rope_type: str = "default"  # one of ROPE_TYPES
    rope_factor: float = 1.0  # "linear" / "llama3": frequency division factor
    rope_low_freq_factor: float = 1.0  # "llama3" only
    rope_high_freq_factor: float = 4.0  # "llama3" only
    rope_original_max_context: int = 8192  # "llama3" only: pretraining context
    tie_embeddings: bool = False  # LM head shares the token-embedding matrix
    qkv_bias: bool = False  # biases on the q, k, v projections (Qwen2: True)
    o_bias: bool = False  # bias on the attention output projection
    mlp_bias: bool = False  # biases in the SwiGLU projections
    eos_token_ids: tuple[int, ...] = ()  # token ids that end generation
    bos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.head_dim == 0 and self.num_heads > 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        check_positive(self, ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                              "num_heads", "num_kv_heads", "head_dim", "max_context"))  # fmt: skip
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"LlamaConfig.num_heads={self.num_heads} must be a multiple of "
                f"num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"LlamaConfig.head_dim={self.head_dim} must be even for RoPE")
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"LlamaConfig.rope_type={self.rope_type!r} is not one of {ROPE_TYPES}")
        if self.rope_theta <= 0 or self.rope_factor <= 0 or self.rms_norm_eps <= 0:
            raise ValueError("LlamaConfig.rope_theta, rope_factor and rms_norm_eps must be > 0")
        object.__setattr__(self, "eos_token_ids", tuple(int(i) for i in self.eos_token_ids))

    @classmethod
    def from_hf_config(cls, hf) -> LlamaConfig:
        """From a transformers config of model_type llama, mistral or qwen2 (v4 or v5 layout)."""
        model_type = getattr(hf, "model_type", "llama")
        act = getattr(hf, "hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ValueError(
                f"{model_type} config has hidden_act={act!r}; only 'silu' is supported"
            )
        if getattr(hf, "pretraining_tp", 1) not in (None, 1):
            raise ValueError(f"{model_type} config has pretraining_tp={hf.pretraining_tp}; need 1")
        rope = dict(getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {})
        if "full_attention" in rope:  # per-layer-type layout
            rope = dict(rope["full_attention"])
        rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
        if rope_type not in ROPE_TYPES:
            raise ValueError(
                f"{model_type} config uses rope_type={rope_type!r}; supported: {ROPE_TYPES}"
            )
        if rope.get("partial_rotary_factor", getattr(hf, "partial_rotary_factor", 1.0)) != 1.0:
            raise ValueError(f"{model_type} config uses partial rotary embeddings: not supported")
        theta = rope.get("rope_theta") or getattr(hf, "rope_theta", None) or 10000.0
        max_context = hf.max_position_embeddings
        window = getattr(hf, "sliding_window", None)
        if model_type == "qwen2" and not getattr(hf, "use_sliding_window", False):
            window = None
        if window is not None and window < max_context:
            # the sliding window never binds on sequences no longer than it: cap the context
            max_context = window
        attention_bias = bool(getattr(hf, "attention_bias", False))
        return cls(
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=hf.num_hidden_layers,
            num_heads=hf.num_attention_heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads,
            head_dim=getattr(hf, "head_dim", None) or 0,
            max_context=max_context,
            rms_norm_eps=hf.rms_norm_eps,
            rope_theta=float(theta),
            rope_type=rope_type,
            rope_factor=float(rope.get("factor", 1.0)),
            rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
            rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
            rope_original_max_context=int(
                rope.get("original_max_position_embeddings", hf.max_position_embeddings)
            ),
            tie_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            qkv_bias=attention_bias or model_type == "qwen2",
            o_bias=attention_bias,
            mlp_bias=bool(getattr(hf, "mlp_bias", False)),
            **hf_special_ids(hf),
        )


def rope_inv_freq(c: LlamaConfig) -> torch.Tensor:
    """Inverse frequencies (Dh/2,) fp32: θ^(−2i/Dh), rescaled for "linear" and "llama3" RoPE."""
    exponent = torch.arange(0, c.head_dim, 2, dtype=torch.float, device="cpu") / c.head_dim
    inv_freq = 1.0 / (c.rope_theta**exponent)
    if c.rope_type == "linear":
        return inv_freq / c.rope_factor
    if c.rope_type == "llama3":
        # wavelengths above the low-frequency cutoff are divided by `factor`, below the
        # high-frequency cutoff kept, and smoothly interpolated in between (Llama 3.1).
        low_wl = c.rope_original_max_context / c.rope_low_freq_factor
        high_wl = c.rope_original_max_context / c.rope_high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wl, inv_freq / c.rope_factor, inv_freq)
        smooth = (c.rope_original_max_context / wavelen - c.rope_low_freq_factor) / (
            c.rope_high_freq_factor - c.rope_low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / c.rope_factor + smooth * scaled
        medium = (wavelen >= high_wl) & (wavelen <= low_wl)
        return torch.where(medium, smoothed, scaled)
    return inv_freq


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x / sqrt(mean(x²) + ε) in fp32, cast back, then the gain (the HF order)
        if torch.onnx.is_in_onnx_export():  # aten::rms_norm has no TorchScript-exporter symbolic
            y = x.float()
            y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
            return self.weight * y.type_as(x)
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)  # one call, same math
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * y.type_as(x)


class LlamaBlock(nn.Module):
    def __init__(self, c: LlamaConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.nh, self.nkv, self.dh = c.num_heads, c.num_kv_heads, c.head_dim
        self.attn_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.wqkv = nn.Linear(c.hidden_size, (self.nh + 2 * self.nkv) * self.dh, bias=c.qkv_bias)
        self.wo = nn.Linear(self.nh * self.dh, c.hidden_size, bias=c.o_bias)
        self.mlp_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.w13 = nn.Linear(c.hidden_size, 2 * c.intermediate_size, bias=c.mlp_bias)  # gate; up
        self.w2 = nn.Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | StaticKV | None,
        mask: torch.Tensor | None,
        is_causal: bool,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        qkv = self.wqkv(self.attn_norm(x)).view(B, T, self.nh + 2 * self.nkv, self.dh)
        # RoPE on q and k together: x·cos + rotate_half(x)·sin, with rotate_half(x) = [−x2, x1]
        # written as roll(x, Dh/2)·sin_signed, sin_signed = [−sin1, sin2] (exact same products)
        qk = qkv[:, :, : self.nh + self.nkv]  # (B, T, nh + nkv, Dh)
        qk = qk * cos + torch.roll(qk, self.dh // 2, dims=-1) * sin
        q = qk[:, :, : self.nh].transpose(1, 2)  # (B, nh, T, Dh)
        k = qk[:, :, self.nh :].transpose(1, 2)  # (B, nkv, T, Dh)
        v = qkv[:, :, self.nh + self.nkv :].transpose(1, 2)  # (B, nkv, T, Dh)
        if cache is not None:
            k, v = cache.write(self.layer, k, v)  # (B, nkv, S, Dh)
        x = x + self.wo(attend(q, k, v, mask, is_causal))
        gate, up = self.w13(self.mlp_norm(x)).chunk(2, dim=-1)  # (B, T, I) each
        return x + self.w2(F.silu(gate) * up)


class LlamaDecoder(Decoder):
    def __init__(self, config: LlamaConfig):
        c = config
        super().__init__(c, num_kv_heads=c.num_kv_heads, head_dim=c.head_dim)
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(LlamaBlock(c, i) for i in range(c.num_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.lm_head = None if c.tie_embeddings else nn.Linear(c.hidden_size, c.vocab_size, False)
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.reset_buffers()

    def reset_buffers(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the RoPE tables (max_context, Dh): cos(p·f), and sin(p·f) signed [−, +]."""
        device = device or self.embed_tokens.weight.device
        if torch.device(device).type == "meta":
            device = "cpu"
        dtype = self.embed_tokens.weight.dtype
        inv_freq = rope_inv_freq(self.config).to(device)  # (Dh/2,)
        freqs = torch.arange(self.max_context, device=device).float()[:, None] * inv_freq
        emb = torch.cat([freqs, freqs], dim=-1)  # (max_context, Dh)
        half = self.head_dim // 2
        sign = torch.ones(self.head_dim, device=device)
        sign[:half] = -1
        self.rope_cos = emb.cos().to(dtype)
        self.rope_sin = (emb.sin() * sign).to(dtype)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)  # (B, T, H)

    def lm_head_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def blocks(self) -> nn.ModuleList:
        return self.layers

    def blocks_forward(self, x, positions, cache, mask, is_causal, residual=None):
        cos = self.rope_cos[positions].unsqueeze(2)  # (B, T, 1, Dh)
        sin = self.rope_sin[positions].unsqueeze(2)
        for i, block in enumerate(self.layers):
            x = add_residual(block(x, cos, sin, cache, mask, is_causal), residual, i)
        return self.norm(x)


def llama_state_dict_from_hf(
    sd: dict[str, torch.Tensor], c: LlamaConfig
) -> dict[str, torch.Tensor]:
    """HF LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM names → LlamaDecoder names."""
    sd = {(k[len("model.") :] if k.startswith("model.") else k): v for k, v in sd.items()}
    out = {"embed_tokens.weight": sd["embed_tokens.weight"], "norm.weight": sd["norm.weight"]}
    out.update(hf_lm_head(sd, c.tie_embeddings))
    for i in range(c.num_layers):
        p, a, m = f"layers.{i}.", f"layers.{i}.self_attn.", f"layers.{i}.mlp."
        qkv = [a + "q_proj", a + "k_proj", a + "v_proj"]
        out[p + "wqkv.weight"] = torch.cat([sd[n + ".weight"] for n in qkv])
        if c.qkv_bias:
            out[p + "wqkv.bias"] = torch.cat([sd[n + ".bias"] for n in qkv])
        out[p + "wo.weight"] = sd[a + "o_proj.weight"]
        if c.o_bias:
            out[p + "wo.bias"] = sd[a + "o_proj.bias"]
        for suffix in ("weight", "bias") if c.mlp_bias else ("weight",):
            gate_up = [sd[f"{m}gate_proj.{suffix}"], sd[f"{m}up_proj.{suffix}"]]
            out[f"{p}w13.{suffix}"] = torch.cat(gate_up)
            out[f"{p}w2.{suffix}"] = sd[f"{m}down_proj.{suffix}"]
        out[p + "attn_norm.weight"] = sd[p + "input_layernorm.weight"]
        out[p + "mlp_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
    return out
