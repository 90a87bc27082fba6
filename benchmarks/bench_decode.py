"""ms per token and tokens/s of our decode loop vs Hugging Face `generate` (eager), in one process.

    python -m benchmarks.bench_decode --device cpu [--quick] [--threads 1]
    python -m benchmarks.bench_decode --device cuda [--quick]
    → benchmarks/results/<device>/decode.{json,md}

SmolLM2-135M (fp32 on CPU, bf16 on CUDA) at batch 1, 8, 32, 64 and 32 / 128 new tokens (--quick:
batch 1 and 8 with 32 tokens, batch 1 with 128), nucleus sampling (T = 1, top-p 0.9) on the same
mixed-length prompts (left padded) for both, plus a greedy batch-1 row whose tokens must equal HF's.
Ours and HF alternate within each repetition; medians are reported.

Per token = one decode step after the prompt's forward: ours from generate's own timings
(decode_s / decode_steps), HF from a logits processor's timestamps (first call → last call,
divided by the steps between). Both wall clock and this process's CPU time are recorded: on a
shared machine wall time swings with the load average (recorded per row), CPU time much less.

Implementations: `ours_eager` (generate's default static step, op by op), `ours_fast` (CPU: the
decoder with `use_input_major_weights()` and a DecodeRunner with step_impl="trace", one
TorchScript trace per bucket made at warm-up, time recorded), `ours_fused_int8` (CPU: the int8
decoder through the fused C++ step, step_impl="fused", the engine's CPU default),
`ours_fast_int8` / `ours_fast_int8pack` (the int8 decoder through the traced step), `ours_compiled` (CPU, --compile:
torch.compile with frozen weights, compile time recorded), `ours_graphs` (CUDA: DecodeRunner
replaying CUDA graphs), `hf_generate` (transformers eager). Sampled tokens of
each of ours are checked against the reference loop (`generate(..., static=False)`), same seeds.
On CUDA also: the fraction of the bf16 memory-bandwidth floor (every weight read once per step,
design/anchors.md), and a GPT-2 Large shaped decoder with random weights (ours vs HF, same weights).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from dglm.engine.decoding.loop import DecodeParams, generate
from dglm.engine.decoding.runner import DecodeRunner, DecodeRunnerConfig
from dglm.engine.evaluation.provenance import load_average
from dglm.engine.models import GPT2Config, GPT2Decoder, load_decoder
from dglm.engine.models.gpt2 import gpt2_state_dict_from_hf
from dglm.engine.models.loading import SHAPE_TWINS_ENV, smollm2_dir
from dglm.engine.models.quant import fused_int8_available, quantize_decoder
from dglm.kernels.int8_linear import bf16_supported

from benchmarks import common, llama_cpp
from benchmarks.common import ROOT

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea, there lived",
    "def fibonacci(n):",
    "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n",
    "The movie was long, but the ending",
    "Write a short poem about the ocean:",
    "In 1969, the first humans",
    "My favourite recipe for a rainy day is",
]
FULL = [(1, 32), (1, 128), (8, 32), (8, 128), (32, 32), (32, 128), (64, 32), (64, 128)]
QUICK = [(1, 32), (1, 128), (8, 32)]
TOP_P = 0.9
BANDWIDTH = {"h100": 3.0e12, "h200": 4.3e12}  # bytes/s, device-to-device copy (anchors.md)


# ------------------------------------------------------------------------------ environment
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------ the two loops
class StepClock:
    """A HF logits processor that only timestamps its calls (one per generated token)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.wall, self.cpu = device, [], []

    def __call__(self, input_ids, scores):
        sync(self.device)
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())
        return scores


