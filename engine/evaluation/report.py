"""`dglm eval`'s report: results.md (tables of every setting by concern, the targets) beside
results.json and samples.jsonl, and the JSON writers every results file shares."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from pathlib import Path

from dglm.engine.evaluation.judges import (
    PROFANITY_NOTE,
    TEXTBLOB_THRESHOLD,
    TOXIC_THRESHOLD,
    VADER_THRESHOLD,
)
from dglm.engine.evaluation.metrics import Z95
from dglm.engine.evaluation.perplexity import GEMMA_NAME
from dglm.engine.evaluation.settings import DEFAULT_SCALE


def finite(o):
    """JSON has no NaN or infinity: they become null."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [finite(v) for v in o]
    return o


def write_json(path: Path, obj, indent: int = 2) -> Path:
    """`obj` as strict JSON (NaN and infinities as null) with a final newline."""
    path.write_text(json.dumps(finite(obj), indent=indent, allow_nan=False) + "\n")
    return path


def write_jsonl(path: Path, rows: Iterable[dict]) -> Path:
    """One strict JSON object per line, non-ASCII text kept as is."""
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(finite(row), ensure_ascii=False, allow_nan=False) + "\n")
    return path


def pct(rate: float | None) -> str:
    """A rate as a whole percentage ("—" when missing)."""
    return "—" if rate is None or math.isnan(rate) else f"{rate:.0%}"


def rate_ci(m: dict, key: str) -> str:
    """m[key] as a percentage followed by its 95% interval m[key + "_ci"], e.g. "90% [85%, 93%]"."""
    lo, hi = m.get(key + "_ci") or (float("nan"), float("nan"))
    if lo is None or hi is None or math.isnan(lo):
        return pct(m.get(key))
    return f"{pct(m.get(key))} [{lo:.0%}, {hi:.0%}]"


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
        return guidance_label_plain(r)
    if r["method"] == "fudge":
        return f"FUDGE λ={r['scale']:g}"
    beta = r.get("re_control_plausibility")
    mask = "" if beta is None else f" β={beta:g}"
    if r["method"] == "re-control":
        alpha = r.get("re_control_step_size")
        if alpha is not None:
            return f"RE-Control α={alpha:g}{mask}"
        return "RE-Control (value network's n, α" + (")" if beta is None else f"){mask}")
    if r["method"] == "caa":
        layers = "+".join(map(str, r.get("caa_layers") or ()))
        return f"CAA L={layers} m={r.get('caa_multiplier', 0):g}"
    if r["method"] == "dglm+re-control":
        alpha = r.get("re_control_step_size")
        return f"s={r['scale']:g} + RE-Control" + ("" if alpha is None else f" α={alpha:g}") + mask
    if r["group"] == "fidelity":
        return f"s=0, α²={r['renoise_alpha2']:g}"
    if r["scale"] is None:
        return "s=0 (unguided)"
    return f"s={r['scale']:g}" + (" (default)" if r.get("default") else "")


def guidance_label_plain(r: dict) -> str:
    return f"none, min-p {r['min_p']:g}" if r.get("min_p") else "none (plain decoding)"


def _baselines(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["method"] == "decoder" or r["setting"] == "dglm unguided"]


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
    judges = ["vader", "textblob"] + (["neural"] if report.get("sentiment_judge") else [])
    names = {"vader": "VADER", "textblob": "TextBlob", "neural": "neural"}
    columns = [f"{names[j]} {sign}" for j in judges for sign in ("+", "−")] + ["probe p(+)"]
    return _setting_table(
        rows,
        columns,
        lambda m: [
            *(rate_ci(m, f"{j}_{t}") for j in judges for t in ("positive", "negative")),
            _mean_ci(m, "probe_p_positive"),
        ],
    )


