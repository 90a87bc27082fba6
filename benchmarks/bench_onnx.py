"""ONNX Runtime backend against our PyTorch path, per stage and end to end.

    python -m benchmarks.bench_onnx [--quick] [--device cpu|cuda] [--threads 1]
                                    [--bundle DIR] [--export DIR] [--out benchmarks/results/cpu]

Model: the real encoder and decoder (all-MiniLM-L6-v2, SmolLM2-135M) with "small" score network and
prompt generator (untrained, same shapes as the default bundle) and the seed sentiment probe; the
bundle and its fp32 ONNX export are cached under $DGLM_CACHE/bench_onnx unless given.
Stages, each timed on both backends in the same process, interleaved (median of `repeats`
time.perf_counter samples; CUDA synchronised before each reading):
  score_network     one evaluation at batch B (B = 2 × requests with CFG)
  prompt_generator  one call at batch B
  prefill / decode  `decoding.generate` vs the ORT decoder's loop, greedy, 32 new tokens:
                    prefill ms and decode ms per token
  end_to_end        Engine.generate, backend "torch" vs "onnx" (50 DDPM steps, `fast` probe guidance,
                    32 new tokens, top-p sampling), with the same seeds: tokens must be identical
Writes one JSON row per measurement to <out>/onnx.json and a table to <out>/onnx.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from dglm.engine.api import GenerationParams
from dglm.engine.decoding.loop import DecodeParams
from dglm.engine.decoding.loop import generate as torch_generate
from dglm.engine.encode.encoder import SentenceEncoder
from dglm.engine.engine import Engine
from dglm.engine.evaluation.provenance import load_average
from dglm.engine.models.loading import cache_root
from dglm.engine.probes import Control
from dglm.engine.training.builder import (
    SEED_SENTIMENT,
    create_bundle,
    probe_from_texts,
    read_labelled_jsonl,
)
from dglm.export.onnx import ExportConfig, export_onnx
from dglm.export.runtime import RuntimeOptions

from benchmarks.common import ROOT, environment, header, write_results

PROMPTS = [
    "The movie was",
    "I think that the food at this place",
    "Prices are rising while",
    "The debate last night",
    "Once upon a time",
    "The weather today",
    "My favourite book is",
    "The new phone",
]


def _cache() -> Path:
    return cache_root() / "bench_onnx"


def _portable(path: Path) -> str:
    """A path for the results file: relative to the benchmark cache ($DGLM_CACHE/...) or to the
    repository, never this machine's absolute path."""
    path = Path(path).resolve()
    for root, name in ((_cache(), "$DGLM_CACHE/bench_onnx"), (ROOT, ".")):
        try:
            return f"{name}/{path.relative_to(root.resolve())}"
        except ValueError:
            continue
    return path.name


def ensure_bundle(path: Path | None) -> Path:
    if path is not None:
        return path
    out = _cache() / "bundle"
    if not (out / "config.json").is_file():
        texts, labels = read_labelled_jsonl(SEED_SENTIMENT)
        probe = probe_from_texts(
            "sentiment", SentenceEncoder(), texts, labels, ("negative", "positive")
        )
        create_bundle(out, "all-MiniLM-L6-v2", "smollm2", "small", "small", [probe])
    return out


def ensure_export(bundle: Path, path: Path | None, reexport: bool = False) -> Path:
    if path is not None:
        return path
    out = _cache() / "export_fp32"
    manifest = out / "manifest.json"
    sha = subprocess.run(
        ["sha256sum", str(bundle / "config.json")], capture_output=True, text=True
    ).stdout.split()[0]
    stale = not manifest.is_file() or reexport
    if stale or json.loads(manifest.read_text())["bundle"]["config_sha256"] != sha:
        export_onnx(bundle, out, ExportConfig(dtype="fp32", batch_buckets=(1, 2, 4, 8, 16)))
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    fns: dict[str, Callable[[], object]], repeats: int, device: torch.device
) -> dict[str, list[float]]:
    """ms per call of each fn: one warm-up call each, then `repeats` samples taken round-robin."""
    for fn in fns.values():
        fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            t = time.perf_counter()
            fn()
            _sync(device)
            samples[name].append(1e3 * (time.perf_counter() - t))
    return samples


