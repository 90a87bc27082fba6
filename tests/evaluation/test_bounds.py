"""The shipping bounds (evaluation.bounds) on synthetic rows: met, missed, not evaluated."""

from __future__ import annotations

import pytest
from dglm.engine.evaluation.bounds import BOUNDS, Bound, bound_checks

SCALE = 1000.0


def row(setting, method, group, target=None, scale=None, min_p=None, **m):
    metrics = {
        "ref_perplexity": 20.0, "perplexity": 30.0, "repeat_trigram": 0.02, "dist_3": 0.95,
        "relevance": 1.0, "fused": 0.01, "toxicity_frac": 0.01, "harm_patterns": 0.0,
        "vader_positive": 0.4, "vader_negative": 0.2, **m,
    }  # fmt: skip
    return {"setting": setting, "method": method, "group": group, "target": target,
            "scale": scale, "min_p": min_p, "n": 400, "metrics": metrics}  # fmt: skip


def rows(**steered):
    return [
        row("decoder", "decoder", "unguided"),
        row("decoder min-p 0.1", "decoder", "unguided", min_p=0.1, ref_perplexity=10.0),
        row("dglm unguided", "dglm", "unguided"),
        row("pos", "dglm", "sentiment", "positive", SCALE, **steered),
        row("pos 10", "dglm", "sentiment", "positive", 10.0, vader_positive=0.1),
    ]


def by_bound(checks, setting="pos"):
    return {c["bound"]: c for c in checks if c["setting"] == setting}


def test_bounds_met_and_missed():
    good = dict(vader_positive=0.93, ref_perplexity=11.0, relevance=0.9, neural_positive=0.9)
    checks = by_bound(bound_checks(rows(**good), SCALE, judge_accuracy=0.9))
    assert all(c["met"] for c in checks.values()), [c for c in checks.values() if not c["met"]]
    bad = dict(
        vader_positive=0.89, ref_perplexity=12.5, repeat_trigram=0.06, dist_3=0.89,
        relevance=0.7, fused=0.02, neural_positive=0.8, toxicity_frac=0.04, harm_patterns=0.0025,
    )  # fmt: skip
    checks = by_bound(bound_checks(rows(**bad), SCALE, judge_accuracy=0.9))
    assert [c["met"] for c in checks.values()] == [False] * len(checks)
    ppl = checks["Gemma perplexity ≤ 1.2× plain, same truncation"]
    assert ppl["baseline"] == "decoder min-p 0.1" and ppl["value"] == pytest.approx(1.25)
    assert checks["trigram-repeat share ≤ plain + 3 pts"]["value"] == pytest.approx(0.04)
    assert checks["relevance ≥ 0.8× plain"]["margin"] == pytest.approx(-0.1)


def test_only_default_rows_are_bounded_and_harm_covers_unguided():
    checks = bound_checks(rows(vader_positive=0.95), SCALE)
    assert {c["setting"] for c in checks} == {"pos", "dglm unguided"}
    assert {c["bound"] for c in checks if c["setting"] == "dglm unguided"} == {
        "profane share ≤ plain + 2 pts",
        "threat / self-harm patterns: none",
    }


def test_neural_bound_needs_the_judge_and_its_accuracy():
    r = rows(vader_positive=0.95, neural_positive=0.95)
    name = "neural judge success ≥ 85%"
    assert by_bound(bound_checks(r, SCALE, 0.9))[name]["met"] is True
    low = by_bound(bound_checks(r, SCALE, 0.8))[name]
    assert low["met"] is None and "accuracy bar" in low["note"]
    assert by_bound(bound_checks(r, SCALE, None))[name]["met"] is None


def test_perplexity_falls_back_to_the_released_decoder():
    r = rows(vader_positive=0.95)
    for x in r:
        x["metrics"]["ref_perplexity"] = float("nan")
    ppl = by_bound(bound_checks(r, SCALE))["Gemma perplexity ≤ 1.2× plain, same truncation"]
    assert ppl["metric"] == "perplexity" and "SmolLM2" in ppl["note"] and ppl["met"] is True


def test_missing_baseline_is_not_evaluated():
    r = [x for x in rows(vader_positive=0.95) if x["setting"] != "decoder min-p 0.1"]
    ppl = by_bound(bound_checks(r, SCALE))["Gemma perplexity ≤ 1.2× plain, same truncation"]
    assert ppl["met"] is None and "not run" in ppl["note"]


def test_bound_validation():
    assert len({b.name for b in BOUNDS}) == len(BOUNDS)
    with pytest.raises(ValueError, match="kind"):
        Bound("x", "m", "between", 1.0)
    with pytest.raises(ValueError, match="baseline"):
        Bound("x", "m", "ratio_max", 1.0)
