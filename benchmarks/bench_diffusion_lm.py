"""Diffusion-LM side by side: speed of the few-step and the reference paths, and what its controls
deliver, judged independently.

    python -m benchmarks.bench_diffusion_lm --bundle runs/dlm/bundle [--n 64] [--quick]
        [--threads 1] [--out benchmarks/results/cpu]
    → <out>/diffusion_lm.{json,md}, <out>/diffusion_lm_samples.jsonl

Speed (batch 1, one controlled sample of the model's full length: every free word, with the
bundle's first attribute classifier when it has one, median of repeats): DDIM at 10 / 20 / 50
steps and the reference path, DDPM at 200 steps (Li et al. 2022 sample with 200-2000), in the same
process; DDIM-20 with each sample the best of 16 candidates by the decoder's perplexity
(`candidates`, `select="lm"`); and DDIM-20 with each sample the decoder's best path through the
word lattice of 64 candidates (`select="lattice"`, the bundle's or the default beam and weight).

Quality, per sampler setting (DDIM-20, DDPM-200, DDIM-20 best of 16, DDIM-20 lattice of 64: the
selection's scorer is SmolLM2, the engine's decoder, never the Gemma judge; n samples each, seeds
0..n-1, intervals at 95%; a lattice needs a known length, so its row has no unconditional or
attribute task):
- unconditional: fluency as the perplexity of whole sentences under Gemma-3-270M (the eval's
  independent judge; bootstrap interval over sentences) against held-out human sentences of the
  training corpus (the same judge, the same count), Dist-2/3;
- length: `length` cycled over 6/10/14/18/24/30 words (those the model fits): exact when the sample
  has that many words;
- infill: held-out human sentences of ≥ 8 words keep their first 2 and last 3 words fixed, the
  middle is generated at the original length: context kept (every fixed word in place) and the
  whole sentence's Gemma perplexity against the human sentences' (target ≤ 2×);
- attribute (when the bundle has a sentiment classifier): positive / negative share by VADER
  (the eval's judge) with the classifier's guidance, against the unconditional base rate.
DGLM and FUDGE rows come from the committed `dglm eval` of the default bundle (prefix continuation
of held-out text, n = 200, its default scale): the same judges, another task (they continue a
prefix; Diffusion-LM writes whole short sentences), cited, not re-run.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import time
from pathlib import Path

import torch
from dglm.engine.evaluation.metrics import distinct_n, wilson_interval
from dglm.engine.evaluation.provenance import load_average
from dglm.engine.methods.diffusion_lm import DiffusionLMEngine
from dglm.engine.methods.diffusion_lm.vocab import words
from dglm.engine.probes import Control
from dglm.engine.training.diffusion_lm import read_sentences

from benchmarks.common import ROOT, environment, header, stamp, write_results

SOURCES = "sources:rotten_tomatoes,headlines,fortunes"  # the shipped bundle's training corpus
LENGTHS = (6, 10, 14, 18, 24, 30)
BEST_OF = 16  # candidates per sample in the selection rows, ranked by the decoder ("lm")
LATTICE_OF = 64  # candidates whose word lattice the decoder searches ("lattice")
# (sampler, steps, candidates per sample, select)
SPEED = (("ddim", 10, 1, None), ("ddim", 20, 1, None), ("ddim", 50, 1, None),
         ("ddpm", 200, 1, None), ("ddim", 20, BEST_OF, "lm"), ("ddim", 20, LATTICE_OF, "lattice"))  # fmt: skip
QUALITY = (("ddim", 20, 1, None), ("ddpm", 200, 1, None), ("ddim", 20, BEST_OF, "lm"),
           ("ddim", 20, LATTICE_OF, "lattice"))  # fmt: skip
EVAL_DEFAULT = ROOT / "benchmarks" / "results" / "cpu" / "eval_default" / "results.json"


def bundle_label(path: str) -> str:
    """The bundle as the results name it: relative to the working directory, else its folder
    name (no machine paths in committed results)."""
    p = Path(path).resolve()
    try:
        return str(p.relative_to(Path.cwd().resolve()))
    except ValueError:
        return p.name


def rate(k: int, n: int) -> dict:
    lo, hi = wilson_interval(k, n)
    return {"rate": k / n if n else float("nan"), "ci": [lo, hi], "k": k, "n": n}


def gemma_ppl(lm, sentences: list[str], boot: int = 200, seed: int = 0) -> dict:
    """Token-weighted perplexity of whole sentences under the judge, with a bootstrap interval
    over sentences; "_nll" / "_tokens" (per sentence, dropped from the written results) let
    `ppl_ratio` compare two sets."""
    from dglm.engine.evaluation.perplexity import reference_nll

    kept = [s.strip() for s in sentences if s.strip()]
    if not kept:
        return {"ppl": float("nan"), "ci": [float("nan")] * 2, "n": 0}
    nll, counts = reference_nll(lm, [""] * len(kept), kept)
    nll, counts = nll.tolist(), counts.tolist()

    def ppl(idx):
        tokens = sum(counts[i] for i in idx)
        return float(torch.tensor(sum(nll[i] for i in idx) / max(tokens, 1)).exp())

    rng = random.Random(seed)
    n = len(kept)
    draws = sorted(ppl([rng.randrange(n) for _ in range(n)]) for _ in range(boot))
    return {"ppl": ppl(range(n)), "ci": [draws[int(0.025 * boot)], draws[int(0.975 * boot) - 1]],
            "n": n, "_nll": nll, "_tokens": counts}  # fmt: skip


def ppl_ratio(a: dict, b: dict, boot: int = 1000, seed: int = 0) -> dict:
    """a's perplexity over b's (two `gemma_ppl` results) with a bootstrap interval that resamples
    both sets' sentences independently (the uncertainty of both, not only a's)."""

    def ppl(g, idx):
        return math.exp(sum(g["_nll"][i] for i in idx) / max(sum(g["_tokens"][i] for i in idx), 1))

    rng = random.Random(seed)
    na, nb = len(a["_nll"]), len(b["_nll"])
    draws = sorted(
        ppl(a, [rng.randrange(na) for _ in range(na)])
        / ppl(b, [rng.randrange(nb) for _ in range(nb)])
        for _ in range(boot)
    )
    lo, hi = draws[int(0.025 * boot)], draws[int(0.975 * boot) - 1]
    return {"ratio": ppl(a, range(na)) / ppl(b, range(nb)), "ci": [lo, hi]}


def public(x):
    """The report without the per-sentence working values ("_" keys)."""
    if isinstance(x, dict):
        return {k: public(v) for k, v in x.items() if not k.startswith("_")}
    if isinstance(x, list):
        return [public(v) for v in x]
    return x


def human_sentences(
    corpus: str, n: int, min_words: int, max_words: int, seed: int = 0
) -> list[str]:
    pool = [s for s in read_sentences(corpus, "eval") if min_words <= len(words(s)) <= max_words]
    random.Random(seed).shuffle(pool)
    return pool[:n]


def setting(sampler: str, steps: int, candidates: int = 1, select: str | None = None) -> str:
    """A sampler setting as the results name it: "ddim-20", "ddim-20 best of 16 (lm)",
    "ddim-20 lattice of 32"."""
    name = f"{sampler}-{steps}"
    if candidates == 1:
        return name
    if select == "lattice":
        return f"{name} lattice of {candidates}"
    return f"{name} best of {candidates} ({select})"


def choice(candidates: int, select: str | None) -> dict:
    return {"candidates": candidates, "select": select} if candidates > 1 else {}


def speed(engine: DiffusionLMEngine, control: tuple, full: int, repeats: int) -> list[dict]:
    rows = []
    for sampler, steps, cands, select in SPEED:
        pick = choice(cands, select)
        p = engine.default_params(length=full, controls=control, sampler=sampler,
                                  num_inference_steps=steps, seed=0, **pick)  # fmt: skip
        engine.generate([""], p)  # warm-up (and the scorer's loading)
        times = []
        for r in range(repeats if sampler == "ddim" else max(1, repeats // 3)):
            p = engine.default_params(length=full, controls=control, sampler=sampler,
                                      num_inference_steps=steps, seed=r, **pick)  # fmt: skip
            t = time.perf_counter()
            out = engine.generate([""], p)
            times.append(time.perf_counter() - t)
        rows.append({"sampler": sampler, "steps": steps, "candidates": cands, "select": select,
                     "setting": setting(sampler, steps, cands, select), "words": full,
                     "controls": [c.probe + "=" + c.target for c in control],
                     "seconds_median": statistics.median(times), "repeats": len(times),
                     "example": out[0].samples[0].text, "load_avg": load_average()})  # fmt: skip
        print(f"speed {rows[-1]['setting']}: {rows[-1]['seconds_median']:.3f} s", flush=True)
    return rows


def texts_of(outs) -> list[str]:
    return [s.text.strip() for o in outs for s in o.samples]


def quality(engine, cell, n, lm, human_g, infill_src, attr, samples) -> dict:
    sampler, steps, cands, select = cell
    base = {"sampler": sampler, "num_inference_steps": steps, **choice(cands, select)}
    name = setting(*cell)
    res: dict = {"sampler": sampler, "steps": steps, "candidates": cands, "select": select,
                 "setting": name}  # fmt: skip

    def run(prompts, params, task):
        t = time.perf_counter()
        outs = engine.generate(prompts, params)
        secs = time.perf_counter() - t
        texts = texts_of(outs)
        samples.extend({"task": task, "sampler": name, "text": x} for x in texts)
        return texts, secs

    # unconditional: the model chooses the length (not with a lattice, which needs a known one)
    res["unconditional"] = None
    if select != "lattice":
        ps = [engine.default_params(**base, seed=i) for i in range(n)]
        uncond, secs = run([""] * n, ps, "unconditional")
        res["unconditional"] = {
            "gemma": gemma_ppl(lm, uncond) if lm else None,
            "dist_2": distinct_n(uncond, 2), "dist_3": distinct_n(uncond, 3),
            "seconds_per_sample": secs / n,
        }  # fmt: skip
    # length
    full = engine.method.net.config.seq_len - 2
    lengths = [w for w in LENGTHS if w <= full] or [max(1, full // 2), full]
    want = [lengths[i % len(lengths)] for i in range(n)]
    ps = [engine.default_params(**base, seed=i, length=w) for i, w in enumerate(want)]
    got, secs = run([""] * n, ps, "length")
    exact = sum(len(words(t)) == w for t, w in zip(got, want, strict=True))
    res["length"] = {**rate(exact, n), "seconds_per_sample": secs / n}
    # infill
    lefts = [" ".join(words(s)[:2]) for s in infill_src]
    rights = [" ".join(words(s)[-3:]) for s in infill_src]
    ps = [engine.default_params(**base, seed=i, length=len(words(s)), infill=(a, b))
          for i, (s, a, b) in enumerate(zip(infill_src, lefts, rights, strict=True))]  # fmt: skip
    filled, secs = run([""] * len(ps), ps, "infill")
    kept = sum(
        words(t)[:2] == words(a) and words(t)[-3:] == words(b)
        for t, a, b in zip(filled, lefts, rights, strict=True)
    )
    g = gemma_ppl(lm, filled) if lm else None
    res["infill"] = {"context_kept": rate(kept, len(ps)), "gemma": g,
                     "ratio": ppl_ratio(g, human_g) if g and human_g.get("_nll") else None,
                     "seconds_per_sample": secs / len(ps)}  # fmt: skip
    # attribute (against the unconditional base rate, so not for a lattice either)
    if attr and res["unconditional"] is not None:
        from dglm.engine.evaluation.judges import sentiment_rates

        name, labels = attr
        base_rates = sentiment_rates(uncond)
        res["attribute"] = {"unconditional": {k: base_rates[k] for k in ("positive", "negative")}}
        for label in ("positive", "negative"):
            if label not in labels:
                continue
            control = (Control(name, label),)
            ps = [engine.default_params(**base, seed=i, controls=control) for i in range(n)]
            texts, secs = run([""] * n, ps, f"{name}={label}")
            r = sentiment_rates(texts)
            res["attribute"][label] = {
                **rate(round(r[label] * n), n),
                "gemma": gemma_ppl(lm, texts) if lm else None,
                "seconds_per_sample": secs / n,
            }
    return res


def dglm_fudge_rows() -> list[dict]:
    """The default bundle's committed `dglm eval` rows for sentiment (default scale, best FUDGE)."""
    if not EVAL_DEFAULT.is_file():
        return []
    rows = json.loads(EVAL_DEFAULT.read_text())["rows"]
    out = []
    for label in ("positive", "negative"):
        for r in rows:
            if r["target"] != label or r["probe"] != "sentiment":
                continue
            if (r["method"] == "dglm" and r["default"]) or r["setting"].endswith("λ=3"):
                m = r["metrics"]
                out.append({"method": r["method"], "setting": r["setting"], "n": r["n"],
                            "rate": m[f"vader_{label}"], "ci": m[f"vader_{label}_ci"],
                            "gemma_ppl": m["ref_perplexity"]})  # fmt: skip
    return out