def _stats(ms: list[float]) -> dict:
    qs = statistics.quantiles(ms, n=10) if len(ms) > 1 else [ms[0]] * 9
    return {
        "ms_median": round(statistics.median(ms), 3),
        "ms_p10": round(qs[0], 3),
        "ms_p90": round(qs[-1], 3),
        "repeats": len(ms),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer repeats and batch sizes")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--threads", type=int, default=1, help="torch threads = ORT intra-op threads")
    p.add_argument("--bundle", type=Path, default=None)
    p.add_argument("--export", type=Path, default=None, help="an fp32 `dglm export onnx` dir")
    p.add_argument("--reexport", action="store_true", help="refresh the cached export")
    p.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/<device>")
    args = p.parse_args(argv)

    import onnxruntime  # the optional `onnx` extra: only for its providers list

    if (
        args.device == "cuda"
        and "CUDAExecutionProvider" not in onnxruntime.get_available_providers()
    ):
        print(f"error: --device cuda needs onnxruntime with the CUDA execution provider; "
              f"onnxruntime {onnxruntime.__version__} has {onnxruntime.get_available_providers()}: "
              "install onnxruntime-gpu, or run --device cpu", file=sys.stderr)  # fmt: skip
        return 2
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    load_before = load_average()
    bundle = ensure_bundle(args.bundle)
    export = ensure_export(bundle, args.export, args.reexport)
    t = time.perf_counter()
    te = Engine.from_pretrained(bundle, device=device, quantize="none")  # as exported: fp32
    load_torch = time.perf_counter() - t
    t = time.perf_counter()
    options = RuntimeOptions(threads=args.threads)
    oe = Engine.from_pretrained(export, device, backend="onnx", onnx_options=options)
    load_onnx = time.perf_counter() - t
    repeats = 5 if args.quick else 15
    e2e_repeats = 3 if args.quick else 7
    batches = (1, 8) if args.quick else (1, 4, 8)
    g = torch.Generator().manual_seed(0)
    d = te.encoder.dim
    rows: list[dict] = []

    def add(stage: str, batch: int, samples: dict[str, list[float]], **extra) -> None:
        ref = statistics.median(samples["torch"])
        for backend, ms in samples.items():
            rows.append(
                {
                    "stage": stage,
                    "backend": backend,
                    "batch": batch,
                    **_stats(ms),
                    "speedup_vs_torch": round(ref / statistics.median(ms), 3),
                    **extra,
                }
            )

    with torch.inference_mode():
        for b in batches:
            rows_cfg = 2 * b  # the CFG pair
            z = torch.randn(rows_cfg, d, generator=g).to(device)
            ctx = te.encoder.latents((PROMPTS * 4)[:rows_cfg]).to(device)
            a2 = torch.rand(rows_cfg, generator=g).to(device)
            drop = (torch.arange(rows_cfg) >= b).to(device)
            add(
                "score_network",
                rows_cfg,
                time_interleaved(
                    {
                        "torch": partial(te.dglm.score_net, z, ctx, a2, drop),
                        "onnx": partial(oe.dglm.score_net, z, ctx, a2, drop),
                    },
                    repeats,
                    device,
                ),
            )
            zb, ab = z[:b], torch.full((b,), 0.95, device=device)
            add(
                "prompt_generator",
                b,
                time_interleaved(
                    {
                        "torch": partial(te.dglm.prompt_gen, zb, ab),
                        "onnx": partial(oe.dglm.prompt_gen, zb, ab),
                    },
                    repeats,
                    device,
                ),
            )
            prefix = [te.tokenizer.encode(s) for s in PROMPTS[:b]]
            soft = te.dglm.prompt_gen(zb, ab)
            params = [DecodeParams(max_new_tokens=32, temperature=0.0)]
            timings: dict[str, dict[str, list[float]]] = {"prefill": {}, "decode": {}}
            tokens = {}
            for _ in range(max(3, repeats // 3)):
                for name, run in (
                    (
                        "torch",
                        partial(torch_generate, te.decoder, te.tokenizer, prefix, params, soft),
                    ),
                    ("onnx", partial(oe.decoder.generate, te.tokenizer, prefix, params, soft)),
                ):
                    res, tm = run()
                    tokens[name] = [r.token_ids for r in res]
                    timings["prefill"].setdefault(name, []).append(1e3 * tm["prefill_s"])
                    per_tok = 1e3 * tm["decode_s"] / max(tm["decode_steps"], 1)
                    timings["decode"].setdefault(name, []).append(per_tok)
            same = tokens["torch"] == tokens["onnx"]
            add("prefill", b, timings["prefill"], greedy_tokens_identical=same)
            add("decode_per_token", b, timings["decode"], greedy_tokens_identical=same)

    # end to end: the whole pipeline, same seeds on both backends
    control = (Control("sentiment", "positive", 10.0),) if te.probes.probes else ()
    for b in batches:
        params = GenerationParams(seed=7, max_new_tokens=32, controls=control)
        stage_ms: dict[str, dict[str, list[float]]] = {}
        outs = {}
        samples: dict[str, list[float]] = {"torch": [], "onnx": []}
        for i in range(e2e_repeats + 1):
            for name, engine in (("torch", te), ("onnx", oe)):
                _sync(device)
                t = time.perf_counter()
                out = engine.generate(PROMPTS[:b], params)
                _sync(device)
                if i == 0:  # warm-up
                    continue
                samples[name].append(1e3 * (time.perf_counter() - t))
                outs[name] = [[s.token_ids for s in o.samples] for o in out]
                for stage, sec in out[0].timings.items():
                    stage_ms.setdefault(stage, {}).setdefault(name, []).append(1e3 * sec)
        same = outs["torch"] == outs["onnx"]
        add("end_to_end", b, samples, tokens_identical=same)
        for stage, per_backend in stage_ms.items():
            if stage != "total":
                add(f"e2e:{stage}", b, per_backend)

    meta = {
        "environment": environment(device, ("dglm-engine", "torch", "onnx", "onnxruntime")),
        "ort_intra_op_threads": args.threads,
        "ort_providers": onnxruntime.get_available_providers(),
        "load_avg_1m_before": load_before,
        "load_avg_1m_after": load_average(),
        "bundle": _portable(bundle),
        "export": _portable(export),
        "export_dtype": oe.onnx_models.manifest["dtype"],
        "kv_slots": oe.decoder.max_context,
        "load_s": {"torch": round(load_torch, 2), "onnx": round(load_onnx, 2)},
        "quick": args.quick,
    }
    rows = [{**r, **meta} for r in rows]  # one JSON row per measurement, with its provenance
    out = args.out or Path(__file__).resolve().parent / "results" / args.device
    write_results(out, "onnx", rows, markdown(rows, meta))
    print(markdown(rows, meta))
    return 0


def markdown(rows: list[dict], meta: dict) -> str:
    by = {(r["stage"], r["batch"], r["backend"]): r for r in rows}
    keys = list(dict.fromkeys((r["stage"], r["batch"]) for r in rows))
    env = meta["environment"]
    lines = [
        *header(
            f"ONNX Runtime vs PyTorch ({env['device']}, fp32)",
            env,
            f"{meta['ort_intra_op_threads']} ONNX Runtime intra-op threads",
            f"load average {meta['load_avg_1m_before']} → {meta['load_avg_1m_after']}",
        ),
        "SmolLM2-135M decoder, all-MiniLM-L6-v2 encoder, small score network / prompt generator "
        f"(untrained), KV buffer of {meta['kv_slots']} slots on ORT. Median ms (p10–p90) of "
        "interleaved samples; batch = rows (score network: 2 × requests for CFG).",
        "",
        "| stage | batch | torch ms | onnx ms | onnx speedup | same tokens |",
        "|---|---:|---:|---:|---:|:---:|",
    ]
    for stage, batch in keys:
        t, o = by[(stage, batch, "torch")], by[(stage, batch, "onnx")]
        same = o.get("tokens_identical", o.get("greedy_tokens_identical", ""))
        lines.append(
            f"| {stage} | {batch} | {t['ms_median']:.1f} ({t['ms_p10']:.1f}–{t['ms_p90']:.1f}) | "
            f"{o['ms_median']:.1f} ({o['ms_p10']:.1f}–{o['ms_p90']:.1f}) | "
            f"{o['speedup_vs_torch']:.2f}× | {same} |"
        )
    e2e = [by[k + ("onnx",)] for k in keys if k[0] == "end_to_end"]
    verdict = all(r["speedup_vs_torch"] >= 1.0 for r in e2e)
    ratios = ", ".join(f"batch {r['batch']}: {r['speedup_vs_torch']:.2f}×" for r in e2e)
    lines += [
        "",
        f"Target (CPU): ONNX Runtime no slower than PyTorch end to end: "
        f"{'met' if verdict else 'NOT met'} "
        f"({ratios}).",
        f"Load time: torch {meta['load_s']['torch']} s, onnx {meta['load_s']['onnx']} s.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
