"""samples/s of one training step (prompt generator, diffusion, distillation): ours vs the fp32
eager baseline, in one run.

    python -m benchmarks.bench_train [--quick] [--device cpu] [--procs N] [--batch-size 16]
    → benchmarks/results/<device>/train.{json,md}

Prompt-generator step (the joint stage of `dglm train steering`), on B random token rows per
process, [prefix Sp ; P soft vectors ; continuation Tc], the P vectors made by the bundle-shaped
PromptGenerator (compact preset) from a noised latent:
- baseline `hf_eager`: transformers' causal LM (SmolLM2-135M from the converted directory, fp32,
  frozen), one forward over inputs_embeds = [prefix ; soft ; continuation] with labels (−100
  outside the continuation) and its own loss (the LM head at every position), backward into the
  prompt generator, AdamW; torch's default threads (the whole machine), one process.
- `ours`: the trainer's step (dglm.engine.training): our decoder (bf16 weights and autocast when
  `bf16_is_fast`, else fp32) with rank-8 adapters on every linear layer, `build_steer_batch` +
  `steer_lm_loss` (the prefix once, without gradients, into a KV cache; the LM head only where a
  continuation token is predicted), AdamW on the prompt generator and the adapters, gradient
  clipping. Three layouts: 1 process × 1 thread, 1 × all threads, N processes × 1 thread (data
  parallel, dglm.engine.training.parallel: gloo on localhost, gradients averaged before the optimizer
  step, each process its own rows; samples/s = every process's rows / wall time).
Target: the fastest whole-machine layout of ours ≥ 3× the baseline (training-default shape
16 + 8 + 24; the full run also reports 32 + 8 + 32).

Diffusion (`diffusion_loss`, ScoreNetwork compact preset) and distillation (`distill_loss`,
teacher / student / target networks of the compact preset) steps at batch 128: fp32 eager with
the default threads as the baseline, against ours: 1 × 1 thread and N × 1 data parallel (bf16
autocast when `bf16_is_fast`). Every step: forward, backward, (gradient averaging), clipping
(ours), AdamW; γ importance sampling and weight EMAs are left out on both sides.

Timing: warm-up steps, then the median of repeated time.perf_counter() measurements of one step.
In-process layouts alternate within each repetition (each with its own thread count); the data-
parallel ones run in one spawned group, a barrier before each timed step and the slowest rank's
time kept. Shapes, weights and token ids are random (fixed generators): speed does not depend on
them.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from dglm.engine.diffusion.score_network import SCORE_NET_PRESETS, ScoreNetwork
from dglm.engine.evaluation.provenance import load_average
from dglm.engine.models import load_decoder
from dglm.engine.models.loading import smollm2_dir
from dglm.engine.models.lora import LoraConfig, add_lora
from dglm.engine.prompt.generator import PROMPT_GENERATOR_PRESETS, PromptGenerator
from dglm.engine.training import parallel
from dglm.engine.training.diffusion import diffusion_loss
from dglm.engine.training.distill import DistillConfig, distill_loss, student_from_teacher
from dglm.engine.training.loop import GAMMA_MAX, GAMMA_MIN
from dglm.engine.training.steering import (
    SteerModules,
    bf16_is_fast,
    build_steer_batch,
    steer_lm_loss,
)
from torch import nn

from benchmarks import common
from benchmarks.common import ROOT

TARGET = 3.0  # ours (fastest whole-machine layout) ÷ baseline, prompt-generator step
TRAIN_SHAPE = (16, 24)  # prefix, continuation tokens: `dglm train steering`'s defaults
ISSUE_SHAPE = (32, 32)
STEPS = {
    "prompt_generator": "prompt generator",
    "diffusion": "diffusion",
    "distill": "distillation",
}
TIMING = {  # (warm-up, timed repeats): prompt-generator step, network steps
    "quick": ((1, 3), (2, 5)),
    "full": ((2, 7), (3, 15)),
}


@dataclass(frozen=True)
class Job:
    step: str  # "prompt_generator" | "diffusion" | "distill"
    impl: str  # "hf_eager" (prompt generator only) | "eager" (the networks' baseline) | "ours"
    batch: int  # rows per process
    dtype: str  # "float32" | "bfloat16": ours runs under bf16 autocast (decoder weights in bf16)
    prefix: int = 0  # prefix tokens (prompt generator)
    continuation: int = 0  # continuation tokens (prompt generator)
    decoder: str = "smollm2"  # "smollm2" or a decoder directory
    pg_preset: str = "compact"
    sn_preset: str = "compact"
    device: str = "cpu"
    seed: int = 0


# ------------------------------------------------------------------------------ environment
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------ the steps
def _optimize(
    opt: torch.optim.Optimizer, params: list[nn.Parameter], loss: torch.Tensor, clip: bool
) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    parallel.average_gradients(params)  # no-op in one process
    if clip:
        nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()


def _gen(job: Job) -> torch.Generator:
    """Each process its own rows; the same ones for every layout of the same rank."""
    return torch.Generator().manual_seed(1000 * job.seed + parallel.rank())


def _sphere(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1) * x.shape[-1] ** 0.5


def _pg_inputs(job: Job, vocab: int, pg: PromptGenerator, device: torch.device):
    """(prefix ids (B, Sp), continuation ids (B, Tc), noised latent z (B, d), alpha² (B,))."""
    g, b, d = _gen(job), job.batch, pg.config.latent_dim
    lo = min(100, vocab // 4)  # clear of the special tokens
    prefix = torch.randint(lo, vocab, (b, job.prefix), generator=g)
    cont = torch.randint(lo, vocab, (b, job.continuation), generator=g)
    a2 = 0.5 + 0.5 * torch.rand(b, generator=g)
    z = a2[:, None].sqrt() * _sphere(torch.randn(b, d, generator=g))
    z = z + (1 - a2[:, None]).sqrt() * torch.randn(b, d, generator=g)
    return prefix.to(device), cont.to(device), z.to(device), a2.to(device)


def _prompt_generator(job: Job, hidden: int, device: torch.device) -> PromptGenerator:
    config = PROMPT_GENERATOR_PRESETS[job.pg_preset]
    if config.decoder_dim != hidden:
        raise ValueError(
            f"--pg-preset {job.pg_preset} makes {config.decoder_dim}-wide soft prompts, the "
            f"decoder is {hidden} wide: pick a preset of the decoder's width"
        )
    torch.manual_seed(job.seed)  # the same initial weights in every process
    return PromptGenerator(config).to(device).train()


def pg_step_hf(job: Job) -> Callable[[], None]:
    """The naive step: HF's causal LM over the whole row, its own loss, fp32."""
    from transformers import AutoModelForCausalLM

    device = torch.device(job.device)
    directory = smollm2_dir() if job.decoder == "smollm2" else job.decoder
    hf = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    hf = hf.to(device).eval().requires_grad_(False)
    emb = hf.get_input_embeddings()
    pg = _prompt_generator(job, emb.weight.shape[1], device)
    prefix, cont, z, a2 = _pg_inputs(job, emb.weight.shape[0], pg, device)
    opt = torch.optim.AdamW(pg.parameters(), lr=1e-4)
    params = list(pg.parameters())
    ignore = torch.full((job.batch, job.prefix + pg.config.prompt_len), -100, device=device)

    def step() -> None:
        x = torch.cat([emb(prefix), pg(z, a2), emb(cont)], dim=1)  # (B, Sp + P + Tc, H)
        labels = torch.cat([ignore, cont], dim=1)  # HF shifts: position j predicts j + 1
        _optimize(opt, params, hf(inputs_embeds=x, labels=labels).loss, clip=False)

    return step