def hf_generate(hf, rows: list[list[int]], n: int, pad: int, sampled: bool, seed: int):
    """HF generate on left-padded rows → (new tokens per row, wall ms/step, CPU ms/step)."""
    from transformers import LogitsProcessorList

    device = hf.device
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, T - len(r) :] = torch.tensor(r)
        mask[b, T - len(r) :] = 1
    clock = StepClock(device)
    kw = dict(temperature=1.0, top_p=TOP_P, top_k=0) if sampled else {}
    torch.manual_seed(seed)
    with torch.inference_mode():
        out = hf.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=n,
            min_new_tokens=n, pad_token_id=pad, do_sample=sampled,
            logits_processor=LogitsProcessorList([clock]), **kw,
        )  # fmt: skip
    steps = len(clock.wall) - 1
    wall = (clock.wall[-1] - clock.wall[0]) / steps * 1e3
    cpu = (clock.cpu[-1] - clock.cpu[0]) / steps * 1e3
    return out[:, T:].tolist(), wall, cpu


def ours_generate(decoder, tok, rows, n: int, sampled: bool, seed: int, **kw):
    """Our generate → (tokens per row, wall ms/step, CPU ms/step, timings)."""
    params = [
        DecodeParams(max_new_tokens=n, temperature=1.0, top_p=TOP_P, seed=seed + b)
        if sampled else DecodeParams(max_new_tokens=n, temperature=0.0)
        for b in range(len(rows))
    ]  # fmt: skip
    results, t = generate(decoder, tok, rows, params, **kw)
    steps = max(t["decode_steps"], 1.0)
    return [r.token_ids for r in results], t["decode_s"] / steps * 1e3, \
        t["decode_cpu_s"] / steps * 1e3, t  # fmt: skip


def llama_run(llm, call: dict):
    """llama.cpp on the same prompts (one after another) → (tokens, wall ms/step, CPU ms/step)."""
    toks, wall, cpu, steps = [], 0.0, 0.0, 0
    for b, row in enumerate(call["rows"]):
        temperature = 1.0 if call["sampled"] else 0.0
        t, _, decode_s, decode_cpu = llama_cpp.sample(
            llm, row, call["n"], temperature, TOP_P, call["seed"] + b
        )
        toks.append(t)
        wall, cpu, steps = wall + decode_s, cpu + decode_cpu, steps + len(t) - 1
    steps = max(steps, 1)
    return toks, wall / steps * 1e3, cpu / steps * 1e3


def run(decoder, tok, call: dict, runner=None):
    """ours_generate(**call) → (tokens, wall ms/step, CPU ms/step)."""
    kw = {} if runner is None else {"runner": runner}
    return ours_generate(decoder, tok, **call, **kw)[:3]


def until_eos(row: list[int], eos: set[int]) -> list[int]:
    for i, t in enumerate(row):
        if t in eos:
            return row[:i]
    return row


# ------------------------------------------------------------------------------ measurements
def measure(impls: dict, repeats: int) -> dict:
    """Run each impl `repeats` times, alternating → {impl: (median wall, median CPU, last out)}."""
    res = {name: ([], [], None) for name in impls}
    for _ in range(repeats):
        for name, fn in impls.items():
            toks, wall, cpu = fn()
            res[name][0].append(wall)
            res[name][1].append(cpu)
            res[name] = (res[name][0], res[name][1], toks)
    return {k: (statistics.median(w), statistics.median(c), t) for k, (w, c, t) in res.items()}


def weight_stream_ms(decoder, repeats: int = 7) -> tuple[float, float]:
    """(wall, CPU) ms to run every weight matrix once as a batch-1 matmul (the CPU floor)."""
    import torch.nn.functional as F

    weights = head_and_linears(decoder)
    xs = [torch.randn(1, w.shape[1], dtype=w.dtype, device=w.device) for w in weights]
    walls, cpus = [], []
    with torch.inference_mode():
        for _ in range(repeats):
            t, c = time.perf_counter(), time.process_time()
            for w, x in zip(weights, xs, strict=True):
                F.linear(x, w)
            sync(w.device)
            walls.append((time.perf_counter() - t) * 1e3)
            cpus.append((time.process_time() - c) * 1e3)
    return statistics.median(walls), statistics.median(cpus)


