"""Synthetic `dglm eval` rows for the target and report tests: positive meets every target at
the default scale, negative misses several."""

from __future__ import annotations

from dglm.engine.evaluation.metrics import wilson_interval
from dglm.engine.evaluation.settings import DEFAULT_SCALE


def row(setting, method, group, target=None, scale=None, s_per_sample=0.5, **m):
    base = {
        "perplexity": 20.0,
        "ref_perplexity": 10.0,
        "dist_3": 0.8,
        "vader_positive": 0.3,
        "vader_negative": 0.2,
        "textblob_positive": 0.25,
        "textblob_negative": 0.15,
    }
    metrics = {**base, **m}
    for key in [k for k in metrics if k.startswith(("vader_", "textblob_"))]:
        metrics[key + "_ci"] = list(wilson_interval(round(200 * metrics[key]), 200))
    return {
        "setting": setting,
        "method": method,
        "group": group,
        "target": target,
        "scale": scale,
        "renoise_alpha2": 0.95 if method == "dglm" else None,
        "n": 200,
        "metrics": metrics,
        "timings": {"per_sample_s": s_per_sample},
    }


def headline(setting, target, s_per_sample, vader, textblob, ref_ppl, dist_3):
    """A DGLM sentiment row at the default scale: the cells the steering targets judge."""
    judged = {f"vader_{target}": vader, f"textblob_{target}": textblob}
    scored = {**judged, "ref_perplexity": ref_ppl, "dist_3": dist_3}
    return row(setting, "dglm", "sentiment", target, DEFAULT_SCALE, s_per_sample, **scored)


def target_rows():
    """Positive meets every target at the default scale; negative misses several."""
    return [
        row("decoder", "decoder", "unguided", ref_perplexity=8.0, perplexity=10.0),
        row("dglm unguided", "dglm", "unguided", ref_perplexity=10.0, perplexity=30.0),
        row("p5", "dglm", "sentiment", "positive", 5.0, vader_positive=0.6),
        headline("p10", "positive", 0.5, vader=0.9, textblob=0.75, ref_ppl=11.0, dist_3=0.78),
        row("p50", "dglm", "sentiment", "positive", 50.0, vader_positive=0.99),
        row("fp1", "fudge", "sentiment", "positive", 1.0, 2.0, vader_positive=0.5),
        row("fp3", "fudge", "sentiment", "positive", 3.0, 3.0, vader_positive=0.7),
        headline("n10", "negative", 0.9, vader=0.6, textblob=0.72, ref_ppl=14.0, dist_3=0.7),
        row("n50", "dglm", "sentiment", "negative", 50.0, vader_negative=0.95),
        row("fn1", "fudge", "sentiment", "negative", 1.0, 0.6, vader_negative=0.65),
    ]


def by_target(checks):
    return {c["target"]: c for c in checks}