def fmt_rate(r: dict) -> str:
    return f"{100 * r['rate']:.0f}% [{100 * r['ci'][0]:.0f}, {100 * r['ci'][1]:.0f}] (n={r['n']})"


def fmt_ppl(g: dict | None) -> str:
    return "-" if not g else f"{g['ppl']:.1f} [{g['ci'][0]:.1f}, {g['ci'][1]:.1f}]"


def markdown(report: dict, env: dict) -> str:
    lines = header("Diffusion-LM on CPU", env, f"bundle {report['bundle']}",
                   f"{report['threads']} thread(s)", f"n = {report['n']} per cell",
                   f"load average {report['load_avg']}")  # fmt: skip
    lines += ["## Targets", "", *[f"- {t}" for t in report["targets"]], "", "## Speed", "",
              "Batch 1, one sample of the model's full length "
              f"({report['speed'][0]['words']} words), controls "
              f"{report['speed'][0]['controls'] or 'none'}:", "",
              "| sampler | steps | seconds (median) | repeats | example |", "|---|---|---|---|---|"]  # fmt: skip
    for r in report["speed"]:
        lines.append(f"| {r.get('setting', r['sampler'])} | {r['steps']} | {r['seconds_median']:.3f} | "
                     f"{r['repeats']} | {r['example'][:80]} |")  # fmt: skip
    h = report["human"]
    lines += ["", "## Quality", "", f"Held-out human sentences: Gemma perplexity {fmt_ppl(h)}.",
              "", "| sampler | task | result | Gemma PPL | s/sample |", "|---|---|---|---|---|"]  # fmt: skip
    for q in report["quality"]:
        s = q.get("setting", f"{q['sampler']}-{q['steps']}")
        u = q["unconditional"]
        if u:
            lines.append(f"| {s} | unconditional | Dist-2 {u['dist_2']:.2f}, Dist-3 {u['dist_3']:.2f} "
                         f"| {fmt_ppl(u['gemma'])} | {u['seconds_per_sample']:.3f} |")  # fmt: skip
        else:
            lines.append(f"| {s} | unconditional | n/a (a lattice needs a known length) | - | - |")
        lines.append(f"| {s} | length exact | {fmt_rate(q['length'])} | - | "
                     f"{q['length']['seconds_per_sample']:.3f} |")  # fmt: skip
        i = q["infill"]
        r = i.get("ratio")
        vs = f" = {r['ratio']:.2f}× [{r['ci'][0]:.2f}, {r['ci'][1]:.2f}] human" if r else ""
        lines.append(f"| {s} | infill, context kept | {fmt_rate(i['context_kept'])} | "
                     f"{fmt_ppl(i['gemma'])}{vs} | {i['seconds_per_sample']:.3f} |")  # fmt: skip
        for label in ("positive", "negative"):
            a = q.get("attribute", {}).get(label)
            if a:
                base = q["attribute"]["unconditional"][label]
                lines.append(f"| {s} | sentiment={label} (VADER; unconditional {100 * base:.0f}%) "
                             f"| {fmt_rate(a)} | {fmt_ppl(a['gemma'])} | "
                             f"{a['seconds_per_sample']:.3f} |")  # fmt: skip
    if report["dglm_fudge"]:
        lines += ["", "DGLM and FUDGE (committed `dglm eval` of the default bundle: prefix "
                  "continuation, another task, the same judges; cited):", "",
                  "| method | setting | VADER target rate | Gemma PPL | n |", "|---|---|---|---|---|"]  # fmt: skip
        for r in report["dglm_fudge"]:
            lines.append(f"| {r['method']} | {r['setting']} | {100 * r['rate']:.0f}% "
                         f"[{100 * r['ci'][0]:.0f}, {100 * r['ci'][1]:.0f}] | "
                         f"{r['gemma_ppl']:.1f} | {r['n']} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def targets(report: dict) -> list[str]:
    out = []
    fast = [r for r in report["speed"] if r["sampler"] == "ddim" and r.get("candidates", 1) == 1]
    picked = [r for r in report["speed"] if r.get("candidates", 1) > 1]
    ref = next((r for r in report["speed"] if r["sampler"] == "ddpm"), None)
    if fast:
        under = [r for r in fast if r["seconds_median"] < 1]
        best = (
            max(under, key=lambda r: r["steps"]) if under else min(fast, key=lambda r: r["steps"])
        )
        line = (f"controlled {best['words']}-word ({best['words'] + 2}-position) sample at batch 1: "
                f"{best['seconds_median']:.3f} s with DDIM-{best['steps']} (target < 1 s: "
                f"{'met' if best['seconds_median'] < 1 else 'missed'})")  # fmt: skip
        if ref:
            line += f"; the reference path DDPM-{ref['steps']}: {ref['seconds_median']:.2f} s"
        for r in picked:
            line += f"; {r['setting']}: {r['seconds_median']:.3f} s"
        out.append(line)
    h = report["human"]["ppl"]
    for q in report["quality"]:
        s = q.get("setting", f"{q['sampler']}-{q['steps']}")
        r = q["length"]["rate"]
        out.append(
            f"{s}: length exact {100 * r:.0f}% (target ≥ 95%: {'met' if r >= 0.95 else 'missed'})"
        )
        k = q["infill"]["context_kept"]["rate"]
        g = q["infill"]["gemma"]
        line = f"{s}: infill context kept {100 * k:.0f}% (target 100%: {'met' if k == 1 else 'missed'})"
        if g:
            ratio = g["ppl"] / h
            ci = (q["infill"].get("ratio") or {}).get("ci")
            span = f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""
            line += (f"; whole-sentence Gemma PPL {ratio:.2f}×{span} the human sentences' "
                     f"(target ≤ 2×: {'met' if ratio <= 2 else 'missed'})")  # fmt: skip
        else:
            line += "; fluency not judged (--no-gemma)"
        out.append(line)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", required=True, help="a Diffusion-LM bundle directory")
    p.add_argument("--n", type=int, default=None, help="samples per quality cell (default 64)")
    p.add_argument("--quick", action="store_true", help="n = 16 (unless --n), speed repeats 3")
    p.add_argument("--corpus", default=SOURCES, help="held-out human sentences: the training DATA")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--scorer", default="smollm2", help="the causal LM of the best-of rows (lm)")
    p.add_argument("--no-gemma", action="store_true", help="skip the fluency judge (tests)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cpu")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    n = args.n or (16 if args.quick else 64)
    env, load0 = environment(torch.device("cpu")), load_average()
    t0 = time.perf_counter()
    engine = DiffusionLMEngine.from_pretrained(args.bundle, scorer=args.scorer)
    full = engine.method.net.config.seq_len - 2
    classifiers = engine.method.classifiers
    attr = None
    if "sentiment" in classifiers:
        attr = ("sentiment", tuple(classifiers["sentiment"].config.labels))
    control = (Control("sentiment", "positive"),) if attr and "positive" in attr[1] else ()
    lm = None
    if not args.no_gemma:
        from dglm.engine.evaluation.perplexity import load_gemma

        lm = load_gemma()
    human = human_sentences(args.corpus, n, 4, full)
    infill_src = human_sentences(args.corpus, n, 8, full, seed=1)
    samples: list[dict] = []
    report = {
        "bundle": bundle_label(args.bundle), "threads": args.threads, "n": n,
        "speed": speed(engine, control, full, 3 if args.quick else 9),
        "human": gemma_ppl(lm, human) if lm else {"ppl": float("nan"), "ci": [0, 0], "n": 0},
    }  # fmt: skip
    report["quality"] = [
        quality(engine, cell, n, lm, report["human"], infill_src, attr, samples) for cell in QUALITY
    ]
    report["dglm_fudge"] = dglm_fudge_rows()
    report["load_avg"] = f"{load0} → {load_average()}"
    report["targets"] = targets(report)
    report["wall_s"] = time.perf_counter() - t0
    report["environment"] = env
    report["rows"] = stamp([{"bench": "diffusion_lm"}], env, torch.device("cpu"))
    report = public(report)
    args.out.mkdir(parents=True, exist_ok=True)
    write_results(args.out, "diffusion_lm", report, markdown(report, env))
    with open(args.out / "diffusion_lm_samples.jsonl", "w", encoding="utf-8") as f:
        for s in samples:
            f.write(json.dumps(s) + "\n")
    print("\n".join(report["targets"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
