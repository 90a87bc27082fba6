"""Diffusion-LM's networks: the denoiser over a sequence of learned word embeddings, and the
noise-aware attribute classifier that guides it.

Denoiser (x0-prediction): z_t (B, L, d) and alpha²(t) (B,) → x̂0 (B, L, d). Word embeddings E
(V, d) are learned with it end to end; Linear(d → dim) + the time embedding, the engine's shared
bidirectional transformer (engine.layers: learned positions, time scale/shift in every block),
Linear(dim → d). Rounding scores are −‖x − E_v‖² (up to a per-vector constant: 2x·E_v − ‖E_v‖²),
the rule that also decodes and clamps (kernels.nearest_embedding), so the rounding loss trains
exactly what sampling uses (the paper ties its LM head to E and scores x·E_v).

Two readings of the last layer's output q (B, L, d), `DiffusionLMConfig.x0_head`:
- "regress" (the paper): x̂0 = q, trained by ‖x̂0 − x0‖².
- "interpolate" (score interpolation, Dieleman et al. 2022, "CDCD"): q scores every word by the
  rounding rule, p(v | z_t) = softmax_v(2q·E_v − ‖E_v‖²), trained by cross-entropy on the true
  words, and x̂0 = Σ_v p(v | z_t)·E_v, the mean embedding under the predicted distribution. A
  regressed x̂0 under uncertainty is the average of the candidate embeddings, which lands near
  the table's centroid (the nearest words there are "the" and "."); the cross-entropy gives every
  position a sharp gradient toward its word and away from the others, and the same mean is formed
  explicitly from a distribution the network is trained to calibrate. The sampler is unchanged:
  it reads x̂0 either way. Measured on CPU (README, Diffusion-LM): at equal steps it halves the
  held-out word error of "regress" at t = 0.25, but its samples are no more fluent.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
from dglm.engine.config import FromDict, check_positive
from dglm.engine.diffusion.schedule import SqrtSchedule
from dglm.engine.layers import TimeMLP, Transformer
from torch import nn

X0_HEADS = ("regress", "interpolate")


@dataclass(frozen=True)
class DiffusionLMConfig(FromDict):
    vocab_size: int = 5000  # V: word-level vocabulary, specials included (vocab.Vocab)
    seq_len: int = 24  # L: positions, BOS + words + EOS + PADs
    emb_dim: int = 16  # d: word-embedding width, the diffusion space per position
    dim: int = 128  # transformer width
    depth: int = 4  # transformer blocks
    head_dim: int = 32  # attention head width
    schedule_offset: float = 1e-4  # the sqrt schedule's s: alpha² = 1 − √(t + s)
    diffusion_steps: int = 2000  # T: training draws t from {1..T}/T (the paper's 2000)
    # self-conditioning (Chen et al. 2023, "Analog Bits"): the denoiser also reads its own previous
    # estimate x̂0 (zeros when there is none); trained on half the batches with a first, no-grad
    # estimate, and fed the previous step's estimate when sampling
    self_condition: bool = False
    # > 0: every word embedding is used at this L2 norm (its learned direction only), so the
    # denoising loss cannot be lowered by shrinking the embeddings together (the collapse a free
    # table drifts into: rounding errors grow as the MSE falls); 0: the learned table as is
    embedding_norm: float = 0.0
    # how the last layer's output becomes x̂0: "regress" (x̂0 itself, MSE) or "interpolate" (word
    # scores, cross-entropy; x̂0 = their softmax-weighted mean embedding): see the module doc
    x0_head: str = "regress"

    def __post_init__(self) -> None:
        check_positive(
            "DiffusionLMConfig",
            **{k: getattr(self, k) for k in ("vocab_size", "seq_len", "emb_dim", "dim", "depth")},
            head_dim=self.head_dim,
            diffusion_steps=self.diffusion_steps,
        )
        if self.vocab_size <= 4:
            raise ValueError(
                f"DiffusionLMConfig.vocab_size must exceed the 4 special tokens, got {self.vocab_size}"
            )
        if self.seq_len < 3:
            raise ValueError(
                f"DiffusionLMConfig.seq_len must be ≥ 3 (BOS, a word, EOS), got {self.seq_len}"
            )
        if self.dim % self.head_dim or self.dim % 2:
            raise ValueError(
                f"DiffusionLMConfig.dim={self.dim} must be even and divisible by head_dim={self.head_dim}"
            )
        SqrtSchedule(self.schedule_offset)  # validates the offset
        if self.x0_head not in X0_HEADS:
            raise ValueError(
                f"DiffusionLMConfig.x0_head must be one of {X0_HEADS}, got {self.x0_head!r}"
            )
        if not (self.embedding_norm >= 0 and math.isfinite(self.embedding_norm)):
            raise ValueError(
                f"DiffusionLMConfig.embedding_norm must be a finite number ≥ 0, got "
                f"{self.embedding_norm!r}"
            )

    def to_dict(self) -> dict:
        return asdict(self)


_CPU_WIDE = DiffusionLMConfig(
    vocab_size=5000, seq_len=24, emb_dim=32, dim=256, depth=4, head_dim=32
)
_CPU_WIDE_SC = replace(_CPU_WIDE, self_condition=True, embedding_norm=32**0.5)
_CPU_WIDE_CE = replace(_CPU_WIDE_SC, x0_head="interpolate")

DIFFUSION_LM_PRESETS: dict[str, DiffusionLMConfig] = {
    # For tests: trains in seconds.
    "tiny": DiffusionLMConfig(vocab_size=64, seq_len=12, emb_dim=8, dim=32, depth=2, head_dim=16),
    # One CPU core, short sentences (≤ 22 words; the paper's E2E d = 16): see the package
    # docstring for the corpus and the measured step rate.
    "cpu": DiffusionLMConfig(
        vocab_size=5000, seq_len=24, emb_dim=16, dim=128, depth=4, head_dim=32
    ),
    # One CPU core, wider: 4× the denoiser's width and 2× the embedding of "cpu" (~3.4M
    # parameters), for simple short sentences (sources:wordnet,amazon_reviews).
    "cpu-wide": _CPU_WIDE,
    # "cpu-wide" with self-conditioning and word embeddings at norm √d (unit scale per coordinate).
    "cpu-wide-sc": _CPU_WIDE_SC,
    # "cpu-wide-sc" with the score-interpolation head (cross-entropy training; module doc).
    "cpu-wide-ce": _CPU_WIDE_CE,
    # "cpu-wide-ce" for short sentences (≤ 14 words) over a small vocabulary, e.g. the Amazon
    # fine-food reviews alone (sources:amazon_reviews: 2,000 words cover 93% of their words).
    "cpu-short-ce": replace(_CPU_WIDE_CE, vocab_size=2000, seq_len=16),
    # "cpu-short-ce" at 32 positions (≤ 30 words): the shape of the "32-token sample" speed target.
    "cpu-long-ce": replace(_CPU_WIDE_CE, vocab_size=2000, seq_len=32),
    # The paper's ROCStories shape: BERT-base-sized denoiser, d = 128, 11k words, length 64.
    "reference": DiffusionLMConfig(
        vocab_size=11_000, seq_len=64, emb_dim=128, dim=768, depth=12, head_dim=64
    ),
}


class DiffusionLMNetwork(nn.Module):
    """x0-prediction denoiser with its word embeddings: (z_t (B,L,d), alpha² (B,)) → x̂0 (B,L,d)."""

    def __init__(self, config: DiffusionLMConfig) -> None:
        super().__init__()
        self.config = c = config
        self.embed = nn.Embedding(c.vocab_size, c.emb_dim)  # N(0, 1) init, as the paper's
        self.time = TimeMLP(c.dim, c.dim)
        self.proj_in = nn.Linear(c.emb_dim, c.dim)
        # the previous estimate's input projection, zero at init (starts as the plain denoiser)
        self.proj_self = nn.Linear(c.emb_dim, c.dim, bias=False) if c.self_condition else None
        if self.proj_self is not None:
            nn.init.zeros_(self.proj_self.weight)
        self.transformer = Transformer(c.dim, c.depth, c.head_dim, c.dim, c.seq_len, dense=False)
        self.proj_out = nn.Linear(c.dim, c.emb_dim)
        if c.x0_head == "interpolate":  # uniform word scores at init (cross-entropy log V)
            nn.init.zeros_(self.proj_out.weight)
            nn.init.zeros_(self.proj_out.bias)

    @property
    def schedule(self) -> SqrtSchedule:
        return SqrtSchedule(self.config.schedule_offset)

    def forward(
        self, z: torch.Tensor, alpha2: torch.Tensor, x0_prev: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x̂0 (B, L, d); `x0_prev` (B, L, d): the previous estimate, read by a self-conditioned
        network only (None = zeros: the first step)."""
        return self.denoise(z, alpha2, x0_prev)[0]

    def denoise(
        self, z: torch.Tensor, alpha2: torch.Tensor, x0_prev: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(x̂0 (B, L, d), word scores (B, L, V) fp32 for the "interpolate" head, else None)."""
        t_emb = self.time(alpha2)  # (B, dim)
        dtype = self.proj_in.weight.dtype
        h = self.proj_in(z.to(dtype)) + t_emb[:, None, :]  # (B, L, dim)
        if self.proj_self is not None and x0_prev is not None:
            h = h + self.proj_self(x0_prev.to(dtype))
        q = self.proj_out(self.transformer(h, t_emb))  # (B, L, d)
        if self.config.x0_head == "regress":
            return q, None
        e = self.table().float()  # once per call: the scores and the mean both read it
        scores = self.logits(q, e)  # (B, L, V) fp32
        return scores.softmax(-1) @ e, scores

    def table(self) -> torch.Tensor:
        """The word embeddings E (V, d) as the diffusion uses them: the learned table, or its
        rows at `config.embedding_norm`."""
        w = self.embed.weight
        norm = self.config.embedding_norm
        if norm > 0:
            w = w * (norm / w.norm(dim=-1, keepdim=True).clamp_min(1e-12))
        return w

    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """E[ids] (..., d)."""
        return self.table()[ids] if self.config.embedding_norm > 0 else self.embed(ids)

    def logits(self, x: torch.Tensor, table: torch.Tensor | None = None) -> torch.Tensor:
        """Rounding scores (..., V): −‖x − E_v‖² + ‖x‖² = 2x·E_v − ‖E_v‖², in fp32 (`table`: E
        as `self.table()` gives it, when the caller already has it)."""
        e = (self.table() if table is None else table).float()
        return 2 * x.float() @ e.T - e.pow(2).sum(-1)


@dataclass(frozen=True)
class LatentClassifierConfig(FromDict):
    name: str  # what a control names it by, e.g. "sentiment"
    labels: tuple[str, ...]  # its classes, in output order
    emb_dim: int  # d of the denoiser it guides
    seq_len: int  # L of the denoiser it guides
    dim: int = 128  # transformer width
    depth: int = 2  # transformer blocks
    head_dim: int = 32

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", tuple(self.labels))
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(
                f"LatentClassifierConfig.name must be a non-empty string, got {self.name!r}"
            )
        if len(self.labels) < 2 or len(set(self.labels)) != len(self.labels):
            raise ValueError(
                f"LatentClassifierConfig.labels must be ≥ 2 distinct labels, got {self.labels!r}"
            )
        check_positive(
            "LatentClassifierConfig",
            emb_dim=self.emb_dim,
            seq_len=self.seq_len,
            dim=self.dim,
            depth=self.depth,
            head_dim=self.head_dim,
        )
        if self.dim % self.head_dim or self.dim % 2:
            raise ValueError(
                f"LatentClassifierConfig.dim={self.dim} must be even and divisible by "
                f"head_dim={self.head_dim}"
            )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["labels"] = list(self.labels)
        return d


class LatentClassifier(nn.Module):
    """Noise-aware attribute classifier on the latent sequence: (z_t (B,L,d), alpha² (B,)) →
    label logits (B, K) fp32; the transformer's outputs mean-pooled over positions."""

    def __init__(self, config: LatentClassifierConfig) -> None:
        super().__init__()
        self.config = c = config
        self.time = TimeMLP(c.dim, c.dim)
        self.proj_in = nn.Linear(c.emb_dim, c.dim)
        self.transformer = Transformer(c.dim, c.depth, c.head_dim, c.dim, c.seq_len, dense=False)
        self.head = nn.Linear(c.dim, len(c.labels))

    def forward(self, z: torch.Tensor, alpha2: torch.Tensor) -> torch.Tensor:
        t_emb = self.time(alpha2)
        h = self.proj_in(z.to(self.proj_in.weight.dtype)) + t_emb[:, None, :]
        return self.head(self.transformer(h, t_emb).mean(dim=1)).float()  # (B, K)
