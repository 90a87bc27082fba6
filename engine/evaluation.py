"""Evaluation of controlled generation: metrics, and the `dglm eval` harness.

Metrics (pure functions of texts, token ids and latents):
- fluency: perplexity of the continuations under the base decoder given the prefix (no soft
  prompt), exp of the token-weighted mean NLL;
- diversity: Dist-n, distinct whitespace n-grams / all n-grams over every continuation of a setting;
- sentiment: VADER compound > 0.05 positive, < −0.05 negative (independent of the probes);
- toxicity: alt-profanity-check probability, mean and fraction above 0.5;
- proposal fidelity: cos(encoder(generated continuation), sampled latent).

The harness continues held-out prefixes (texts in the "eval" hash split of the offline sources,
whose training pairs are held out too) under a list of settings — plain decoding, unguided DGLM,
probe-guided DGLM over guidance scales, a re-noising sweep, the FUDGE baseline with the same
probe — and writes results.json, results.md and samples.jsonl.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import math
import os
import platform
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from dglm.engine.probes import Control, Probe

logger = logging.getLogger(__name__)

VADER_THRESHOLD = 0.05  # |compound| above this is polar (Hutto & Gilbert, 2014)
TOXIC_THRESHOLD = 0.5
RENOISE_SWEEP = (1.0, 0.95, 0.9, 0.5, 0.0)  # the reference's Table 2 sweep of alpha²
DEFAULT_SOURCES = ("rotten_tomatoes", "speeches", "fortunes")
# target checks (issue 3)
TARGET_SENTIMENT_RATE = 0.85
TARGET_PPL_RATIO = 1.3
TARGET_DIST3_DELTA = 0.05
# labels a toxicity probe may give its non-toxic class; else a binary probe's y=0 label
_LOW_TOXICITY_LABELS = ("non_toxic", "non-toxic", "nontoxic", "clean", "safe", "low", "neutral")


# ================================================================== metrics


@torch.inference_mode()
def continuation_nll(
    decoder,
    prefix_ids: list[list[int]],
    continuation_ids: list[list[int]],
    batch_size: int = 16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row NLL sums (N,) fp64 and token counts (N,) of each continuation given its prefix.

    Rows are right padded (causal attention never looks right, so no mask is needed); logits are
    computed only at the positions that predict continuation tokens.
    """
    if len(prefix_ids) != len(continuation_ids):
        raise ValueError(
            f"prefix_ids has {len(prefix_ids)} rows but continuation_ids has {len(continuation_ids)}"
        )
    n = len(prefix_ids)
    nll = torch.zeros(n, dtype=torch.float64)
    counts = torch.tensor([len(c) for c in continuation_ids], dtype=torch.long)
    for i, p in enumerate(prefix_ids):
        if not p:
            raise ValueError(f"prefix_ids[{i}] is empty: perplexity needs a prefix token")
    device = decoder.device
    for lo in range(0, n, batch_size):
        rows = [r for r in range(lo, min(n, lo + batch_size)) if continuation_ids[r]]
        if not rows:
            continue
        seqs = [prefix_ids[r] + continuation_ids[r] for r in rows]
        T = max(len(s) for s in seqs)
        ids = torch.zeros(len(rows), T, dtype=torch.long)
        predict = torch.zeros(len(rows), T, dtype=torch.bool)  # position t predicts token t + 1
        targets = torch.zeros(len(rows), T, dtype=torch.long)
        for j, (r, s) in enumerate(zip(rows, seqs, strict=True)):
            ids[j, : len(s)] = torch.tensor(s)
            p, c = len(prefix_ids[r]), len(continuation_ids[r])
            predict[j, p - 1 : p + c - 1] = True
            targets[j, p - 1 : p + c - 1] = torch.tensor(continuation_ids[r])
        positions = torch.arange(T).expand(len(rows), T)
        h = decoder.hidden_states(decoder.embed(ids.to(device)), positions.to(device))  # (R, T, H)
        logits = decoder.logits(h[predict.to(device)][None])[0]  # (M, V) fp32
        tok_nll = F.cross_entropy(logits, targets[predict].to(device), reduction="none")  # (M,)
        row_of = torch.arange(len(rows))[:, None].expand(len(rows), T)[predict]  # (M,)
        sums = torch.zeros(len(rows), dtype=torch.float64).index_add_(
            0, row_of, tok_nll.double().cpu()
        )
        nll[rows] = sums
    return nll, counts


def perplexity(nll: torch.Tensor, counts: torch.Tensor) -> float:
    """exp(Σ NLL / Σ tokens): the token-weighted mean; nan when there are no tokens."""
    total = int(counts.sum())
    return math.exp(float(nll.sum()) / total) if total else float("nan")


def distinct_n(texts: list[str], n: int) -> float:
    """Dist-n (Li et al., 2016): distinct n-grams / total n-grams over all texts (whitespace words).

    0.0 when the texts hold no n-gram.
    """
    if n < 1:
        raise ValueError(f"n must be ≥ 1, got {n}")
    seen: set[tuple[str, ...]] = set()
    total = 0
    for text in texts:
        words = text.split()
        grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else 0.0


