"""A FUDGE-style token-level baseline: rerank the decoder's top-k next tokens with the same probe.

FUDGE (Yang & Klein, 2021, "FUDGE: Controlled Text Generation With Future Discriminators"):
p(x_t | x_<t, a) ∝ p_lm(x_t | x_<t) · p(a | x_≤t). At every step the decoder proposes its top-k
next tokens; each candidate continuation-so-far (prefix-free: the generated text plus the candidate,
as the probes were trained on continuations) is embedded by the sentence encoder and scored by the
probe, and the next token is drawn from

    score_j = log p_lm(c_j | x_<t) + λ · log p(target | encoder(x_<t ⊕ c_j)),   j = 1..k

(λ = 1 is FUDGE; λ = 0 is plain top-k sampling). The k candidate texts of every unfinished row are
encoded in one batch per step.

FUDGE runs on the one decode loop (`decoding.core.DecodeCore.decode`, no soft prompt) as a logits
processor, `FudgeProcessor`: it returns the reweighted candidate scores (−inf elsewhere), and the
loop's one `Sampler` draws from them at temperature 1 with the request's top_p and seed (greedy:
their argmax), as it draws every other method's tokens. Reranking needs the candidates' text on the
host, so each step syncs once: a baseline, not a hot path. `Fudge` is the same as an engine
`Method`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from dglm.engine.api import GenerationParams
from dglm.engine.decoding.core import DecodeCore
from dglm.engine.decoding.sampling import DecodeParams, DecodeResult
from dglm.engine.encode.encoder import SentenceEncoder
from dglm.engine.methods.base import DECODE_SEED_XOR, Conditioning, Method, MethodBatch
from dglm.engine.models.base import Decoder
from dglm.engine.probes import Probe, ProbeSet

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FudgeParams:
    max_new_tokens: int = 20  # tokens to generate at most
    top_k: int = 50  # candidates per step scored by the probe
    strength: float = 1.0  # λ on log p(target | text); 0 = plain top-k sampling
    temperature: float = 1.0  # on the LM logits; 0 = greedy over the reweighted candidates
    top_p: float = 1.0  # nucleus over the reweighted candidates; 1 = off
    seed: int = 0  # row b samples from its own generator seeded seed + b
    ignore_eos: bool = False  # never pick EOS: exactly max_new_tokens per row

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer ≥ 1, got {self.max_new_tokens!r}")
        if not isinstance(self.top_k, int) or self.top_k < 1:
            raise ValueError(f"top_k must be an integer ≥ 1, got {self.top_k!r}")
        if not self.strength >= 0:
            raise ValueError(f"strength must be ≥ 0, got {self.strength!r}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be ≥ 0 (0 = greedy), got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")


def target_logprob(probe: Probe, target: str | int, emb: torch.Tensor) -> torch.Tensor:
    """log p(target | text) from a probe: (N, d) embeddings → (N,) fp32.

    Binary probe: log σ(z) for the y=1 label, log σ(−z) for y=0; one-vs-rest: log σ(z_row).
    """
    z = probe.logits(emb)  # (N, C) fp32
    out = torch.zeros(z.shape[0], device=z.device)
    for row, y in probe.target_rows(target):
        out += F.logsigmoid(z[:, row] if y == 1.0 else -z[:, row])
    return out


class FudgeProcessor:
    """FUDGE as a logits processor of the decode loop, whose sampler then draws at temperature 1
    (`sampling_params`: the temperature T is applied here).

    Per step and unfinished row: the top-k candidates of log_softmax(logits / T) (T = 0: 1),
    reweighted by λ · log p(target | text) of each row's (probe, target) (None: no reweighting);
    returns those scores at the candidates' ids, −inf elsewhere. One encoder batch per step for
    every unfinished row's candidates.
    """

    def __init__(
        self,
        tokenizer,
        encoder: SentenceEncoder,
        targets: list[tuple[Probe, str | int] | None],  # per row
        top_k: int,
        strength: float,
        temperature: float,
    ) -> None:
        self.tokenizer, self.encoder, self.targets = tokenizer, encoder, targets
        self.top_k, self.strength, self.temperature = top_k, strength, temperature
        self.probe_s = 0.0  # seconds in candidate text, encoder and probe
        # where the engine reads this method's stage timings: "probe" (= probe_s), after decoding
        self.timings: dict[str, float] = {}
        self.scored = 0  # candidate texts embedded
        self.steps = 0  # steps with an unfinished row

    def __call__(
        self, logits: torch.Tensor, tokens: torch.Tensor, finished: torch.Tensor
    ) -> torch.Tensor:
        active = [b for b, done in enumerate(finished.tolist()) if not done]  # host sync
        out = torch.full_like(logits, float("-inf"))  # (B, V)
        if not active:
            return out
        self.steps += 1
        k = min(self.top_k, logits.shape[-1])
        temp = self.temperature if self.temperature > 0 else 1.0
        logp = torch.log_softmax(logits[active].float() / temp, dim=-1)  # (A, V)
        cand_lp, cand_ids = logp.topk(k, dim=-1)  # (A, k) each, descending
        t = time.perf_counter()
        scores = cand_lp
        reweighted = [i for i, b in enumerate(active) if self.targets[b] is not None]
        if self.strength > 0 and reweighted:
            history = tokens[[active[i] for i in reweighted]].tolist()
            cand = cand_ids[reweighted].tolist()
            texts = self.tokenizer.batch_decode(
                [h + [c] for h, cs in zip(history, cand, strict=True) for c in cs],
                skip_special_tokens=True,
            )  # k candidate continuations per reweighted row, row-major
            emb = self.encoder.embed(texts)  # (R·k, d)
            lp = torch.zeros_like(cand_lp)  # (A, k)
            for j, i in enumerate(reweighted):
                probe, target = self.targets[active[i]]
                row_lp = target_logprob(probe, target, emb[j * k : (j + 1) * k])
                lp[i] = row_lp.to(lp.device)
            scores = cand_lp + self.strength * lp
            self.scored += len(texts)
        self.probe_s += time.perf_counter() - t
        self.timings["probe"] = self.probe_s
        rows = torch.tensor(active, device=logits.device)
        out[rows] = out[rows].scatter_(-1, cand_ids, scores)
        return out


def sampling_params(
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int,
    stop: tuple[str, ...] = (),
    ignore_eos: bool = False,
) -> DecodeParams:
    """A FUDGE row's sampling: the processor's scores already carry the temperature, so the
    sampler draws at 1 (0: greedy), over the nucleus top_p, from the row's seed."""
    return DecodeParams(
        max_new_tokens, temperature=1.0 if temperature > 0 else 0.0, top_p=top_p, seed=seed,
        stop=stop, ignore_eos=ignore_eos,
    )  # fmt: skip


