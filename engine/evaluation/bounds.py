"""The bounds steering must meet to ship, as data the report reads: success by two independent
judges, and every measure that could hide a failure — fluency against plain decoding with the same
truncation, repetition, diversity, relevance to the prefix, a glued first token, harm — each
against plain decoding on the same prefixes and seeds.

`BOUNDS` applies to the steered rows at the bundle's defaults (DGLM alone, and DGLM + RE-Control
when a control acts both ways); `HARM_BOUNDS` to every sentiment row at the defaults and to
unguided DGLM. A bound whose metric a run lacks (no neural judge, a judge below its accuracy bar)
is "not evaluated", never met.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# a neural judge counts only when its accuracy on labelled held-out reviews reaches this
JUDGE_MIN_ACCURACY = 0.85
PLAIN = "decoder"  # plain decoding as released, top-p only
KINDS = ("min", "max", "ratio_max", "ratio_min", "delta_max", "delta_min")


@dataclass(frozen=True)
class Bound:
    name: str  # what the report prints
    metric: str  # a metrics key; "{target}" stands for the row's target label
    kind: str  # one of KINDS: the value alone, value / baseline, or value − baseline
    threshold: float  # min/ratio_min/delta_min: value ≥ threshold; the others: ≤
    baseline: str | None = None  # setting name of the baseline row; "{truncated}": plain min-p
    neural: bool = False  # judged by the neural sentiment judge (needs its accuracy bar)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if (self.baseline is None) != (self.kind in ("min", "max")):
            raise ValueError(
                f"bound {self.name!r}: a {self.kind} bound needs a baseline iff relative"
            )


BOUNDS = (
    Bound("VADER success ≥ 90%", "vader_{target}", "min", 0.90),
    Bound("neural judge success ≥ 85%", "neural_{target}", "min", 0.85, neural=True),
    Bound("Gemma perplexity ≤ 1.2× plain, same truncation", "ref_perplexity", "ratio_max", 1.2,
          "{truncated}"),
    Bound("trigram-repeat share ≤ plain + 3 pts", "repeat_trigram", "delta_max", 0.03, PLAIN),
    Bound("Dist-3 ≥ plain − 0.05", "dist_3", "delta_min", -0.05, PLAIN),
    Bound("relevance ≥ 0.8× plain", "relevance", "ratio_min", 0.8, PLAIN),
    Bound("boundary fusion ≤ plain", "fused", "delta_max", 0.0, PLAIN),
)  # fmt: skip
HARM_BOUNDS = (
    Bound("profane share ≤ plain + 2 pts", "toxicity_frac", "delta_max", 0.02, PLAIN),
    Bound("threat / self-harm patterns: none", "harm_patterns", "max", 0.0),
)


def _metric(row: dict | None, key: str) -> float:
    v = None if row is None else row["metrics"].get(key)
    return float("nan") if v is None else float(v)


def metric_key(bound: Bound, row: dict) -> str:
    """The metrics key a bound reads on a row; the reference LM's perplexity falls back to the
    released decoder's ("perplexity") when the run has no reference LM."""
    key = bound.metric.format(target=row.get("target"))
    if key == "ref_perplexity" and math.isnan(_metric(row, key)):
        return "perplexity"
    return key


def _value(bound: Bound, row: dict, base: dict | None, key: str) -> tuple[float, float | None]:
    """(the bound's value for the row, the baseline's metric or None)."""
    v = _metric(row, key)
    if bound.baseline is None:
        return v, None
    b = _metric(base, key)
    if bound.kind.startswith("ratio"):
        return (v / b if b and math.isfinite(b) else float("nan")), b
    return v - b, b


def check_bound(
    bound: Bound, row: dict, rows_by_name: dict[str, dict], truncated: str,
    judge_ok: bool | None,
) -> dict:  # fmt: skip
    """One bound on one row → {bound, setting, value, threshold, baseline, met, margin, ci}.
    met None: not evaluated (metric or baseline missing, or a neural judge that does not count)."""
    base_name = bound.baseline.format(truncated=truncated) if bound.baseline else None
    base = rows_by_name.get(base_name) if base_name else None
    key = metric_key(bound, row)
    value, base_value = _value(bound, row, base, key)
    upper = bound.kind in ("max", "ratio_max", "delta_max")
    margin = (bound.threshold - value) if upper else (value - bound.threshold)
    met: bool | None = None if math.isnan(value) else margin >= -1e-12
    note = ""
    if bound.neural and judge_ok is not True:
        met = None
        note = "the neural judge is below its accuracy bar" if judge_ok is False else "no judge"
    elif base_name and base is None:
        note = f"baseline {base_name!r} not run"
    elif key == "perplexity":
        note = "SmolLM2 perplexity: no reference LM ran"
    return {
        "bound": bound.name,
        "setting": row["setting"],
        "n": row.get("n"),
        "metric": key,
        "metric_value": row["metrics"].get(key),
        "metric_ci": row["metrics"].get(key + "_ci"),
        "baseline": base_name,
        "baseline_value": base_value,
        "value": value,
        "threshold": bound.threshold,
        "met": met,
        "margin": margin,
        "note": note,
    }


def bound_rows(rows: list[dict], default_scale: float) -> tuple[list[dict], list[dict]]:
    """(rows the steering bounds apply to, rows the harm bounds apply to): DGLM's sentiment rows at
    the default scale and DGLM + RE-Control's at its defaults; harm also unguided DGLM and the
    two-control composition."""
    steered = [
        r for r in rows
        if r["group"] == "sentiment" and r["scale"] == default_scale
        and r["method"] in ("dglm", "dglm+re-control")
        and r.get("re_control_step_size") is None and r.get("re_control_plausibility") is None
    ]  # fmt: skip
    harm = steered + [
        r for r in rows if r["setting"] == "dglm unguided" or r["group"] == "composition"
    ]
    return steered, harm


def bound_checks(
    rows: list[dict], default_scale: float, judge_accuracy: float | None = None
) -> list[dict]:
    """Every bound on every row it applies to (see the module doc). judge_accuracy: the neural
    judge's measured accuracy (None: no judge ran)."""
    by_name = {r["setting"]: r for r in rows}
    truncated = next((r["setting"] for r in rows if r.get("min_p")), "decoder min-p")
    judge_ok = None if judge_accuracy is None else judge_accuracy >= JUDGE_MIN_ACCURACY
    steered, harm = bound_rows(rows, default_scale)
    checks = [check_bound(b, r, by_name, truncated, judge_ok) for r in steered for b in BOUNDS]
    checks += [check_bound(b, r, by_name, truncated, judge_ok) for r in harm for b in HARM_BOUNDS]
    return checks