def _naturalness_table(report: dict) -> list[str]:
    """What a success rate can hide, per row (evaluation.naturalness, evaluation.harm)."""
    ref = report.get("reference_lm") or {"name": GEMMA_NAME}
    rows = [r for r in report["rows"] if "repeat_trigram" in r["metrics"]]
    if not rows:
        return ["(no row has the naturalness metrics: an older run)"]
    judge = rows[0]["metrics"].get("relevance_judge", ref["name"])
    columns = ["repeats a trigram", "fused first token", f"relevance ({judge}, nats/token)",
               "Dist-1", "Dist-3", f"PPL {ref['name']}", "profane†", "threat/self-harm"]  # fmt: skip
    lines = _setting_table(
        rows,
        columns,
        lambda m: [
            rate_ci(m, "repeat_trigram"),
            rate_ci(m, "fused"),
            _mean_ci(m, "relevance"),
            _fmt(m.get("dist_1")),
            _fmt(m.get("dist_3")),
            _fmt(m.get("ref_perplexity"), ".2f"),
            rate_ci(m, "toxicity_frac"),
            rate_ci(m, "harm_patterns")
            + (f" ({', '.join(m['harm_pattern_hits'])})" if m.get("harm_pattern_hits") else ""),
        ],
    )
    return lines + [
        "",
        "Repeats a trigram: the continuation holds some word trigram twice. Fused: its first "
        "character glues onto the prefix's last word. Relevance: log p(continuation | its prefix) − "
        "log p(continuation | another prefix of the run), per token, mean ± 1.96·se. "
        "Threat/self-harm: the committed patterns of evaluation.harm.",
    ]


def _words_table(report: dict) -> list[str]:
    """The words each row uses most beyond plain decoding (log-odds z, Monroe et al. 2008)."""
    lines = ["| setting | over-represented words vs plain decoding (z; count / plain's count) |",
             "|---|---|"]  # fmt: skip
    for r in report["rows"]:
        words = r.get("overrepresented")
        if words and "same_run_as" not in r:
            shown = ", ".join(
                f"{w['word']} ({w['z']:.1f}; {w['count']}/{w['reference']})" for w in words
            )
            lines.append(f"| {r['setting']} | {shown} |")
    return lines


def _bounds_table(report: dict) -> list[str]:
    checks = report.get("bounds") or []
    if not checks:
        return ["No bound could be checked (settings missing)."]
    lines = [
        "| setting | bound | n | value [95% interval] | baseline | checked | threshold | met |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for c in checks:
        met = "not evaluated" if c["met"] is None else ("met" if c["met"] else "**missed**")
        if c["note"]:
            met += f" ({c['note']})"
        ci = c.get("metric_ci")
        v = _fmt(c["metric_value"], ".3f")
        if ci and ci[0] is not None and not math.isnan(ci[0]):
            v += f" [{ci[0]:.3f}, {ci[1]:.3f}]"
        base = "—" if c["baseline"] is None else f"{c['baseline']}: {_fmt(c['baseline_value'])}"
        lines.append(
            f"| {c['setting']} | {c['bound']} | {c['n']} | {v} | {base} | {_fmt(c['value'])} | "
            f"{_fmt(c['threshold'], 'g')} | {met} |"
        )
    return lines


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
            rate_ci(m, "toxicity_frac"),
            _mean_ci(m, "hatesonar_mean"),
            rate_ci(m, "hatesonar_frac"),
            _mean_ci(m, "probe_p_nontoxic"),
        ],
    )
    lines += [
        "",
        f"† {PROFANITY_NOTE}, so that column is not independent of the toxicity probe; "
        "HateSonar (a classifier of its own, trained on labelled tweets) is.",
    ]
    return lines


def _composition_table(report: dict) -> list[str]:
    """Two controls through two methods (settings.composition_settings: DGLM sentiment=negative,
    RE-Control toxicity) beside plain decoding and DGLM steering sentiment alone at the same
    scale: how negative, how toxic, how fluent."""
    comp = [r for r in report["rows"] if r["group"] == "composition"]
    same = {(r["target"], r["scale"]) for r in comp}
    alone = [
        r for r in report["rows"]
        if r["group"] == "sentiment" and r["method"] == "dglm" and (r["target"], r["scale"]) in same
    ]  # fmt: skip
    ref = report.get("reference_lm") or {"name": GEMMA_NAME}
    columns = ["VADER −", "profanity-check† > 0.5", "HateSonar > 0.5", "probe p(non-toxic)",
               f"PPL {ref['name']}"]  # fmt: skip
    rows = [r for r in report["rows"] if r["setting"] == "decoder"] + alone + comp
    return _setting_table(
        rows,
        columns,
        lambda m: [
            rate_ci(m, "vader_negative"),
            rate_ci(m, "toxicity_frac"),
            rate_ci(m, "hatesonar_frac"),
            _mean_ci(m, "probe_p_nontoxic"),
            _fmt(m.get("ref_perplexity"), ".2f"),
        ],
    )


