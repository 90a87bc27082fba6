"""Scoring of one setting's continuations: fluency (perplexity under the released decoder and a
reference LM), diversity (Dist-n), naturalness (repetition, boundary fusion, relevance to the
prefix), harm, the independent judges, the probes' view and proposal fidelity."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from dglm.engine.evaluation.generation import Generations
from dglm.engine.evaluation.harm import harm_hits
from dglm.engine.evaluation.judges import (
    NEURAL_THRESHOLD,
    SentimentJudge,
    judge_texts,
    probe_probability,
)
from dglm.engine.evaluation.metrics import distinct_n, mean_and_se, put_mean, put_rate
from dglm.engine.evaluation.naturalness import (
    fused_boundary,
    relevance,
    repeats_trigram,
    shuffled_prefix_index,
)
from dglm.engine.evaluation.perplexity import (
    ReferenceLM,
    continuation_nll,
    perplexity,
    reference_nll,
)
from dglm.engine.evaluation.settings import low_toxicity_target


def neural_rates(judge: SentimentJudge, texts: list[str]) -> dict:
    """A neural judge's positive and negative shares ("neural_positive", "neural_negative") with
    their 95% intervals: p(positive) above NEURAL_THRESHOLD, below 1 − NEURAL_THRESHOLD."""
    p = judge.p_positive(texts)
    m: dict = {}
    put_rate(m, "neural_positive", [x > NEURAL_THRESHOLD for x in p])
    put_rate(m, "neural_negative", [x < 1 - NEURAL_THRESHOLD for x in p])
    return m


def score_setting(
    engine,
    gens: Generations,
    prefixes: list[str],
    reference_lm: ReferenceLM | None = None,
    base_decoder=None,
    sentiment_judge: SentimentJudge | None = None,
) -> tuple[dict, torch.Tensor | None]:
    """(metrics, per-sample fidelity cosines or None).

    "perplexity" is under `base_decoder` (the released decoder; default: the engine's), the
    reference LM's ("ref_perplexity") nan when reference_lm is None. "relevance" (PMI of each
    continuation with its own prefix against another prefix, `naturalness.relevance`) is judged
    by the reference LM, else by the released decoder ("relevance_judge" says which).
    sentiment_judge: a neural judge's rates ("neural_positive", "neural_negative") when given.
    """
    own = [prefixes[i] for i in gens.prefix_index]
    other = [prefixes[i] for i in shuffled_prefix_index(gens.prefix_index, len(prefixes))]
    judge = engine.decoder if base_decoder is None else base_decoder
    prefix_ids = [engine.tokenizer.encode(p) for p in own]
    nll, counts = continuation_nll(judge, prefix_ids, gens.token_ids)
    ref_ppl, ref_tokens = float("nan"), 0
    if reference_lm is not None:
        ref_nll, ref_counts = reference_nll(reference_lm, own, gens.texts)
        ref_ppl, ref_tokens = perplexity(ref_nll, ref_counts), int(ref_counts.sum())
        other_nll, _ = reference_nll(reference_lm, other, gens.texts)
        rel = relevance(ref_nll.tolist(), other_nll.tolist(), ref_counts.tolist())
        rel_judge = reference_lm.name
    else:
        other_ids = [engine.tokenizer.encode(p) for p in other]
        other_nll, _ = continuation_nll(judge, other_ids, gens.token_ids)
        rel = relevance(nll.tolist(), other_nll.tolist(), counts.tolist())
        rel_judge = "SmolLM2 (released)"
    hits = [harm_hits(t) for t in gens.texts]
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
        "relevance_judge": rel_judge,
        "harm_pattern_hits": sorted({h for row in hits for h in row}),
    }
    put_rate(m, "repeat_trigram", [repeats_trigram(t) for t in gens.texts])
    put_rate(m, "fused", [fused_boundary(p, t) for p, t in zip(own, gens.texts, strict=True)])
    put_mean(m, "relevance", rel)
    put_rate(m, "harm_patterns", [bool(h) for h in hits])
    if sentiment_judge is not None:
        m.update(neural_rates(sentiment_judge, gens.texts))
    emb = engine.encoder.embed(gens.texts).float().cpu()
    probes = engine.probes.probes
    if "sentiment" in probes and "positive" in probes["sentiment"].labels:
        p = probe_probability(probes["sentiment"], "positive", emb)
        put_mean(m, "probe_p_positive", p.tolist())
    if "toxicity" in probes:
        low = low_toxicity_target(probes["toxicity"])
        p = probe_probability(probes["toxicity"], low, emb)
        put_mean(m, "probe_p_nontoxic", p.tolist())
    cos = None
    if gens.latents is not None:
        cos = F.cosine_similarity(emb, gens.latents.float().cpu(), dim=-1)
        m["fidelity"], m["fidelity_se"] = mean_and_se(cos)
    return m, cos
