"""The steering issue's target checks on synthetic rows: met with margins, missed with negative
margins, the SmolLM2 fallback and settings that were not run."""

from __future__ import annotations

import pytest
import torch
from dglm.engine.evaluation.metrics import mean_and_se
from dglm.engine.evaluation.targets import target_checks
from eval_rows import by_target, target_rows


def test_targets_met_at_the_default_scale_with_margins():
    cos95 = torch.tensor([0.5, 0.6, 0.7, 0.6])
    cos0 = torch.tensor([0.2, 0.2, 0.3, 0.3])
    checks = target_checks(target_rows(), {0.95: cos95, 0.0: cos0})
    t = by_target(checks)
    # judged at the default scale (10), never at a scale that happens to do better
    pos = [c for c in checks if c["target"].startswith("sentiment positive")]
    assert {c["setting"] for c in pos} == {"p10"} and len(pos) == 6
    assert all(c["met"] for c in pos)
    c = t["sentiment positive: VADER positive ≥ 80%"]
    assert c["value"] == 0.9 and c["margin"] == pytest.approx(0.10)
    assert (
        c["note"] == "90% [85%, 93%]; unguided DGLM 30% [24%, 37%], plain decoding 30% [24%, 37%]"
    )
    c = t["sentiment positive: TextBlob positive ≥ 70%"]
    assert c["margin"] == pytest.approx(0.05) and "unguided DGLM 25% [" in c["note"]
    c = t["sentiment positive: Gemma-3-270M perplexity ≤ 1.5× plain decoding"]
    assert c["value"] == pytest.approx(11 / 8) and c["margin"] == pytest.approx(1.5 - 11 / 8)
    c = t["sentiment positive: Dist-3 within 0.05 of unguided DGLM"]
    assert c["value"] == pytest.approx(0.02) and c["margin"] == pytest.approx(0.03)
    # FUDGE: the best λ (fp3, 70%) is the one to beat; latency 0.5 s vs its 3.0 s
    c = t["sentiment positive: success above FUDGE (same probe)"]
    assert c["value"] == pytest.approx(0.2) and "fp3" in c["note"]
    c = t["sentiment positive: latency per sample below FUDGE"]
    assert c["value"] == pytest.approx(0.5 / 3.0) and c["margin"] == pytest.approx(1 - 0.5 / 3)
    c = t["unguided DGLM: Gemma-3-270M perplexity ≤ 1.3× plain decoding"]
    assert c["value"] == pytest.approx(1.25) and c["met"] and c["setting"] == "dglm unguided"
    (fid,) = [c for c in checks if c["target"].startswith("fidelity")]
    diff, se = mean_and_se(cos95 - cos0)
    assert fid["value"] == pytest.approx(0.35) and fid["met"]
    assert fid["margin"] == pytest.approx(diff - 2 * se)


# sentiment negative's checks: (met, margin); the second judge alone is met
NEGATIVE = {
    "VADER negative ≥ 80%": (False, -0.2),
    "TextBlob negative ≥ 70%": (True, 0.02),
    "Gemma-3-270M perplexity ≤ 1.5× plain decoding": (False, 1.5 - 14 / 8),
    "Dist-3 within 0.05 of unguided DGLM": (False, -0.05),
    "success above FUDGE (same probe)": (False, -0.05),
    "latency per sample below FUDGE": (False, 1 - 0.9 / 0.6),
}


def test_targets_missed_report_negative_margins():
    t = by_target(target_checks(target_rows(), {}))
    neg = {k: v for k, v in t.items() if k.startswith("sentiment negative")}
    assert {c["setting"] for c in neg.values()} == {"n10"}
    for name, (met, margin) in NEGATIVE.items():
        c = neg["sentiment negative: " + name]
        assert c["met"] is met and c["margin"] == pytest.approx(margin), name
    assert not any(k.startswith("fidelity") for k in t)  # no α² sweep given


