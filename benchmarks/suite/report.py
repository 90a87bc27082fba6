"""The suite's report: the issue's target checks, one markdown table, two plots, the JSON."""

from __future__ import annotations

import math
from pathlib import Path

from dglm.engine.evaluation.report import write_jsonl

from benchmarks.common import header, write_results
from benchmarks.suite.config import METHODS

RATIO_CONTROLLED = 1.15  # controlled ≤ 1.15× the engine's own uncontrolled latency
SPEEDUP_REFERENCE = 10.0  # ≥ 10× faster than reference-style DGLM
TARGET_LENGTH, TARGET_BATCH = 32, 1
STAGE_ORDER = ("encode", "diffusion", "prompt_generator", "prefill", "decode", "rerank")
STAGE_SHORT = {"prompt_generator": "pg"}


# ------------------------------------------------------------------ targets
def target_check(
    target: str, where: str, value: float | None, threshold: str, met, note: str = ""
) -> dict:
    """One target row of a results table: met is True / False, or None when not measured."""
    return {
        "target": target,
        "where": where,
        "value": value,
        "threshold": threshold,
        "met": met,  # True | False | None (not measured)
        "note": note,
    }


def _p50(rows: list[dict]) -> dict[tuple[str, int, int], float]:
    return {
        (r["method"], r["batch"], r["length"]): r["latency_ms"]["p50"]
        for r in rows
        if "latency_ms" in r
    }


def _pooled_success(rows: list[dict], method: str, cells: set[tuple[int, int]]) -> tuple:
    """(successes, judged) of `method` over the (batch, length) cells."""
    k = n = 0
    for r in rows:
        if r["method"] == method and (r["batch"], r["length"]) in cells and "quality" in r:
            q = r["quality"]
            if q.get("success_k") is not None:
                k += q["success_k"]
                n += q["success_n"]
    return k, n


def _same_note(rows: list[dict], method: str, batch: int, length: int) -> str:
    for r in rows:
        if (r["method"], r["batch"], r["length"]) == (method, batch, length):
            if r.get("same_tokens_as_uncontrolled") is not None:
                return f"; tokens identical to uncontrolled in {r['same_tokens_as_uncontrolled']:.0%} of rows"
    return ""


def target_checks(rows: list[dict]) -> list[dict]:
    """The issue's targets from the rows, each met / missed / not measured (met None).

    1. engine_1probe ≤ 1.15× engine (p50) at L=32, B=1; the same for engine_2probes (extra).
    2. engine_1probe faster than hf_generate (no control) at L=32, B=1; and, when llama_cpp ran,
       at least as fast as it (its tokens/s, uncontrolled).
    3. engine_1probe ≥ 10× faster than reference_dglm, per (length, batch) both ran.
    4. engine_1probe faster than fudge, per (length, batch) both ran.
    5. engine_1probe's control success (VADER) ≥ each baseline's, pooled over the cells both ran
       (same prompts and seeds).
    """
    p50 = _p50(rows)
    checks = []
    where = f"L={TARGET_LENGTH}, B={TARGET_BATCH}"
    base = p50.get(("engine", TARGET_BATCH, TARGET_LENGTH))
    for method, extra in (("engine_1probe", ""), ("engine_2probes", " (extra)")):
        c = p50.get((method, TARGET_BATCH, TARGET_LENGTH))
        ratio = c / base if c is not None and base else None
        checks.append(
            target_check(
                f"{method} ≤ {RATIO_CONTROLLED}× engine uncontrolled{extra}",
                where,
                ratio,
                f"≤ {RATIO_CONTROLLED}",
                None if ratio is None else ratio <= RATIO_CONTROLLED,
                ""
                if ratio is None
                else f"p50 {c:.0f} ms vs {base:.0f} ms"
                + _same_note(rows, method, TARGET_BATCH, TARGET_LENGTH),
            )
        )
    c = p50.get(("engine_1probe", TARGET_BATCH, TARGET_LENGTH))
    hf = p50.get(("hf_generate", TARGET_BATCH, TARGET_LENGTH))
    speed = hf / c if c and hf is not None else None
    checks.append(
        target_check(
            "engine_1probe faster than hf_generate (no control)",
            where,
            speed,
            "> 1 (speedup)",
            None if speed is None else speed > 1,
            "" if speed is None else f"p50 {c:.0f} ms vs {hf:.0f} ms",
        )
    )
    llama = p50.get(("llama_cpp", TARGET_BATCH, TARGET_LENGTH))
    if llama is not None:  # the CPU decode issue's target: controlled ≥ llama.cpp uncontrolled
        speed = llama / c if c else None
        checks.append(
            target_check(
                "engine_1probe tokens/s ≥ llama_cpp's (no control)",
                where,
                speed,
                "≥ 1 (speedup)",
                None if speed is None else speed >= 1,
                "" if speed is None else f"p50 {c:.0f} ms vs {llama:.0f} ms",
            )
        )
    for baseline, need, label in (
        ("reference_dglm", SPEEDUP_REFERENCE, f"≥ {SPEEDUP_REFERENCE:g}× faster than"),
        ("fudge", 1.0, "faster than"),
    ):
        cells = sorted(
            (L, B) for (m, B, L) in p50 if m == baseline and ("engine_1probe", B, L) in p50
        )
        if not cells:
            checks.append(target_check(f"engine_1probe {label} {baseline}", "—", None, "", None))
        for L, B in cells:
            ours, theirs = p50[("engine_1probe", B, L)], p50[(baseline, B, L)]
            s = theirs / ours
            met = s >= need if need > 1 else s > 1
            checks.append(
                target_check(
                    f"engine_1probe {label} {baseline}",
                    f"L={L}, B={B}",
                    s,
                    f"≥ {need:g}" if need > 1 else "> 1",
                    met,
                    f"p50 {ours:.0f} ms vs {theirs:.0f} ms",
                )
            )
    for baseline in ("reference_dglm", "fudge"):
        cells = {(B, L) for (m, B, L) in p50 if m == baseline and ("engine_1probe", B, L) in p50}
        ok, on = _pooled_success(rows, "engine_1probe", cells)
        bk, bn = _pooled_success(rows, baseline, cells)
        if not on or not bn:
            checks.append(
                target_check(f"engine_1probe control success ≥ {baseline}", "—", None, "", None)
            )
            continue
        ours, theirs = ok / on, bk / bn
        checks.append(
            target_check(
                f"engine_1probe control success ≥ {baseline}",
                f"{len(cells)} shared cell(s)",
                ours - theirs,
                "≥ 0 (difference)",
                ours >= theirs,
                f"{ok}/{on} = {ours:.2f} vs {bk}/{bn} = {theirs:.2f}",
            )
        )
    return checks


