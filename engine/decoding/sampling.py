"""Token sampling for the one decode loop: per-row settings, pure filter/sample functions, and the
per-batch `Sampler` every backend's tokens go through (eager decoder, CUDA-graph runner, ONNX
Runtime), so a seed gives the same tokens on each.

Sampling is the exponential race / Gumbel-max trick: argmax(log p − log E), E ~ Exp(1) drawn from a
per-row torch.Generator, so a row's samples depend only on its own seed, never on its batch
neighbours, and no torch.multinomial (a host sync) is needed.

Logits processors (`LogitsProcessor`) rewrite a step's logits before sampling; a method that acts
per token (FUDGE) is one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
from dglm.kernels import nucleus


@dataclass(frozen=True)
class DecodeParams:
    max_new_tokens: int = 32  # tokens to generate at most
    temperature: float = 1.0  # softmax temperature; 0 = greedy
    top_p: float = 1.0  # nucleus mass in (0, 1]; 1 = off
    top_k: int = 0  # keep the k most likely tokens; 0 = off
    seed: int | None = None  # sampling seed; None = drawn from torch's global RNG
    stop: tuple[str, ...] = ()  # generation ends before the first of these strings
    ignore_eos: bool = False  # never sample EOS: exactly max_new_tokens (unless a stop string)

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be ≥ 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be ≥ 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be ≥ 0 (0 = off), got {self.top_k}")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must be a tuple of non-empty strings, got {self.stop!r}")


@dataclass
class DecodeResult:
    token_ids: list[int]  # generated tokens only, stop string / EOS excluded
    text: str  # their text, cut at the first stop string
    finish_reason: str  # "stop" (EOS or stop string) | "length"


class LogitsProcessor(Protocol):
    """Rewrites one step's logits before sampling (after the ignore_eos mask).

    logits (B, V) fp32, the step's own buffer (may be edited in place); tokens (B, t) long, the
    tokens generated so far (pad after a row's end); finished (B,) bool, rows already done (their
    tokens are discarded). Returns logits (B, V).
    """

    def __call__(
        self, logits: torch.Tensor, tokens: torch.Tensor, finished: torch.Tensor
    ) -> torch.Tensor: ...


# ------------------------------------------------------------------------------ pure functions
def implausible(logits: torch.Tensor, plausibility: float) -> torch.Tensor:
    """(B, V) bool: the tokens whose probability is below `plausibility` × the row's top one
    (min-p truncation; contrastive decoding's plausibility constraint). logits (B, V) fp32; the
    comparison needs no softmax, log p differs from the logit by a per-row constant."""
    floor = logits.max(dim=-1, keepdim=True).values + math.log(plausibility)
    return logits < floor


class MinP:
    """A `LogitsProcessor` keeping, in every row, the tokens with p ≥ plausibility · max p: plain
    decoding with the same truncation as prompt guidance's plausibility mask."""

    def __init__(self, plausibility: float) -> None:
        if not 0 < plausibility < 1:
            raise ValueError(f"plausibility must be in (0, 1), got {plausibility!r}")
        self.plausibility = plausibility

    def __call__(
        self, logits: torch.Tensor, tokens: torch.Tensor, finished: torch.Tensor
    ) -> torch.Tensor:
        return logits.masked_fill_(implausible(logits, self.plausibility), float("-inf"))


def repeated_ngram_ban(tokens: torch.Tensor, size: int, vocab_size: int) -> torch.Tensor:
    """(B, V) bool: the tokens that would complete a `size`-gram already in each row's
    `tokens` (B, t) — the row's last size − 1 tokens followed, earlier, by that token (HF's
    no_repeat_ngram_size, over the generated tokens only). No host sync."""
    B, t = tokens.shape
    banned = torch.zeros(B, vocab_size, dtype=torch.bool, device=tokens.device)
    if t < size:  # no complete n-gram yet
        return banned
    grams = tokens.unfold(1, size, 1)  # (B, W, size), W = t − size + 1
    last = tokens[:, t - size + 1 :]  # (B, size − 1): the n-gram the next token would end
    match = (grams[:, :, :-1] == last[:, None, :]).all(-1)  # (B, W)
    hits = torch.zeros(B, vocab_size, device=tokens.device)
    hits.scatter_reduce_(1, grams[:, :, -1], match.float(), reduce="amax")
    return hits > 0


class NoRepeatNGram:
    """A `LogitsProcessor` banning, in `rows` (None: all), every token that would repeat an
    n-gram of the row's continuation (`repeated_ngram_ban`)."""

    def __init__(self, size: int, rows: list[int] | None = None) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"no_repeat_ngram_size must be an integer ≥ 1, got {size!r}")
        self.size, self.rows = size, rows

    def __call__(
        self, logits: torch.Tensor, tokens: torch.Tensor, finished: torch.Tensor
    ) -> torch.Tensor:
        banned = repeated_ngram_ban(tokens, self.size, logits.shape[-1])
        if self.rows is not None:
            keep = torch.zeros(logits.shape[0], 1, dtype=torch.bool, device=logits.device)
            keep[self.rows] = True
            banned &= keep
        return logits.masked_fill_(banned, float("-inf"))


