"""The suite's loop: every method on the same prompts and seeds, interleaved within each repeat.

For each batch B: one untimed warm-up call per method (at its shortest length); then for each
length L, `repeats` rounds in which every method runs once (the order rotated per round, so a
drift in the machine's load reaches every method alike), each call timed end to end with the
device synchronised and its peak memory measured. After a (B, L) cell its continuations are
judged (control success, perplexity) and one row per method is made.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict

import torch
from dglm.engine.evaluation.provenance import load_average
from dglm.engine.evaluation.settings import low_toxicity_target
from dglm.engine.probes import Control

from benchmarks import common
from benchmarks.suite.config import PROMPTS, SENTIMENT_TARGET, SuiteConfig
from benchmarks.suite.measure import PeakMemory, summarize, timed
from benchmarks.suite.methods import Method, build_methods, describe, method_label, sampler_info
from benchmarks.suite.quality import Judge, Judged, aggregate
from benchmarks.suite.report import target_checks

SAMPLES_PER_ROW = 4  # continuations kept per row in <name>_samples.jsonl
WARMUP_REPEAT = 999  # the warm-up call's repeat index (its own prompts and seeds)


def schedule(config: SuiteConfig, batch: int, repeat: int) -> tuple[list[str], list[int]]:
    """(prompts, seeds) of one call: the same for every method."""
    prompts = [PROMPTS[(repeat * batch + b) % len(PROMPTS)] for b in range(batch)]
    seeds = [config.seed + 1000 * repeat + b for b in range(batch)]
    return prompts, seeds


def run_suite(
    config: SuiteConfig,
    methods: list[Method],
    judge: Judge,
    device: torch.device,
    judge_controls: tuple,
    progress: Callable[[str], None] | None = None,
) -> tuple[list[dict], list[dict]]:
    """→ (rows, samples). A row per (method, batch, length): measured, or {"skipped": reason}.

    judge_controls: what uncontrolled methods are judged against (their base rate).
    """
    say = progress or (lambda _msg: None)
    meter = PeakMemory(device)
    t_start = time.perf_counter()
    rows: list[dict] = []
    samples: list[dict] = []
    for batch in config.batches:
        repeats = config.repeats_for(batch)
        runnable = {
            m.name: [L for L in config.lengths if config.skip_reason(m.name, batch, L) is None]
            for m in methods
        }
        if config.warmup:
            prompts, seeds = schedule(config, batch, WARMUP_REPEAT)
            for m in methods:
                if runnable[m.name]:
                    t = time.perf_counter()
                    m.run(prompts, min(runnable[m.name]), seeds)
                    say(f"warm-up B={batch} {m.name}: {time.perf_counter() - t:.1f} s")
        for length in config.lengths:
            active = [m for m in methods if length in runnable[m.name]]
            for m in methods:
                if m not in active:
                    reason = config.skip_reason(m.name, batch, length)
                    rows.append(_skipped_row(m, batch, length, reason))
            cells: dict[str, dict] = {
                m.name: {"ms": [], "stages": [], "tokens": [], "peak": [], "growth": [], "runs": []}
                for m in active
            }
            for r in range(repeats):
                prompts, seeds = schedule(config, batch, r)
                k = r % max(len(active), 1)
                for m in active[k:] + active[:k]:
                    run, seconds, peak, growth = timed(
                        lambda m=m, p=prompts, n=length, s=seeds: m.run(p, n, s), device, meter
                    )
                    cell = cells[m.name]
                    cell["ms"].append(seconds * 1e3)
                    cell["stages"].append(run.stages)
                    cell["tokens"].append(sum(len(t) for t in run.token_ids))
                    cell["peak"].append(peak)
                    cell["growth"].append(growth)
                    cell["runs"].append((r, prompts, run))
            base = cells.get("engine")
            for m in active:
                cell = cells[m.name]
                judged = _judge(judge, m, cell["runs"], judge_controls)
                row = _row(config, m, batch, length, cell, judged, meter.method)
                if base is not None and m.family == "engine" and m.controls:
                    row["same_tokens_as_uncontrolled"] = same_tokens_share(
                        cell["runs"], base["runs"]
                    )
                rows.append(row)
                samples += _samples(m, batch, length, cell["runs"], judged)
                q = row["quality"]
                rate = q["success_rate"]
                say(
                    f"[{time.perf_counter() - t_start:6.0f} s] B={batch:<3} L={length:<4} "
                    f"{m.name:<15} p50 {row['latency_ms']['p50']:9.1f} ms  "
                    f"{row['tokens_per_s']:7.1f} tok/s  success "
                    + ("—" if rate is None else f"{rate:.2f}")
                    + f" (n={q['n']})  load {load_average()}"
                )
    return rows, samples


def same_tokens_share(runs: list, base_runs: list) -> float:
    """Share of rows whose tokens equal the uncontrolled engine's (same prompts and seeds)."""
    same = [
        a == b
        for (_, _, run), (_, _, base) in zip(runs, base_runs, strict=True)
        for a, b in zip(run.token_ids, base.token_ids, strict=True)
    ]
    return sum(same) / len(same)


