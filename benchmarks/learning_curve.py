"""Steering and naturalness on dev against training samples seen: the learning curve that says
whether more training (CPU hours, GPU minutes) or something else comes next (issue 33, point 6).

Each point is a bundle: the base bundle as it is (the curve's first point), then the base bundle
with a snapshot of a `dglm train steering --keep-every N` run put in (`add_steering(...,
snapshot=)`), each evaluated by `dglm eval`'s harness on the **dev** split with the same prefixes,
seeds and rows (plain decoding and DGLM toward each sentiment target at the bundle's scale).
Samples seen: the base bundle's (`--base-samples`, from its TRAINING.md) plus the snapshot's
step × the run's batch size.

    python -m benchmarks.learning_curve --bundle default --run runs/steer --base-samples 20400
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
from dglm.engine import bundle as bundle_io
from dglm.engine.engine import Engine
from dglm.engine.evaluation.perplexity import resolve_reference_lm
from dglm.engine.evaluation.run import run_eval
from dglm.engine.evaluation.settings import PRESETS, EvalConfig
from dglm.engine.training.recipes import add_steering

from benchmarks import common

# the metrics each point reports per row (rates with their intervals)
METRICS = (
    "vader_positive", "vader_negative", "ref_perplexity", "perplexity", "repeat_trigram",
    "dist_3", "relevance", "fused", "toxicity_frac",
)  # fmt: skip


def snapshots(run: Path) -> list[Path]:
    """The run's joint-stage snapshots, by step."""
    return sorted((run / "joint" / "snapshots").glob("step-*.pt"))


def samples_seen(snapshot: Path, base: int) -> tuple[int, int]:
    """(step, samples seen): base + step × the run's batch size (its train_config)."""
    state = torch.load(snapshot, map_location="cpu", weights_only=True)
    return state["step"], base + state["step"] * state["meta"]["train_config"]["batch_size"]


def point(
    bundle_dir: Path, config: EvalConfig, reference_lm, label: str, plain: bool = True
) -> dict:
    """One point: the dev eval of one bundle → {label, rows: {setting: metrics}, bounds}.
    The steering networks alone: the bundle's implied controls are left out (they are the same
    at every point). plain: also plain decoding (the same at every point: the released decoder)."""
    engine = Engine.from_pretrained(bundle_dir)
    engine.dglm.config = replace(engine.config, implied_controls={})
    scale = float(engine.config.control_scale)
    only = (f"dglm sentiment=positive:{scale:g}", f"dglm sentiment=negative:{scale:g}")
    only = ("decoder", *only) if plain else only
    report, _ = run_eval(
        engine, replace(config, only=only), bundle=label, reference_lm=reference_lm
    )
    rows = {
        r["setting"]: {k: r["metrics"].get(k) for k in METRICS}
        | {f"{k}_ci": r["metrics"].get(f"{k}_ci") for k in METRICS}
        for r in report["rows"]
    }
    return {"label": label, "rows": rows, "bounds": report["bounds"]}


def learning_curve(
    bundle: str,
    run: Path,
    config: EvalConfig,
    base_samples: int,
    reference_lm=None,
    cache: Path | None = None,
) -> list[dict]:
    """Every point of the curve, the base bundle first; plain decoding is run with the base
    point only and its rows are copied into the others. cache: a directory keeping each point
    as `<label>.json`, reused by the next call (run it as snapshots appear, one point at a
    time beside the training; the same config each time)."""

    def cached(label: str, make) -> dict:
        path = None if cache is None else cache / f"{label}.json"
        if path is not None and path.exists():
            return json.loads(path.read_text())
        p = make()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(p))
        return p

    base_dir = bundle_io.resolve_bundle_dir(bundle)
    points = [cached("base", lambda: {"step": 0, "samples": base_samples,
                                      **point(base_dir, config, reference_lm, "base")})]  # fmt: skip
    plain = {k: v for k, v in points[0]["rows"].items() if k.startswith("decoder")}
    with tempfile.TemporaryDirectory() as tmp:
        for snap in snapshots(run):
            step, seen = samples_seen(snap, base_samples)

            def make(snap=snap, step=step, seen=seen) -> dict:
                out = Path(tmp) / snap.stem
                add_steering(bundle, run, out, snapshot=snap)
                p = point(out, config, reference_lm, snap.stem, plain=False)
                return {"step": step, "samples": seen, **p}

            p = cached(snap.stem, make)
            p["rows"] = {**plain, **p["rows"]}
            points.append(p)
    return points


def _ppl(m: dict) -> float:
    """The reference LM's perplexity, else the released decoder's."""
    v = m.get("ref_perplexity")
    return m["perplexity"] if v is None or math.isnan(v) else v


def markdown(points: list[dict], env: dict, config: EvalConfig) -> str:
    lines = common.header(
        "Learning curve: dev steering and naturalness against samples seen",
        env,
        f"dev split, {config.num_prefixes} prefixes × {config.num_samples}",
    )
    lines += [
        "| point | samples seen | setting | VADER target | Gemma PPL (plain, same truncation) "
        "| repeats a trigram | Dist-3 | relevance |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for p in points:
        plain = p["rows"]["decoder"]
        masked = next((m for k, m in p["rows"].items() if k.startswith("decoder min-p")), plain)
        for s, m in p["rows"].items():
            if not s.startswith("dglm"):
                continue
            target = "positive" if "positive" in s else "negative"
            ppl, base = _ppl(m), _ppl(masked)
            lines.append(
                f"| {p['label']} | {p['samples']} | {s} | {m[f'vader_{target}']:.3f} | "
                f"{ppl:.1f} ({base:.1f}) | {m['repeat_trigram']:.3f} | {m['dist_3']:.3f} | "
                f"{m['relevance']:.3f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", default="default", help="the bundle the run started from")
    p.add_argument("--run", required=True, type=Path, help="a `dglm train steering` run directory")
    p.add_argument("--base-samples", type=int, required=True, help="samples the bundle had seen")
    p.add_argument("--prefixes", type=int, default=64, help="dev prefixes")
    p.add_argument("--samples", type=int, default=2, help="continuations per prefix")
    p.add_argument("--gemma", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument(
        "--out", type=Path, default=common.ROOT / "benchmarks/results/cpu/learning_curve"
    )
    args = p.parse_args(argv)
    if not snapshots(args.run):
        raise SystemExit(f"no snapshots in {args.run}/joint/snapshots: train with --keep-every N")
    config = replace(
        PRESETS["full"], num_prefixes=args.prefixes, num_samples=args.samples,
        guidance_scales=(), renoise_alpha2s=(), fudge_strengths=(), gemma=args.gemma,
    )  # fmt: skip
    reference_lm, _ = resolve_reference_lm(config, torch.device("cpu"))
    points = learning_curve(
        args.bundle, args.run, config, args.base_samples, reference_lm, args.out / "points"
    )
    env = common.environment(torch.device("cpu"))
    report = {"config": {**vars(args), "run": str(args.run), "out": str(args.out)},
              "points": points, "environment": env}  # fmt: skip
    paths = common.write_results(args.out, "learning_curve", report, markdown(points, env, config))
    print({k: str(v) for k, v in paths.items()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