def pg_step_ours(job: Job) -> Callable[[], None]:
    """The trainer's step: cached prefix, adapters, LM head at continuation positions only."""
    device = torch.device(job.device)
    dtype = getattr(torch, job.dtype)
    decoder, _ = load_decoder(job.decoder, device, dtype)
    adapters = add_lora(decoder.requires_grad_(False).eval(), LoraConfig())
    pg = _prompt_generator(job, decoder.hidden_size, device)
    modules = SteerModules(pg, adapters)
    parallel.broadcast_parameters(modules)  # the adapters' random A: rank 0's everywhere
    prefix, cont, z, a2 = _pg_inputs(job, decoder.vocab_size, pg, device)
    p_rows, c_rows = prefix.tolist(), cont.tolist()
    params = [p for p in modules.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    prompt_len = pg.config.prompt_len

    def step() -> None:
        batch = build_steer_batch(p_rows, c_rows, prompt_len, 0)
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = steer_lm_loss(decoder, batch, pg(z, a2))
        _optimize(opt, params, loss, clip=True)

    return step


def _net_inputs(job: Job, d: int, device: torch.device):
    g = _gen(job)
    ctx, x = (
        _sphere(torch.randn(job.batch, d, generator=g)),
        _sphere(torch.randn(job.batch, d, generator=g)),
    )
    eps = torch.randn(job.batch, d, generator=g)
    return g, ctx.to(device), x.to(device), eps.to(device)


def diffusion_step(job: Job) -> Callable[[], None]:
    device = torch.device(job.device)
    torch.manual_seed(job.seed)
    net = ScoreNetwork(SCORE_NET_PRESETS[job.sn_preset]).to(device).train()
    g, ctx, x, eps = _net_inputs(job, net.config.latent_dim, device)
    gamma = (GAMMA_MIN + (GAMMA_MAX - GAMMA_MIN) * torch.rand(job.batch, generator=g)).to(device)
    drop = (torch.rand(job.batch, generator=g) < 0.1).to(device)
    weight = torch.ones(job.batch, device=device)
    return _network_step(
        job,
        list(net.parameters()),
        lambda: diffusion_loss(net, ctx, x, gamma, weight, drop, eps)[0],
    )


def distill_step(job: Job) -> Callable[[], None]:
    device = torch.device(job.device)
    torch.manual_seed(job.seed)
    teacher = ScoreNetwork(SCORE_NET_PRESETS[job.sn_preset]).to(device).eval()
    teacher.requires_grad_(False)
    student = student_from_teacher(teacher).train()
    target = copy.deepcopy(student).eval().requires_grad_(False)
    cfg = DistillConfig(skip=4)
    g, ctx, x, eps = _net_inputs(job, teacher.config.latent_dim, device)
    n = torch.randint(cfg.skip, cfg.grid + 1, (job.batch,), generator=g).to(device)
    w = torch.ones(job.batch, device=device)
    return _network_step(
        job,
        list(student.parameters()),
        lambda: distill_loss(student, target, teacher, ctx, x, n, w, eps, cfg),
    )


def _network_step(job: Job, params: list[nn.Parameter], loss: Callable[[], torch.Tensor]):
    """One step of a network's loss(): AdamW (lr 1e-4) on params, under bf16 autocast for a bf16
    job, gradients clipped for ours."""
    opt = torch.optim.AdamW(params, lr=1e-4)
    bf16 = job.dtype == "bfloat16"

    def step() -> None:
        with torch.autocast(torch.device(job.device).type, dtype=torch.bfloat16, enabled=bf16):
            value = loss()
        _optimize(opt, params, value, clip=job.impl == "ours")

    return step


def build_step(job: Job) -> Callable[[], None]:
    if job.step == "prompt_generator":
        return pg_step_hf(job) if job.impl == "hf_eager" else pg_step_ours(job)
    return {"diffusion": diffusion_step, "distill": distill_step}[job.step](job)


# ------------------------------------------------------------------------------ timing
def time_steps(
    steps: dict[str, tuple[Callable[[], None], int]],
    warmup: int,
    repeats: int,
    device: torch.device,
) -> dict[str, list[float]]:
    """{name: seconds of each timed step}; `steps` maps name → (step, torch threads). Each
    repetition runs every step once, in turn; in a process group a barrier precedes each."""
    group = parallel.world_size() > 1
    for fn, threads in steps.values():
        torch.set_num_threads(threads)
        for _ in range(warmup):
            fn()
        sync(device)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, (fn, threads) in steps.items():
            torch.set_num_threads(threads)
            if group:
                torch.distributed.barrier()
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def _ddp_worker(rank: int, world: int, jobs: list[tuple[Job, int, int]], out: str) -> None:
    """In each process of the group: every job's step timed on 1 thread; rank 0 writes the
    per-step times of the slowest rank as JSON lines to `out`."""
    rows = []
    for job, warmup, repeats in jobs:
        step = build_step(job)
        times = time_steps({"step": (step, 1)}, warmup, repeats, torch.device(job.device))["step"]
        slowest = torch.tensor(times, dtype=torch.float64)
        torch.distributed.all_reduce(slowest, op=torch.distributed.ReduceOp.MAX)
        rows.append(slowest.tolist())
        del step
        gc.collect()
    if rank == 0:
        Path(out).write_text(json.dumps(rows))


def run_data_parallel(jobs: list[tuple[Job, int, int]], procs: int) -> list[list[float]]:
    """Per job: the per-step seconds of `procs` processes × 1 thread (the slowest rank's)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "times.json"
        parallel.spawn(_ddp_worker, procs, jobs, str(out))
        return json.loads(out.read_text())


# ------------------------------------------------------------------------------ report
def shape_label(job: Job, prompt_len: int) -> str:
    if job.step == "prompt_generator":
        return f"{job.prefix}+{prompt_len}+{job.continuation}"
    return f"{SCORE_NET_PRESETS[job.sn_preset].latent_dim}-d latents"


def make_row(job: Job, procs: int, threads: int, times: list[float], shape: str) -> dict:
    s = statistics.median(times)
    samples = job.batch * procs / s
    return {
        "step": job.step,
        "impl": job.impl,
        "layout": f"{job.impl} {procs}×{threads}",
        "procs": procs,
        "threads": threads,
        "cores": procs * threads,
        "dtype": job.dtype,
        "shape": shape,
        "batch_per_proc": job.batch,
        "s_per_step": float(f"{s:.6g}"),  # significant digits: steps of a few ms stay exact
        "samples_per_s": round(samples, 3),
        "samples_per_s_per_core": round(samples / (procs * threads), 3),
        "repeats": len(times),
        "times_s": [round(t, 4) for t in times],
        "load_avg": load_average(),
    }


def add_speedups(rows: list[dict]) -> None:
    """× baseline for every row: against the baseline row of the same step and shape."""
    for r in rows:
        base = [b for b in rows if b["step"] == r["step"] and b["shape"] == r["shape"]
                and b["impl"] != "ours"]  # fmt: skip
        if base:
            r["speedup_vs_baseline"] = round(r["samples_per_s"] / base[0]["samples_per_s"], 3)


def fastest(rows: list[dict], cores: int) -> list[dict]:
    """Per (step, shape): the fastest layout of ours, and the fastest on the whole machine (every
    core: processes × threads ≥ `cores`), each with its ratio to the baseline."""
    out = []
    for key in dict.fromkeys((r["step"], r["shape"]) for r in rows):
        same = [r for r in rows if (r["step"], r["shape"]) == key]
        base = next((r for r in same if r["impl"] != "ours"), None)
        ours = [r for r in same if r["impl"] == "ours"]
        f = {"step": key[0], "shape": key[1], "baseline": base and base["layout"]}
        for name, pool in (
            ("fastest", ours),
            ("whole_machine", [r for r in ours if r["cores"] >= cores]),
        ):
            if pool:
                best = max(pool, key=lambda r: r["samples_per_s"])
                f[f"{name}_layout"] = best["layout"]
                f[f"{name}_samples_per_s"] = best["samples_per_s"]
                if base:
                    f[f"{name}_ratio"] = round(best["samples_per_s"] / base["samples_per_s"], 3)
        out.append(f)
    return out


def targets(rows: list[dict], cores: int, target: float = TARGET) -> list[dict]:
    """Per prompt-generator shape: ours' fastest whole-machine layout ÷ the baseline ≥ `target`
    (met: None when either side was not measured)."""
    out = []
    for f in fastest(rows, cores):
        if f["step"] != "prompt_generator":
            continue
        t = {"step": f["step"], "shape": f["shape"], "target": target, "met": None,
             "baseline": f["baseline"], "layout": f.get("whole_machine_layout"),
             "fastest_layout": f.get("fastest_layout")}  # fmt: skip
        if "whole_machine_ratio" in f:
            ratio = f["whole_machine_ratio"]
            t.update(ratio=ratio, met=ratio >= target, margin=round(ratio / target - 1, 3))
        out.append(t)
    return out


def target_line(t: dict) -> str:
    what = f"prompt-generator step {t['shape']}: fastest whole-machine layout"
    if t["met"] is None:
        return f"{what} ≥ {t['target']}× the baseline: not measured"
    verdict = "**met**" if t["met"] else "**missed**"
    return (f"{what} `{t['layout']}` is {t['ratio']}× `{t['baseline']}` (target ≥ "
            f"{t['target']}×): {verdict}, margin {t['margin']:+.0%}; fastest layout of ours: "
            f"`{t['fastest_layout']}`")  # fmt: skip


def markdown(report: dict) -> str:
    load = report["load_avg"]
    machine = (
        f"AMX {'yes' if report['amx'] else 'no'}, whole machine = {report['threads']} threads or "
        f"{report['procs']} processes, load average {load['start']} → {load['end']}"
    )
    lines = [
        *common.header(f"Training-step benchmark — {report['device']}", report["environment"], machine),
        "samples/s = rows of every process ÷ median seconds per step; per core = ÷ (processes × "
        "threads); × baseline = against the baseline row of the same step and shape.",
        "",
    ]  # fmt: skip
    lines += [f"- Target: {target_line(t)}" for t in report["targets"]]
    lines += [f"- {n}" for n in report["notes"]]
    for step, title in STEPS.items():
        rows = [r for r in report["rows"] if r["step"] == step]
        if not rows:
            continue
        lines += ["", f"## {title}", ""]
        for f in report["fastest"]:
            if f["step"] == step and "fastest_ratio" in f:
                lines.append(
                    f"- {f['shape']}: fastest `{f['fastest_layout']}`, {f['fastest_ratio']}× "
                    f"`{f['baseline']}`; on the whole machine `{f.get('whole_machine_layout')}`, "
                    f"{f.get('whole_machine_ratio')}×"
                )
        lines += ["",
                  "| layout | processes × threads | dtype | shape | batch / process | s/step | "
                  "samples/s | samples/s per core | × baseline | load |",
                  "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in rows:
            lines.append(
                f"| {r['layout']} | {r['procs']} × {r['threads']} | {r['dtype']} | {r['shape']} | "
                f"{r['batch_per_proc']} | {r['s_per_step']:.4f} | {r['samples_per_s']:.2f} | "
                f"{r['samples_per_s_per_core']:.2f} | {r.get('speedup_vs_baseline', '')} | "
                f"{r['load_avg']} |"
            )
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ main
def _shape(text: str) -> tuple[int, int]:
    try:
        prefix, cont = (int(x) for x in text.split("+"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected PREFIX+CONTINUATION, got {text!r}") from None
    if prefix < 1 or cont < 1:
        raise argparse.ArgumentTypeError(f"token counts must be positive, got {text!r}")
    return prefix, cont


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help=f"shape {TRAIN_SHAPE[0]}+{TRAIN_SHAPE[1]} only, fewer repeats")  # fmt: skip
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--procs", type=int, default=None,
                    help="processes of the data-parallel layout (default: --threads; CPU only)")  # fmt: skip
    ap.add_argument("--threads", type=int, default=None,
                    help="threads of the whole-machine layouts (default: torch's default)")  # fmt: skip
    ap.add_argument("--batch-size", type=int, default=16, help="prompt-generator rows per process")
    ap.add_argument("--net-batch-size", type=int, default=128,
                    help="diffusion / distillation rows per process")  # fmt: skip
    ap.add_argument("--shapes", type=_shape, nargs="*", default=None,
                    help="prompt-generator PREFIX+CONTINUATION token counts, e.g. 16+24 32+32")  # fmt: skip
    ap.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                    help="ours; auto: bf16 where bf16_is_fast (CUDA, AMX CPUs), else fp32")  # fmt: skip
    ap.add_argument("--decoder", default="smollm2", help="decoder directory (default SmolLM2)")
    ap.add_argument("--pg-preset", default="compact", choices=sorted(PROMPT_GENERATOR_PRESETS))
    ap.add_argument("--sn-preset", default="compact", choices=sorted(SCORE_NET_PRESETS))
    ap.add_argument("--warmup", type=int, default=None, help="override the warm-up steps")
    ap.add_argument("--repeats", type=int, default=None, help="override the timed repeats")
    ap.add_argument("--out", type=Path, default=None,
                    help="output folder (default benchmarks/results/<device>)")  # fmt: skip
    args = ap.parse_args(argv)
    for name in ("procs", "threads", "batch_size", "net_batch_size", "repeats", "warmup"):
        v = getattr(args, name)
        if v is not None and v < (0 if name == "warmup" else 1):
            ap.error(f"--{name.replace('_', '-')} must be positive, got {v}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = torch.device(args.device)
    default_threads = torch.get_num_threads()
    threads = args.threads or default_threads
    procs = 1 if device.type == "cuda" else (args.procs or threads)
    dtype = args.dtype
    if dtype == "auto":
        dtype = "bfloat16" if bf16_is_fast(device) else "float32"
    shapes = args.shapes or ([TRAIN_SHAPE] if args.quick else [TRAIN_SHAPE, ISSUE_SHAPE])
    (pg_w, pg_r), (net_w, net_r) = TIMING["quick" if args.quick else "full"]
    pg_w, net_w = (pg_w, net_w) if args.warmup is None else (args.warmup, args.warmup)
    pg_r, net_r = (pg_r, net_r) if args.repeats is None else (args.repeats, args.repeats)
    prompt_len = PROMPT_GENERATOR_PRESETS[args.pg_preset].prompt_len
    job_fields = dict(decoder=args.decoder, pg_preset=args.pg_preset, sn_preset=args.sn_preset,
                  device=str(device))  # fmt: skip
    t_start, load_start = time.perf_counter(), load_average()
    rows: list[dict] = []
    ddp_jobs: list[tuple[Job, int, int]] = []

    def measure_in_process(base: Job, ours: Job, warmup: int, repeats: int, layouts) -> None:
        steps = {"base": (build_step(base), threads)}
        ours_step = build_step(ours)
        for t in layouts:
            steps[f"ours {t}"] = (ours_step, t)
        times = time_steps(steps, warmup, repeats, device)
        label = shape_label(base, prompt_len)
        rows.append(make_row(base, 1, threads, times["base"], label))
        for t in layouts:
            rows.append(make_row(ours, 1, t, times[f"ours {t}"], label))
        print(f"{base.step} {label}: " + ", ".join(
            f"{r['layout']} {r['samples_per_s']:.2f}/s" for r in rows[-1 - len(layouts):])
            + f" [load {load_average()}]", file=sys.stderr)  # fmt: skip
        del steps, ours_step
        gc.collect()

    try:
        # prompt generator: HF eager vs ours 1 × 1 and 1 × all threads, alternating
        in_process = [1] if threads == 1 or device.type == "cuda" else [1, threads]
        for prefix, cont in shapes:
            base = Job("prompt_generator", "hf_eager", args.batch_size, "float32", prefix, cont,
                       **job_fields)  # fmt: skip
            ours = replace(base, impl="ours", dtype=dtype)
            measure_in_process(base, ours, pg_w, pg_r, in_process)
            ddp_jobs.append((ours, pg_w, pg_r))
        for step in ("diffusion", "distill"):
            base = Job(step, "eager", args.net_batch_size, "float32", **job_fields)
            ours = replace(base, impl="ours", dtype=dtype)
            measure_in_process(base, ours, net_w, net_r, [1])
            ddp_jobs.append((ours, net_w, net_r))
        if procs > 1:
            t0 = time.perf_counter()
            for (job, _, _), times in zip(
                ddp_jobs, run_data_parallel(ddp_jobs, procs), strict=True
            ):
                rows.append(make_row(job, procs, 1, times, shape_label(job, prompt_len)))
            print(f"data parallel {procs} × 1: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    finally:
        torch.set_num_threads(default_threads)
    shape_order = {s: i for i, s in enumerate(dict.fromkeys(r["shape"] for r in rows))}
    step_order = {s: i for i, s in enumerate(STEPS)}
    rows.sort(key=lambda r: (step_order[r["step"]], shape_order[r["shape"]]))  # stable
    add_speedups(rows)
    total_s = time.perf_counter() - t_start
    cores = threads if device.type == "cpu" else 1  # what "the whole machine" takes
    tgts = targets(rows, cores)
    notes = [
        f"ours: {dtype}; prompt generator preset `{args.pg_preset}` (P = {prompt_len}), "
        f"adapters rank {LoraConfig().rank} on every linear layer; score networks preset "
        f"`{args.sn_preset}`; baselines fp32 (the prompt generator's: transformers' "
        "AutoModelForCausalLM with its default attention implementation)",
        f"timing: prompt generator {pg_w} warm-up + median of {pg_r}, networks {net_w} + "
        f"median of {net_r}; total {total_s:.0f} s",
        f"load average {load_start} at the start, {load_average()} at the end",
    ]
    env = common.environment(device, ("dglm-engine", "torch", "transformers"))
    if procs == 1:
        notes.append("no data-parallel layout (one process: --procs 1 or CUDA)")
    report = {
        "bench": "train",
        "device": common.device_name(device),
        "environment": env,
        "threads": threads,
        "procs": procs,
        "amx": bf16_is_fast("cpu"),
        "dtype": dtype,
        "quick": args.quick,
        "load_avg": {"start": load_start, "end": load_average()},
        "settings": {
            "warmup": {"prompt_generator": pg_w, "networks": net_w},
            "repeats": {"prompt_generator": pg_r, "networks": net_r},
            "batch_size": args.batch_size,
            "net_batch_size": args.net_batch_size,
            "shapes": [f"{p}+{prompt_len}+{c}" for p, c in shapes],
            "ours": [  # the decoder by name: no machine paths in results
                {**asdict(j), "decoder": Path(j.decoder).name} for j, _, _ in ddp_jobs
            ],
        },
        "total_s": round(total_s, 1),
        "targets": tgts,
        "fastest": fastest(rows, cores),
        "notes": notes,
        "rows": common.stamp(rows, env, device),
    }
    out = args.out or ROOT / "benchmarks" / "results" / common.device_name(device)
    common.write_results(out, "train", report, markdown(report))
    for t in tgts:
        print(target_line(t).replace("**", ""), file=sys.stderr)
    print(f"wrote {out / 'train.json'} and train.md ({total_s:.0f} s)", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
