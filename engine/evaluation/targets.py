"""The steering issue's targets, checked on `dglm eval`'s rows at the default guidance scale: each
met, missed (with its margin) or not evaluated."""

from __future__ import annotations

import math

import torch
from dglm.engine.evaluation.judges import VADER_THRESHOLD
from dglm.engine.evaluation.metrics import mcnemar_p, mean_and_se
from dglm.engine.evaluation.perplexity import GEMMA_NAME
from dglm.engine.evaluation.report import pct, rate_ci
from dglm.engine.evaluation.settings import DEFAULT_SCALE

# at the default scale, VADER ≥ 80% each way and the second judge ≥ 70%; reference LM perplexity
# of unguided DGLM ≤ 1.3× plain decoding, steered ≤ 1.5×; Dist-3 within 0.05 of unguided DGLM;
# success above FUDGE with the same probe at a lower latency per sample
TARGET_VADER_RATE = 0.80
TARGET_SECOND_JUDGE_RATE = 0.70
TARGET_PPL_RATIO_UNGUIDED = 1.3
TARGET_PPL_RATIO_STEERED = 1.5
TARGET_DIST3_DELTA = 0.05
# RE-Control (issue 14): alone, ≥ 25 points over plain decoding at perplexity ≤ 1.5× plain; with
# DGLM, above each alone at equal or better perplexity, the difference significant in a paired
# test on the same prefixes and seeds (when the samples' judgements are given)
TARGET_RE_CONTROL_GAIN = 0.25
PAIRED_ALPHA = 0.05

# per setting name: {(prefix index, sample number): VADER compound} (run_eval's `vader_by_sample`)
SampleScores = dict[str, dict[tuple[int, int], float]]


def paired_counts(
    a: dict[tuple[int, int], float], b: dict[tuple[int, int], float], target: str
) -> tuple[int, int, int]:
    """(pairs, A-only successes, B-only successes) over the samples both settings have: success
    = VADER compound beyond ±VADER_THRESHOLD toward `target`, as the VADER rates count it."""
    sign = 1.0 if target == "positive" else -1.0
    keys = sorted(a.keys() & b.keys())
    hit_a = [sign * a[k] > VADER_THRESHOLD for k in keys]
    hit_b = [sign * b[k] > VADER_THRESHOLD for k in keys]
    only_a = sum(x and not y for x, y in zip(hit_a, hit_b, strict=True))
    only_b = sum(y and not x for x, y in zip(hit_a, hit_b, strict=True))
    return len(keys), only_a, only_b


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
        f"{rate_ci(r['metrics'], key)}; unguided DGLM {rate_ci(ref['metrics'], key)}, "
        f"plain decoding {rate_ci(dec['metrics'], key)}"
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
    note_s = f"VADER {pct(m[key])} vs {f['setting']} {pct(fm[key])}"
    if blob in m and blob in fm:
        note_s += f"; TextBlob {pct(m[blob])} vs {pct(fm[blob])}"
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


def _re_control_checks(
    target: str,
    group: list[dict],
    dec: dict,
    steered: dict | None,
    ppl: tuple[str, str],
    default_scale: float,
    scores: SampleScores | None = None,
) -> list[dict]:
    """RE-Control's targets for one sentiment target (none when its rows were not run), the
    combined control's at DGLM's default scale and the value network's α and β. With
    `scores`, "above" also needs the paired difference to be significant (exact McNemar test on
    the same prefixes and sample numbers, p < PAIRED_ALPHA); the margin is then 0.05 − p when the
    difference is positive but not significant."""
    alone = next((r for r in group if r["method"] == "re-control"), None)
    both = next((r for r in group if _default_combined(r, default_scale)), None)
    checks: list[dict] = []
    key = "vader_" + target
    if alone is not None:
        gain = alone["metrics"][key] - dec["metrics"][key]
        checks += [
            _check(
                f"sentiment {target}: RE-Control VADER {target} ≥ plain decoding + "
                f"{TARGET_RE_CONTROL_GAIN:.0%}",
                alone["setting"],
                gain,
                TARGET_RE_CONTROL_GAIN,
                gain >= TARGET_RE_CONTROL_GAIN,
                gain - TARGET_RE_CONTROL_GAIN,
                f"{rate_ci(alone['metrics'], key)} vs plain decoding {rate_ci(dec['metrics'], key)}",
            ),
            _ppl_check(
                f"sentiment {target}: RE-Control {ppl[1]} ≤ {TARGET_PPL_RATIO_STEERED}× plain "
                "decoding",
                alone,
                dec,
                ppl[0],
                TARGET_PPL_RATIO_STEERED,
            ),
        ]
    if both is not None:
        for other, what in ((alone, "RE-Control alone"), (steered, "DGLM alone")):
            if other is None:
                continue
            diff = both["metrics"][key] - other["metrics"][key]
            p_both, p_other = both["metrics"][ppl[0]], other["metrics"][ppl[0]]
            met = diff > 0 and p_both <= p_other
            margin = diff if p_both <= p_other else min(diff, p_other - p_both)
            note = (
                f"VADER {pct(both['metrics'][key])} vs {pct(other['metrics'][key])}; "
                f"{ppl[1]} {p_both:.2f} vs {p_other:.2f}"
            )
            sa, sb = (scores or {}).get(both["setting"]), (scores or {}).get(other["setting"])
            if sa and sb:
                n, only_both, only_other = paired_counts(sa, sb, target)
                p = mcnemar_p(only_both, only_other)
                note += (
                    f"; paired over {n}: {only_both} only with both, {only_other} only "
                    f"{what.removesuffix(' alone')} alone, McNemar p = {p:.2g}"
                )
                if met and p >= PAIRED_ALPHA:
                    met, margin = False, PAIRED_ALPHA - p
            checks.append(
                _check(
                    f"sentiment {target}: DGLM + RE-Control above {what}, perplexity no worse",
                    both["setting"],
                    diff,
                    0.0,
                    met,
                    margin,
                    note,
                )
            )
    return checks


