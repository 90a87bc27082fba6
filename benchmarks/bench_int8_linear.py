"""Benchmark the weight-only int8 linear kernel on CPU: every weight matrix of SmolLM2-135M's 30
layers (q/k/v fused 960×576, o 576×576, gate/up fused 3072×576, down 576×1536, plus the 49152×576
LM head), one pass = one decode step's products, against the other ways to run them.

    python -m benchmarks.bench_int8_linear [--out benchmarks/results/cpu] [--repeats 7]
        [--batches 1 4 8 32] [--threads 1] [--layers 30]

Implementations (ms per pass, median of `repeats` after one warm-up; interleaved):
  cpp        torch.ops.dglm.int8_linear: the package's C++ kernel, what int8 decoders call on CPU
  int8pack   torch._weight_int8pack_mm on bf16 activations (torch's fused kernel)
  fp32       F.linear with the fp32 weights (what an unquantized decoder streams: 4× the bytes)
Random weights of the real shapes (the speed does not depend on the values); every pass streams
the whole set from memory (~134 MB int8), as a decode step does. Writes <out>/int8_linear.json
and .md.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from dglm.engine.evaluation.provenance import load_average
from dglm.engine.models.quant import fused_int8_available, int8_weights
from dglm.kernels import int8_linear as kernel

from benchmarks.common import environment, header, stamp, write_results

LAYERS = 30
SHAPES = ((960, 576), (576, 576), (3072, 576), (576, 1536))  # (out, in) per layer
HEAD = (49152, 576)


def weights(layers: int = LAYERS, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n, k in [*SHAPES * layers, HEAD]:
        w = torch.randn(n, k, generator=g) * 0.02
        q, s = int8_weights(w)
        out.append({"w": w, "q": q, "s": s, "s_bf16": s.to(torch.bfloat16)})
    return out


def passes(ws: list[dict], batch: int) -> dict:
    xs = {k: torch.randn(batch, k) for k in {w["w"].shape[1] for w in ws}}
    xb = {k: x.bfloat16() for k, x in xs.items()}
    impls = {
        "cpp": lambda: [kernel.int8_linear(xs[w["q"].shape[1]], w["q"], w["s"]) for w in ws],
        "fp32": lambda: [F.linear(xs[w["w"].shape[1]], w["w"]) for w in ws],
    }
    if fused_int8_available():
        impls["int8pack"] = lambda: [
            torch._weight_int8pack_mm(xb[w["q"].shape[1]], w["q"], w["s_bf16"]) for w in ws
        ]
    return impls


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "cpu")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--batches", type=int, nargs="*", default=[1, 4, 8, 32])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--layers", type=int, default=LAYERS, help="decoder layers (30: SmolLM2)")
    args = p.parse_args(argv)
    if not kernel.available():
        raise SystemExit("dglm.kernels.cpu_ops is not built: reinstall the package")
    torch.set_num_threads(args.threads)
    env, load = environment(torch.device("cpu"), ("dglm-engine", "torch")), load_average()
    ws = weights(args.layers)
    int8_mb = sum(w["q"].numel() for w in ws) / 1e6
    rows = []
    with torch.inference_mode():
        for b in args.batches:
            impls = passes(ws, b)
            samples = {name: [] for name in impls}
            for f in impls.values():
                f()  # warm-up
            for _ in range(args.repeats):
                for name, f in impls.items():
                    t = time.perf_counter()
                    f()
                    samples[name].append((time.perf_counter() - t) * 1e3)
            fp32 = statistics.median(samples["fp32"])
            for name, ms in samples.items():
                med = statistics.median(ms)
                rows.append({"impl": name, "batch": b, "threads": args.threads,
                             "ms_per_pass": round(med, 2), "repeats": args.repeats,
                             "int8_gb_per_s": round(int8_mb / med, 2) if name != "fp32" else None,
                             "speedup_vs_fp32": round(fp32 / med, 2),
                             "load_avg": load_average()})  # fmt: skip
                print(f"B={b:3d} {name:9s} {med:8.2f} ms  ×{fp32 / med:5.2f} vs fp32")
    lines = header(
        f"int8 linear on CPU (SmolLM2-135M's weight shapes, {args.layers} layers + LM head; "
        "one pass = one decode step's products)",
        env, f"isa {kernel.isa()}", f"{args.threads} thread(s)",
        f"load average {load} → {load_average()}",
    )  # fmt: skip
    lines += [f"{int8_mb:.0f} MB of int8 weights per pass (fp32: {4 * int8_mb:.0f} MB).", "",
              "| batch | impl | ms per pass | int8 GB/s | × fp32 |", "|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        gbs = "-" if r["int8_gb_per_s"] is None else r["int8_gb_per_s"]
        lines.append(f"| {r['batch']} | {r['impl']} | {r['ms_per_pass']} | {gbs} | "
                     f"{r['speedup_vs_fp32']} |")  # fmt: skip
    report = {"bench": "int8_linear", "isa": kernel.isa(), "environment": env,
              "rows": stamp(rows, env, torch.device("cpu"))}  # fmt: skip
    write_results(args.out, "int8_linear", report, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
