"""RE-Control's decode-time overhead: ms per token with the edit against the same decoding without
it, in one process.

    python -m benchmarks.bench_re_control [--bundle default] [--batches 1,8] [--tokens 32]
        [--repeats 3] [--threads 1]
    → benchmarks/results/<device>/re_control.{json,md}

The arms run `Engine.generate(method=engine.re_control)` on the same prompts and seeds with a
`sentiment=positive` RE-Control control: "edit" at the value network's default steps and step
size without the plausibility mask, "masked" the same with the mask at β (default: the value
network's own β when it has one, else 0.1; its cost is one more LM-head row per edited row and a
few passes over the vocabulary), "plain" with `re_control_steps=0` (the hook is then left out:
exactly plain decoding on the same decode path). Per token = the decode stage's wall time over the steps after the first token;
arms alternate within each repetition and medians are reported. The issue's target: the edit costs
≤ 1.3× plain decoding per token at batch 1 and 8 on CPU.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from dglm.engine.api import GenerationParams
from dglm.engine.engine import Engine
from dglm.engine.evaluation.provenance import load_average
from dglm.engine.probes import Control

from benchmarks import common
from benchmarks.common import ROOT

PROMPTS = [
    "The food at this place",
    "My last trip to the city",
    "The new phone I bought",
    "Yesterday the weather",
    "The customer service team",
    "This book is about",
    "The hotel room we had",
    "Our neighbours decided to",
]
TARGET = 1.3  # edit / plain, ms per token


ARMS = ("plain", "edit", "masked")


def one_call(
    engine: Engine, prompts, tokens: int, arm: str, probe: str, label: str, beta: float = 0.0
) -> float:
    """ms per decode step of one Engine.generate call; arm: "plain" (no edit), "edit" (the value
    network's defaults, no plausibility mask), "masked" (the edit with the mask at β)."""
    overrides = {
        "plain": {"re_control_steps": 0},
        "edit": {"re_control_plausibility": 0.0},
        "masked": {"re_control_plausibility": beta},
    }[arm]
    params = [
        GenerationParams(controls=(Control(probe, label, method="re-control"),), seed=i,
                         max_new_tokens=tokens, ignore_eos=True, **overrides)
        for i in range(len(prompts))
    ]  # fmt: skip
    out = engine.generate(list(prompts), params, method=engine.re_control)
    return out[0].timings["decode"] * 1e3 / (tokens - 1)


def _verdict(met: bool | None) -> str:
    return "—" if met is None else ("**met**" if met else "**missed**")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", default="default")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--probe", default="sentiment")
    ap.add_argument("--label", default="positive")
    ap.add_argument(
        "--plausibility", type=float, default=None,
        help="β of the third arm, the edit with its plausibility mask (0: no such arm; default: "
        "the value network's β, else 0.1)",
    )  # fmt: skip
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    t0, load0 = time.perf_counter(), load_average()
    engine = Engine.from_pretrained(args.bundle, device="cpu")
    if args.probe not in engine.value_nets:
        raise SystemExit(f"bench_re_control: the bundle has no {args.probe!r} value network")
    net = engine.value_nets[args.probe].config
    if args.plausibility is None:
        args.plausibility = net.plausibility or 0.1
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
        arms = ARMS if args.plausibility > 0 else ARMS[:2]
        for arm in arms:  # warm-up: buckets, first calls
            one_call(engine, prompts, 4, arm, args.probe, args.label, args.plausibility)
        ms = {arm: [] for arm in arms}
        for _ in range(args.repeats):
            for arm in arms:
                ms[arm].append(one_call(engine, prompts, args.tokens, arm, args.probe,
                                        args.label, args.plausibility))  # fmt: skip
        plain, edited = statistics.median(ms["plain"]), statistics.median(ms["edit"])
        row = {"batch": batch, "tokens": args.tokens, "plain_ms_per_token": round(plain, 3),
               "edit_ms_per_token": round(edited, 3), "ratio": round(edited / plain, 3),
               "met": edited / plain <= TARGET, "repeats": args.repeats}  # fmt: skip
        if "masked" in ms:
            masked = statistics.median(ms["masked"])
            row |= {"plausibility": args.plausibility, "masked_ms_per_token": round(masked, 3),
                    "masked_ratio": round(masked / plain, 3),
                    "masked_met": masked / plain <= TARGET}  # fmt: skip
        rows.append(row | {"load_avg": load_average()})
        print(
            f"B={batch}: plain {plain:.1f} ms/token, edit {edited:.1f} ({edited / plain:.2f}x)"
            + (f", masked {masked:.1f} ({masked / plain:.2f}x)" if "masked" in ms else "")
        )
    env = common.environment(device)
    report = {
        "bench": "re_control", "environment": env, "threads": args.threads,
        "value_network": net.to_dict(), "rows": common.stamp(rows, env, device),
        "load_avg": {"start": load0, "end": load_average()},
        "wall_s": round(time.perf_counter() - t0, 1),
    }  # fmt: skip
    lines = [
        *common.header(
            "RE-Control decode-time overhead — cpu",
            report["environment"],
            f"{args.threads} torch thread(s)",
            f"load average {load0} → {load_average()}",
        ),  # fmt: skip
        f"Engine.generate(method=engine.re_control), {args.tokens} tokens per row, control "
        f"{args.probe}={args.label}; edit = the value network's defaults ({net.steps} steps of "
        f"{net.step_size:g}, {net.depth} × {net.hidden_dim} MLP) without the plausibility mask "
        f"(its default β: {net.plausibility:g}), plain = re_control_steps=0 "
        f"(same decode path, no hook); median of {args.repeats} alternating repetitions. Target: "
        f"the edit ≤ {TARGET}× plain per token."
        + (f" masked = the edit with its plausibility mask at β = {args.plausibility:g} "
           "(`re_control_plausibility`: one more LM-head row per edited row)."
           if args.plausibility > 0 else ""),
        "",
        "| batch | plain ms/token | edit ms/token | edit / plain | target ≤ 1.3 | masked ms/token "
        "| masked / plain | target ≤ 1.3 | load |",
        "|---:|---:|---:|---:|---|---:|---:|---|---:|",
    ]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['batch']} | {r['plain_ms_per_token']} | {r['edit_ms_per_token']} | "
                     f"{r['ratio']} | {'**met**' if r['met'] else '**missed**'} | "
                     f"{r.get('masked_ms_per_token', '—')} | {r.get('masked_ratio', '—')} | "
                     f"{_verdict(r.get('masked_met'))} | "
                     f"{r['load_avg']} |")  # fmt: skip
    out = common.write_results(
        ROOT / "benchmarks" / "results" / "cpu" if args.out is None else type(ROOT)(args.out),
        "re_control", report, "\n".join(lines) + "\n",
    )  # fmt: skip
    print(f"wrote {out['json']} and {out['markdown'].name}")


if __name__ == "__main__":
    main()