# ------------------------------------------------------------------ markdown
def _f(v, spec: str = ".1f") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return format(v, spec)


def _stages(stages: dict[str, float]) -> str:
    order = [k for k in STAGE_ORDER if k in stages] + [k for k in stages if k not in STAGE_ORDER]
    return " · ".join(f"{STAGE_SHORT.get(k, k)} {_fmt_ms(stages[k])}" for k in order)


def _fmt_ms(ms: float) -> str:
    return f"{ms:.0f}" if ms >= 10 else f"{ms:.1f}"


def _sort_key(r: dict) -> tuple:
    order = list(METHODS)
    return (r["length"], r["batch"], order.index(r["method"]) if r["method"] in order else 99)


def _sampler(r: dict) -> str:
    s = r.get("info", {}).get("sampler")
    if not s:
        return "—"
    return f"{s.get('sampler', '?')} × {s.get('num_inference_steps', '?')}, {s.get('guidance_mode', '?')}"


def render_markdown(report: dict, plots: list[str]) -> str:
    env = report["environment"]
    cfg = report["config"]
    load = env["load_avg"]
    lines = [
        *header(
            f"Benchmark suite — {report['device']}{' (quick)' if cfg['quick'] else ''}",
            env,
            f"load average {load['start']} → {load['end']}",
            f"total {report['wall_s']:.0f} s",
        ),
        f"Same prompts, seeds and decoder ({env['decoder']}) for every method; nucleus sampling "
        f"(T = {cfg['temperature']:g}, top-p {cfg['top_p']:g}), L new tokens per row (Hugging Face "
        "paths via min_new_tokens, the engine and FUDGE via ignore_eos: exactly L, see tokens/row). "
        "Controls at scale "
        + (f"{cfg['control_scale']:g}" if cfg["control_scale"] is not None else "the bundle's")
        + ". Latency = one whole call (all B rows), "
        "percentiles over the timed repeats after a warm-up; tok/s = generated tokens / latency "
        "(median over repeats). Stages: medians in ms (pg = prompt generator; FUDGE's decode "
        "includes its prefill, rerank = candidate text + encoder + probe). Δ mem = peak memory "
        f"growth during the call ({report['memory_method']}). Success: share of continuations "
        "meeting every control (sentiment by VADER, toxicity by alt-profanity-check), over all "
        "repeats; uncontrolled rows: the base rate of sentiment=positive. probe: the same by the "
        "bundle's probes (p > 0.5). PPL: perplexity of the continuation under the decoder given "
        "the prefix.",
        "",
    ]
    lines += [f"- {n}" for n in report["notes"]]
    lines += ["", "Methods:", ""]
    lines += [f"- `{k}`: {v}" for k, v in report["methods"].items()]
    lines += [
        "",
        "| method | controls | B | L | p50 ms | p90 ms | p99 ms | tok/s | tokens/row | stages (ms) "
        "| Δ mem MiB | success | probe | PPL | sampler |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---|",
    ]
    for r in sorted(report["rows"], key=_sort_key):
        head = f"| {r['method']} | {r['controls']} | {r['batch']} | {r['length']} |"
        if "skipped" in r:
            lines.append(head + f" skipped: {r['skipped']} |" + " |" * 10)
            continue
        lat, q = r["latency_ms"], r["quality"]
        succ = "—"
        if q["success_rate"] is not None:
            succ = f"{q['success_rate']:.2f} ({q['success_k']}/{q['success_n']})"
        lines.append(
            head + f" {_f(lat['p50'])} | {_f(lat['p90'])} | {_f(lat['p99'])} | "
            f"{_f(r['tokens_per_s'])} | {_f(r['tokens_per_row'])} | {_stages(r['stages_ms'])} | "
            f"{_f(r['peak_mem_delta_mib'])} | {succ} | {_f(q['probe_success_rate'], '.2f')} | "
            f"{_f(q['perplexity'], '.2f')} | {_sampler(r)} |"
        )
    lines += ["", "## Targets", "", "| target | where | value | threshold | status | note |"]
    lines.append("|---|---|---:|---|---|---|")
    for c in report["targets"]:
        status = {True: "**met**", False: "**missed**", None: "not measured"}[c["met"]]
        lines.append(
            f"| {c['target']} | {c['where']} | {_f(c['value'], '.3f')} | {c['threshold']} | "
            f"{status} | {c['note']} |"
        )
    if plots:
        lines += ["", "## Plots", ""]
        lines += [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ plots
def write_plots(rows: list[dict], out: Path, name: str) -> list[Path]:
    """<name>_relative_runtime.png (p50 / hf_generate p50 vs L at batch 1: the reference's Table 4
    view) and <name>_latency_vs_batch.png (p50 vs batch at L = 32, or the nearest length run;
    bars to p90). [] when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []

    measured = [r for r in rows if "latency_ms" in r]
    methods = [m for m in METHODS if any(r["method"] == m for r in measured)]
    paths = []
    p50 = _p50(measured)

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    lengths = sorted({r["length"] for r in measured if r["batch"] == 1})
    for m in methods:
        pts = [
            (L, p50[(m, 1, L)] / p50[("hf_generate", 1, L)])
            for L in lengths
            if (m, 1, L) in p50 and ("hf_generate", 1, L) in p50
        ]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=m)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set(xscale="log", yscale="log", xlabel="generation length (tokens)",
           ylabel="runtime / HF generate (batch 1, p50)",
           title="Relative runtime vs generation length")  # fmt: skip
    paths.append(_finish(fig, ax, lengths, out / f"{name}_relative_runtime.png"))

    all_lengths = sorted({r["length"] for r in measured})
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    if all_lengths:
        L = min(all_lengths, key=lambda x: (abs(x - TARGET_LENGTH), x))
        for m in methods:
            pts = sorted(
                (r["batch"], r["latency_ms"]["p50"], r["latency_ms"]["p90"])
                for r in measured
                if r["method"] == m and r["length"] == L
            )
            if pts:
                b, med, p90 = zip(*pts, strict=True)
                upper = [hi - lo for lo, hi in zip(med, p90, strict=True)]
                ax.errorbar(b, med, yerr=[[0] * len(b), upper], marker="o", capsize=3, label=m)
        batches = sorted({r["batch"] for r in measured if r["length"] == L})
        ax.set_title(f"Latency vs batch (L = {L}; bars to p90)")
    ax.set(xscale="log", yscale="log", xlabel="batch (rows per call)", ylabel="latency p50 (ms)")
    ticks = batches if all_lengths else []
    paths.append(_finish(fig, ax, ticks, out / f"{name}_latency_vs_batch.png"))
    return paths


def _finish(fig, ax, ticks: list[int], path: Path) -> Path:
    """Log axes labelled 1, 1.5, 2, 3, 5, 7, 10, ... (not powers of ten), `ticks` on x, grid,
    legend; save and close."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    fmt = FuncFormatter(lambda v, _: f"{v:g}")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(fmt)
        axis.set_minor_formatter(NullFormatter())
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 1.5, 2.0, 3.0, 5.0, 7.0)))
    if ticks:
        ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ------------------------------------------------------------------ files
def write_report(report: dict, samples: list[dict], out: Path, name: str) -> dict[str, Path]:
    """<name>.json, <name>.md, <name>_samples.jsonl and the plots, in `out` (created)."""
    out.mkdir(parents=True, exist_ok=True)
    plots = write_plots(report["rows"], out, name)
    paths = write_results(out, name, report, render_markdown(report, [str(p) for p in plots]))
    paths["samples"] = write_jsonl(out / f"{name}_samples.jsonl", samples)
    for p in plots:
        paths[p.stem.removeprefix(name + "_")] = p
    return paths
