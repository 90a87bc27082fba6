"""RE-Control's decode-time overhead: ms per token with the edit against the same decoding without
it, in one process.

    python -m benchmarks.bench_re_control [--bundle default] [--batches 1,8] [--tokens 32]
        [--repeats 3] [--threads 1]
    → benchmarks/results/<device>/re_control.{json,md}

Both arms run `Engine.generate(method=engine.re_control)` on the same prompts and seeds with a
`sentiment=positive` RE-Control control: "edit" at the value network's default steps and step
size, "plain" with `re_control_steps=0` (the hook is then left out: exactly plain decoding on the
same decode path). Per token = the decode stage's wall time over the steps after the first token;
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


def one_call(engine: Engine, prompts, tokens: int, edit: bool, probe: str, label: str) -> float:
    """ms per decode step of one Engine.generate call."""
    overrides = {} if edit else {"re_control_steps": 0}
    params = [
        GenerationParams(controls=(Control(probe, label, method="re-control"),), seed=i,
                         max_new_tokens=tokens, ignore_eos=True, **overrides)
        for i in range(len(prompts))
    ]  # fmt: skip
    out = engine.generate(list(prompts), params, method=engine.re_control)
    return out[0].timings["decode"] * 1e3 / (tokens - 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", default="default")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--probe", default="sentiment")
    ap.add_argument("--label", default="positive")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    t0, load0 = time.perf_counter(), load_average()
    engine = Engine.from_pretrained(args.bundle, device="cpu")
    if args.probe not in engine.value_nets:
        raise SystemExit(f"bench_re_control: the bundle has no {args.probe!r} value network")
    net = engine.value_nets[args.probe].config
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
        for edit in (False, True):  # warm-up: buckets, first calls
            one_call(engine, prompts, 4, edit, args.probe, args.label)
        ms = {False: [], True: []}
        for _ in range(args.repeats):
            for edit in (False, True):
                ms[edit].append(one_call(engine, prompts, args.tokens, edit, args.probe,
                                         args.label))  # fmt: skip
        plain, edited = statistics.median(ms[False]), statistics.median(ms[True])
        rows.append({"batch": batch, "tokens": args.tokens, "plain_ms_per_token": round(plain, 3),
                     "edit_ms_per_token": round(edited, 3), "ratio": round(edited / plain, 3),
                     "met": edited / plain <= TARGET, "repeats": args.repeats,
                     "load_avg": load_average()})  # fmt: skip
        print(f"B={batch}: plain {plain:.1f} ms/token, edit {edited:.1f} ({edited / plain:.2f}x)")
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
        f"{net.step_size:g}, {net.depth} × {net.hidden_dim} MLP), plain = re_control_steps=0 "
        f"(same decode path, no hook); median of {args.repeats} alternating repetitions. Target: "
        f"edit ≤ {TARGET}× plain per token.",
        "",
        "| batch | plain ms/token | edit ms/token | edit / plain | target ≤ 1.3 | load |",
        "|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['plain_ms_per_token']} | {r['edit_ms_per_token']} | "
                     f"{r['ratio']} | {'**met**' if r['met'] else '**missed**'} | "
                     f"{r['load_avg']} |")  # fmt: skip
    out = common.write_results(
        ROOT / "benchmarks" / "results" / "cpu" if args.out is None else type(ROOT)(args.out),
        "re_control", report, "\n".join(lines) + "\n",
    )  # fmt: skip
    print(f"wrote {out['json']} and {out['markdown'].name}")


if __name__ == "__main__":
    main()
