"""Transformer pieces shared by the score network and the prompt generator.

Bidirectional pre-RMSNorm blocks, qk-RMSNorm attention, SwiGLU feed-forward, time conditioning as
zero-initialised scale/shift after each pre-norm, and optional U-Net-style dense skips.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from dglm.kernels.attention import fused_attention_supported, qk_norm_attention
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # y = x / sqrt(mean(x²) + eps) · g, computed in fp32
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).type_as(x)


def sinusoidal_embedding(x: torch.Tensor, dim: int) -> torch.Tensor:
    """(B,) → (B, dim): [sin(x·f_i), cos(x·f_i)], f_i = 10000^(−i/(dim/2 − 1))."""
    half = dim // 2
    freqs = torch.exp(
        torch.arange(half, device=x.device, dtype=torch.float32) * (-math.log(10000) / (half - 1))
    )
    args = x.float()[:, None] * freqs[None, :]
    return torch.cat((args.sin(), args.cos()), dim=-1)


class TimeMLP(nn.Module):
    """Sinusoidal embedding of 1000·alpha² → Linear → SiLU → Linear."""

    def __init__(self, sin_dim: int, out_dim: int) -> None:
        super().__init__()
        self.sin_dim = sin_dim
        self.fc1 = nn.Linear(sin_dim, out_dim)
        self.fc2 = nn.Linear(out_dim, out_dim)

    def forward(self, alpha2: torch.Tensor) -> torch.Tensor:  # (B,) → (B, out_dim)
        h = sinusoidal_embedding(alpha2 * 1000, self.sin_dim).to(self.fc1.weight.dtype)
        return self.fc2(F.silu(self.fc1(h)))


class TimeScaleShift(nn.Module):
    """SiLU → Linear(time_dim → 2·dim), zero-initialised: x·(1 + scale) + shift."""

    def __init__(self, time_dim: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(time_dim, 2 * dim)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor, time_emb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.proj(F.silu(time_emb))[:, None, :].chunk(2, dim=-1)  # (B, 1, dim) each
        return x * (scale + 1) + shift


# Attention on CUDA uses the fused Triton kernel (dglm.kernels.attention) when triton is installed;
# set False to force the PyTorch path (A/B benchmarks, debugging). CPU always uses PyTorch.
FUSED_ATTENTION = True


class Attention(nn.Module):
    def __init__(self, dim: int, head_dim: int, time_dim: int) -> None:
        super().__init__()
        assert dim % head_dim == 0, (dim, head_dim)
        self.n_heads, self.head_dim = dim // head_dim, head_dim
        self.pre_norm = RMSNorm(dim)
        self.time_cond = TimeScaleShift(time_dim, dim)
        self.to_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_norm = RMSNorm(head_dim)
        self.k_norm = RMSNorm(head_dim)
        self.to_out = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, time_emb: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.time_cond(self.pre_norm(x), time_emb)
        q, k, v = self.to_qkv(h).view(b, t, 3, self.n_heads, self.head_dim).unbind(2)  # (B,T,H,Dh)
        if FUSED_ATTENTION and q.is_cuda and not q.requires_grad:
            # One Triton launch for qk-norm + attention over all (item, head) pairs, reading the
            # strided q/k/v views in place and writing (B, T, H, Dh) = to_out's layout. The kernel
            # has no backward, so autograd (`exact` guidance, training) stays on the path below.
            assert self.q_norm.eps == self.k_norm.eps
            if fused_attention_supported(t, self.head_dim):
                w_q, w_k = self.q_norm.weight, self.k_norm.weight
                o = qk_norm_attention(q, k, v, w_q, w_k, self.q_norm.eps)  # (B, T, H, Dh)
                return self.to_out(o.view(b, t, d))
        q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (y.transpose(1, 2) for y in (q, k, v))  # (B, H, T, Dh)
        o = F.scaled_dot_product_attention(q, k, v)  # softmax(q·kᵀ/√Dh)·v, bidirectional
        return self.to_out(o.transpose(1, 2).reshape(b, t, d))


class FeedForward(nn.Module):
    """SwiGLU: W2·(W1a·h ⊙ SiLU(W1b·h)), inner = int(4·dim·2/3)."""

    def __init__(self, dim: int, time_dim: int, mult: float = 4.0) -> None:
        super().__init__()
        inner = int(dim * mult * 2 / 3)
        self.pre_norm = RMSNorm(dim)
        self.time_cond = TimeScaleShift(time_dim, dim)
        self.proj_in = nn.Linear(dim, 2 * inner)
        self.proj_out = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor, time_emb: torch.Tensor) -> torch.Tensor:
        h = self.time_cond(self.pre_norm(x), time_emb)
        a, gate = self.proj_in(h).chunk(2, dim=-1)
        return self.proj_out(a * F.silu(gate))


class Block(nn.Module):
    def __init__(self, dim: int, head_dim: int, time_dim: int) -> None:
        super().__init__()
        self.attn = Attention(dim, head_dim, time_dim)
        self.ff = FeedForward(dim, time_dim)

    def forward(self, x: torch.Tensor, time_emb: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x, time_emb)
        return x + self.ff(x, time_emb)


class Transformer(nn.Module):
    """Learned absolute positions, `depth` blocks, final RMSNorm.

    dense=True adds U-Net skips: the inputs of the first depth/2 blocks are concatenated, in reverse
    order, onto the inputs of the second half through Linear(2·dim → dim).
    """

    def __init__(
        self, dim: int, depth: int, head_dim: int, time_dim: int, seq_len: int, dense: bool
    ) -> None:
        super().__init__()
        if dense and depth % 2:
            raise ValueError(f"dense skips need an even depth, got {depth}")
        self.pos_emb = nn.Parameter(torch.randn(seq_len, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, head_dim, time_dim) for _ in range(depth))
        self.dense = (
            nn.ModuleList(nn.Linear(2 * dim, dim) for _ in range(depth // 2)) if dense else None
        )
        self.norm = RMSNorm(dim)

    def forward(self, x: torch.Tensor, time_emb: torch.Tensor) -> torch.Tensor:
        x = x + self.pos_emb.to(x.dtype)  # (B, T, dim)
        half = len(self.blocks) // 2
        skips: list[torch.Tensor] = []
        for i, block in enumerate(self.blocks):
            if self.dense is not None:
                if i < half:
                    skips.append(x)
                else:
                    x = self.dense[i - half](torch.cat((x, skips.pop()), dim=-1))
            x = block(x, time_emb)
        return self.norm(x)
