"""A FUDGE-style token-level baseline: rerank the decoder's top-k next tokens with the same probe.

FUDGE (Yang & Klein, 2021, "FUDGE: Controlled Text Generation With Future Discriminators"):
p(x_t | x_<t, a) ∝ p_lm(x_t | x_<t) · p(a | x_≤t). At every step the decoder proposes its top-k
next tokens; each candidate continuation-so-far (prefix-free: the generated text plus the candidate,
as the probes were trained on continuations) is embedded by the sentence encoder and scored by the
probe, and the next token is drawn from

    score_j = log p_lm(c_j | x_<t) + λ · log p(target | encoder(x_<t ⊕ c_j)),   j = 1..k

(λ = 1 is FUDGE; λ = 0 is plain top-k sampling). The k candidate texts of every unfinished row are
encoded in one batch per step. The decoder runs its own KV-cached loop over the engine's decoder
(no soft prompt). Reranking needs the candidates' text on the host, so each step syncs once: this
loop is a baseline, not a hot path.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from dglm.engine.decoding.loop import _eos_ids, _pad_id
from dglm.engine.encode.encoder import SentenceEncoder
from dglm.engine.models.base import Decoder
from dglm.engine.probes import Probe

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


@dataclass
class FudgeResult:
    token_ids: list[int]  # generated tokens, EOS excluded
    text: str
    finish_reason: str  # "stop" (EOS) | "length"


def target_logprob(probe: Probe, target: str | int, emb: torch.Tensor) -> torch.Tensor:
    """log p(target | text) from a probe: (N, d) embeddings → (N,) fp32.

    Binary probe: log σ(z) for the y=1 label, log σ(−z) for y=0; one-vs-rest: log σ(z_row).
    """
    z = probe.logits(emb)  # (N, C) fp32
    out = torch.zeros(z.shape[0], device=z.device)
    for row, y in probe.target_rows(target):
        out += F.logsigmoid(z[:, row] if y == 1.0 else -z[:, row])
    return out


def _sample(scores: torch.Tensor, params: FudgeParams, gens: list[torch.Generator]) -> torch.Tensor:
    """Index (A,) into the k candidates from reweighted scores (A, k), sorted descending by log p_lm.

    Gumbel-max over the nucleus of softmax(scores); each row draws from its own generator.
    """
    if params.temperature == 0:
        return scores.argmax(-1)
    s, order = scores.sort(-1, descending=True)  # (A, k)
    if params.top_p < 1:
        probs = s.softmax(-1)
        tail = probs.flip(-1).cumsum(-1).flip(-1)  # mass of this and every less likely candidate
        remove = tail <= 1 - params.top_p
        remove[:, 0] = False
        s = s.masked_fill(remove, float("-inf"))
    u = torch.stack([torch.rand(s.shape[1], generator=g) for g in gens]).to(s.device)  # (A, k)
    gumbel = -torch.log(-torch.log(u.clamp_min(1e-20)))
    return order.gather(-1, (s + gumbel).argmax(-1, keepdim=True))[:, 0]


@torch.inference_mode()
def fudge_generate(
    decoder: Decoder,
    tokenizer,
    encoder: SentenceEncoder,
    probe: Probe,
    target: str | int,
    prefix_ids: list[list[int]],
    params: FudgeParams = FudgeParams(),
) -> tuple[list[FudgeResult], dict[str, float]]:
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
    device = decoder.device
    lens = [len(p) for p in prefix_ids]
    t_prefix, max_new = max(lens), params.max_new_tokens
    total = t_prefix + max_new
    if total > decoder.max_context:
        raise ValueError(
            f"{t_prefix} prefix tokens + max_new_tokens={max_new} exceed the decoder's context of "
            f"{decoder.max_context}"
        )
    k = min(params.top_k, decoder.vocab_size)
    eos = _eos_ids(decoder, tokenizer)
    pad = _pad_id(decoder, tokenizer, eos)
    t_start = time.perf_counter()
    lm_s = probe_s = 0.0
    scored = 0

    ids = torch.full((B, t_prefix), pad, dtype=torch.long)  # left padded
    key_mask = torch.ones(B, total, dtype=torch.bool)  # (B, S)
    for b, row in enumerate(prefix_ids):
        ids[b, t_prefix - len(row) :] = torch.tensor(row, dtype=torch.long)
        key_mask[b, : t_prefix - len(row)] = False
    positions = (key_mask[:, :t_prefix].long().cumsum(-1) - 1).clamp_min(0)  # (B, T)
    padded = min(lens) < t_prefix
    next_pos = torch.tensor(lens, dtype=torch.long)  # (B,)
    ids, key_mask, positions, next_pos = (
        t.to(device) for t in (ids, key_mask, positions, next_pos)
    )
    gens = [torch.Generator().manual_seed(params.seed + b) for b in range(B)]
    eos_set = set(eos)
    cache = decoder.new_cache(B, total)

    t = time.perf_counter()
    logits = decoder(
        decoder.embed(ids),
        positions,
        cache,
        key_mask[:, :t_prefix] if padded else None,
        last_only=True,
    )[:, -1]  # (B, V)
    lm_s += time.perf_counter() - t

    generated: list[list[int]] = [[] for _ in range(B)]
    finished = [False] * B
    steps = 0
    for step in range(max_new):
        active = [b for b in range(B) if not finished[b]]
        if not active:
            break
        t = time.perf_counter()
        temp = params.temperature if params.temperature > 0 else 1.0
        scaled = logits[active].float() / temp
        if params.ignore_eos and eos:
            scaled[:, eos] = float("-inf")
        logp = torch.log_softmax(scaled, dim=-1)  # (A, V)
        cand_lp, cand_ids = logp.topk(k, dim=-1)  # (A, k) each, descending
        cand = cand_ids.tolist()
        lm_s += time.perf_counter() - t

        t = time.perf_counter()
        scores = cand_lp
        if params.strength > 0:
            texts = tokenizer.batch_decode(
                [generated[b] + [c] for i, b in enumerate(active) for c in cand[i]],
                skip_special_tokens=True,
            )  # A·k candidate continuations, row-major
            emb = encoder.embed(texts)  # (A·k, d)
            lp = target_logprob(probe, target, emb).to(device).view(len(active), k)  # (A, k)
            scores = cand_lp + params.strength * lp
            scored += len(texts)
        choice = _sample(scores, params, [gens[b] for b in active])  # (A,)
        probe_s += time.perf_counter() - t

        tok = cand_ids.gather(-1, choice[:, None])[:, 0].tolist()
        next_tok = torch.full((B,), pad, dtype=torch.long)
        for i, b in enumerate(active):
            if tok[i] in eos_set:
                finished[b] = True
            else:
                generated[b].append(tok[i])
            next_tok[b] = tok[i]
        steps += 1
        if step + 1 == max_new or all(finished):
            break
        t = time.perf_counter()
        km = key_mask[:, : cache.length + 1] if padded else None
        logits = decoder(decoder.embed(next_tok.to(device)[:, None]), next_pos[:, None], cache, km)[
            :, -1
        ]  # (B, V); finished rows feed pad and are ignored
        next_pos += 1
        lm_s += time.perf_counter() - t

    texts = tokenizer.batch_decode(generated, skip_special_tokens=True)
    results = [
        FudgeResult(generated[b], texts[b], "stop" if finished[b] else "length") for b in range(B)
    ]
    timings = {
        "lm_s": lm_s,
        "probe_s": probe_s,
        "total_s": time.perf_counter() - t_start,
        "steps": float(steps),
        "candidates_scored": float(scored),
    }
    logger.info(
        "fudge: %d rows, %d steps, %d candidates scored in %.2fs",
        B,
        steps,
        scored,
        timings["total_s"],
    )
    return results, timings