def test_targets_fall_back_to_smollm2_perplexity_and_mark_missing_settings():
    rows = [r for r in target_rows() if r["setting"] not in ("n10", "fn1")]
    for r in rows:
        r["metrics"]["ref_perplexity"] = float("nan")  # Gemma was not run
    rows[1]["metrics"]["perplexity"] = 14.0  # unguided DGLM vs plain decoding's 10
    t = by_target(target_checks(rows, {}))
    c = t["unguided DGLM: SmolLM2 perplexity (Gemma-3-270M absent) ≤ 1.3× plain decoding"]
    assert not c["met"] and c["value"] == pytest.approx(1.4) and c["margin"] == pytest.approx(-0.1)
    c = t["sentiment positive: SmolLM2 perplexity (Gemma-3-270M absent) ≤ 1.5× plain decoding"]
    assert not c["met"] and c["value"] == pytest.approx(2.0)  # SmolLM2: 20 vs 10
    assert c["margin"] == pytest.approx(-0.5) and c["note"] == "20.00 vs plain decoding 10.00"
    # the negative target has no default-scale row: "not run", never "met"
    neg = [c for c in t.values() if c["target"].startswith("sentiment negative")]
    assert len(neg) == 6 and all(c["met"] is None for c in neg)
    assert all("not run" in c["setting"] for c in neg)


def test_re_control_targets_need_plain_decoding_only():
    """An evaluation of RE-Control rows beside plain decoding and DGLM (no unguided DGLM row)
    still checks RE-Control's targets: the gain over plain decoding, its perplexity, and the
    combined control against each alone at no worse perplexity."""
    from eval_rows import headline, row

    rows = [
        row("decoder", "decoder", "unguided", ref_perplexity=50.0, vader_negative=0.2),
        headline("n10", "negative", 0.5, vader=0.62, textblob=0.3, ref_ppl=26.0, dist_3=0.9),
        row("re", "re-control", "sentiment", "negative", ref_perplexity=80.0, vader_negative=0.55),
        row(
            "both",
            "dglm+re-control",
            "sentiment",
            "negative",
            10.0,
            ref_perplexity=24.0,
            vader_negative=0.65,
        ),  # fmt: skip
    ]
    t = by_target(target_checks(rows, {}))
    gain = t["sentiment negative: RE-Control VADER negative ≥ plain decoding + 25%"]
    assert gain["met"] and gain["value"] == pytest.approx(0.35)
    ppl = t["sentiment negative: RE-Control Gemma-3-270M perplexity ≤ 1.5× plain decoding"]
    assert not ppl["met"] and ppl["value"] == pytest.approx(1.6)
    over = t["sentiment negative: DGLM + RE-Control above DGLM alone, perplexity no worse"]
    assert over["met"] and over["value"] == pytest.approx(0.03)
    assert t["sentiment negative: DGLM + RE-Control above RE-Control alone, perplexity no worse"][
        "met"
    ]
    assert not any("VADER negative ≥ 80%" in k for k in t)  # DGLM's own need unguided DGLM


def test_mcnemar_p_is_the_exact_binomial_test_of_discordant_pairs():
    from dglm.engine.evaluation.metrics import mcnemar_p

    assert mcnemar_p(10, 0) == pytest.approx(2 / 2**10)
    assert mcnemar_p(0, 10) == mcnemar_p(10, 0)  # two-sided, symmetric
    assert mcnemar_p(5, 5) == 1.0 and mcnemar_p(0, 0) == 1.0
    assert mcnemar_p(3, 1) == pytest.approx(2 * (1 + 4) / 16)  # P(X ≤ 1), X ~ Bin(4, 1/2)
    with pytest.raises(ValueError):
        mcnemar_p(-1, 2)


