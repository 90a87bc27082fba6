"""Benchmark the fused guided step on CPU: the C++ op against the eager PyTorch reference.

    python -m benchmarks.bench_guided_update [--out benchmarks/results/cpu] [--repeats 101]

Times, in µs per call (median of `repeats` time.perf_counter measurements after warm-up, the
implementations interleaved so they share the machine's noise):
  reference  `guided_update_ref`, eager PyTorch
  cpp        `guided_update_cpu`: the C++ op with its Python wrapper (tensor → array views,
             output allocation), what the engine calls
  cpp_raw    `dglm.kernels.cpu_ops.guided_update` on numpy arrays with preallocated outputs
Writes one JSON row per measurement to <out>/guided_update.json and a table to
<out>/guided_update.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from dglm.engine.evaluation.provenance import load_average
from dglm.kernels import cpu_ops
from dglm.kernels.guided_update import GuidedUpdateInputs, guided_update_cpu, guided_update_ref

from benchmarks.common import environment, header, stamp, write_results

BATCHES = (1, 8, 64)
DIM = 384
PROBES = 2
IMPLS = ("reference", "cpp", "cpp_raw")


def make_inputs(b: int, d: int, k: int, seed: int = 0) -> GuidedUpdateInputs:
    g = torch.Generator().manual_seed(seed)
    coefs = torch.rand(b, 5, generator=g) * 0.9 + 0.05  # (B, 5)
    return GuidedUpdateInputs(
        z=torch.randn(b, d, generator=g),
        v_cond=torch.randn(b, d, generator=g),
        v_uncond=torch.randn(b, d, generator=g),
        cfg_scale=torch.rand(b, generator=g) * 5 + 1,
        probe_weight=torch.randn(k, d, generator=g) / d**0.5,
        probe_bias=torch.randn(k, generator=g),
        probe_target=torch.randint(0, 2, (b, k), generator=g).float(),
        probe_scale=torch.rand(b, k, generator=g) * 4,
        noise=torch.randn(b, d, generator=g),
        coefs=coefs,
    )


def calls(inputs: GuidedUpdateInputs) -> dict[str, Callable[[], object]]:
    arrays = [t.numpy() for t in inputs]
    z_next, x0 = np.empty_like(arrays[0]), np.empty_like(arrays[0])
    return {
        "reference": lambda: guided_update_ref(inputs, rescale=True),
        "cpp": lambda: guided_update_cpu(inputs, rescale=True),
        "cpp_raw": lambda: cpu_ops.guided_update(*arrays, True, z_next, x0),
    }


def time_interleaved(
    fns: dict[str, Callable[[], object]], repeats: int, min_repeat_s: float = 2e-3
) -> dict[str, list[float]]:
    """µs per call of each fn: `repeats` samples each, taken round-robin after a warm-up."""
    number = {}
    for name, fn in fns.items():
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < 0.2:  # warm-up, and calls per sample for ≥ min_repeat_s
            fn()
            n += 1
        number[name] = max(1, int(n * min_repeat_s / (time.perf_counter() - t0)))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            n = number[name]
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            samples[name].append((time.perf_counter() - t0) / n * 1e6)
    return samples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "cpu")
    parser.add_argument("--repeats", type=int, default=101)
    args = parser.parse_args(argv)

    torch.set_num_threads(os.cpu_count() or 1)
    env, load = environment(torch.device("cpu"), ("dglm-engine", "torch", "numpy")), load_average()
    rows = []
    for b in BATCHES:
        inputs = make_inputs(b, DIM, PROBES)
        for got, want in zip(guided_update_cpu(inputs), guided_update_ref(inputs), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        samples = time_interleaved(calls(inputs), args.repeats)
        ref_us = statistics.median(samples["reference"])
        for impl in IMPLS:
            us = sorted(samples[impl])
            med = statistics.median(us)
            rows.append(
                {
                    "op": "guided_update",
                    "impl": impl,
                    "device": "cpu",
                    "batch": b,
                    "dim": DIM,
                    "probes": PROBES,
                    "cfg": True,
                    "rescale": True,
                    "dtype": "float32",
                    "us_median": round(med, 3),
                    "us_p10": round(us[len(us) // 10], 3),
                    "us_p90": round(us[(9 * len(us)) // 10], 3),
                    "repeats": args.repeats,
                    "speedup_vs_reference": round(ref_us / med, 2),
                    "load_avg": load,
                }
            )
            print(f"B={b:3d} {impl:10s} {med:9.2f} µs  ×{ref_us / med:5.2f} vs reference")

    title = f"guided_update on CPU (D={DIM}, K={PROBES}, CFG on, rescale on, fp32)"
    lines = [
        *header(title, env, f"load average {load}"),
        f"Median of {args.repeats} interleaved time.perf_counter samples, µs per call.",
        "",
        "| batch | reference (µs) | cpp (µs) | cpp_raw (µs) | cpp speedup | cpp_raw speedup |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for b in BATCHES:
        r = {row["impl"]: row for row in rows if row["batch"] == b}
        lines.append(
            f"| {b} | {r['reference']['us_median']:.1f} | {r['cpp']['us_median']:.1f} "
            f"| {r['cpp_raw']['us_median']:.1f} | {r['cpp']['speedup_vs_reference']:.1f}× "
            f"| {r['cpp_raw']['speedup_vs_reference']:.1f}× |"
        )
    lines += [
        "",
        "cpp = `guided_update_cpu` (Python wrapper + C++ op, what the engine calls); "
        "cpp_raw = `dglm.kernels.cpu_ops.guided_update` on numpy arrays with preallocated outputs.",
    ]
    report = {"environment": env, "rows": stamp(rows, env, torch.device("cpu"))}
    write_results(args.out, "guided_update", report, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