_VADER = None


def vader_compound(texts: list[str]) -> list[float]:
    """VADER compound polarity in [−1, 1] per text."""
    global _VADER
    if _VADER is None:
        try:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        except ImportError as e:
            raise RuntimeError(
                "the sentiment metric needs vaderSentiment: pip install 'dglm-engine[eval]'"
            ) from e
        _VADER = SentimentIntensityAnalyzer()
    return [_VADER.polarity_scores(t)["compound"] for t in texts]


def sentiment_rates(texts: list[str], threshold: float = VADER_THRESHOLD) -> dict[str, float]:
    """{"positive": share with compound > threshold, "negative": share < −threshold, "compound":
    mean compound}."""
    if not texts:
        return {"positive": float("nan"), "negative": float("nan"), "compound": float("nan")}
    c = vader_compound(texts)
    n = len(c)
    return {
        "positive": sum(x > threshold for x in c) / n,
        "negative": sum(x < -threshold for x in c) / n,
        "compound": sum(c) / n,
    }


def toxicity(texts: list[str], threshold: float = TOXIC_THRESHOLD) -> dict[str, float]:
    """alt-profanity-check probabilities: {"mean": mean probability, "frac": share > threshold}."""
    if not texts:
        return {"mean": float("nan"), "frac": float("nan")}
    try:
        from profanity_check import predict_prob
    except ImportError as e:
        raise RuntimeError(
            "the toxicity metric needs alt-profanity-check: pip install 'dglm-engine[eval]'"
        ) from e
    p = [float(x) for x in predict_prob(list(texts))]
    return {"mean": sum(p) / len(p), "frac": sum(x > threshold for x in p) / len(p)}


def fidelity(encoder, texts: list[str], latents: torch.Tensor) -> torch.Tensor:
    """(N,) cos(encoder(text_i), latent_i): how closely a continuation follows its proposal."""
    if latents.shape[0] != len(texts):
        raise ValueError(f"{len(texts)} texts but {latents.shape[0]} latents")
    emb = encoder.embed(list(texts)).float().cpu()  # (N, d) unit norm
    return F.cosine_similarity(emb, latents.float().cpu(), dim=-1)


def probe_probability(probe: Probe, target: str | int, emb: torch.Tensor) -> torch.Tensor:
    """(N,) p(target | text) under a probe, from embeddings (N, d)."""
    from dglm.engine.fudge import target_logprob

    return target_logprob(probe, target, emb).exp()


