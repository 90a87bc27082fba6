"""µs per call of the fused kernels against their baselines, and of a whole sampler step.

    python -m benchmarks.bench_kernels            # → benchmarks/results/<device>/kernels.{json,md}
    python -m benchmarks.bench_kernels --quick    # batch 1, short timings, no torch.compile: a
                                                  # smoke run (benchmarks/gpu_proof.sh --dry-run)

On CUDA (timed with `triton.testing.do_bench`, medians):
- attention core at batch 1, 8, 64 (T = 32, 64; H = 4, Dh = 64; fp32 and bf16): the Triton kernel
  vs the layer's PyTorch path (two RMSNorms + SDPA), vs SDPA alone on ready (B, H, T, Dh) tensors,
  vs eager math (norms + softmax(q·kᵀ/√d)·v as separate ops);
- guided update at batch 1, 8, 64 (D = 384, K = 2, CFG): Triton vs the eager reference vs
  `torch.compile` of the reference;
- a whole `fast` sampler step (score network "small" preset with CFG rows + guided update):
  eager (SDPA + reference update) vs fused (Triton kernels, launched one by one) vs fused + CUDA
  graph (`CapturedSampler` replay), plus kernels and launch API calls per step (torch.profiler).
On CPU (repeated `time.perf_counter` medians): the C++ guided update vs the eager reference vs
`torch.compile` of it, the PyTorch attention paths, and the eager sampler step; the GPU rows are
listed as pending.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from dglm.engine import layers
from dglm.engine.diffusion.captured import CapturedSampler, sampler_coefficients
from dglm.engine.diffusion.sampler import Guidance, SamplerConfig
from dglm.engine.diffusion.score_network import SCORE_NET_PRESETS, ScoreNetwork
from dglm.engine.evaluation.provenance import load_average
from dglm.kernels import guided_update as gu
from dglm.kernels.attention import qk_norm_attention, qk_norm_attention_ref, rms_norm
from dglm.kernels.guided_update import GuidedUpdateInputs, select_guided_update

from benchmarks import common
from benchmarks.common import ROOT

BATCHES = (1, 8, 64)
ATTN_SHAPES = [(32, 4, 64), (64, 4, 64)]  # (T, H, Dh)
LATENT, PROBES = 384, 2
PENDING_GPU = [
    "attention: triton vs layer PyTorch path vs SDPA alone vs eager math (CUDA, fp32/bf16)",
    "guided_update: triton vs eager reference vs torch.compile(reference) (CUDA)",
    "sampler_step: eager vs fused vs fused+graph (CUDA, fp32/bf16)",
    "launches: CUDA kernels and launch API calls per sampler step",
]


# ------------------------------------------------------------------------------ timing helpers
def time_cpu(fn: Callable[[], object], budget_s: float = 0.5, repeats: int = 9) -> float:
    """Median µs per call over `repeats` samples of n calls each (n sized to the budget)."""
    for _ in range(3):
        fn()
    t0 = time.perf_counter()
    fn()
    one = max(time.perf_counter() - t0, 1e-7)
    n = max(1, int(budget_s / repeats / one))
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        samples.append((time.perf_counter() - t0) / n)
    return statistics.median(samples) * 1e6


def time_gpu(fn: Callable[[], object], rep_ms: int = 200) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=rep_ms, return_mode="median") * 1e3  # ms → µs


# ------------------------------------------------------------------------------ inputs
def attention_inputs(b, t, h, dh, dtype, device, gen):
    qkv = (2 * torch.randn(b, t, 3, h, dh, generator=gen)).to(device, dtype)
    q, k, v = qkv.unbind(2)  # (B, T, H, Dh) strided views, as the layer produces them
    w_q, w_k = ((1 + 0.1 * torch.randn(dh, generator=gen)).to(device, dtype) for _ in range(2))
    return q, k, v, w_q, w_k


def eager_math_attention(q, k, v, w_q, w_k, eps=1e-6):
    """Norms + softmax(q·kᵀ/√d)·v as separate ops (no SDPA)."""
    q, k = rms_norm(q, w_q, eps), rms_norm(k, w_k, eps)
    q, k, v = (y.transpose(1, 2) for y in (q, k, v))  # (B, H, T, Dh)
    s = (q @ k.transpose(-1, -2)).float() / math.sqrt(q.shape[-1])
    return (s.softmax(-1).to(v.dtype) @ v).transpose(1, 2)


def guided_inputs(b, device, gen):
    d, k = LATENT, PROBES
    alpha = 0.05 + 0.9 * torch.rand(b, generator=gen)
    coefs = torch.stack([alpha, (1 - alpha**2).sqrt(), *torch.rand(3, b, generator=gen)], 1)
    args = GuidedUpdateInputs(
        torch.randn(b, d, generator=gen),  # z
        torch.randn(b, d, generator=gen),  # v_cond
        torch.randn(b, d, generator=gen),  # v_uncond
        1 + 3 * torch.rand(b, generator=gen),  # cfg_scale
        torch.randn(k, d, generator=gen),  # probe_weight
        torch.randn(k, generator=gen),  # probe_bias
        torch.rand(b, k, generator=gen),  # probe_target
        5 * torch.rand(b, k, generator=gen),  # probe_scale
        torch.randn(b, d, generator=gen),  # noise
        coefs,
    )
    return GuidedUpdateInputs(*(a.to(device) for a in args)), True  # (inputs, rescale)


# ------------------------------------------------------------------------------ benchmarks
def bench_attention(device, timer, gen, rows: list, dtypes, batches=BATCHES) -> None:
    for dtype in dtypes:
        for t, h, dh in ATTN_SHAPES:
            for b in batches:
                q, k, v, w_q, w_k = attention_inputs(b, t, h, dh, dtype, device, gen)
                qn, kn, vn = (y.transpose(1, 2).contiguous() for y in (q, k, v))
                args = (q, k, v, w_q, w_k)
                impls = {
                    "layer_pytorch(norms+sdpa)": partial(qk_norm_attention_ref, *args),
                    "sdpa_alone": partial(F.scaled_dot_product_attention, qn, kn, vn),
                    "eager_math": partial(eager_math_attention, *args),
                }
                if device.type == "cuda":
                    impls = {"triton": partial(qk_norm_attention, *args)} | impls
                with torch.no_grad():
                    for impl, fn in impls.items():
                        us = timer(fn)
                        rows.append({
                            "bench": "attention", "impl": impl, "batch": b, "tokens": t,
                            "heads": h, "head_dim": dh, "dtype": str(dtype).split(".")[-1],
                            "us": round(us, 2),
                        })  # fmt: skip
                print(f"attention {dtype} T={t} B={b}: done", file=sys.stderr)


def bench_guided_update(device, timer, gen, rows: list, batches=BATCHES, compile=True) -> None:
    compiled = torch.compile(gu.guided_update_ref, dynamic=False) if compile else None
    for b in batches:
        args = guided_inputs(b, device, gen)
        impls = {}
        if device.type == "cuda":
            impls["triton"] = partial(gu.guided_update_triton, *args)
        elif gu.cpp_available():
            impls["cpp"] = partial(gu.guided_update_cpu, *args)
        impls["eager_reference"] = partial(gu.guided_update_ref, *args)
        if compiled is not None:
            impls["torch_compile_reference"] = partial(compiled, *args)
        ref = gu.guided_update_ref(*args)
        for impl, fn in impls.items():
            out = fn()
            err = max((o - r).abs().max().item() for o, r in zip(out, ref, strict=True))
            rows.append({
                "bench": "guided_update", "impl": impl, "batch": b, "dim": LATENT,
                "probes": PROBES, "cfg": True, "us": round(timer(fn), 2),
                "max_abs_err_vs_ref": err,
            })  # fmt: skip
        print(f"guided_update B={b}: done", file=sys.stderr)


def _sampler_setup(device, dtype, b, gen):
    torch.manual_seed(0)
    net = ScoreNetwork(SCORE_NET_PRESETS["small"]).to(device, dtype).eval()
    steps = 4
    config = SamplerConfig(sampler="ddpm", num_inference_steps=steps)
    d = net.config.latent_dim
    noise = torch.randn(steps + 1, b, d, generator=gen).to(device)
    context = torch.randn(b, d, generator=gen).to(device)
    cfg_scale = torch.full((b,), 3.0, device=device)
    guidance = Guidance(
        torch.randn(PROBES, d, generator=gen).to(device),
        torch.randn(PROBES, generator=gen).to(device),
        torch.rand(b, PROBES, generator=gen).to(device),
        torch.full((b, PROBES), 5.0, device=device),
    )
    return net, config, noise, context, cfg_scale, guidance


def _one_eager_step(net, noise, context, cfg_scale, guidance, update_fn, coefs, alpha2: float):
    """The body of `sampling.sample`'s loop for one step, with the engine's CFG model_fn."""
    dt = next(net.parameters()).dtype
    z, b = noise[0], noise.shape[1]
    a2 = torch.full((b,), alpha2, device=z.device)
    drop = torch.arange(2 * b, device=z.device) >= b
    v = net(torch.cat((z, z)).to(dt), torch.cat((context, context)).to(dt),
            torch.cat((a2, a2)).to(dt), drop)  # fmt: skip
    g = guidance
    inputs = GuidedUpdateInputs(z, v[:b].float(), v[b:].float(), cfg_scale, g.weight, g.bias,
                                g.target, g.scale, noise[1], coefs[0].expand(b, 5))  # fmt: skip
    return update_fn(inputs, True)


def bench_sampler_step(device, timer, gen, rows: list, dtypes, batches=BATCHES) -> None:
    for dtype in dtypes:
        for b in batches:
            net, config, noise, context, cfg_scale, guidance = _sampler_setup(device, dtype, b, gen)
            coefs = sampler_coefficients(config)
            alpha2 = float(coefs[0, 0] ** 2)  # host scalars precomputed, as sampling.sample does
            coefs = coefs.to(device)

            inputs = (net, noise, context, cfg_scale, guidance)

            def step(impl: str, inputs=inputs, coefs=coefs, alpha2=alpha2) -> Callable:
                update_fn = select_guided_update(device, impl)
                return partial(_one_eager_step, *inputs, update_fn, coefs, alpha2)

            impls: dict[str, tuple[bool, Callable]] = {}
            impls["eager(sdpa+reference)"] = (False, step("reference"))
            if device.type == "cuda":
                impls["fused(triton)"] = (True, step("triton"))
                graphs = CapturedSampler(net, PROBES, max_steps=config.num_inference_steps,
                                         batch_sizes=(b,))  # fmt: skip
                graph, _ = graphs.load(noise, config, context, cfg_scale, guidance)
                impls["fused+graph"] = (True, graph.replay)
            else:
                impls["eager(sdpa+cpp)"] = (False, step("auto"))
            with torch.no_grad():
                for impl, (fused, fn) in impls.items():
                    layers.FUSED_ATTENTION = fused
                    try:
                        us = timer(fn)
                        launches = count_launches(fn, device)
                    finally:
                        layers.FUSED_ATTENTION = True
                    rows.append({
                        "bench": "sampler_step", "impl": impl, "batch": b, "cfg_rows": 2 * b,
                        "preset": "small", "dtype": str(dtype).split(".")[-1],
                        "us": round(us, 2), **launches,
                    })  # fmt: skip
            print(f"sampler_step {dtype} B={b}: done", file=sys.stderr)


def count_launches(fn: Callable, device: torch.device) -> dict:
    """Per call: CUDA kernels run and launch API calls (kernel + graph launches); CPU: aten ops."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    fn()
    with profile(activities=acts) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
    events = prof.events()
    if device.type == "cuda":
        kernels = sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
        api = sum(
            1 for e in events
            if e.name in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx",
                          "cudaLaunchKernelExC", "cudaGraphLaunch")
        )  # fmt: skip
        return {"cuda_kernels": kernels, "launch_calls": api}
    top = sum(1 for e in events if e.name.startswith("aten::") and e.cpu_parent is None)
    return {"aten_ops_top_level": top}