def head_and_linears(decoder) -> list[torch.Tensor]:
    """The matrices a decode step reads in full: every nn.Linear weight and the LM head (the
    embeddings are only indexed, one row per token)."""
    linears = [m.weight for m in decoder.modules() if isinstance(m, torch.nn.Linear)]
    head = decoder.lm_head_weight()
    return linears if any(w is head for w in linears) else [*linears, head]


def weight_bytes(decoder) -> int:
    return sum(w.numel() * w.element_size() for w in head_and_linears(decoder))


def bench_model(args, name, decoder, tok, hf, pad, device, dtype, rows_out, configs, extra):
    """Ours vs HF over `configs` of (batch, new tokens); appends JSON rows."""
    eos = set(decoder.eos_token_ids) | ({tok.eos_token_id} if tok is not None else set())
    prompt_ids = extra["prompt_ids"]
    longest = max(len(p) for p in prompt_ids)
    dt = str(dtype).split(".")[-1]
    runners = {}
    if device.type == "cuda":
        max_len = longest + max(n for _, n in configs)
        buckets = tuple(s for s in (64, 128, 256, 512) if s < max_len)
        config = DecodeRunnerConfig(max_len=max_len, seq_buckets=buckets)
        t0 = time.perf_counter()
        runners["ours_graphs"] = DecodeRunner(decoder, config)
        runners["ours_graphs"].warmup()
        extra["capture_s"] = round(time.perf_counter() - t0, 1)
        print(f"{name}: captured graphs in {extra['capture_s']} s", file=sys.stderr)
    else:
        max_len = longest + max(n for _, n in configs)
        buckets = tuple(s for s in (32, 64, 128, 256) if s < max_len)
        batches = tuple(sorted({b for b, _ in configs}))
        kw = dict(batch_sizes=batches, max_len=max_len, seq_buckets=buckets, enforce_eager=True)
        t0 = time.perf_counter()
        fast = copy.deepcopy(decoder).use_input_major_weights()
        runners["ours_fast"] = DecodeRunner(fast, DecodeRunnerConfig(**kw, step_impl="trace"))
        runners["ours_fast"].warmup()
        if not args.no_int8:  # weight-only int8 (models.quant): the fused C++ step (the CPU
            # default for Llama decoders; a trace where it cannot serve), then the traced step
            q8 = quantize_decoder(copy.deepcopy(decoder))
            runners["ours_fused_int8"] = DecodeRunner(
                q8, DecodeRunnerConfig(**kw, step_impl="fused")
            )
            runners["ours_fused_int8"].warmup()
            if bf16_supported():  # the opt-in bf16-activation mode (quantize="int8-bf16")
                qb = quantize_decoder(copy.deepcopy(decoder), "int8-bf16")
                runners["ours_fused_int8_bf16"] = DecodeRunner(
                    qb, DecodeRunnerConfig(**kw, step_impl="fused")
                )
                runners["ours_fused_int8_bf16"].warmup()
            kernels = {"ours_fast_int8": None}  # the default kernel (C++ when built)
            if fused_int8_available():
                kernels["ours_fast_int8pack"] = "int8pack"  # torch's bf16 kernel, for comparison
            for rname, kernel in kernels.items():
                q8 = quantize_decoder(copy.deepcopy(decoder), kernel=kernel)
                runners[rname] = DecodeRunner(
                    q8.use_input_major_weights(), DecodeRunnerConfig(**kw, step_impl="trace")
                )
                runners[rname].warmup()
        extra["trace_s"] = round(time.perf_counter() - t0, 1)
        print(f"{name}: traced every bucket in {extra['trace_s']} s", file=sys.stderr)
        if args.compile:
            config = DecodeRunnerConfig(**kw, step_impl="compile")
            runners["ours_compiled"] = DecodeRunner(decoder, config)
    base = {
        "model": name,
        "dtype": dt,
        "device": common.device_name(device),
        "threads": args.threads,
    }
    floor = {}
    if device.type == "cuda" and common.device_name(device) in BANDWIDTH:
        floor["floor_ms"] = weight_bytes(decoder) / BANDWIDTH[common.device_name(device)] * 1e3
    elif device.type == "cpu":
        wall, cpu = weight_stream_ms(decoder)
        floor["weight_stream_ms"], floor["weight_stream_cpu_ms"] = round(wall, 2), round(cpu, 2)
        rows_out.append({**base, "impl": "weight_stream", "batch": 1, "ms_per_token": wall,
                         "cpu_ms_per_token": cpu, "load_avg": load_average()})  # fmt: skip

    for batch, n in configs:
        rows = [prompt_ids[i % len(prompt_ids)] for i in range(batch)]
        repeats = {1: 3, 8: 2}.get(batch, 1) if n <= 32 else {1: 2}.get(batch, 1)
        modes = [True, False] if (batch, n) == (1, 32) else [True]  # greedy parity at batch 1
        for sampled in modes:
            seed = 1000 * batch + n
            call = dict(rows=rows, n=n, sampled=sampled, seed=seed)
            impls = {
                "ours_eager": lambda c=call: run(decoder, tok, c),
                "hf_generate": lambda c=call: hf_generate(hf, pad=pad, **c),
            }
            if batch >= 32 and runners:  # time: the big batches compare the fast path only
                del impls["ours_eager"]
            if extra.get("llama") is not None and batch == 1:
                impls["llama_cpp"] = lambda c=call: llama_run(extra["llama"], c)
            for rname, runner in runners.items():
                if rname == "ours_compiled" and batch not in args.compile_batches:
                    continue
                if rname == "ours_compiled" and "compile_s" not in extra:
                    t0 = time.perf_counter()  # the first call compiles (per b = 1 / b ≥ 2)
                    ours_generate(decoder, tok, rows[:1], 2, sampled, seed, runner=runner)
                    extra["compile_s"] = round(time.perf_counter() - t0, 1)
                    print(f"{name}: compiled in {extra['compile_s']} s", file=sys.stderr)
                impls[rname] = lambda c=call, r=runner: run(r.decoder, tok, c, r)
            t0 = time.perf_counter()
            res = measure(impls, repeats if sampled else 1)
            hf_ms, hf_cpu, hf_toks = res["hf_generate"]
            ref = None
            if sampled and batch <= 8:  # the reference loop, same seeds
                ref = ours_generate(decoder, tok, rows, n, sampled, seed, static=False)[0]
            for impl, (wall, cpu, toks) in res.items():
                row = {**base, "impl": impl, "batch": batch, "new_tokens": n,
                       "sampling": f"top_p{TOP_P}" if sampled else "greedy",
                       "ms_per_token": round(wall, 2), "cpu_ms_per_token": round(cpu, 2),
                       "tokens_per_s": round(batch * 1e3 / wall, 1), "repeats": repeats,
                       "load_avg": load_average()}  # fmt: skip
                if impl != "hf_generate":
                    row["speedup_vs_hf"] = round(hf_ms / wall, 3)
                    row["cpu_speedup_vs_hf"] = round(hf_cpu / cpu, 3)
                    exact = "int8" not in impl and impl != "llama_cpp"  # else other logits
                    if ref is not None and exact:
                        row["same_tokens_as_reference_loop"] = toks == ref
                    if impl == "ours_fused_int8" and "ours_fast_int8" in res:
                        row["same_tokens_as_traced_int8"] = toks == res["ours_fast_int8"][2]
                    if not sampled and exact:  # HF forced n tokens: to EOS
                        row["same_tokens_as_hf"] = all(
                            o == until_eos(h, eos)[: len(o)] and len(o) <= len(h)
                            for o, h in zip(toks, hf_toks, strict=True)
                        )
                    if "floor_ms" in floor and batch == 1:
                        row["floor_ms"] = round(floor["floor_ms"], 4)
                        row["x_floor"] = round(wall / floor["floor_ms"], 2)
                        row["floor_fraction"] = round(floor["floor_ms"] / wall, 3)
                rows_out.append(row)
            print(f"{name} B={batch} n={n} {'sampled' if sampled else 'greedy'}: "
                  + ", ".join(f"{k} {v[0]:.1f} ms ({v[1]:.1f} cpu)" for k, v in res.items())
                  + f" [{time.perf_counter() - t0:.0f} s, load {load_average()}]",
                  file=sys.stderr)  # fmt: skip


