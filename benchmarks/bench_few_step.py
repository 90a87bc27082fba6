"""Few-step samplers against the 250-step teacher: proposal quality, probe control and time.

    python -m benchmarks.bench_few_step [--bundle default] [--prefixes 48] [--samples 2]
                                        [--scale 20] [--quick] [--threads 1] [--out DIR]

Samplers, all on the same bundle, prefixes and seeds (so every sampler starts from the same z_T):
  teacher ddpm 250   the reference's sampler (the baseline)
  teacher ddpm 50    the bundle's teacher default before distillation
  dpmpp-2m 8 / 16    DPM-Solver++(2M), training-free
  student 1 / 2 / 4  the distilled consistency student (`dglm train distill`), if the bundle has one
Per sampler:
  proposal quality (unguided): cosine and MSE of the latent to the teacher-250 latent of the same
    seed; the encoder's view of the decoded text: cosine of enc(text) to enc(teacher-250 text) and
    to the sampler's own latent ("fidelity"). A teacher-250 run with other seeds gives the scale:
    how close two independent teacher samples for the same prefix are.
  control success through the evaluation harness (dglm.engine.evaluation.evaluate): sentiment=positive,
    sentiment=negative (VADER rates) and toxicity=low (1 − toxic fraction), guidance scale --scale,
    plus the probes' own view and the decoder perplexity of the continuations.
  time per proposal: the diffusion stage alone (Engine._sample_group) with one probe control, batch
    1 and batch 16 (per row), median of repeats; score-network evaluations per proposal.
Writes <out>/few_step.json (+ .md); --quick writes few_step_quick.*.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from dglm.engine.api import GenerationParams
from dglm.engine.engine import Engine
from dglm.engine.evaluation.generation import generate_setting
from dglm.engine.evaluation.judges import probe_probability
from dglm.engine.evaluation.prefixes import heldout_prefixes
from dglm.engine.evaluation.provenance import commit_label
from dglm.engine.evaluation.run import environment
from dglm.engine.evaluation.scoring import score_setting
from dglm.engine.evaluation.settings import EvalConfig, Setting, low_toxicity_target, target_rate
from dglm.engine.probes import Control
from tqdm import tqdm

from benchmarks.common import ROOT, device_name, write_results

SAMPLERS = (  # (name, sampler, steps, uses the student)
    ("teacher ddpm 250", "ddpm", 250, False),
    ("teacher ddpm 50", "ddpm", 50, False),
    ("dpmpp-2m 16", "dpmpp-2m", 16, False),
    ("dpmpp-2m 8", "dpmpp-2m", 8, False),
    ("student 4", "consistency", 4, True),
    ("student 2", "consistency", 2, True),
    ("student 1", "consistency", 1, True),
)
REFERENCE = "teacher ddpm 250"
OTHER_SEED = 7_777_777  # seed offset of the teacher-250 resample


def _settings(engine, scale: float, a2: float):
    out = [Setting("unguided", "dglm", "unguided", renoise_alpha2=a2)]
    probes = engine.probes.probes
    if "sentiment" in probes:
        for target in ("positive", "negative"):
            out.append(Setting(f"sentiment={target}", "dglm", "sentiment",
                               (Control("sentiment", target, scale),), a2, "sentiment", target,
                               scale))  # fmt: skip
    if "toxicity" in probes:
        low = low_toxicity_target(probes["toxicity"])
        out.append(Setting("toxicity=low", "dglm", "toxicity", (Control("toxicity", low, scale),),
                           a2, "toxicity", low, scale))  # fmt: skip
    return out


def _probe_success(setting, m: dict) -> float | None:
    if setting.group == "sentiment":
        p = m.get("probe_p_positive")
        return None if p is None else (p if setting.target == "positive" else 1 - p)
    if setting.group == "toxicity":
        return m.get("probe_p_nontoxic")
    return None


def _latent_probe_success(engine, setting, latents: torch.Tensor) -> float | None:
    """The probe's probability of the target on the proposals themselves (before decoding)."""
    if setting.probe is None or latents is None:
        return None
    probe = engine.probes.probes[setting.probe]
    return float(probe_probability(probe, setting.target, latents.float().cpu()).mean())