def test_combined_control_must_beat_each_alone_in_a_paired_test_when_samples_are_given():
    """The same rows as above (+3 points over DGLM alone): with per-sample judgements, a gain
    made of 13 vs 10 discordant pairs is not significant (missed, p in the note); 13 vs 1 is."""
    from dglm.engine.evaluation.targets import paired_counts
    from eval_rows import headline, row

    rows = [
        row("decoder", "decoder", "unguided", ref_perplexity=50.0, vader_negative=0.2),
        headline("n10", "negative", 0.5, vader=0.62, textblob=0.3, ref_ppl=26.0, dist_3=0.9),
        row("re", "re-control", "sentiment", "negative", ref_perplexity=80.0, vader_negative=0.55),
        row("both", "dglm+re-control", "sentiment", "negative", 10.0, ref_perplexity=24.0,
            vader_negative=0.65),
    ]  # fmt: skip
    keys = [(i, j) for i in range(50) for j in range(2)]
    base = {k: (-0.5 if n < 50 else 0.5) for n, k in enumerate(keys)}  # first 50 negative

    def flipped(good: range, bad: range) -> dict:
        out = dict(base)
        for n in good:  # negative here, not in the base
            out[keys[n]] = -0.9
        for n in bad:  # not negative here, negative in the base
            out[keys[n]] = 0.0  # within ±0.05: neutral
        return out

    name = "sentiment negative: DGLM + RE-Control above DGLM alone, perplexity no worse"
    scores = {"n10": base, "re": base, "both": flipped(range(50, 63), range(10))}
    assert paired_counts(scores["both"], base, "negative") == (100, 13, 10)
    c = by_target(target_checks(rows, {}, scores=scores))[name]
    assert c["met"] is False and c["margin"] < 0 and c["value"] == pytest.approx(0.03)
    assert "paired over 100: 13 only with both, 10 only DGLM alone, McNemar p = 0.68" in c["note"]
    scores["both"] = flipped(range(50, 63), range(1))
    c = by_target(target_checks(rows, {}, scores=scores))[name]
    assert c["met"] is True and "McNemar p = 0.0018" in c["note"]
    # positive: the sign of the compound flips what counts
    assert paired_counts({(0, 0): 0.3}, {(0, 0): -0.3}, "positive") == (1, 1, 0)


def test_combined_rows_at_other_scales_are_compared_with_dglm_at_the_same_scale():
    """Extra DGLM + RE-Control rows at other guidance scales do not stand in for the default one
    in the targets (nor do the α / β sweep rows); `combined_by_scale` pairs each combined row
    with DGLM alone at its own scale, with the paired test when the samples are given."""
    from dglm.engine.evaluation.targets import combined_by_scale
    from eval_rows import headline, row

    both = dict(method="dglm+re-control", group="sentiment", target="negative")
    rows = [
        row("decoder", "decoder", "unguided", ref_perplexity=50.0, vader_negative=0.2),
        headline("n10", "negative", 0.5, vader=0.62, textblob=0.3, ref_ppl=26.0, dist_3=0.9),
        row("n3", "dglm", "sentiment", "negative", 3.0, ref_perplexity=20.0, vader_negative=0.4),
        # listed first: the targets must not take it for the default-scale row
        row("both3", scale=3.0, ref_perplexity=19.0, vader_negative=0.55, **both),
        row("both10 α=64", scale=10.0, ref_perplexity=25.0, vader_negative=0.9, **both),
        row("both10", scale=10.0, ref_perplexity=24.0, vader_negative=0.60, **both),
    ]
    rows[4]["re_control_step_size"] = 64.0
    name = "sentiment negative: DGLM + RE-Control above DGLM alone, perplexity no worse"
    c = by_target(target_checks(rows, {}))[name]
    assert c["setting"] == "both10" and c["met"] is False and c["value"] == pytest.approx(-0.02)

    keys = [(i, 0) for i in range(200)]
    alone = {k: (-0.5 if i < 80 else 0.5) for i, k in enumerate(keys)}  # 40% negative
    comb = {k: (-0.5 if i < 110 else 0.5) for i, k in enumerate(keys)}  # 55%: 30 more
    scores = {"n3": alone, "both3": comb}
    by = combined_by_scale(rows, scores)
    assert [(e["target"], e["scale"], e["combined"], e["dglm"]) for e in by] == [
        ("negative", 3.0, "both3", "n3"),
        ("negative", 10.0, "both10", "n10"),
    ]
    e = by[0]
    assert e["difference"] == pytest.approx(0.15) and e["perplexity_key"] == "ref_perplexity"
    assert (e["dglm_perplexity"], e["combined_perplexity"]) == (20.0, 19.0)
    assert (e["pairs"], e["only_combined"], e["only_dglm"]) == (200, 30, 0)
    assert e["mcnemar_p"] == pytest.approx(2 / 2**30)
    assert "mcnemar_p" not in by[1]  # no samples for that pair