def filter_logits(scores: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor):
    """Top-k, then top-p (nucleus) filtering of temperature-scaled logits, as HF's warpers.

    scores (B, V) fp32; top_k (B, 1) long, 0 = off; top_p (B, 1), 1 = off.
    Returns (sorted filtered scores (B, V), descending, −inf where removed; their token ids (B, V)).
    Nucleus (Holtzman et al., 2020, "The Curious Case of Neural Text Degeneration"): drop the
    tokens whose ascending cumulative probability is ≤ 1 − top_p, always keeping the top one.
    Probabilities and their tail sums are fp64, so `filter_top` (no full sort) reaches the same
    decisions: the two differ by reduction order only (~1e-16), not fp32 rounding (~1e-7).
    """
    V = scores.shape[-1]
    sorted_scores, sorted_ids = scores.sort(dim=-1, descending=True)  # (B, V)
    k = torch.where(top_k > 0, top_k.clamp(max=V), V)  # (B, 1)
    kth = sorted_scores.gather(-1, k - 1)  # (B, 1): ties with the k-th score are kept, as in HF
    sorted_scores = sorted_scores.masked_fill(sorted_scores < kth, float("-inf"))
    probs = sorted_scores.double().softmax(dim=-1)
    tail = probs.flip(-1).cumsum(-1).flip(-1)  # (B, V): mass of this token and all less likely
    remove = tail <= 1 - top_p.double()
    remove[:, 0] = False
    return sorted_scores.masked_fill(remove, float("-inf")), sorted_ids


