"""The `Method` interface: what a controllable-generation method hands the one decode loop.

A method is built from the bundle parts it needs (never from the Engine); the Engine
(`Engine(core, methods)`) owns what methods share — request checks, rows and seeds, the decode
core (`decoding.core`), the outputs — and routes each request to its method, which turns a batch
of rows into a `Conditioning`: soft-prompt vectors spliced after each prefix (DGLM), logits
processors acting on each step's logits (FUDGE), a hidden-state hook between the decoder's blocks
and its LM head (RE-Control), vectors added to the residual stream after the decoder's blocks
(CAA), and the per-row latents it reports. A new method is one module with
one `Method` subclass, used by name once registered or passed as an object:

    engine.generate(prompts, params, method="fudge")
    engine.generate(prompts, params, method=Fudge(engine.encoder, engine.probes, top_k=20))
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from dglm.engine.api import GenerationParams
from dglm.engine.decoding.sampling import DecodeParams, LogitsProcessor
from dglm.engine.models.base import HiddenHook

# decoding seeds are derived from a row's seed with this mask, apart from the method's own draws
DECODE_SEED_XOR = 0x5DEECE66D


@dataclass
class MethodBatch:
    """One `Engine.generate` call, as rows: sample j of request i is row r, rows[r] = (i, j)."""

    prompts: list[str]  # per request
    params: list[GenerationParams]  # per request
    prefix_ids: list[list[int]]  # per request: the prompt's token ids
    rows: list[tuple[int, int]]  # per row: (request, sample index)
    seeds: list[int]  # per row: the request's seed + sample index
    tokenizer: object  # the decoder's tokenizer
    # the decoder's LM head, final-norm hidden states (..., H) → logits (..., V) fp32, or None
    # where the backend does not expose it (ONNX Runtime)
    lm_head: object = None


@dataclass
class Conditioning:
    """What a method gives the decode loop for the rows of a MethodBatch."""

    soft_prompt: torch.Tensor | None = None  # (R, P, H) after each row's prefix, or None
    processors: tuple[LogitsProcessor, ...] = ()  # rewrite each step's logits (R, V)
    hidden_hook: HiddenHook | None = None  # edits final-norm hidden states (R, T, H)
    # (R, L, H) added to the decoder's residual stream after each block (CAA), or None
    residual: torch.Tensor | None = None
    latents: torch.Tensor | None = None  # (R, d) reported per sample (fp32 CPU), or None
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage of the method


class Method(ABC):
    """A controllable-generation method on the shared engine and decode loop."""

    name: ClassVar[str]
    prompt_len: int = 0  # soft-prompt vectors it splices after each prefix (KV slots it needs)

    def validate(self, params: list[GenerationParams]) -> None:
        """Method-specific input checks, before any model work (ValueError naming the field);
        none by default."""
        return None

    def decode_params(self, p: GenerationParams, seed: int) -> DecodeParams:
        """The decode loop's settings for a row of request `p` with row seed `seed`."""
        return DecodeParams(
            max_new_tokens=p.max_new_tokens,
            temperature=p.temperature,
            top_p=p.top_p,
            top_k=p.top_k,
            seed=seed ^ DECODE_SEED_XOR,
            stop=p.stop,
            ignore_eos=p.ignore_eos,
        )

    @abstractmethod
    def condition(self, batch: MethodBatch) -> Conditioning:
        """The conditioning of every row of `batch` (R = len(batch.rows))."""


__all__ = ["DECODE_SEED_XOR", "Conditioning", "Method", "MethodBatch"]