def time_proposals(engine, cfg, batch: int, repeats: int) -> float:
    """Median seconds of the diffusion stage for `batch` rows with one sentiment control."""
    controls = ()
    if "sentiment" in engine.probes.probes:
        controls = (Control("sentiment", "positive", 20.0),)
    params = [GenerationParams(controls=controls, seed=i) for i in range(batch)]
    ctx = engine.encoder.latents(["The movie was"] * batch).to(engine.device)
    rows = [(i, 0) for i in range(batch)]
    times = []
    for r in range(repeats + 1):
        t0 = time.perf_counter()
        engine.dglm.sample_group(cfg, rows, list(range(r, r + batch)), ctx, params)
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
        if r:  # the first call is a warm-up
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(args) -> dict:
    engine = Engine.from_pretrained(args.bundle, device=args.device)
    base = engine.config.sampler
    # the student's row presets the bundle default (e.g. re-noising), only sampler/steps change
    samplers = [s for s in SAMPLERS if not s[3] or engine.dglm.student is not None]
    skipped = [s[0] for s in SAMPLERS if s not in samplers]
    prefixes = [p for _, p in heldout_prefixes(engine.tokenizer, args.prefixes)]
    ecfg = EvalConfig(prefixes=tuple(prefixes), num_samples=args.samples, max_new_tokens=20,
                      batch_size=16, seed=0)  # fmt: skip
    a2 = float(base.renoise_alpha2)
    settings = _settings(engine, args.scale, a2)
    other = replace(ecfg, seed=OTHER_SEED)
    jobs = [(name, setting, ecfg) for name, *_ in samplers for setting in settings]
    jobs.insert(1, (REFERENCE + " (other seeds)", settings[0], other))
    configs = {name: replace(base, sampler=s, num_inference_steps=n) for name, s, n, _ in samplers}
    configs[REFERENCE + " (other seeds)"] = configs[REFERENCE]

    results: dict[tuple[str, str], tuple] = {}
    bar = tqdm(jobs, desc="few-step", file=sys.stderr)
    for name, setting, cfg in bar:
        bar.set_postfix_str(f"{name} / {setting.name}")
        engine.dglm.config = replace(engine.dglm.config, sampler=configs[name])
        gens = generate_setting(engine, setting, prefixes, cfg)
        metrics, _ = score_setting(engine, gens, prefixes)
        results[name, setting.name] = (gens, metrics)
    engine.dglm.config = replace(engine.dglm.config, sampler=base)

    ref_gens, _ = results[REFERENCE, "unguided"]
    ref_emb = engine.encoder.embed(ref_gens.texts).float().cpu()
    rows = []
    for name in [n for n, *_ in samplers] + [REFERENCE + " (other seeds)"]:
        cfg = configs[name]
        gens, m = results[name, "unguided"]
        emb = engine.encoder.embed(gens.texts).float().cpu()
        lat, ref_lat = gens.latents.float(), ref_gens.latents.float()
        row = {
            "sampler": name,
            "sampler_config": asdict(cfg),
            "network_evals": cfg.num_inference_steps
            * (1 if cfg.sampler == "consistency" or engine.config.cfg_scale == 1.0 else 2),
            "proposal": {
                "latent_cos_to_teacher": float(F.cosine_similarity(lat, ref_lat).mean()),
                "latent_mse_to_teacher": float((lat - ref_lat).pow(2).mean()),
                "text_cos_to_teacher_text": float(F.cosine_similarity(emb, ref_emb).mean()),
                "fidelity": m.get("fidelity"),
                "perplexity": m["perplexity"],
            },
            "control": {},
        }
        for setting in settings[1:]:
            if (name, setting.name) not in results:
                continue
            cg, cm = results[name, setting.name]
            row["control"][setting.name] = {
                "success": target_rate(setting, cm),
                "probe_success": _probe_success(setting, cm),
                "latent_probe_success": _latent_probe_success(engine, setting, cg.latents),
                "latent_probe_success_unguided": _latent_probe_success(
                    engine, setting, gens.latents
                ),
                "perplexity": cm["perplexity"],
            }
        if not name.endswith("(other seeds)"):
            row["time_per_proposal_ms"] = {
                "batch1": 1e3 * time_proposals(engine, cfg, 1, args.repeats),
                "batch16_per_row": 1e3 * time_proposals(engine, cfg, 16, args.repeats) / 16,
            }
        rows.append(row)
    base_rates = {s.name: None for s in settings[1:]}
    _, um = results[REFERENCE, "unguided"]
    for s in settings[1:]:
        base_rates[s.name] = target_rate(s, um)
    return {
        "benchmark": "few_step",
        "bundle": str(args.bundle),
        "settings": {
            "prefixes": len(prefixes),
            "samples_per_prefix": args.samples,
            "guidance_scale": args.scale,
            "max_new_tokens": ecfg.max_new_tokens,
            "top_p": ecfg.top_p,
            "repeats": args.repeats,
        },
        "unguided_rates_teacher250": base_rates,
        "rows": rows,
        "skipped": [
            {"sampler": s, "reason": "the bundle has no distilled student"} for s in skipped
        ],
        "targets": targets(rows),
        "environment": environment(engine),
    }


