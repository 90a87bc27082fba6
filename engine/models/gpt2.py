"""GPT-2 decoder: learned absolute positions, pre-LayerNorm blocks, GELU (tanh) MLP.

HF stores GPT-2's projections as Conv1D with (in, out) weights; they are transposed once at load
into nn.Linear (out, in) weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from dglm.engine.models.base import Decoder, KVCache, StaticKV, add_residual, attend
from dglm.engine.models.configs import check_positive, hf_lm_head, hf_special_ids
from torch import nn

ACTIVATIONS = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
}


@dataclass(frozen=True)
class GPT2Config:
    vocab_size: int  # V: rows of the embedding and the LM head
    hidden_size: int  # H: residual width
    num_layers: int  # L: transformer blocks
    num_heads: int  # nh: attention heads, H % nh == 0
    max_context: int = 1024  # learned positions (n_positions)
    intermediate_size: int = 0  # MLP inner width; 0 = 4·H
    layer_norm_eps: float = 1e-5  # ε inside LayerNorm
    activation: str = "gelu_new"  # one of ACTIVATIONS
    scale_attn_weights: bool = True  # scores scaled by 1/sqrt(Dh)
    scale_attn_by_inverse_layer_idx: bool = False  # scores further scaled by 1/(layer + 1)
    tie_embeddings: bool = True  # LM head shares the token-embedding matrix
    eos_token_ids: tuple[int, ...] = ()  # token ids that end generation
    bos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.intermediate_size == 0:
            object.__setattr__(self, "intermediate_size", 4 * self.hidden_size)
        check_positive(self, ("vocab_size", "hidden_size", "num_layers", "num_heads",
                              "max_context", "intermediate_size"))  # fmt: skip
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"GPT2Config.hidden_size={self.hidden_size} must be a multiple of "
                f"num_heads={self.num_heads}"
            )
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"GPT2Config.activation={self.activation!r} is not one of {sorted(ACTIVATIONS)}"
            )
        if self.layer_norm_eps <= 0:
            raise ValueError(f"GPT2Config.layer_norm_eps must be > 0, got {self.layer_norm_eps}")
        object.__setattr__(self, "eos_token_ids", tuple(int(i) for i in self.eos_token_ids))

    @classmethod
    def from_hf_config(cls, hf) -> GPT2Config:
        """From a transformers GPT2Config."""
        if getattr(hf, "add_cross_attention", False):
            raise ValueError("gpt2 config has add_cross_attention=True: not supported")
        return cls(
            vocab_size=hf.vocab_size,
            hidden_size=hf.n_embd,
            num_layers=hf.n_layer,
            num_heads=hf.n_head,
            max_context=hf.n_positions,
            intermediate_size=getattr(hf, "n_inner", None) or 0,
            layer_norm_eps=hf.layer_norm_epsilon,
            activation=hf.activation_function,
            scale_attn_weights=bool(getattr(hf, "scale_attn_weights", True)),
            scale_attn_by_inverse_layer_idx=bool(
                getattr(hf, "scale_attn_by_inverse_layer_idx", False)
            ),
            tie_embeddings=bool(getattr(hf, "tie_word_embeddings", True)),
            **hf_special_ids(hf),
        )


class GPT2Block(nn.Module):
    def __init__(self, c: GPT2Config, layer: int):
        super().__init__()
        self.layer = layer
        self.nh, self.dh = c.num_heads, c.hidden_size // c.num_heads
        self.scale = self.dh**-0.5 if c.scale_attn_weights else 1.0
        if c.scale_attn_by_inverse_layer_idx:
            self.scale /= layer + 1
        self.act = ACTIVATIONS[c.activation]
        self.ln_1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.wqkv = nn.Linear(c.hidden_size, 3 * c.hidden_size)
        self.wo = nn.Linear(c.hidden_size, c.hidden_size)
        self.ln_2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.fc = nn.Linear(c.hidden_size, c.intermediate_size)
        self.proj = nn.Linear(c.intermediate_size, c.hidden_size)

    def forward(
        self,
        x: torch.Tensor,
        cache: KVCache | StaticKV | None,
        mask: torch.Tensor | None,
        is_causal: bool,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        qkv = self.wqkv(self.ln_1(x)).view(B, T, 3, self.nh, self.dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, nh, T, Dh)
        if cache is not None:
            k, v = cache.write(self.layer, k, v)  # (B, nh, S, Dh)
        x = x + self.wo(attend(q, k, v, mask, is_causal, self.scale))
        return x + self.proj(self.act(self.fc(self.ln_2(x))))


class GPT2Decoder(Decoder):
    def __init__(self, config: GPT2Config):
        c = config
        super().__init__(c, num_kv_heads=c.num_heads, head_dim=c.hidden_size // c.num_heads)
        self.wte = nn.Embedding(c.vocab_size, c.hidden_size)
        self.wpe = nn.Embedding(c.max_context, c.hidden_size)
        self.h = nn.ModuleList(GPT2Block(c, i) for i in range(c.num_layers))
        self.ln_f = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.lm_head = None if c.tie_embeddings else nn.Linear(c.hidden_size, c.vocab_size, False)

    def reset_buffers(self, device: torch.device | str | None = None) -> None:
        """No non-persistent buffers (kept for symmetry with LlamaDecoder)."""

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.wte(input_ids)  # (B, T, H); positions are added in forward

    def lm_head_weight(self) -> torch.Tensor:
        return self.wte.weight if self.lm_head is None else self.lm_head.weight

    def blocks(self) -> nn.ModuleList:
        return self.h

    def blocks_forward(self, x, positions, cache, mask, is_causal, residual=None):
        x = x + self.wpe(positions)  # (B, T, H)
        for i, block in enumerate(self.h):
            x = add_residual(block(x, cache, mask, is_causal), residual, i)
        return self.ln_f(x)


def gpt2_state_dict_from_hf(sd: dict[str, torch.Tensor], c: GPT2Config) -> dict[str, torch.Tensor]:
    """HF GPT2LMHeadModel / GPT2Model names (Conv1D (in, out) weights) → GPT2Decoder names."""
    sd = {
        (k[len("transformer.") :] if k.startswith("transformer.") else k): v for k, v in sd.items()
    }
    out = {name: sd[name] for name in ("wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias")}
    out.update(hf_lm_head(sd, c.tie_embeddings))
    conv = {"attn.c_attn": "wqkv", "attn.c_proj": "wo", "mlp.c_fc": "fc", "mlp.c_proj": "proj"}
    for i in range(c.num_layers):
        p = f"h.{i}."
        for theirs, ours in conv.items():
            out[f"{p}{ours}.weight"] = sd[f"{p}{theirs}.weight"].t().contiguous()  # (out, in)
            out[f"{p}{ours}.bias"] = sd[f"{p}{theirs}.bias"]
        for ln in ("ln_1", "ln_2"):
            out[f"{p}{ln}.weight"] = sd[f"{p}{ln}.weight"]
            out[f"{p}{ln}.bias"] = sd[f"{p}{ln}.bias"]
    return out