def _default_combined(r: dict, scale: float | None) -> bool:
    """Whether row r is DGLM + RE-Control at its defaults (the value network's α and β), with DGLM
    at guidance scale `scale` (None: any)."""
    if r["method"] != "dglm+re-control":
        return False
    if r.get("re_control_step_size") is not None or r.get("re_control_plausibility") is not None:
        return False
    return scale is None or r["scale"] == scale


def combined_by_scale(rows: list[dict], scores: SampleScores | None = None) -> list[dict]:
    """DGLM + RE-Control (defaults) beside DGLM alone at the same guidance scale, for every
    sentiment target and scale where both ran: each one's VADER rate and reference perplexity,
    their difference and, with `scores`, the paired discordant counts and the exact McNemar p.
    Not a target: it shows where the second control adds to the first (below DGLM's own
    ceiling) and where it does not."""
    out = []
    for target in ("positive", "negative"):
        group = [r for r in rows if r["group"] == "sentiment" and r["target"] == target]
        alone = {r["scale"]: r for r in group if r["method"] == "dglm"}
        both = sorted(
            (r for r in group if _default_combined(r, None) and r["scale"] in alone),
            key=lambda r: r["scale"],
        )
        key = "vader_" + target
        for r in both:
            a = alone[r["scale"]]
            ppl, _ = perplexity_key([a, r])
            entry = {
                "target": target,
                "scale": r["scale"],
                "dglm": a["setting"],
                "combined": r["setting"],
                "n": r["n"],
                "dglm_rate": a["metrics"][key],
                "combined_rate": r["metrics"][key],
                "difference": r["metrics"][key] - a["metrics"][key],
                "perplexity_key": ppl,
                "dglm_perplexity": a["metrics"][ppl],
                "combined_perplexity": r["metrics"][ppl],
            }
            sa, sb = (scores or {}).get(r["setting"]), (scores or {}).get(a["setting"])
            if sa and sb:
                n, only_both, only_dglm = paired_counts(sa, sb, target)
                entry.update(
                    pairs=n, only_combined=only_both, only_dglm=only_dglm,
                    mcnemar_p=mcnemar_p(only_both, only_dglm),
                )  # fmt: skip
            out.append(entry)
    return out


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
    scores: SampleScores | None = None,
) -> list[dict]:
    """The issue's targets, each met, missed (with its margin: positive = met by that much) or not
    evaluated (met None), judged at the default guidance scale:

    - unguided DGLM perplexity ≤ 1.3× plain decoding's, under Gemma-3-270M (under SmolLM2 when
      Gemma was not run, which the target's name then says);
    - per sentiment target, DGLM at the default scale: VADER rate ≥ 80%, TextBlob rate ≥ 70%,
      perplexity ≤ 1.5× plain decoding's, Dist-3 within 0.05 of unguided DGLM, VADER rate above
      the best FUDGE row with the same probe and target, at a lower latency per sample; the notes
      give the unguided DGLM and plain-decoding base rates with 95% intervals;
    - RE-Control, when its rows ran: alone, VADER rate ≥ plain decoding's + 25 points at
      perplexity ≤ 1.5× plain decoding's; with DGLM, above each alone at no worse perplexity
      (and, with `scores`, significantly so in a paired exact McNemar test, p < 0.05);
    - proposal fidelity: the paired mean difference cos(α² = 0.95) − cos(α² = 0) over the same
      prefixes and seeds, met when it exceeds twice its standard error (margin = difference − 2·se).
    """
    by_name = {r["setting"]: r for r in rows}
    dec, ref = by_name.get("decoder"), by_name.get("dglm unguided")
    checks: list[dict] = []
    if dec is not None and ref is None:  # RE-Control's checks need plain decoding only
        for target in ("positive", "negative"):
            group = [r for r in rows if r["group"] == "sentiment" and r["target"] == target]
            steered = next(
                (r for r in group if r["method"] == "dglm" and r["scale"] == default_scale), None
            )
            rc = [r for r in group if r["method"] in ("re-control", "dglm+re-control")]
            if rc:
                rc_ppl = perplexity_key([dec, *rc, *([steered] if steered else [])])
                checks += _re_control_checks(
                    target, group, dec, steered, rc_ppl, default_scale, scores
                )
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
            rc = [r for r in group if r["method"] in ("re-control", "dglm+re-control")]
            rc_ppl = perplexity_key([dec, *rc, *([steered] if steered else [])])
            rc_checks = _re_control_checks(
                target, group, dec, steered, rc_ppl, default_scale, scores
            )
            if steered is None:
                steered = f"dglm sentiment={target}:{default_scale:g} (not run)"
            checks += _sentiment_checks(target, steered, dec, ref, fudges, ppl) + rc_checks
    return checks + _fidelity_check(fidelity_cos)