def filter_top(
    scores: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`filter_logits` restricted to the k best tokens (torch.topk instead of a full sort).

    Every row must have top_k = 0 or top_k ≤ k. Returns (filtered scores (B, k) descending, −inf
    where removed; their ids (B, k); covered (B,) bool). A row is covered when the filter removes
    every token outside its k best, i.e. their kept mass m_out = Σ_{j ∉ top k} p_j ≤ 1 − top_p
    (each such token's tail is ≤ m_out); its (scores, ids) then hold all that filter_logits keeps.
    Same fp64 math: p = exp(s − max) / Z over the tokens top-k keeps,
    tail_i = m_out + Σ_{j ≥ i} p_j.
    Ties straddling the k-th place may be ordered differently from the full sort.
    """
    V = scores.shape[-1]
    vals, ids = scores.topk(k, dim=-1)  # (B, k) descending
    kk = torch.where(top_k > 0, top_k.clamp(max=V), V)  # (B, 1)
    kth = torch.where(kk <= k, vals.gather(-1, kk.clamp(max=k) - 1), float("-inf"))  # (B, 1)
    top = vals.masked_fill(vals < kth, float("-inf"))  # (B, k)
    m = vals[:, :1]  # (B, 1) row max
    z = (scores - m).double().exp().masked_fill(scores < kth, 0).sum(-1, keepdim=True)  # (B, 1)
    e_top = (top - m).double().exp()  # (B, k), 0 where top-k removed
    m_out = ((z - e_top.sum(-1, keepdim=True)) / z).clamp_min(0)  # (B, 1)
    tail = m_out + (e_top / z).flip(-1).cumsum(-1).flip(-1)  # (B, k)
    remove = tail <= 1 - top_p.double()
    remove[:, 0] = False
    covered = (m_out <= 1 - top_p.double())[:, 0]
    return top.masked_fill(remove, float("-inf")), ids, covered


# filter_top sizes tried before a full sort (CPU only), each row taking the first that covers it:
# the nucleus of a peaked next-token distribution fits in a few hundred tokens; a flat one (T = 1)
# may need thousands. On one core, 49k logits: topk 256 / 2048 / 8192 0.4 / 0.4 / 0.9 ms, the
# full sort and filter 6.2 ms
PARTIAL_SORT_SIZES = (256, 2048, 8192)


def sample_tokens(
    logits: torch.Tensor,
    uniforms: torch.Tensor | None,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    rows: torch.Tensor | None = None,
    max_k: int = 0,
    full_sort: bool = False,
    partial_sizes: tuple[int, ...] = (),
    native: bool = False,
) -> torch.Tensor:
    """Next tokens (B,) long from logits (B, V) fp32. No host sync unless `partial_sizes`.

    Sampled rows draw the Gumbel-max sample argmax(filtered logits / T + G), G = −log(−log U)
    (the exponential race; Gumbel 1954, as used by Kool et al., 2019, "Stochastic Beams and
    Where to Find Them"); every other row is greedy (argmax of the raw logits, as HF).
    uniforms (S, V): the uniforms U of the S sampled rows, None = every row greedy; G is taken only
    where a token is scored (the candidates of a partial filter), not over the whole vocabulary.
    rows (S,) long indexes them (None = all B rows); temperature (S, 1), top_k (S, 1) long (0 =
    off), top_p (S, 1).
    Host-side choices of the filter: full_sort sorts (exact top-k then top-p, as HF's warpers);
    else max_k > 0 (every sampled row has 0 < top_k ≤ max_k) masks below the k-th score found
    with torch.topk (ties kept, as HF); else no filtering. partial_sizes (CPU, where reading a
    flag back costs nothing): before the full sort, try `filter_top` with each size; a row it
    covers samples from it (same token, see filter_top), the others go on to the next size and
    finally the full sort; every row's top_k must be 0 or ≤ the sizes tried.
    native (CPU, with full_sort): the C++ sampler (dglm.kernels.nucleus) instead of the torch
    filter: the same tokens without sorting the vocabulary.
    """
    if uniforms is None:
        return logits.argmax(dim=-1)
    if native and full_sort:
        sampled = nucleus.sample_nucleus(logits, uniforms, temperature, top_k, top_p, rows)
        return _scatter_rows(logits, sampled, rows)

    def noise(u: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        """The Gumbel noise of rows `u` at token `ids` (None: every token)."""
        g = u if ids is None else u.gather(-1, ids)
        return -(-g.log()).log()

    scores = logits if rows is None else logits.index_select(0, rows)  # (S, V)
    scores = scores / temperature
    if full_sort:
        # noise stays attached to its token id, so a row samples the same token whichever
        # filter path it takes; each row takes the smallest size that covers its nucleus
        sampled = torch.empty(scores.shape[0], dtype=torch.long, device=scores.device)
        left = None  # (R,) indices of the rows still to sample (None: all of them)
        for size in partial_sizes:
            if size >= scores.shape[-1]:
                break
            part, part_ids, covered = filter_top(scores, top_k, top_p, size)
            if bool(covered.any()):  # host branch: CPU only (see above)
                cov = covered.nonzero()[:, 0]
                pick = (part[cov] + noise(uniforms[cov], part_ids[cov])).argmax(
                    dim=-1, keepdim=True
                )
                won = part_ids[cov].gather(-1, pick)[:, 0]
                sampled.index_copy_(0, cov if left is None else left[cov], won)
            if bool(covered.all()):
                return _scatter_rows(logits, sampled, rows)
            rest = (~covered).nonzero()[:, 0]
            left = rest if left is None else left[rest]
            scores, top_k, top_p, uniforms = (
                scores[rest],
                top_k[rest],
                top_p[rest],
                uniforms[rest],
            )
        top, ids = filter_logits(scores, top_k, top_p)  # sorted, (R, V) each
        choice = (top + noise(uniforms, ids)).argmax(dim=-1, keepdim=True)  # (R, 1)
        won = ids.gather(-1, choice)[:, 0]
        if left is None:
            sampled = won
        else:
            sampled.index_copy_(0, left, won)
    else:
        if max_k:
            best = scores.topk(max_k, dim=-1).values  # (S, max_k), descending
            kth = best.gather(-1, (top_k.clamp(1, max_k) - 1))  # (S, 1)
            scores = scores.masked_fill(scores < kth, float("-inf"))
        sampled = (scores + noise(uniforms)).argmax(dim=-1)  # (S,)
    return _scatter_rows(logits, sampled, rows)


def _scatter_rows(logits: torch.Tensor, sampled: torch.Tensor, rows: torch.Tensor | None):
    """The sampled rows' tokens in place, every other row greedy."""
    if rows is None:
        return sampled
    return logits.argmax(dim=-1).index_copy_(0, rows, sampled)


# ------------------------------------------------------------------------------ tokens and text
def eos_ids(decoder, tokenizer) -> list[int]:
    """EOS ids of the decoder's config, then the tokenizer's, without repeats."""
    ids = list(getattr(decoder, "eos_token_ids", ()))
    tok_eos = getattr(tokenizer, "eos_token_id", None)
    if tok_eos is not None:
        ids.append(int(tok_eos))
    return list(dict.fromkeys(ids))


def pad_id(decoder, tokenizer, eos: list[int]) -> int:
    """The tokenizer's pad id, else the decoder config's, else the first EOS, else 0."""
    for pad in (getattr(tokenizer, "pad_token_id", None), decoder.config.pad_token_id):
        if pad is not None and 0 <= pad < decoder.vocab_size:
            return int(pad)
    return eos[0] if eos else 0


def decode_text(tokenizer, ids: list[int]) -> str:
    """The text of `ids`, special tokens skipped ("" without a tokenizer)."""
    if tokenizer is None:
        return ""
    return tokenizer.decode(ids, skip_special_tokens=True)


def first_stop(text: str, stops: tuple[str, ...]) -> int:
    """Index of the first occurrence of any stop string in text, or −1."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else -1


def until_eos(toks: list[int], eos: list[int]) -> list[int]:
    """`toks` up to (not including) the first EOS."""
    for i, t in enumerate(toks):
        if t in eos:
            return toks[:i]
    return toks


# ------------------------------------------------------------------------------ one batch
class Sampler:
    """The sampling state of one batch: per-row settings on the device, per-row generators, the
    generated tokens, the finished rows, EOS and stop-string handling.

    `step(logits)` turns a step's logits into the tokens to feed next, with no host sync (outside
    the CPU-only partial sort): ignore_eos rows get −inf at EOS, the processors run, sampled rows
    draw their Gumbel noise from their own generators, finished rows keep feeding pad. `done()`
    is the host check (stop strings, every row finished) a loop makes every few steps;
    `results()` cuts each row at EOS / its stop string / its max_new_tokens.
    """

    def __init__(
        self,
        params: list[DecodeParams],
        vocab_size: int,
        eos: list[int],
        pad: int,
        device: torch.device,
        tokenizer=None,
        processors: tuple[LogitsProcessor, ...] = (),
    ) -> None:
        B = len(params)
        self.params, self.eos, self.pad, self.tokenizer = params, eos, pad, tokenizer
        self.processors = tuple(processors)
        sampled_rows = [b for b, p in enumerate(params) if p.temperature > 0]
        sampled = [params[b] for b in sampled_rows]
        # filter choice, made on the host once: a full sort for top-p (or mixed top-k / no top-k
        # rows), a torch.topk threshold when every sampled row uses top-k alone, else nothing
        some_k = any(p.top_k > 0 for p in sampled)
        all_k = bool(sampled) and all(p.top_k > 0 for p in sampled)
        self.full_sort = any(p.top_p < 1 for p in sampled) or (some_k and not all_k)
        self.max_k = min(max(p.top_k for p in sampled), vocab_size) if all_k else 0
        self.temperature = torch.tensor([[p.temperature] for p in sampled], device=device)
        self.top_k = torch.tensor([[p.top_k] for p in sampled], dtype=torch.long, device=device)
        self.top_p = torch.tensor([[p.top_p] for p in sampled], dtype=torch.float64, device=device)
        # on CPU the nucleus is first looked for among the few best tokens (no full sort)
        self.partial: tuple[int, ...] = ()
        if device.type == "cpu" and self.full_sort:
            self.partial = tuple(
                n for n in PARTIAL_SORT_SIZES if all(p.top_k <= n for p in sampled)
            )
        # on CPU, the C++ sampler (same tokens, no vocabulary sort) when it is built
        self.native = device.type == "cpu" and self.full_sort and nucleus.available()
        self.rows = None if len(sampled) == B else torch.tensor(sampled_rows, device=device)
        self.generators = []
        for p in sampled:
            seed = p.seed if p.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
            self.generators.append(torch.Generator(device=device).manual_seed(seed))
        self.gumbel = torch.empty(len(sampled), vocab_size, device=device) if sampled else None
        self.eos_t = torch.tensor(eos or [-1], dtype=torch.long, device=device)
        self.row_max = [p.max_new_tokens for p in params]
        self.out = torch.full((B, max(self.row_max)), pad, dtype=torch.long, device=device)
        self.finished = torch.zeros(B, dtype=torch.bool, device=device)
        self.steps = 0  # tokens generated per row so far
        no_eos = [b for b, p in enumerate(params) if p.ignore_eos]
        self.no_eos_rows = self.no_eos_ids = None
        if no_eos and eos:
            self.no_eos_rows = torch.tensor(no_eos, dtype=torch.long, device=device)[:, None]
            self.no_eos_ids = torch.tensor(eos, dtype=torch.long, device=device)[None, :]

    def step(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits (B, V) fp32 → next tokens (B,) long, recorded; finished rows get pad."""
        if self.no_eos_rows is not None:
            logits[self.no_eos_rows, self.no_eos_ids] = float("-inf")  # the step's own buffer
        for processor in self.processors:
            logits = processor(logits, self.out[:, : self.steps], self.finished)
        if self.gumbel is not None:
            for i, g in enumerate(self.generators):
                self.gumbel[i].uniform_(generator=g)  # U (V,), this row's own stream
            # −log(−log U) is taken in sample_tokens, only where tokens are scored
        tok = sample_tokens(
            logits, self.gumbel, self.temperature, self.top_k, self.top_p, self.rows,
            self.max_k, self.full_sort, self.partial, native=self.native,
        ).masked_fill_(self.finished, self.pad)  # fmt: skip
        self.out[:, self.steps] = tok
        self.finished |= torch.isin(tok, self.eos_t)
        self.steps += 1
        return tok

    def done(self) -> bool:
        """Host check: mark rows that hit a stop string finished; True when every row is done
        (EOS, stop string, or its own max_new_tokens)."""
        done = self.finished.tolist()
        stop_rows = [b for b, p in enumerate(self.params) if p.stop and not done[b]]
        if stop_rows:
            rows = self.out[stop_rows, : self.steps].tolist()
            for b, toks in zip(stop_rows, rows, strict=True):
                toks = until_eos(toks[: self.row_max[b]], self.eos)
                if first_stop(decode_text(self.tokenizer, toks), self.params[b].stop) >= 0:
                    self.finished[b] = True
                    done[b] = True
        return all(d or self.steps >= self.row_max[b] for b, d in enumerate(done))

    def results(self) -> list[DecodeResult]:
        """One result per row: tokens up to EOS, text cut at the first stop string."""
        results = []
        for b, row in enumerate(self.out[:, : self.steps].tolist()):
            row = row[: self.row_max[b]]
            toks = until_eos(row, self.eos)
            reason = "stop" if len(toks) < len(row) else "length"
            text = decode_text(self.tokenizer, toks)
            stops = self.params[b].stop
            cut = first_stop(text, stops) if stops else -1
            if cut >= 0:
                text, reason = text[:cut], "stop"
                # keep the tokens whose text lies entirely before the stop string
                n = 0
                while n < len(toks) and len(decode_text(self.tokenizer, toks[: n + 1])) <= cut:
                    n += 1
                toks = toks[:n]
            results.append(DecodeResult(toks, text, reason))
        return results


__all__ = [
    "PARTIAL_SORT_SIZES",
    "DecodeParams",
    "DecodeResult",
    "LogitsProcessor",
    "Sampler",
    "decode_text",
    "eos_ids",
    "filter_logits",
    "filter_top",
    "first_stop",
    "pad_id",
    "sample_tokens",
    "until_eos",
]