@torch.inference_mode()
def fudge_generate(
    decoder: Decoder,
    tokenizer,
    encoder: SentenceEncoder,
    probe: Probe,
    target: str | int,
    prefix_ids: list[list[int]],
    params: FudgeParams = FudgeParams(),
) -> tuple[list[DecodeResult], dict[str, float]]:
    """FUDGE decoding of a continuation per row → (results, timings in seconds).

    timings: "lm_s" (decoder prefill and steps), "probe_s" (candidate text, encoder, probe),
    "total_s", "steps", "candidates_scored".
    """
    probe.target_rows(target)  # validates the target
    B = len(prefix_ids)
    if B == 0:
        raise ValueError("prefix_ids is empty: pass at least one row")
    if any(len(p) == 0 for p in prefix_ids):
        raise ValueError("every row of prefix_ids needs at least one token")
    t_start = time.perf_counter()
    processor = FudgeProcessor(
        tokenizer, encoder, [(probe, target)] * B, params.top_k, params.strength,
        params.temperature,
    )  # fmt: skip
    rows = [
        sampling_params(
            params.max_new_tokens,
            params.temperature,
            params.top_p,
            params.seed + b,
            ignore_eos=params.ignore_eos,
        )  # fmt: skip
        for b in range(B)
    ]
    results, t = DecodeCore(decoder, tokenizer).decode(prefix_ids, rows, None, (processor,))
    timings = {
        "lm_s": t["prefill_s"] + t["decode_s"] - processor.probe_s,
        "probe_s": processor.probe_s,
        "total_s": time.perf_counter() - t_start,
        "steps": float(processor.steps),
        "candidates_scored": float(processor.scored),
    }
    logger.info(
        "fudge: %d rows, %d steps, %d candidates scored in %.2fs",
        B,
        processor.steps,
        processor.scored,
        timings["total_s"],
    )
    return results, timings


class Fudge(Method):
    """FUDGE as an engine method: each request's first control (probe, target) reweights its
    rows' top-k candidates; requests without one decode plain top-k. Temperature and top_p come
    from each request (rows of one call must share the temperature); seeds from the engine's
    rows."""

    name = "fudge"

    def __init__(
        self, encoder: SentenceEncoder, probes: ProbeSet, top_k: int = 50, strength: float = 1.0
    ) -> None:
        FudgeParams(top_k=top_k, strength=strength)  # validates them
        self.encoder, self.probes, self.top_k, self.strength = encoder, probes, top_k, strength

    def validate(self, params: list[GenerationParams]) -> None:
        for p in params:
            self.probes.validate(p.controls)

    def decode_params(self, p: GenerationParams, seed: int) -> DecodeParams:
        # the seed plain decoding's rows take: with λ = 0 a row draws plain top-k sampling's token
        seed ^= DECODE_SEED_XOR
        return sampling_params(p.max_new_tokens, p.temperature, p.top_p, seed, p.stop, p.ignore_eos)

    def condition(self, batch: MethodBatch) -> Conditioning:
        params = [batch.params[i] for i, _ in batch.rows]
        settings = {p.temperature for p in params}
        if len(settings) > 1:
            raise ValueError(
                f"FUDGE runs one temperature per call, got {sorted(settings)}: "
                "generate requests with different temperatures in separate calls"
            )
        (temperature,) = settings
        targets = []
        for p in params:
            c = p.controls[0] if p.controls else None
            targets.append(None if c is None else (self.probes.probes[c.probe], c.target))
        processor = FudgeProcessor(
            batch.tokenizer, self.encoder, targets, self.top_k, self.strength, temperature
        )
        cond = Conditioning(processors=(processor,))
        processor.timings = cond.timings  # its "probe" seconds, read after decoding
        return cond


__all__ = [
    "Fudge",
    "FudgeParams",
    "FudgeProcessor",
    "fudge_generate",
    "sampling_params",
    "target_logprob",
]