def mean_and_se(x: torch.Tensor) -> tuple[float, float]:
    """Mean and standard error of a 1-D sample (se nan for fewer than two values)."""
    x = x.double()
    n = x.numel()
    if n == 0:
        return float("nan"), float("nan")
    se = float(x.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")
    return float(x.mean()), se


# ================================================================== held-out prefixes


def _sha1(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def _source_prefixes(
    name: str, tokenizer, min_tokens: int, max_tokens: int, min_continuation: int
) -> Iterator[str]:
    """Prefixes of one source's held-out texts, in SHA-1 order of the texts.

    A text is used only if it is in the "eval" split and so is every prefix/continuation pair
    `dglm data pairs` cuts from it (those are split by the hash of the pair, not of the text).
    A prefix is the first min(max_tokens, max(min_tokens, len/2)) tokens of a text with at least
    min_tokens + min_continuation tokens.
    """
    from dglm.engine import data

    docs = sorted(
        (d for d in data.SOURCES[name]() if data.split_of(d.text) == "eval"),
        key=lambda d: _sha1(d.text),
    )
    for doc in docs:
        ids = tokenizer.encode(doc.text, add_special_tokens=False)
        if len(ids) < min_tokens + min_continuation:
            continue
        if any(
            data.split_of(p.prefix + p.continuation) != "eval"
            for p in data.make_pairs([doc], tokenizer)
        ):
            continue
        cut = min(max_tokens, max(min_tokens, len(ids) // 2))
        prefix = tokenizer.decode(ids[:cut], skip_special_tokens=True).strip()
        if prefix:
            yield prefix


def heldout_prefixes(
    tokenizer,
    n: int,
    sources: tuple[str, ...] = DEFAULT_SOURCES,
    min_tokens: int = 16,
    max_tokens: int = 32,
    min_continuation: int = 8,
) -> list[tuple[str, str]]:
    """n deterministic (source, prefix) pairs, round-robin over the sources' held-out texts.

    A source that cannot be read here (missing package or files) is skipped with a warning.
    """
    from dglm.engine import data

    for s in sources:
        if s not in data.SOURCES:
            raise ValueError(f"unknown data source {s!r}; available: {sorted(data.SOURCES)}")
    streams = {}
    for s in sources:
        streams[s] = _source_prefixes(s, tokenizer, min_tokens, max_tokens, min_continuation)
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    while len(out) < n and streams:
        for s in list(streams):
            try:
                prefix = next(streams[s])
            except StopIteration:
                del streams[s]
                continue
            except RuntimeError as e:
                logger.warning("skipping source %s: %s", s, e)
                del streams[s]
                continue
            if prefix not in seen:
                seen.add(prefix)
                out.append((s, prefix))
            if len(out) == n:
                break
    if not out:
        raise RuntimeError(f"no held-out prefixes could be read from sources {list(sources)}")
    if len(out) < n:
        logger.warning("only %d held-out prefixes available (asked for %d)", len(out), n)
    return out


# ================================================================== settings and configuration


@dataclass(frozen=True)
class EvalConfig:
    num_prefixes: int = 64  # held-out prefixes
    num_samples: int = 2  # continuations per prefix and setting
    max_new_tokens: int = 20  # the reference's length for guided tasks
    min_prefix_tokens: int = 16  # prefixes are 16-32 decoder tokens of a held-out text
    max_prefix_tokens: int = 32
    sources: tuple[str, ...] = DEFAULT_SOURCES  # offline sources of held-out texts
    prefixes: tuple[str, ...] = ()  # explicit prefixes instead of held-out texts (tests)
    guidance_scales: tuple[float, ...] = (5.0, 10.0, 20.0, 50.0, 100.0, 200.0)  # DGLM probe sweep
    renoise_alpha2s: tuple[float, ...] = RENOISE_SWEEP  # proposal-fidelity sweep (unguided)
    fudge_top_k: int = 50  # FUDGE candidates per step
    fudge_strengths: tuple[float, ...] = (1.0, 3.0)  # FUDGE λ on log p(target | text)
    temperature: float = 1.0
    top_p: float = 0.95  # nucleus sampling for every method
    batch_size: int = 16  # prompts per generation call (every method alike)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_prefixes", "num_samples", "max_new_tokens", "fudge_top_k", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer ≥ 1, got {v!r}")
        if self.num_samples >= 1000:
            raise ValueError(f"num_samples must be < 1000, got {self.num_samples}")
        if not 1 <= self.min_prefix_tokens <= self.max_prefix_tokens:
            raise ValueError(
                f"need 1 ≤ min_prefix_tokens ≤ max_prefix_tokens, got {self.min_prefix_tokens}, "
                f"{self.max_prefix_tokens}"
            )
        for name in (
            "sources",
            "prefixes",
            "guidance_scales",
            "renoise_alpha2s",
            "fudge_strengths",
        ):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if any(not isinstance(p, str) or not p.strip() for p in self.prefixes):
            raise ValueError("prefixes must be non-empty strings")
        if any(not (math.isfinite(s) and s > 0) for s in self.guidance_scales):
            raise ValueError(f"guidance_scales must be finite and > 0, got {self.guidance_scales}")
        if any(not 0.0 <= a <= 1.0 for a in self.renoise_alpha2s):
            raise ValueError(f"renoise_alpha2s must lie in [0, 1], got {self.renoise_alpha2s}")
        if any(not (math.isfinite(s) and s >= 0) for s in self.fudge_strengths):
            raise ValueError(f"fudge_strengths must be finite and ≥ 0, got {self.fudge_strengths}")
        if not 0 < self.top_p <= 1 or not self.temperature >= 0:
            raise ValueError(
                f"need 0 < top_p ≤ 1 and temperature ≥ 0, got {self.top_p}, {self.temperature}"
            )


PRESETS = {
    "full": EvalConfig(),
    # < 15 minutes on CPU for MiniLM + SmolLM2-135M (one torch thread; about 12.5 minutes on a
    # 2-core machine shared with a load of ~8, with FUDGE at top-k 50)
    "quick": EvalConfig(
        num_prefixes=16,
        num_samples=1,
        guidance_scales=(20.0, 100.0),
        fudge_top_k=20,
        fudge_strengths=(1.0,),
    ),
}


@dataclass(frozen=True)
class Setting:
    name: str  # unique, e.g. "dglm sentiment=positive:20"
    method: str  # "decoder" (plain decoding) | "dglm" | "fudge"
    group: str  # "unguided" | "sentiment" | "toxicity" | "fidelity"
    controls: tuple[Control, ...] = ()
    renoise_alpha2: float | None = None  # dglm only
    probe: str | None = None
    target: str | None = None
    scale: float | None = None  # DGLM guidance scale, or FUDGE λ


def low_toxicity_target(probe: Probe) -> str:
    """The label of a toxicity probe that means "not toxic"."""
    for label in probe.labels:
        if label.lower() in _LOW_TOXICITY_LABELS:
            return label
    if probe.rows == 1:
        return probe.labels[0]  # binary probes label y=1 as the property (toxic)
    raise ValueError(
        f"toxicity probe labels {list(probe.labels)} name no non-toxic class; "
        f"use one of {list(_LOW_TOXICITY_LABELS)}"
    )


def build_settings(config: EvalConfig, probes: dict[str, Probe], default_alpha2: float):
    """(settings to run, skipped [{setting, reason}])."""
    settings = [
        Setting("decoder", "decoder", "unguided"),
        Setting("dglm unguided", "dglm", "unguided", renoise_alpha2=default_alpha2),
    ]
    skipped = []
    if "sentiment" in probes:
        for target in ("positive", "negative"):
            if target not in probes["sentiment"].labels:
                skipped.append(
                    {"setting": f"sentiment={target}", "reason": "not a sentiment probe label"}
                )
                continue
            for s in config.guidance_scales:
                settings.append(
                    Setting(
                        f"dglm sentiment={target}:{s:g}",
                        "dglm",
                        "sentiment",
                        (Control("sentiment", target, s),),
                        default_alpha2,
                        "sentiment",
                        target,
                        s,
                    )
                )
            for lam in config.fudge_strengths:
                settings.append(
                    Setting(
                        f"fudge sentiment={target} λ={lam:g}",
                        "fudge",
                        "sentiment",
                        probe="sentiment",
                        target=target,
                        scale=lam,
                    )
                )
    else:
        skipped.append({"setting": "sentiment", "reason": "the bundle has no 'sentiment' probe"})
    if "toxicity" in probes:
        low = low_toxicity_target(probes["toxicity"])
        for s in config.guidance_scales:
            settings.append(
                Setting(
                    f"dglm toxicity={low}:{s:g}",
                    "dglm",
                    "toxicity",
                    (Control("toxicity", low, s),),
                    default_alpha2,
                    "toxicity",
                    low,
                    s,
                )
            )
    else:
        skipped.append({"setting": "toxicity=low", "reason": "the bundle has no 'toxicity' probe"})
    for a2 in config.renoise_alpha2s:
        settings.append(
            Setting(f"dglm unguided α²={a2:g}", "dglm", "fidelity", renoise_alpha2=float(a2))
        )
    return settings, skipped


# ================================================================== running


@dataclass
class Generations:
    """The continuations of one setting, row r = prefix r // num_samples, sample r % num_samples."""

    prefix_index: list[int]
    texts: list[str]
    token_ids: list[list[int]]
    latents: torch.Tensor | None  # (N, d) fp32, dglm only
    timings: dict[str, float] = field(default_factory=dict)  # seconds, generation only


def _chunks(n: int, size: int) -> list[range]:
    return [range(lo, min(n, lo + size)) for lo in range(0, n, size)]


def _seed(config: EvalConfig, prefix: int) -> int:
    return config.seed + 1000 * prefix  # sample j of a prefix uses seed + j


def generate_setting(
    engine, setting: Setting, prefixes: list[str], config: EvalConfig, tick=None
) -> Generations:
    """Run one setting over every prefix in batches of config.batch_size prompts."""
    from dglm.engine.decoding import DecodeParams
    from dglm.engine.decoding import generate as decode
    from dglm.engine.engine import GenerationParams
    from dglm.engine.fudge import FudgeParams, fudge_generate

    S = config.num_samples
    rows_idx, texts, toks, lats = [], [], [], []
    timings: dict[str, float] = {}

    def add(key: str, v: float) -> None:
        timings[key] = timings.get(key, 0.0) + v

    for chunk in _chunks(len(prefixes), config.batch_size):
        t0 = time.perf_counter()
        if setting.method == "dglm":
            params = [
                GenerationParams(
                    controls=setting.controls,
                    num_samples=S,
                    seed=_seed(config, i),
                    max_new_tokens=config.max_new_tokens,
                    temperature=config.temperature,
                    top_p=config.top_p,
                    renoise_alpha2=setting.renoise_alpha2,
                )
                for i in chunk
            ]
            outs = engine.generate([prefixes[i] for i in chunk], params)
            for i, o in zip(chunk, outs, strict=True):
                for s in o.samples:
                    rows_idx.append(i)
                    texts.append(s.text)
                    toks.append(list(s.token_ids))
                    lats.append(s.latent)
            for k, v in outs[0].timings.items():
                if k != "total":
                    add(k + "_s", v)
        else:
            ids = [engine.tokenizer.encode(prefixes[i]) for i in chunk for _ in range(S)]
            if setting.method == "decoder":
                params = [
                    DecodeParams(
                        max_new_tokens=config.max_new_tokens,
                        temperature=config.temperature,
                        top_p=config.top_p,
                        seed=(_seed(config, i) + j) ^ 0x5DEECE66D,  # the engine's decode seeds
                    )
                    for i in chunk
                    for j in range(S)
                ]
                results, t = decode(engine.decoder, engine.tokenizer, ids, params)
                for k in ("prefill_s", "decode_s"):
                    add(k, t[k])
            elif setting.method == "fudge":
                fp = FudgeParams(
                    max_new_tokens=config.max_new_tokens,
                    top_k=config.fudge_top_k,
                    strength=setting.scale,
                    temperature=config.temperature,
                    top_p=config.top_p,
                    seed=_seed(config, chunk[0]),
                )
                probe = engine.probes.probes[setting.probe]
                results, t = fudge_generate(
                    engine.decoder, engine.tokenizer, engine.encoder, probe, setting.target, ids, fp
                )
                for k in ("lm_s", "probe_s", "candidates_scored"):
                    add(k, t[k])
            else:
                raise AssertionError(setting.method)
            for r, res in enumerate(results):
                rows_idx.append(chunk[r // S])
                texts.append(res.text)
                toks.append(list(res.token_ids))
        add("wall_s", time.perf_counter() - t0)
        if tick is not None:
            tick()
    n = len(texts)
    timings["per_sample_s"] = timings["wall_s"] / n
    latents = torch.stack(lats) if lats else None
    return Generations(rows_idx, texts, toks, latents, timings)


def score_setting(
    engine, gens: Generations, prefixes: list[str]
) -> tuple[dict, torch.Tensor | None]:
    """(metrics, per-sample fidelity cosines or None)."""
    prefix_ids = [engine.tokenizer.encode(prefixes[i]) for i in gens.prefix_index]
    nll, counts = continuation_nll(engine.decoder, prefix_ids, gens.token_ids)
    sent = sentiment_rates(gens.texts)
    tox = toxicity(gens.texts)
    m = {
        "perplexity": perplexity(nll, counts),
        "tokens": int(counts.sum()),
        "mean_tokens": float(counts.double().mean()),
        "empty_frac": sum(not t.strip() for t in gens.texts) / len(gens.texts),
        "dist_1": distinct_n(gens.texts, 1),
        "dist_2": distinct_n(gens.texts, 2),
        "dist_3": distinct_n(gens.texts, 3),
        "vader_positive": sent["positive"],
        "vader_negative": sent["negative"],
        "vader_compound": sent["compound"],
        "toxicity_mean": tox["mean"],
        "toxicity_frac": tox["frac"],
    }
    emb = engine.encoder.embed(gens.texts).float().cpu()
    probes = engine.probes.probes
    if "sentiment" in probes and "positive" in probes["sentiment"].labels:
        m["probe_p_positive"] = float(
            probe_probability(probes["sentiment"], "positive", emb).mean()
        )
    if "toxicity" in probes:
        low = low_toxicity_target(probes["toxicity"])
        m["probe_p_nontoxic"] = float(probe_probability(probes["toxicity"], low, emb).mean())
    cos = None
    if gens.latents is not None:
        cos = F.cosine_similarity(emb, gens.latents.float().cpu(), dim=-1)
        m["fidelity"], m["fidelity_se"] = mean_and_se(cos)
    return m, cos


def _warm_up(engine, prefix: str) -> None:
    """One tiny untimed call through every model, so no setting pays first-call costs."""
    from dglm.engine.engine import GenerationParams

    engine.generate([prefix], GenerationParams(max_new_tokens=2, seed=0))
    engine.encoder.embed([prefix, prefix + " and"])


def _target_rate(setting: Setting, m: dict) -> float | None:
    if setting.group == "sentiment":
        return m["vader_" + setting.target]
    if setting.group == "toxicity":
        return 1.0 - m["toxicity_frac"]
    return None


def run_eval(
    engine,
    config: EvalConfig,
    progress: Callable[[str, int, int], None] | None = None,
    bundle: str = "",
) -> tuple[dict, list[dict]]:
    """Generate and score every setting → (report, samples); see write_report.

    progress(setting name, batches done, batches in all) is called after every batch.
    """
    t_start = time.perf_counter()
    if config.prefixes:
        sources_prefixes = [("given", p) for p in config.prefixes]
    else:
        sources_prefixes = heldout_prefixes(
            engine.tokenizer,
            config.num_prefixes,
            config.sources,
            config.min_prefix_tokens,
            config.max_prefix_tokens,
        )
    prefixes = [p for _, p in sources_prefixes]
    default_a2 = float(engine.config.sampler.renoise_alpha2)
    settings, skipped = build_settings(config, engine.probes.probes, default_a2)
    logger.info("evaluating %d settings on %d prefixes", len(settings), len(prefixes))

    # settings with identical generation parameters share one run (e.g. α² = the bundle's)
    def key(s: Setting) -> tuple:
        return (s.method, s.controls, s.renoise_alpha2, s.probe, s.target, s.scale)

    _warm_up(engine, prefixes[0])
    first: dict[tuple, str] = {}
    for s in settings:
        first.setdefault(key(s), s.name)
    total = len(first) * len(_chunks(len(prefixes), config.batch_size))
    done = 0
    runs: dict[tuple, tuple[Generations, dict, torch.Tensor | None]] = {}
    rows, samples = [], []
    for s in settings:
        k = key(s)
        if k not in runs:

            def tick(name: str = s.name) -> None:
                nonlocal done
                done += 1
                if progress is not None:
                    progress(name, done, total)

            gens = generate_setting(engine, s, prefixes, config, tick)
            metrics, cos = score_setting(engine, gens, prefixes)
            runs[k] = (gens, metrics, cos)
            for r in range(len(gens.texts)):
                sample = {
                    "setting": s.name,
                    "prefix_index": gens.prefix_index[r],
                    "prefix": prefixes[gens.prefix_index[r]],
                    "continuation": gens.texts[r],
                }
                if cos is not None:
                    sample["fidelity"] = round(float(cos[r]), 4)
                samples.append(sample)
            logger.info("%s: %s", s.name, {m: round(v, 4) for m, v in metrics.items()})
        gens, metrics, _ = runs[k]
        metrics = dict(metrics)
        rate = _target_rate(s, metrics)
        if rate is not None:
            metrics["target_rate"] = rate
        row = {
            "setting": s.name,
            "method": s.method,
            "group": s.group,
            "probe": s.probe,
            "target": s.target,
            "scale": s.scale,
            "renoise_alpha2": s.renoise_alpha2,
            "n": len(gens.texts),
            "metrics": metrics,
            "timings": gens.timings,
        }
        if first[k] != s.name:
            row["same_run_as"] = first[k]
        rows.append(row)

    fid = {s.renoise_alpha2: runs[key(s)][2] for s in settings if s.group == "fidelity"}
    report = {
        "bundle": bundle,
        "bundle_trained": bool(engine.config.trained),
        "config": asdict(config),
        "prefixes": [{"source": src, "prefix": p} for src, p in sources_prefixes],
        "rows": rows,
        "skipped": skipped,
        "targets": target_checks(rows, fid),
        "environment": environment(engine),
        "wall_s": time.perf_counter() - t_start,
    }
    return report, samples


# ================================================================== targets


def _check(
    name: str, setting: str, value: float, threshold: float, met: bool, margin: float, note: str
) -> dict:
    return {
        "target": name,
        "setting": setting,
        "value": value,
        "threshold": threshold,
        "met": bool(met),
        "margin": margin,  # > 0: met by this much; < 0: missed by this much
        "note": note,
    }


def _sentiment_checks(r: dict, ref: dict, target: str) -> list[dict]:
    m, m0 = r["metrics"], ref["metrics"]
    rate = m["vader_" + target]
    ratio = m["perplexity"] / m0["perplexity"] if m0["perplexity"] > 0 else float("nan")
    dd = abs(m["dist_3"] - m0["dist_3"])
    return [
        _check(
            f"sentiment {target}: VADER {target} ≥ {TARGET_SENTIMENT_RATE:.0%}",
            r["setting"],
            rate,
            TARGET_SENTIMENT_RATE,
            rate >= TARGET_SENTIMENT_RATE,
            rate - TARGET_SENTIMENT_RATE,
            f"unguided {m0['vader_' + target]:.3f}",
        ),
        _check(
            f"sentiment {target}: perplexity ≤ {TARGET_PPL_RATIO}× unguided",
            r["setting"],
            ratio,
            TARGET_PPL_RATIO,
            ratio <= TARGET_PPL_RATIO,
            TARGET_PPL_RATIO - ratio,
            f"{m['perplexity']:.2f} vs unguided {m0['perplexity']:.2f}",
        ),
        _check(
            f"sentiment {target}: Dist-3 within {TARGET_DIST3_DELTA} of unguided",
            r["setting"],
            dd,
            TARGET_DIST3_DELTA,
            dd <= TARGET_DIST3_DELTA,
            TARGET_DIST3_DELTA - dd,
            f"{m['dist_3']:.3f} vs unguided {m0['dist_3']:.3f}",
        ),
    ]


def target_checks(rows: list[dict], fidelity_cos: dict[float, torch.Tensor | None]) -> list[dict]:
    """Issue 3's targets, each met or missed with its margin (positive = met by that much).

    Sentiment, per target: the smallest guidance scale meeting all three of VADER rate ≥ 85%,
    perplexity ≤ 1.3× unguided DGLM and Dist-3 within 0.05 of unguided; if none does, the scale
    meeting the most of them, then with the highest rate. Fidelity: the paired mean difference
    cos(α² = 0.95) − cos(α² = 0) over the same prefixes and seeds, met when it exceeds twice its
    standard error (margin = difference − 2·se).
    """
    checks: list[dict] = []
    ref = next((r for r in rows if r["setting"] == "dglm unguided"), None)
    for target in ("positive", "negative"):
        cands = [
            r
            for r in rows
            if r["method"] == "dglm" and r["group"] == "sentiment" and r["target"] == target
        ]
        if not cands or ref is None:
            continue
        judged = [(_sentiment_checks(r, ref, target), r) for r in cands]
        passing = [x for x in judged if all(c["met"] for c in x[0])]
        if passing:
            best = min(passing, key=lambda x: x[1]["scale"])
        else:
            best = min(
                judged,
                key=lambda x: (-sum(c["met"] for c in x[0]), -x[0][0]["value"], x[1]["scale"]),
            )
        checks += best[0]
    cos_95, cos_0 = fidelity_cos.get(0.95), fidelity_cos.get(0.0)
    if cos_95 is not None and cos_0 is not None:
        diff, se = mean_and_se(cos_95 - cos_0)
        bound = diff - 2 * se if not math.isnan(se) else diff
        checks.append(
            _check(
                "fidelity: cos at α²=0.95 above α²=0 (plain decoding)",
                "dglm unguided α²=0.95 vs α²=0",
                diff,
                0.0,
                bound > 0,
                bound,
                f"paired difference {diff:+.4f} ± {se:.4f} (se); "
                f"α²=0.95 {float(cos_95.mean()):.4f}, α²=0 {float(cos_0.mean()):.4f}",
            )
        )
    return checks


# ================================================================== report


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(
            ["git", *args],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def environment(engine) -> dict:
    """Device, machine, package versions and the git commit the results come from."""
    device = torch.device(engine.device)
    name = platform.processor()
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    elif Path("/proc/cpuinfo").exists():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "device": str(device),
        "device_name": name,
        "dtype": str(engine.dtype).replace("torch.", ""),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {
            p: _version(p)
            for p in (
                "dglm-engine",
                "torch",
                "transformers",
                "sentence-transformers",
                "vadersentiment",
                "alt-profanity-check",
            )
        },
        "commit": _git("rev-parse", "HEAD"),
        "dirty": bool(status) if status is not None else None,
        "encoder": engine.config.encoder,
        "decoder": engine.config.decoder,
        "sampler": asdict(engine.config.sampler),
        "cfg_scale": engine.config.cfg_scale,
    }


def _fmt(v: float | None, spec: str = ".3f") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return format(v, spec)


def render_markdown(report: dict) -> str:
    env = report["environment"]
    cfg = report["config"]
    lines = [
        f"# dglm eval: {report['bundle']}",
        "",
        f"{len(report['prefixes'])} held-out prefixes × {cfg['num_samples']} sample(s), "
        f"{cfg['max_new_tokens']} new tokens, top-p {cfg['top_p']}, temperature "
        f"{cfg['temperature']}, batches of {cfg['batch_size']} prompts; device {env['device']} "
        f"({env['device_name']}, {env['torch_threads']} torch threads); commit "
        f"{(env['commit'] or 'unknown')[:12]}{' (dirty)' if env['dirty'] else ''}; "
        f"total {report['wall_s']:.0f} s.",
        "",
    ]
    if not report["bundle_trained"]:
        lines += [
            "**The bundle's networks are untrained (random): these numbers mean nothing.**",
            "",
        ]
    lines += [
        "PPL: perplexity of the continuation under the base decoder given the prefix. Dist-n: "
        "distinct n-grams over all continuations. VADER ±: share judged positive / negative. "
        "p(+): the sentiment probe's mean p(positive). tox: alt-profanity-check mean probability "
        "and share > 0.5. fidelity: cos(encoder(continuation), sampled latent). s/sample: "
        "generation wall time per continuation (batched).",
        "",
        "| setting | n | PPL | Dist-1 | Dist-2 | Dist-3 | VADER + | VADER − | p(+) | tox | "
        "tox>0.5 | fidelity | s/sample |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        m = r["metrics"]
        fid = m.get("fidelity")
        fid_s = f"{fid:.3f} ± {m['fidelity_se']:.3f}" if fid is not None else "—"
        lines.append(
            f"| {r['setting']} | {r['n']} | {_fmt(m['perplexity'], '.2f')} | {_fmt(m['dist_1'])} | "
            f"{_fmt(m['dist_2'])} | {_fmt(m['dist_3'])} | {_fmt(m['vader_positive'], '.0%')} | "
            f"{_fmt(m['vader_negative'], '.0%')} | {_fmt(m.get('probe_p_positive'))} | "
            f"{_fmt(m['toxicity_mean'])} | {_fmt(m['toxicity_frac'], '.0%')} | {fid_s} | "
            f"{_fmt(r['timings']['per_sample_s'], '.3f')} |"
        )
    lines += ["", "Generation time per sample, by stage (seconds; batched as above):", ""]
    lines += ["| setting | total | stages |", "|---|---:|---|"]
    for r in report["rows"]:
        if "same_run_as" in r:
            continue
        t = r["timings"]
        stages = ", ".join(
            f"{k.removesuffix('_s')} {v / r['n']:.3f}"
            for k, v in t.items()
            if k.endswith("_s") and k not in ("wall_s", "per_sample_s")
        )
        lines.append(f"| {r['setting']} | {t['per_sample_s']:.3f} | {stages} |")
    if any(r["group"] == "toxicity" for r in report["rows"]):
        lines += [
            "",
            "Note: the toxicity probe's training labels come from alt-profanity-check, the same "
            "classifier that judges toxicity here, so that evaluator is not independent of it.",
        ]
    if report["skipped"]:
        lines += [
            "",
            "Skipped: "
            + "; ".join(f"{s['setting']} ({s['reason']})" for s in report["skipped"])
            + ".",
        ]
    lines += ["", "## Targets", ""]
    if not report["targets"]:
        lines.append("No target could be checked (settings missing).")
    else:
        lines += [
            "| target | setting | value | met | margin | note |",
            "|---|---|---:|---|---:|---|",
        ]
        for c in report["targets"]:
            lines.append(
                f"| {c['target']} | {c['setting']} | {_fmt(c['value'])} | "
                f"{'met' if c['met'] else 'missed'} | {c['margin']:+.3f} | {c['note']} |"
            )
    return "\n".join(lines) + "\n"


def write_report(report: dict, samples: list[dict], out: str | Path) -> dict[str, Path]:
    """results.json, results.md and samples.jsonl in `out` (created)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out / "results.json",
        "markdown": out / "results.md",
        "samples": out / "samples.jsonl",
    }
    paths["json"].write_text(json.dumps(_finite(report), indent=2, allow_nan=False) + "\n")
    paths["markdown"].write_text(render_markdown(report))
    with open(paths["samples"], "w", encoding="utf-8") as f:
        for s in samples:
            f.write(json.dumps(s, ensure_ascii=False) + "\n")
    return paths


def _finite(o):
    """JSON has no NaN or infinity: they become null."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    return o


# ================================================================== CLI (`dglm eval`)


def _floats(text: str) -> tuple[float, ...]:
    import argparse

    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None


def add_eval_parser(sub) -> None:
    """Register `dglm eval` on the CLI's subparsers."""
    e = sub.add_parser(
        "eval",
        help="evaluate a bundle on held-out prefixes (fluency, diversity, steering, fidelity, "
        "FUDGE baseline)",
    )
    e.add_argument("--bundle", default="default", help="bundle directory or shipped name")
    e.add_argument(
        "--quick",
        action="store_true",
        help="the small preset (< 15 min on CPU; one torch thread unless `dglm --threads N`)",
    )
    e.add_argument(
        "--out",
        default=None,
        help="output directory (default benchmarks/results/<device>/eval_<bundle>)",
    )
    e.add_argument("--device", default="cpu")
    e.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    e.add_argument("--prefixes", type=int, default=None, help="number of held-out prefixes")
    e.add_argument("--samples", type=int, default=None, help="continuations per prefix")
    e.add_argument("--max-new-tokens", type=int, default=None)
    e.add_argument("--scales", type=_floats, default=None, help="guidance scales, e.g. 10,50")
    e.add_argument("--renoise", type=_floats, default=None, help="alpha² sweep, e.g. 1,0.95,0")
    e.add_argument("--fudge-top-k", type=int, default=None)
    e.add_argument("--fudge-strengths", type=_floats, default=None, help="FUDGE λ, e.g. 1,3")
    e.add_argument("--batch-size", type=int, default=None, help="prompts per generation call")
    e.add_argument("--sources", default=None, help="comma-separated held-out sources")
    e.add_argument("--seed", type=int, default=None)
    e.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    from dglm.engine import bundle as bundle_io
    from dglm.engine.engine import Engine
    from tqdm.auto import tqdm

    config = PRESETS["quick" if args.quick else "full"]
    overrides = {
        "num_prefixes": args.prefixes,
        "num_samples": args.samples,
        "max_new_tokens": args.max_new_tokens,
        "guidance_scales": args.scales,
        "renoise_alpha2s": args.renoise,
        "fudge_top_k": args.fudge_top_k,
        "fudge_strengths": args.fudge_strengths,
        "batch_size": args.batch_size,
        "sources": tuple(args.sources.split(",")) if args.sources else None,
        "seed": args.seed,
    }
    config = replace(config, **{k: v for k, v in overrides.items() if v is not None})
    if getattr(args, "threads", None) is None and args.quick and args.device == "cpu":
        # `dglm --threads N eval` chooses; --quick on CPU defaults to one thread, by far the
        # fastest on a busy shared machine (two threads there spend their time in barriers)
        torch.set_num_threads(1)
    bundle_dir = bundle_io.resolve_bundle_dir(args.bundle)
    out = args.out or Path("benchmarks/results") / torch.device(args.device).type / (
        f"eval_{bundle_dir.name}"
    )
    engine = Engine.from_pretrained(bundle_dir, device=args.device, dtype=args.dtype)
    bar = tqdm(total=None, desc="eval", unit="batch", dynamic_ncols=True, disable=None)

    def progress(name: str, done: int, total: int) -> None:
        bar.total = total
        bar.set_postfix_str(name)
        bar.update(done - bar.n)

    report, samples = run_eval(engine, config, progress, bundle=str(args.bundle))
    bar.close()
    paths = write_report(report, samples, out)
    print(render_markdown(report))
    print(json.dumps({k: str(v) for k, v in paths.items()}))
    return 0