@torch.inference_mode()
def int8_quality(decoder, tok, n_texts: int = 64) -> dict:
    """Teacher-forced next-token quality of the int8 decoder against fp32 on held-out text (the
    evaluation's held-out prefixes, 16-32 tokens each): perplexity of each and top-1 agreement."""
    from dglm.engine.evaluation.prefixes import heldout_prefixes

    texts = [p for _, p in heldout_prefixes(tok, n_texts, min_tokens=16, max_tokens=32)]
    models = {"fp32": decoder, "int8": quantize_decoder(copy.deepcopy(decoder))}
    if bf16_supported():
        models["int8_bf16"] = quantize_decoder(copy.deepcopy(decoder), "int8-bf16")
    nll = dict.fromkeys(models, 0.0)
    agree = count = 0
    for text in texts:
        ids = torch.tensor([tok.encode(text)], device=decoder.device)
        pos = torch.arange(ids.shape[1], device=decoder.device)[None]
        out = {}
        for key, d in models.items():
            logits = d(d.embed(ids), pos)[0, :-1].float()
            nll[key] += float(
                torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum")
            )
            out[key] = logits.argmax(-1)
        agree += int((out["fp32"] == out["int8"]).sum())
        count += ids.shape[1] - 1
    ppl = {k: float(torch.tensor(v / count).exp()) for k, v in nll.items()}
    out = {
        "texts": len(texts),
        "tokens": count,
        "ppl_fp32": round(ppl["fp32"], 3),
        "ppl_int8": round(ppl["int8"], 3),
        "ppl_delta_pct": round(100 * (ppl["int8"] / ppl["fp32"] - 1), 2),
        "top1_agreement": round(agree / count, 4),
    }
    if "int8_bf16" in ppl:
        out["ppl_int8_bf16"] = round(ppl["int8_bf16"], 3)
        out["ppl_int8_bf16_delta_pct"] = round(100 * (ppl["int8_bf16"] / ppl["fp32"] - 1), 2)
    return out