def targets(rows: list[dict]) -> list[dict]:
    """The issue's targets for the 4-step student against the 250-step teacher."""
    by = {r["sampler"]: r for r in rows}
    ref, student = by.get(REFERENCE), by.get("student 4")
    if ref is None or student is None:
        return [{"target": "4-step student vs teacher", "met": None, "note": "no student"}]
    out = []
    for name, c in ref["control"].items():
        t, s = (
            c["latent_probe_success"],
            student["control"].get(name, {}).get("latent_probe_success"),
        )
        out.append({"target": f"probe control on the proposal {name}: student 4 ≥ 0.95 × teacher "
                    "250", "teacher": t, "student": s,
                    "met": None if t is None or s is None else s >= 0.95 * t})  # fmt: skip
        t, s = c["success"], student["control"].get(name, {}).get("success")
        met = None if t is None or s is None else s >= 0.95 * t
        out.append({"target": f"control success {name}: student 4 ≥ 0.95 × teacher 250",
                    "teacher": t, "student": s, "met": met})  # fmt: skip
    floor = by.get(REFERENCE + " (other seeds)")
    if floor is not None:
        t = floor["proposal"]["latent_cos_to_teacher"]
        s = student["proposal"]["latent_cos_to_teacher"]
        out.append({"target": "proposal cosine to teacher-250 samples: student 4 ≥ 0.95 × that of "
                    "an independent teacher-250 sample", "teacher": t, "student": s,
                    "met": s >= 0.95 * t})  # fmt: skip
    tf, sf = ref["proposal"]["fidelity"], student["proposal"]["fidelity"]
    if tf is not None and sf is not None:
        out.append({"target": "fidelity (encoder's view of the text vs the proposal): student 4 ≥ "
                    "0.95 × teacher 250", "teacher": tf, "student": sf, "met": sf >= 0.95 * tf})  # fmt: skip
    ratio = ref["network_evals"] / student["network_evals"]
    out.append({"target": "≥ 50× fewer score-network evaluations", "teacher": ref["network_evals"],
                "student": student["network_evals"], "met": ratio >= 50})  # fmt: skip
    return out


def _f(v, spec=".3f") -> str:
    return "—" if v is None else format(v, spec)


def markdown(report: dict) -> str:
    s = report["settings"]
    env = report["environment"]
    lines = [
        "# Few-step samplers vs the 250-step teacher",
        "",
        f"Bundle `{report['bundle']}`; {s['prefixes']} held-out prefixes × {s['samples_per_prefix']} "
        f"samples, {s['max_new_tokens']} new tokens, top-p {s['top_p']}, guidance scale "
        f"{s['guidance_scale']:g} (`fast`); {env['device_name']} ({env['device']}, "
        f"{env['torch_threads']} torch threads), torch {env['versions']['torch']}, commit "
        f"{commit_label(env)}.",
        "",
        "## Proposal quality (unguided) and time",
        "",
        "Same seed = same z_T and same decoding seed as the teacher-250 row; the last row is the "
        "teacher with other seeds (other z_T *and* other decoding randomness), the scale of two "
        "independent teacher samples. Time: the diffusion stage alone with one probe control.",
        "",
        "| sampler | net evals | latent cos to teacher | latent MSE | text cos to teacher text "
        "| fidelity | PPL | ms / proposal (B=1) | ms / proposal (B=16) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        p, t = r["proposal"], r.get("time_per_proposal_ms", {})
        lines.append(
            f"| {r['sampler']} | {r['network_evals']} | {_f(p['latent_cos_to_teacher'])} | "
            f"{_f(p['latent_mse_to_teacher'])} | {_f(p['text_cos_to_teacher_text'])} | "
            f"{_f(p['fidelity'])} | {_f(p['perplexity'], '.1f')} | {_f(t.get('batch1'), '.1f')} | "
            f"{_f(t.get('batch16_per_row'), '.2f')} |"
        )
    names = list(report["unguided_rates_teacher250"])
    lines += [
        "",
        "## Control success",
        "",
        "Cells: success on the decoded text through the evaluation harness (VADER for sentiment, "
        "1 − toxic fraction for toxicity) / the probe on the decoded text / the probe on the "
        "proposal latent (unguided → guided, same seeds). The latent column shows what each "
        "sampler's guidance delivers; the text columns also pass through the prompt generator.",
        "",
        "| sampler | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
        "| (teacher 250, unguided) | "
        + " | ".join(_f(report["unguided_rates_teacher250"][n]) for n in names)
        + " |",
    ]
    for r in report["rows"]:
        if not r["control"]:
            continue
        cells = []
        for n in names:
            c = r["control"].get(n)
            if c is None:
                cells.append("—")
                continue
            cells.append(
                f"{_f(c['success'])} / {_f(c['probe_success'])} / "
                f"{_f(c['latent_probe_success_unguided'])} → {_f(c['latent_probe_success'])}"
            )
        lines.append(f"| {r['sampler']} | " + " | ".join(cells) + " |")
    lines += ["", "## Targets (4-step student vs 250-step teacher)", ""]
    for t in report["targets"]:
        met = {True: "met", False: "MISSED", None: "n/a"}[t["met"]]
        lines.append(
            f"- {t['target']}: teacher {_f(t.get('teacher'))}, student {_f(t.get('student'))} → "
            f"**{met}**"
        )
    for sk in report["skipped"]:
        lines.append(f"- skipped {sk['sampler']}: {sk['reason']}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", default="default")
    p.add_argument("--prefixes", type=int, default=48)
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--scale", type=float, default=50.0)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="8 prefixes × 1 sample, 2 repeats")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.prefixes, args.samples, args.repeats = 8, 1, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    report = run(args)
    out = Path(args.out or ROOT / "benchmarks" / "results" / device_name(torch.device(args.device)))
    write_results(out, "few_step_quick" if args.quick else "few_step", report, markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
