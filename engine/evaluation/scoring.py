"""Scoring of one setting's continuations: fluency (perplexity under the released decoder and a
reference LM), diversity (Dist-n), the independent judges, the probes' view and proposal fidelity."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from dglm.engine.evaluation.generation import Generations
from dglm.engine.evaluation.judges import judge_texts, probe_probability
from dglm.engine.evaluation.metrics import distinct_n, mean_and_se, put_mean
from dglm.engine.evaluation.perplexity import (
    ReferenceLM,
    continuation_nll,
    perplexity,
    reference_nll,
)
from dglm.engine.evaluation.settings import low_toxicity_target


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
