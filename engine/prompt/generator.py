"""The prompt generator: a (noised) continuation latent → soft-prompt vectors for the decoder
(DGLM reference shapes; output width = the decoder's).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from dglm.engine.config import FromDict, check_positive
from dglm.engine.layers import TimeMLP, Transformer
from torch import nn


@dataclass(frozen=True)
class PromptGeneratorConfig(FromDict):
    latent_dim: int = 384  # d: the encoder's embedding width
    decoder_dim: int = 576  # width of the decoder's token embeddings (soft-prompt vectors)
    dim: int = 256  # transformer width
    depth: int = 4  # transformer blocks
    head_dim: int = 64  # attention head width
    prompt_len: int = 8  # P: soft-prompt vectors per latent

    def __post_init__(self) -> None:
        check_positive("PromptGeneratorConfig", **{k: v for k, v in asdict(self).items()})
        if self.dim % self.head_dim:
            raise ValueError(
                f"PromptGeneratorConfig.dim={self.dim} must be divisible by head_dim={self.head_dim}"
            )
        if (4 * self.latent_dim) % self.prompt_len or self.latent_dim % 2:
            raise ValueError(
                f"PromptGeneratorConfig: 4·latent_dim={4 * self.latent_dim} must be divisible by "
                f"prompt_len={self.prompt_len} and latent_dim even"
            )


PROMPT_GENERATOR_PRESETS: dict[str, PromptGeneratorConfig] = {
    # The reference's shape (Sentence-T5 XL → GPT-2 Large).
    "reference": PromptGeneratorConfig(latent_dim=768, decoder_dim=1280, dim=768, depth=6),
    # The default bundle's shape (all-MiniLM-L6-v2 → SmolLM2-135M).
    "small": PromptGeneratorConfig(latent_dim=384, decoder_dim=576, dim=256, depth=4),
    "compact": PromptGeneratorConfig(latent_dim=384, decoder_dim=576, dim=256, depth=2),
    "tiny": PromptGeneratorConfig(
        latent_dim=32, decoder_dim=64, dim=64, depth=2, head_dim=32, prompt_len=4
    ),
}


class PromptGenerator(nn.Module):
    """(noised latent (B,d), alpha² (B,)) → soft prompt (B, P, decoder_dim).

    Splicer Linear(d → 4d) → P tokens → Linear → dim; time-conditioned transformer (no dense
    skips); Linear(dim → decoder_dim).
    """

    def __init__(self, config: PromptGeneratorConfig) -> None:
        super().__init__()
        self.config = c = config
        d, p = c.latent_dim, c.prompt_len
        self.splice_in = nn.Linear(d, 4 * d)
        self.splice_tok = nn.Linear(4 * d // p, c.dim)
        self.time_mlp = TimeMLP(d, d // 2)
        self.transformer = Transformer(c.dim, c.depth, c.head_dim, d // 2, p, dense=False)
        self.out = nn.Linear(c.dim, c.decoder_dim)

    def forward(self, z: torch.Tensor, alpha2: torch.Tensor) -> torch.Tensor:
        b, p = z.shape[0], self.config.prompt_len
        h = self.splice_tok(self.splice_in(z).view(b, p, -1))  # (B, P, dim)
        h = self.transformer(h, self.time_mlp(alpha2))
        return self.out(h)  # (B, P, decoder_dim)
