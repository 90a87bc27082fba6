"""The benchmark suite: the engine against what a user would otherwise run, in one process.

    python -m benchmarks.run --suite cpu [--quick] [--threads 1] [--out DIR]
    python -m benchmarks.run --suite gpu [--quick] [--no-fast-decode]
    → benchmarks/results/<device>/suite.{json,md}, suite_relative_runtime.png,
      suite_latency_vs_batch.png, suite_samples.jsonl (--quick: suite_quick.*)

Methods, on the same prompts, seeds and decoder, at generation lengths 16/32/64/128 and batch
1/8/32 (--quick: 16/32 and 1/8): Hugging Face `generate` (no control); the engine uncontrolled,
with one probe (sentiment=positive) and two (+ toxicity=<non-toxic>); reference-style DGLM (250 fp32
DDPM steps, `exact` guidance through the score network, eager HF decoding with the soft prompt);
FUDGE (top-k reranking with the same probe). See benchmarks/suite/ for how each is run and judged.

CPU: fp32, one torch thread by default (a shared 2-core machine is erratic with two); the slow
baselines are skipped past a batch / batch × length cap (a "skipped: reason" row). GPU: the engine
in bf16 with its CUDA-graph sampler and the kernels it selects (Triton where available); the
reference stays fp32.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from dglm.engine import bundle as bundle_io
from dglm.engine.cli.common import comma_separated
from dglm.engine.decoding.runner import FUSED_MAX_BATCH
from dglm.engine.engine import Engine

from benchmarks.common import ROOT, device_name
from benchmarks.suite.config import METHODS, preset
from benchmarks.suite.methods import hf_decoder_dir, load_hf
from benchmarks.suite.report import write_report
from benchmarks.suite.runner import run

_ints = comma_separated(int, "integers")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--suite", required=True, choices=("cpu", "gpu"))
    ap.add_argument("--quick", action="store_true", help="lengths 16,32 and batches 1,8")
    ap.add_argument("--bundle", default="default", help="bundle directory or shipped name")
    ap.add_argument("--out", type=Path, default=None,
                    help="output folder (default benchmarks/results/<device>)")  # fmt: skip
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: 1 on the CPU suite, torch's own on GPU)")  # fmt: skip
    ap.add_argument("--lengths", type=_ints, default=None, help="override, e.g. 16,32")
    ap.add_argument("--batches", type=_ints, default=None, help="override, e.g. 1,8")
    ap.add_argument("--repeats", type=_ints, default=None,
                    help="timed repeats at batch 1 and above, e.g. 3,2")  # fmt: skip
    ap.add_argument("--methods", default=None,
                    help=f"comma-separated subset of {','.join(METHODS)}")  # fmt: skip
    ap.add_argument("--scale", type=float, default=None, help="guidance scale of the controls")
    ap.add_argument("--no-fast-decode", action="store_true",
                    help="decode the engine's rows without its persistent runner "
                    "(Engine(fast_decode=False): an eager static step built per call)")  # fmt: skip
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    repeats = args.repeats
    if repeats is not None and len(repeats) == 1:
        repeats = (repeats[0], repeats[0])
    try:
        config = preset(
            args.suite,
            args.quick,
            lengths=args.lengths,
            batches=args.batches,
            repeats=repeats,
            methods=tuple(args.methods.split(",")) if args.methods else None,
            control_scale=args.scale,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if config.suite == "gpu" and not torch.cuda.is_available():
        print("error: --suite gpu needs a CUDA device but torch.cuda.is_available() is False: "
              "install a CUDA build of torch on a GPU machine, or run --suite cpu",
              file=sys.stderr)  # fmt: skip
        return 2
    device = torch.device("cuda" if config.suite == "gpu" else "cpu")
    threads = args.threads if args.threads is not None else (1 if device.type == "cpu" else None)
    if threads is not None:
        torch.set_num_threads(threads)

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    bundle_dir = bundle_io.resolve_bundle_dir(args.bundle)
    notes = [f"torch threads: {torch.get_num_threads()}"]
    fast = not args.no_fast_decode
    if device.type == "cuda":
        engine = Engine.from_pretrained(
            bundle_dir, device=device, dtype="bfloat16", fast_decode=fast
        )
        reference = Engine.from_pretrained(
            bundle_dir, device=device, dtype="float32", cuda_graphs=False
        )
        hf_dir = hf_decoder_dir(engine, bundle_dir)
        hf = load_hf(hf_dir, device, torch.bfloat16)
        hf_ref = load_hf(hf_dir, device, torch.float32)
        notes.append("engine bf16 (decoder, score network, prompt generator); hf_generate bf16; "
                     "reference_dglm fp32; perplexity from the fp32 decoder")  # fmt: skip
        notes.append("the engine's encode / diffusion / pg stage times are taken without a device "
                     "sync inside Engine.generate (the call's latency is synchronised)")  # fmt: skip
    else:
        engine = Engine.from_pretrained(bundle_dir, device=device, dtype="float32",
                                        fast_decode=fast)  # fmt: skip
        # the reference-style pipeline swaps in HF decoding: its own engine, untouched weights
        reference = Engine.from_pretrained(bundle_dir, device=device, dtype="float32",
                                           quantize="none")  # fmt: skip
        hf = hf_ref = load_hf(hf_decoder_dir(engine, bundle_dir), device, torch.float32)
        quant = getattr(engine.decoder, "quantized", "none")
        notes.append(f"the engine's default CPU paths (C++ guided update; decoder weights "
                     f"{'int8, fp32 activations' if quant == 'int8' else 'fp32'}); "
                     "reference_dglm and hf_generate fp32")  # fmt: skip
    if engine.decode_runner is not None:
        t = time.perf_counter()
        engine.decode_runner.warmup(
            tuple(b for b in config.batches if b <= engine.decode_runner.max_batch)
        )
        what = "CUDA graphs" if device.type == "cuda" else "traced input-major step"
        if getattr(engine.decode_runner, "fused", None) is not None:
            what = (f"fused int8 C++ step up to batch {FUSED_MAX_BATCH} rows, traced step above; "
                    "C++ nucleus sampler")  # fmt: skip
        notes.append(f"engine: Engine(fast_decode=True), persistent decode runner ({what}; "
                     f"captured/traced for every batch and KV bucket up front in "
                     f"{time.perf_counter() - t:.0f} s, not timed)")  # fmt: skip
    say(f"loaded in {time.perf_counter() - t0:.0f} s; preset {config.preset}: lengths "
        f"{config.lengths}, batches {config.batches}, repeats {config.repeats}")  # fmt: skip
    report, samples = run(
        config, engine, reference, hf, hf_ref, device, str(args.bundle), say, tuple(notes)
    )
    report["wall_s"] = time.perf_counter() - t0
    out = args.out or ROOT / "benchmarks" / "results" / device_name(device)
    paths = write_report(report, samples, out, config.output_name)
    for c in report["targets"]:
        status = {True: "met", False: "MISSED", None: "not measured"}[c["met"]]
        value = "—" if c["value"] is None else f"{c['value']:.3f}"
        say(f"target: {c['target']} [{c['where']}]: {value} {c['threshold']} → {status}")
    say(f"wrote {', '.join(str(p) for p in paths.values())} ({report['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
