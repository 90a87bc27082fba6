"""The score network: semantic diffusion over sentence embeddings (DGLM reference shapes,
widths scaling with the encoder's width d).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from dglm.engine.config import FromDict, check_positive
from dglm.engine.layers import TimeMLP, Transformer
from torch import nn


@dataclass(frozen=True)
class ScoreNetConfig(FromDict):
    latent_dim: int = 384  # d: the encoder's embedding width
    dim: int = 256  # transformer width
    depth: int = 8  # transformer blocks (even: dense skips pair them)
    head_dim: int = 64  # attention head width
    num_tokens: int = 32  # T: tokens the splicers cut a latent into
    output_dim_mult: int = 8  # inverse splicer width: d·mult/T per token
    # Distilled students take the classifier-free guidance weight w as an input (Meng et al. 2023):
    # one network evaluation per step instead of a conditional + null-context pair.
    guidance_embedding: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.guidance_embedding, bool):
            raise ValueError(
                f"ScoreNetConfig.guidance_embedding must be a bool, got {self.guidance_embedding!r}"
            )
        check_positive(
            "ScoreNetConfig",
            **{k: v for k, v in asdict(self).items() if k != "guidance_embedding"},
        )
        if self.dim % self.head_dim or self.dim % 2:
            raise ValueError(
                f"ScoreNetConfig.dim={self.dim} must be even and divisible by head_dim={self.head_dim}"
            )
        if self.depth % 2:
            raise ValueError(f"ScoreNetConfig.depth must be even (dense skips), got {self.depth}")
        for mult in (8, 4, self.output_dim_mult):
            if (self.latent_dim * mult) % self.num_tokens:
                raise ValueError(
                    f"ScoreNetConfig: latent_dim·{mult}={self.latent_dim * mult} is not divisible by "
                    f"num_tokens={self.num_tokens}"
                )


SCORE_NET_PRESETS: dict[str, ScoreNetConfig] = {
    # The reference's shape (Sentence-T5 XL latents).
    "reference": ScoreNetConfig(latent_dim=768, dim=768, depth=12),
    # The default bundle's shape (all-MiniLM-L6-v2 latents).
    "small": ScoreNetConfig(latent_dim=384, dim=256, depth=8),
    # A shape that trains in minutes on two CPU cores (half the blocks and tokens of "small").
    "compact": ScoreNetConfig(latent_dim=384, dim=256, depth=4, num_tokens=16),
    # For tests.
    "tiny": ScoreNetConfig(latent_dim=32, dim=64, depth=2, head_dim=32, num_tokens=8),
}


# w enters the sinusoidal embedding as alpha² does (×1000 inside TimeMLP): w = 1 ↦ 100.
GUIDANCE_EMBED_SCALE = 0.1


class ScoreNetwork(nn.Module):
    """v-prediction network: (z_t (B,d), context (B,d) | None, alpha² (B,)) → v̂ (B,d).

    Splicer: Linear(d → 8d) → T tokens of 8d/T → Linear → dim/2; context splicer likewise with 4d;
    a learned null context replaces the prefix for classifier-free guidance. With
    `guidance_embedding`, an embedding of the guidance weight w (zero-initialised output, so a
    student copied from its teacher starts as the teacher) is added to the time embedding.
    """

    def __init__(self, config: ScoreNetConfig) -> None:
        super().__init__()
        self.config = c = config
        d, t, half = c.latent_dim, c.num_tokens, c.dim // 2
        self.splice_in = nn.Linear(d, 8 * d)
        self.splice_tok = nn.Linear(8 * d // t, half)
        self.ctx_in = nn.Linear(d, 4 * d)
        self.ctx_tok = nn.Linear(4 * d // t, half)
        self.null_context = nn.Parameter(torch.randn(d))
        self.time_mlp = TimeMLP(c.dim, half)
        self.guidance_mlp = None
        if c.guidance_embedding:
            self.guidance_mlp = TimeMLP(c.dim, half)
            nn.init.zeros_(self.guidance_mlp.fc2.weight)
            nn.init.zeros_(self.guidance_mlp.fc2.bias)
        self.input_proj = nn.Linear(c.dim, c.dim)
        self.transformer = Transformer(c.dim, c.depth, c.head_dim, half, t, dense=True)
        self.unsplice_tok = nn.Linear(c.dim, d * c.output_dim_mult // t)
        self.unsplice_out = nn.Linear(d * c.output_dim_mult, d)

    def forward(
        self,
        z: torch.Tensor,  # (B, d) noised latent
        context: torch.Tensor | None,  # (B, d) prefix latent, None = null context for every row
        alpha2: torch.Tensor,  # (B,) noise level
        drop_context: torch.Tensor | None = None,  # (B,) bool: rows that use the null context
        cfg_scale: torch.Tensor | None = None,  # (B,) guidance weight w: students only
    ) -> torch.Tensor:
        b, t = z.shape[0], self.config.num_tokens
        if (cfg_scale is not None) != (self.guidance_mlp is not None):
            raise ValueError(
                "cfg_scale is an input of guidance-embedding (distilled) score networks only: "
                f"guidance_embedding={self.config.guidance_embedding}, cfg_scale given: "
                f"{cfg_scale is not None}"
            )
        null = self.null_context.to(z.dtype).expand(b, -1)
        if context is None:
            context = null
        elif drop_context is not None:
            context = torch.where(drop_context[:, None], null, context)
        x = self.splice_tok(self.splice_in(z).view(b, t, -1))  # (B, T, dim/2)
        c = self.ctx_tok(self.ctx_in(context).view(b, t, -1))  # (B, T, dim/2)
        h = self.input_proj(torch.cat((x, c), dim=-1))  # (B, T, dim)
        temb = self.time_mlp(alpha2)
        if self.guidance_mlp is not None:
            temb = temb + self.guidance_mlp(cfg_scale * GUIDANCE_EMBED_SCALE)
        h = self.transformer(h, temb)
        return self.unsplice_out(self.unsplice_tok(h).reshape(b, -1))  # (B, d)