# ------------------------------------------------------------------------------ report
def speedups(rows: list) -> list[dict]:
    """Baseline / candidate per (bench, shape) for the targets the issue sets."""
    pairs = {
        "attention": ("layer_pytorch(norms+sdpa)", ("triton", "sdpa_alone", "eager_math")),
        "guided_update": ("eager_reference", ("triton", "cpp", "torch_compile_reference")),
        "sampler_step": ("eager(sdpa+reference)",
                         ("fused(triton)", "fused+graph", "eager(sdpa+cpp)")),
    }  # fmt: skip
    keys = ("batch", "tokens", "dtype")
    out = []
    for bench, (base, cands) in pairs.items():
        for r in rows:
            if r["bench"] != bench or r["impl"] != base:
                continue
            for c in rows:
                same = all(c.get(x) == r.get(x) for x in keys)
                if c["bench"] == bench and c["impl"] in cands and same:
                    out.append({
                        "bench": bench, **{x: r[x] for x in keys if x in r},
                        "impl": c["impl"], "vs": base, "speedup": round(r["us"] / c["us"], 2),
                    })  # fmt: skip
    return out


def markdown(report: dict) -> str:
    details = [f"load average {report['load_avg']} at the end"] if report["load_avg"] else []
    lines = common.header(
        f"Kernel benchmarks — {report['device']}", report["environment"], *details
    )
    if report["pending"]:
        lines += ["**Pending (needs a GPU session):**", ""]
        lines += [f"- {p}" for p in report["pending"]] + [""]
    for bench in ("attention", "guided_update", "sampler_step"):
        rows = [r for r in report["rows"] if r["bench"] == bench]
        if not rows:
            continue
        cols = [c for c in rows[0] if c not in ("bench", "device", "versions", "commit")]
        lines += [f"## {bench}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
        lines.append("")
    lines += ["## speedups (baseline µs / candidate µs)", "",
              "| bench | shape | candidate | vs | × |", "|---|---|---|---|---|"]  # fmt: skip
    for s in report["speedups"]:
        shape = ", ".join(f"{k}={s[k]}" for k in ("batch", "tokens", "dtype") if k in s)
        lines.append(f"| {s['bench']} | {shape} | {s['impl']} | {s['vs']} | {s['speedup']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--threads", type=int, default=1,
        help="CPU: torch threads (1 by default: on a shared machine, spinning OpenMP workers "
        "preempted by other jobs make multi-threaded timings meaningless)",
    )  # fmt: skip
    p.add_argument("--quick", action="store_true",
                   help="batch 1 only, short timings, no torch.compile baseline (a smoke run)")  # fmt: skip
    args = p.parse_args(argv)
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    rows: list[dict] = []
    if device.type == "cuda":
        timer, dtypes = time_gpu, (torch.float32, torch.bfloat16)
        if args.quick:
            timer = partial(time_gpu, rep_ms=50)
    else:
        timer, dtypes = time_cpu, (torch.float32,)
        if args.quick:
            timer = partial(time_cpu, budget_s=0.05, repeats=3)
        torch.set_num_threads(args.threads)
    batches = (1,) if args.quick else BATCHES
    bench_attention(device, timer, gen, rows, dtypes, batches)
    bench_guided_update(device, timer, gen, rows, batches, compile=not args.quick)
    bench_sampler_step(device, timer, gen, rows, dtypes, batches)
    env = common.environment(device, ("dglm-engine", "torch", "triton"))
    report = {
        "device": common.device_name(device),
        "environment": env,
        "load_avg": load_average() if device.type == "cpu" else None,
        "pending": PENDING_GPU if device.type != "cuda" else [],
        "quick": args.quick,
        "rows": common.stamp(rows, env, device),
        "speedups": speedups(rows),
    }
    common.write_results(args.out / report["device"], "kernels", report, markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