def _judge(judge: Judge, m: Method, runs: list, default_controls: tuple) -> Judged:
    prefix, toks, texts = [], [], []
    for _, _, run in runs:
        prefix += run.prefix_ids
        toks += run.token_ids
        texts += run.texts
    return judge.judge(prefix, toks, texts, m.controls or default_controls)


def _cell(m: Method, batch: int, length: int) -> dict:
    """What names a row: the method and the (batch, length) cell."""
    return {
        "method": m.name,
        "family": m.family,
        "controls": method_label(m),
        "batch": batch,
        "length": length,
    }


def _skipped_row(m: Method, batch: int, length: int, reason: str | None) -> dict:
    return {**_cell(m, batch, length), "skipped": reason or "skipped"}


def _row(
    config: SuiteConfig, m: Method, batch: int, length: int, cell: dict, judged: Judged,
    memory_method: str,
) -> dict:  # fmt: skip
    ms = cell["ms"]
    tps = [tok / (t / 1e3) for tok, t in zip(cell["tokens"], ms, strict=True)]
    keys = list(dict.fromkeys(k for s in cell["stages"] for k in s))
    stages = {k: statistics.median(s.get(k, 0.0) for s in cell["stages"]) * 1e3 for k in keys}
    rows_total = batch * len(ms)
    toks_per_row = [len(t) for _, _, run in cell["runs"] for t in run.token_ids]
    peaks = [p for p in cell["peak"] if p is not None]
    growths = [g for g in cell["growth"] if g is not None]
    return {
        **_cell(m, batch, length),
        "repeats": len(ms),
        "latency_ms": summarize(ms),
        "tokens_per_s": statistics.median(tps),
        "tokens_per_row": sum(toks_per_row) / rows_total,
        "full_length_frac": sum(n == length for n in toks_per_row) / rows_total,
        "stages_ms": stages,
        "peak_mem_mib": max(peaks) if peaks else None,
        "peak_mem_delta_mib": max(growths) if growths else None,
        "memory_method": memory_method,
        "quality": aggregate(judged),
        "info": m.info,
        "load_avg": load_average(),
    }


def _samples(m: Method, batch: int, length: int, runs: list, judged: Judged) -> list[dict]:
    out = []
    i = 0
    for r, prompts, run in runs:
        for b, text in enumerate(run.texts):
            if len(out) < SAMPLES_PER_ROW:
                out.append({
                    "method": m.name, "batch": batch, "length": length, "repeat": r,
                    "prompt": prompts[b], "continuation": text, "success": judged.success[i],
                })  # fmt: skip
            i += 1
    return out


def environment(engine, device: torch.device, load_start: float | None) -> dict:
    """The provenance capture (commit, machine, versions), the load average over the run, and the
    engine's models."""
    return {
        **common.environment(device),
        "load_avg": {"start": load_start, "end": load_average()},
        "encoder": engine.config.encoder,
        "decoder": engine.config.decoder,
    }


def run(
    config: SuiteConfig,
    engine,
    reference_engine,
    hf,
    hf_reference,
    device: torch.device,
    bundle: str = "default",
    progress: Callable[[str], None] | None = None,
    notes: tuple[str, ...] = (),
) -> tuple[dict, list[dict]]:
    """Build the methods, run the suite, check the targets → (report, samples)."""
    t0, load_start = time.perf_counter(), load_average()
    methods, left_out = build_methods(config, engine, reference_engine, hf, hf_reference)
    probes = engine.probes.probes
    low = low_toxicity_target(probes["toxicity"]) if "toxicity" in probes else None
    judge = Judge(reference_engine.decoder, engine.encoder, probes, low)
    base_rate = (Control(*SENTIMENT_TARGET, config.control_scale or engine.config.control_scale),)
    rows, samples = run_suite(config, methods, judge, device, base_rate, progress)
    env = environment(engine, device, load_start)
    rows = common.stamp(rows, env, device)
    s = sampler_info(engine.config.sampler)
    all_notes = [
        f"bundle {bundle!r} ({'trained' if engine.config.trained else 'UNTRAINED'}); the engine "
        f"runs its default sampler: {s.get('sampler')} × {s.get('num_inference_steps')} steps, "
        f"{s.get('guidance_mode')} guidance (full settings in each row's info)",
        *notes,
        *left_out,
    ]
    if judge.missing:
        all_notes.append(f"evaluators missing (their judgement left out): {sorted(judge.missing)}")
    report = {
        "bench": "suite",
        "suite": config.suite,
        "device": common.device_name(device),
        "bundle": bundle,
        "config": asdict(config),
        "environment": env,
        "memory_method": PeakMemory(device).method,
        "methods": {m.name: describe(m) for m in methods},
        "notes": all_notes,
        "rows": rows,
        "targets": target_checks(rows),
        "wall_s": time.perf_counter() - t0,
    }
    return report, samples