def smollm2(device: torch.device, dtype: torch.dtype):
    from transformers import LlamaForCausalLM

    decoder, tok = load_decoder("smollm2", device=device, dtype=dtype)
    hf = LlamaForCausalLM.from_pretrained(smollm2_dir(), dtype=dtype).to(device).eval()
    return decoder, tok, hf


def gpt2_large(device: torch.device, dtype: torch.dtype):
    """GPT-2 Large shapes (36 layers, 1280 wide, 20 heads, 50257 tokens), random weights shared
    by ours and HF's GPT2LMHeadModel."""
    from transformers import GPT2Config as HFConfig
    from transformers import GPT2LMHeadModel

    hf_config = HFConfig(n_embd=1280, n_layer=36, n_head=20, n_positions=1024, vocab_size=50257)
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(hf_config).to(dtype=dtype).eval()
    config = GPT2Config.from_hf_config(hf_config)
    decoder = GPT2Decoder(config)
    decoder.load_state_dict(gpt2_state_dict_from_hf(hf.state_dict(), config))
    decoder = decoder.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return decoder, None, hf.to(device)


def markdown(report: dict) -> str:
    load = report["load_avg"]
    lines = [
        *common.header(f"Decode benchmark — {report['device']}", report["environment"],
                f"load average {load['start']} → {load['end']}"),
        "ms per token = one decode step (after the prompt's forward), median over repeats; "
        "cpu = this process's CPU time per step (robust to the machine's load, recorded per row).",
        "",
    ]  # fmt: skip
    for note in report.get("notes", []):
        lines.append(f"- {note}")
    if report.get("pending"):
        lines += ["", "**Pending (needs a GPU session):**", ""]
        lines += [f"- {p}" for p in report["pending"]]
    lines += ["", "| model | impl | batch | new | sampling | ms/token | cpu ms/token | tok/s | "
              "× HF (wall) | × HF (cpu) | same tokens | floor | load |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in report["rows"]:
        same = [k for k in ("same_tokens_as_hf", "same_tokens_as_reference_loop",
                            "same_tokens_as_traced_int8") if k in r]  # fmt: skip
        floor = ""
        if "x_floor" in r:
            floor = f"{r['x_floor']}× ({r['floor_ms']} ms)"
        lines.append(
            f"| {r['model']} | {r['impl']} | {r.get('batch', '')} | {r.get('new_tokens', '')} | "
            f"{r.get('sampling', '')} | {r['ms_per_token']:.2f} | {r['cpu_ms_per_token']:.2f} | "
            f"{r.get('tokens_per_s', '')} | {r.get('speedup_vs_hf', '')} | "
            f"{r.get('cpu_speedup_vs_hf', '')} | "
            + ", ".join(f"{k.split('_as_')[1]}: {r[k]}" for k in same)
            + f" | {floor} | {r['load_avg']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help=f"configs {QUICK} instead of {FULL}")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for ours and HF")
    ap.add_argument("--compile", action="store_true",
                    help="CPU: also torch.compile (compiles 3-7 min on 2 busy cores)")  # fmt: skip
    ap.add_argument(
        "--compile-batches",
        type=int,
        nargs="*",
        default=[1],
        help="CPU: batch sizes measured compiled (b = 1 and b ≥ 2 compile apart)",
    )
    ap.add_argument("--configs", nargs="*", default=None,
                    help="override the configs: BATCHxNEW, e.g. 1x32 8x128")  # fmt: skip
    ap.add_argument("--no-int8", action="store_true", help="CPU: skip the int8 decoder rows")
    ap.add_argument("--no-llama-cpp", action="store_true", help="CPU: skip the llama.cpp rows")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t_start, load_start = time.perf_counter(), load_average()
    configs = QUICK if args.quick else FULL
    if args.configs:
        configs = [tuple(int(x) for x in c.split("x")) for c in args.configs]
    rows: list[dict] = []
    extra: dict = {}
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    decoder, tok, hf = smollm2(device, dtype)
    extra["prompt_ids"] = [tok.encode(p) for p in PROMPTS]
    name = "SmolLM2-135M" + (" (shape twin, random)" if os.environ.get(SHAPE_TWINS_ENV) else "")
    if device.type == "cpu" and not args.no_int8 and not os.environ.get(SHAPE_TWINS_ENV):
        extra["int8_quality"] = int8_quality(decoder, tok)
        print(f"int8 quality: {extra['int8_quality']}", file=sys.stderr)
    llama_note = None
    if device.type == "cpu" and not args.no_llama_cpp and not os.environ.get(SHAPE_TWINS_ENV):
        extra["llama"], llama_note = llama_cpp.load(args.threads)
        if llama_note:
            print(f"llama_cpp row skipped: {llama_note}", file=sys.stderr)
    bench_model(args, name, decoder, tok, hf, tok.pad_token_id, device, dtype, rows,
                configs, extra)  # fmt: skip
    pending = []
    if device.type == "cuda":
        del decoder, hf
        g_dec, _, g_hf = gpt2_large(device, dtype)
        gen = torch.Generator().manual_seed(0)
        g_extra = {"prompt_ids": [torch.randint(0, 50257, (n,), generator=gen).tolist()
                                  for n in (12, 7, 20, 9, 15, 5, 11, 18)]}  # fmt: skip
        bench_model(args, "GPT2-Large-shape (random)", g_dec, None, g_hf, 50256, device, dtype,
                    rows, QUICK if args.quick else configs, g_extra)  # fmt: skip
        extra.update({f"gpt2_large_{k}": v for k, v in g_extra.items() if k != "prompt_ids"})
    else:
        pending = [
            "ours_graphs vs hf_generate, SmolLM2-135M bf16 on CUDA, batch 1/8/32/64 × 32/128 "
            "tokens, fraction of the bandwidth floor",
            "GPT-2 Large shaped random decoder (bf16, CUDA): ours_graphs vs hf_generate, floor",
        ]
    total_s = time.perf_counter() - t_start
    notes = [
        f"threads: torch.set_num_threads({args.threads}) for ours and HF alike",
        f"load average {load_start} at the start, {load_average()} at the end; total {total_s:.0f} s",
    ]
    if "compile_s" in extra:
        notes.append(f"ours_compiled: first call compiled in {extra['compile_s']} s "
                     "(torch.compile, dynamic shapes, frozen weights; b = 1 apart)")  # fmt: skip
    if "trace_s" in extra:
        notes.append(f"ours_fast: input-major weights; every batch × KV bucket traced in "
                     f"{extra['trace_s']} s (TorchScript, at warm-up)")  # fmt: skip
    if "capture_s" in extra:
        notes.append(f"ours_graphs: captured every batch × KV bucket in {extra['capture_s']} s")
    if "int8_quality" in extra:
        q = extra["int8_quality"]
        notes.append(
            "ours_fast_int8: weight-only int8 decoder (models.quant: per-channel int8 weights, "
            "the C++ kernel torch.ops.dglm.int8_linear, fp32 activations and sums), the same "
            "traced step; ours_fast_int8pack: the same weights through "
            "torch._weight_int8pack_mm (bf16 activations); teacher-forced on "
            f"{q['texts']} held-out texts ({q['tokens']} tokens): perplexity {q['ppl_int8']} vs "
            f"{q['ppl_fp32']} fp32 ({q['ppl_delta_pct']:+.2f}%), top-1 agreement "
            f"{q['top1_agreement']:.1%}; its sampled tokens are not compared (other logits)"
        )
        notes.append(
            "ours_fused_int8: the same int8 decoder through the fused C++ step "
            "(dglm.kernels.llama_step: every layer in one call, one OpenMP region; the LM head "
            "through the int8 kernel after it); `traced_int8` = the same tokens as "
            "ours_fast_int8 (logits agree to rounding)"
        )
        if "ppl_int8_bf16" in q:
            notes.append(
                "ours_fused_int8_bf16: the same int8 weights in the kernel's bf16-activation mode "
                "(quantize='int8-bf16', AVX512-BF16), fused step: perplexity "
                f"{q['ppl_int8_bf16']} ({q['ppl_int8_bf16_delta_pct']:+.2f}% over fp32)"
            )
    if llama_note:
        notes.append(f"llama_cpp rows skipped: {llama_note}")
    elif extra.get("llama") is not None:
        notes.append(
            f"llama_cpp: llama-cpp-python {llama_cpp.version()} on the SmolLM2 GGUF (Q4_1 "
            f"weights), {args.threads} thread(s), batch 1 only, same prompts and sampling "
            "settings (its own sampler and RNG)"
        )
    if args.quick:
        notes.append(f"--quick: configs {QUICK}")
    notes.append("batches ≥ 32 (one repetition): ours_eager skipped to keep the run short")
    env = common.environment(device, ("dglm-engine", "torch", "transformers"))
    report = {
        "bench": "decode",
        "device": common.device_name(device),
        "environment": env,
        "load_avg": {"start": load_start, "end": load_average()},
        "threads": args.threads,
        "quick": args.quick,
        "total_s": round(total_s, 1),
        "notes": notes,
        "pending": pending,
        "extra": {k: v for k, v in extra.items() if k not in ("prompt_ids", "llama")},
        "rows": common.stamp(rows, env, device),
    }
    out = args.out or ROOT / "benchmarks" / "results" / common.device_name(device)
    common.write_results(out, "decode", report, markdown(report))
    print(f"wrote {out / 'decode.json'} and decode.md ({total_s:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