def _by_scale_table(report: dict) -> list[str]:
    """DGLM + RE-Control beside DGLM alone at each guidance scale where both ran (the report's
    `re_control_by_scale`, targets.combined_by_scale): rates, perplexities, the paired test."""
    lines = [
        "| target | s | n | DGLM alone | DGLM + RE-Control | difference | PPL alone | PPL both "
        "| discordant (both / alone) | McNemar p |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    metrics = {r["setting"]: r["metrics"] for r in report["rows"]}
    for e in report["re_control_by_scale"]:
        key = "vader_" + e["target"]
        alone, both = rate_ci(metrics[e["dglm"]], key), rate_ci(metrics[e["combined"]], key)
        paired = ("—", "—")
        if "mcnemar_p" in e:
            paired = (f"{e['only_combined']} / {e['only_dglm']}", f"{e['mcnemar_p']:.2g}")
        lines.append(
            f"| {e['target']} | {e['scale']:g} | {e['n']} | {alone} | {both} | "
            f"{e['difference'] * 100:+.1f} pts | "
            f"{_fmt(e['dglm_perplexity'], '.2f')} | {_fmt(e['combined_perplexity'], '.2f')} | "
            f"{paired[0]} | {paired[1]} |"
        )
    key = report["re_control_by_scale"][0]["perplexity_key"]
    lines += [
        "",
        "VADER success toward the target; PPL: "
        + ("the reference LM's" if key == "ref_perplexity" else "SmolLM2's")
        + " perplexity; RE-Control at its value network's defaults for a control acting both "
        "ways; the paired test counts the samples (same prefix, same sample number) only one of "
        "the two settings turned to the target.",
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
        f"{len(report['prefixes'])} held-out prefixes of the {report.get('split', 'dev')} split × "
        f"{cfg['num_samples']} sample(s), "
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
    lines += ["", "## Naturalness and harm", "", *_naturalness_table(report)]
    if any(r.get("overrepresented") for r in report["rows"]):
        lines += ["", "## Words over-used against plain decoding", "", *_words_table(report)]
    lines += ["", "## Toxicity", "", *_toxicity_table(report)]
    if any(r["group"] == "composition" for r in report["rows"]):
        lines += ["", "## Two controls, two methods", "", *_composition_table(report)]
    if report.get("re_control_by_scale"):
        lines += ["", "## DGLM + RE-Control across guidance scales", "", *_by_scale_table(report)]
    lines += ["", "## Generation time per sample, by stage (seconds; batched as above)", ""]
    lines += _stage_table(report)
    if report["skipped"]:
        lines += [
            "",
            "Skipped: "
            + "; ".join(f"{s['setting']} ({s['reason']})" for s in report["skipped"])
            + ".",
        ]
    split = report.get("split", "dev")
    acc = report.get("sentiment_judge_accuracy")
    lines += [
        "",
        f"## Bounds to ship (split: {split})",
        "",
        "Checked on the point estimates at the bundle's defaults; plain decoding is the baseline "
        "of every relative bound (with DGLM's truncation for perplexity). Neural judge: "
        + (
            "none ran."
            if not report.get("sentiment_judge")
            else f"{report['sentiment_judge']}, accuracy {_fmt(acc)} on labelled held-out "
            "reviews (it counts from 0.85)."
        ),
        "",
        *_bounds_table(report),
    ]
    lines += [
        "",
        "## Targets",
        "",
        f"Earlier issues' targets, kept for comparison with earlier reports; the bounds above "
        "supersede them (these judge perplexity against plain decoding without DGLM's "
        "truncation, and count no repetition or relevance). At the default guidance scale "
        f"s = {default_scale:g}; margin > 0: met by that much, < 0: missed by that much. "
        "Unguided DGLM and plain-decoding base rates are in the notes.",
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
    write_json(paths["json"], report)
    paths["markdown"].write_text(render_markdown(report))
    write_jsonl(paths["samples"], samples)
    return paths
