"""KV-cached batched generation for the compact decoders.

Row layout in the cache: left padding, prefix tokens, P soft-prompt vectors, generated tokens.
Positions count real tokens only (pads excluded), as HF does from an attention mask. Each step is
the static one (`Decoder.forward_static` through a `DecodeRunner`: CUDA graphs when the caller
passes a graph runner, op by op otherwise); `static=False` keeps the growing-cache reference loop.

Sampling is the exponential race / Gumbel-max trick: argmax(log p − log E), E ~ Exp(1) drawn from a
per-row torch.Generator, so a row's samples depend only on its own seed, never on its batch
neighbours, and no torch.multinomial (a host sync) is needed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from dglm.engine.decoding.runner import DecodeRunner, DecodeRunnerConfig
from dglm.engine.models.base import Decoder, KVCache

logger = logging.getLogger(__name__)

# the host looks at the generated tokens (stop strings, all rows finished) every this many steps
STOP_CHECK_EVERY = 8


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


# filter_top sizes tried before a full sort (CPU only): the nucleus of a peaked next-token
# distribution fits in a few hundred tokens; a 49k-entry sort costs ~6 ms on one core
PARTIAL_SORT_SIZES = (256, 2048)


def sample_tokens(
    logits: torch.Tensor,
    gumbel: torch.Tensor | None,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    rows: torch.Tensor | None = None,
    max_k: int = 0,
    full_sort: bool = False,
    partial_sizes: tuple[int, ...] = (),
) -> torch.Tensor:
    """Next tokens (B,) long from logits (B, V) fp32. No host sync unless `partial_sizes`.

    Sampled rows draw the Gumbel-max sample argmax(filtered logits / T + G), G = −log(−log U)
    (the exponential race; Gumbel 1954, as used by Kool et al., 2019, "Stochastic Beams and
    Where to Find Them"); every other row is greedy (argmax of the raw logits, as HF).
    gumbel (S, V) noise for the S sampled rows, None = every row greedy; rows (S,) long indexes
    them (None = all B rows); temperature (S, 1), top_k (S, 1) long (0 = off), top_p (S, 1).
    Host-side choices of the filter: full_sort sorts (exact top-k then top-p, as HF's warpers);
    else max_k > 0 (every sampled row has 0 < top_k ≤ max_k) masks below the k-th score found
    with torch.topk (ties kept, as HF); else no filtering. partial_sizes (CPU, where reading a
    flag back costs nothing): before the full sort, try `filter_top` with each size and use it
    when every row is covered (same tokens, see filter_top); every row's top_k must be 0 or
    ≤ the sizes tried.
    """
    if gumbel is None:
        return logits.argmax(dim=-1)
    scores = logits if rows is None else logits.index_select(0, rows)  # (S, V)
    scores = scores / temperature
    if full_sort:
        top = ids = None
        for size in partial_sizes:
            if size >= scores.shape[-1]:
                break
            part, part_ids, covered = filter_top(scores, top_k, top_p, size)
            if bool(covered.all()):  # host branch: CPU only (see above)
                top, ids = part, part_ids
                break
        if top is None:
            top, ids = filter_logits(scores, top_k, top_p)  # sorted, (S, V) each
        # noise stays attached to its token id, so a row samples the same token whichever
        # filter path its batch takes
        choice = (top + gumbel.gather(-1, ids)).argmax(dim=-1, keepdim=True)  # (S, 1)
        sampled = ids.gather(-1, choice)[:, 0]
    else:
        if max_k:
            best = scores.topk(max_k, dim=-1).values  # (S, max_k), descending
            kth = best.gather(-1, (top_k.clamp(1, max_k) - 1))  # (S, 1)
            scores = scores.masked_fill(scores < kth, float("-inf"))
        sampled = (scores + gumbel).argmax(dim=-1)  # (S,)
    if rows is None:
        return sampled
    return logits.argmax(dim=-1).index_copy_(0, rows, sampled)


def _eos_ids(decoder: Decoder, tokenizer) -> list[int]:
    ids = list(getattr(decoder, "eos_token_ids", ()))
    tok_eos = getattr(tokenizer, "eos_token_id", None)
    if tok_eos is not None:
        ids.append(int(tok_eos))
    return list(dict.fromkeys(ids))


def _pad_id(decoder: Decoder, tokenizer, eos: list[int]) -> int:
    for pad in (getattr(tokenizer, "pad_token_id", None), decoder.config.pad_token_id):
        if pad is not None and 0 <= pad < decoder.vocab_size:
            return int(pad)
    return eos[0] if eos else 0


def _decode(tokenizer, ids: list[int]) -> str:
    if tokenizer is None:
        return ""
    return tokenizer.decode(ids, skip_special_tokens=True)


def _first_stop(text: str, stops: tuple[str, ...]) -> int:
    """Index of the first occurrence of any stop string in text, or −1."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else -1


def _check_cache(cache: KVCache | None, decoder: Decoder, batch: int, need: int) -> KVCache:
    if cache is None:
        return decoder.new_cache(batch, need)
    if cache.batch_size < batch or cache.max_len < need:
        raise ValueError(
            f"cache of {cache.batch_size} rows × {cache.max_len} slots is too small for "
            f"{batch} rows × {need} slots; allocate it with decoder.new_cache({batch}, {need})"
        )
    if cache.dtype != decoder.dtype or cache.device != decoder.device:
        raise ValueError(
            f"cache is {cache.dtype} on {cache.device} but the decoder is {decoder.dtype} on "
            f"{decoder.device}"
        )
    return cache.rows(batch) if cache.batch_size > batch else cache


@torch.inference_mode()
def generate(
    decoder: Decoder,
    tokenizer,
    prefix_ids: list[list[int]],
    params: list[DecodeParams],
    soft_prompt: torch.Tensor | None = None,
    cache: KVCache | None = None,
    runner: DecodeRunner | None = None,
    *,
    static: bool = True,
) -> tuple[list[DecodeResult], dict[str, float]]:
    """Generate a continuation per row → (results in row order, timings: "prefill_s",
    "decode_s" (wall), "decode_steps" (steps after the first token), "decode_cpu_s").

    prefix_ids: token ids per row (may be empty when a soft prompt follows); params: one per row
    (or one for all); soft_prompt (B, P, H) is spliced after each prefix; cache: a KVCache of at
    least B rows × (longest prefix + P + max_new_tokens) slots to reuse, else one is allocated.

    The step: `runner` (a DecodeRunner built once per engine: CUDA graphs, or its eager / compiled
    step on CPU) when given; otherwise an eager DecodeRunner over `cache` (the same static step,
    `Decoder.forward_static`); static=False runs the reference loop instead, `Decoder.forward`
    over a growing KVCache.

    The decode loop keeps everything on the device: no .item(), no torch.multinomial, no Python
    branch on tensor values; the host reads the tokens only every STOP_CHECK_EVERY steps (stop
    strings and the all-rows-finished exit). Finished rows keep feeding pad but their output is
    frozen.
    """
    B = len(prefix_ids)
    if B == 0:
        raise ValueError("prefix_ids is empty: pass at least one row")
    params = list(params)
    if len(params) == 1 and B > 1:
        params = params * B
    if len(params) != B:
        raise ValueError(f"params has {len(params)} entries for {B} rows of prefix_ids")
    P = 0
    if soft_prompt is not None:
        if soft_prompt.ndim != 3 or soft_prompt.shape[0] != B:
            raise ValueError(
                f"soft_prompt has shape {tuple(soft_prompt.shape)}, expected ({B}, P, "
                f"{decoder.hidden_size})"
            )
        if soft_prompt.shape[2] != decoder.hidden_size:
            raise ValueError(
                f"soft_prompt width {soft_prompt.shape[2]} != decoder hidden_size "
                f"{decoder.hidden_size}"
            )
        P = soft_prompt.shape[1]
    lens = [len(p) for p in prefix_ids]
    if P == 0 and min(lens) == 0:
        raise ValueError(f"prefix_ids[{lens.index(0)}] is empty and there is no soft prompt")
    device = decoder.device
    eos = _eos_ids(decoder, tokenizer)
    pad = _pad_id(decoder, tokenizer, eos)
    t_prefix = max(lens)
    t0 = t_prefix + P  # prefill length
    max_new = max(p.max_new_tokens for p in params)
    total = t0 + max_new
    if total > decoder.max_context:
        raise ValueError(
            f"{t_prefix} prefix tokens + {P} soft-prompt vectors + max_new_tokens={max_new} "
            f"exceed the decoder's context of {decoder.max_context}"
        )
    t_start = time.perf_counter()
    if runner is not None:
        if cache is not None:
            raise ValueError("pass either cache or runner (the runner owns its KV buffers)")
        if runner.decoder is not decoder:
            raise ValueError("runner was built for another decoder")
    elif static:
        cache = _check_cache(cache, decoder, B, total)
        config = DecodeRunnerConfig(batch_sizes=(B,), max_len=total, enforce_eager=True)
        runner = DecodeRunner(decoder, config, cache=cache)
    else:
        runner = _CacheStepper(decoder, _check_cache(cache, decoder, B, total))

    # ---- host-side setup: padded ids, key mask, positions, sampler settings
    ids = torch.full((B, t_prefix), pad, dtype=torch.long)
    key_mask = torch.ones(B, total, dtype=torch.bool)  # (B, S): prefix + soft + generated are real
    for b, row in enumerate(prefix_ids):
        if row:
            ids[b, t_prefix - len(row) :] = torch.tensor(row, dtype=torch.long)
        key_mask[b, : t_prefix - len(row)] = False
    positions = (key_mask[:, :t0].long().cumsum(-1) - 1).clamp_min(0)  # (B, T0)
    padded = min(lens) < t_prefix  # without padding every key is real: no mask needed
    sampled_rows = [b for b, p in enumerate(params) if p.temperature > 0]
    sampled = [params[b] for b in sampled_rows]
    # filter choice, made on the host once: a full sort for top-p (or mixed top-k / no top-k
    # rows), a torch.topk threshold when every sampled row uses top-k alone, else nothing
    some_k = any(p.top_k > 0 for p in sampled)
    all_k = bool(sampled) and all(p.top_k > 0 for p in sampled)
    full_sort = any(p.top_p < 1 for p in sampled) or (some_k and not all_k)
    max_k = min(max(p.top_k for p in sampled), decoder.vocab_size) if all_k else 0
    ids, key_mask, positions = (t.to(device) for t in (ids, key_mask, positions))
    temperature = torch.tensor([[p.temperature] for p in sampled], device=device)  # (S, 1)
    top_k = torch.tensor([[p.top_k] for p in sampled], dtype=torch.long, device=device)  # (S, 1)
    top_p = torch.tensor([[p.top_p] for p in sampled], dtype=torch.float64, device=device)
    # on CPU the nucleus is first looked for among the few best tokens (no full sort)
    partial = ()
    if device.type == "cpu" and full_sort:
        partial = tuple(n for n in PARTIAL_SORT_SIZES if all(p.top_k <= n for p in sampled))
    rows = None if len(sampled) == B else torch.tensor(sampled_rows, device=device)  # (S,)
    generators = []
    for p in sampled:
        seed = p.seed if p.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
        generators.append(torch.Generator(device=device).manual_seed(seed))
    gumbel = torch.empty(len(sampled), decoder.vocab_size, device=device) if sampled else None
    eos_t = torch.tensor(eos or [-1], dtype=torch.long, device=device)
    out = torch.full((B, max_new), pad, dtype=torch.long, device=device)  # generated tokens
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    row_max = [p.max_new_tokens for p in params]
    no_eos = [b for b, p in enumerate(params) if p.ignore_eos]
    no_eos_rows = torch.tensor(no_eos, dtype=torch.long, device=device)[:, None] if no_eos else None
    no_eos_ids = torch.tensor(eos, dtype=torch.long, device=device)[None, :] if eos else None

    def next_tokens(logits: torch.Tensor) -> torch.Tensor:  # (B, V) → (B,)
        if no_eos_rows is not None and no_eos_ids is not None:
            logits[no_eos_rows, no_eos_ids] = float("-inf")  # the step's own logits buffer
        if gumbel is not None:
            for i, g in enumerate(generators):
                gumbel[i].uniform_(generator=g)  # U (V,), this row's own stream
            gumbel.log_().neg_().log_().neg_()  # −log(−log U), in place
        tok = sample_tokens(
            logits, gumbel, temperature, top_k, top_p, rows, max_k, full_sort, partial
        )
        return tok.masked_fill_(finished, pad)

    # ---- prefill: pads, prefix, soft prompt in one causal pass
    runner.begin(B, total, key_mask if padded else None)
    x = decoder.embed(ids)  # (B, T_prefix, H)
    if P:
        x = torch.cat([x, soft_prompt.to(device=device, dtype=x.dtype)], dim=1)  # (B, T0, H)
    logits = runner.prefill(x, positions)  # (B, V)
    tok = next_tokens(logits)
    out[:, 0] = tok
    finished |= torch.isin(tok, eos_t)
    _sync(device)
    t_prefill, c_prefill = time.perf_counter(), time.process_time()

    # ---- decode: one token per row per step, static cache, no host sync between checks
    steps = 1
    for step in range(1, max_new):
        if step % STOP_CHECK_EVERY == 0 and _check(
            out, finished, steps, row_max, params, tokenizer, eos
        ):
            break
        tok = next_tokens(runner.step(tok))  # (B, V) logits → (B,)
        out[:, step] = tok
        finished |= torch.isin(tok, eos_t)
        steps += 1
    _sync(device)
    t_decode, c_decode = time.perf_counter(), time.process_time()

    results = _results(out[:, :steps].tolist(), row_max, params, tokenizer, eos)
    timings = {
        "prefill_s": t_prefill - t_start,
        "decode_s": t_decode - t_prefill,
        "decode_steps": float(steps - 1),
        "decode_cpu_s": c_decode - c_prefill,  # this process's CPU time (all its threads)
    }
    return results, timings


class _CacheStepper:
    """The reference step (`generate(..., static=False)`): `Decoder.forward` over a KVCache that
    grows by one slot per step, the attention mask rebuilt from the key mask every step. Same
    interface as DecodeRunner's begin / prefill / step."""

    def __init__(self, decoder: Decoder, cache: KVCache) -> None:
        self.decoder, self.cache = decoder, cache

    def begin(self, batch_size: int, slots: int, key_mask: torch.Tensor | None) -> None:
        self.cache.reset()
        self.key_mask = key_mask  # (B, slots) bool, or None without padding

    def prefill(self, inputs_embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        t0 = inputs_embeds.shape[1]
        km = None if self.key_mask is None else self.key_mask[:, :t0]
        logits = self.decoder(inputs_embeds, positions, self.cache, km, last_only=True)
        self.next_pos = positions[:, -1:] + 1  # (B, 1)
        return logits[:, -1]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.decoder.embed(tokens[:, None])  # (B, 1, H)
        n = self.cache.length + 1
        km = None if self.key_mask is None else self.key_mask[:, :n]
        logits = self.decoder(x, self.next_pos, self.cache, km)[:, -1]  # (B, V)
        self.next_pos += 1
        return logits


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _check(out, finished, steps, row_max, params, tokenizer, eos) -> bool:
    """Host check every few steps: mark rows that hit a stop string finished; True when every
    row is done (EOS, stop string, or its own max_new_tokens)."""
    done = finished.tolist()
    stop_rows = [b for b, p in enumerate(params) if p.stop and not done[b]]
    if stop_rows:
        rows = out[stop_rows, :steps].tolist()
        for b, toks in zip(stop_rows, rows, strict=True):
            toks = _until_eos(toks[: row_max[b]], eos)
            if _first_stop(_decode(tokenizer, toks), params[b].stop) >= 0:
                finished[b] = True
                done[b] = True
    return all(d or steps >= row_max[b] for b, d in enumerate(done))


def _until_eos(toks: list[int], eos: list[int]) -> list[int]:
    for i, t in enumerate(toks):
        if t in eos:
            return toks[:i]
    return toks


def _results(out, row_max, params, tokenizer, eos) -> list[DecodeResult]:
    results = []
    for b, row in enumerate(out):
        row = row[: row_max[b]]
        toks = _until_eos(row, eos)
        reason = "stop" if len(toks) < len(row) else "length"
        text = _decode(tokenizer, toks)
        cut = _first_stop(text, params[b].stop) if params[b].stop else -1
        if cut >= 0:
            text, reason = text[:cut], "stop"
            # keep the tokens whose text lies entirely before the stop string
            n = 0
            while n < len(toks) and len(_decode(tokenizer, toks[: n + 1])) <= cut:
                n += 1
            toks = toks[:n]
        results.append(DecodeResult(toks, text, reason))
    return results
