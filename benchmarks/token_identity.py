"""Same-seed token ids of every method on every backend, recorded once and compared after a change.

    python -m benchmarks.token_identity --record benchmarks/results/token_identity.json
    python -m benchmarks.token_identity --check benchmarks/results/token_identity.json

A refactor of the engine's routing must not change a token: this runs a fixed set of seeded
requests on the default bundle — DGLM (unguided, guided, composed with RE-Control, without prompt
guidance, on the multistep sampler, with an n-gram ban and a stop string), RE-Control alone and
FUDGE through `Engine.generate`, on the eager step, the fused CPU step (the default), traced steps
(an fp32 decoder) and ONNX Runtime (`--onnx DIR`: a `dglm export onnx` of the default bundle) —
plus every method of `dglm eval` (plain decoding, plain decoding with min-p, DGLM, RE-Control
alone, DGLM + RE-Control, FUDGE) through `evaluation.generation.generate_setting`, and the
Diffusion-LM bundle, and writes (or compares) the token ids of every sample. `--check` exits 1
naming each case whose ids differ. The requests use only the public API, so the same script runs
on the commit that recorded the fixture and on every later one.

Recorded at adc7ed0 (re-recorded for the default bundle's new defaults: no_repeat_ngram_size 3,
sentiment=negative implying toxicity=low through RE-Control; first recorded at 13edcb9), except
the FUDGE cases ("fudge", "eval fudge"), re-recorded when FUDGE's token came to be drawn by the
loop's one Sampler (V uniforms per row and step, indexed by token, from the row's decode seed)
instead of inside its logits processor (k uniforms per row and step, indexed by rank, from the
row's seed): the same distribution, other noise. The "onnx" cases are still those of 13edcb9.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from dglm.engine.api import GenerationParams
from dglm.engine.engine import Engine
from dglm.engine.evaluation.generation import generate_setting, released_decoder
from dglm.engine.evaluation.settings import EvalConfig, Setting
from dglm.engine.methods.fudge import Fudge
from dglm.engine.probes import Control

PROMPTS = ["The movie was", "My neighbour told me that the old bridge"]
SEED, TOKENS = 7, 12
POSITIVE = Control("sentiment", "positive")


def engine_requests(engine: Engine, onnx: bool) -> dict[str, Callable[[], list[list[int]]]]:
    """Named requests on one engine → their samples' token ids."""

    def run(method=None, **kw) -> list[list[int]]:
        p = GenerationParams(seed=SEED, num_samples=2, max_new_tokens=TOKENS, **kw)
        outs = engine.generate(PROMPTS, p, method=method)
        return [s.token_ids for o in outs for s in o.samples]

    cases = {
        "dglm unguided": lambda: run(),
        "dglm sentiment=positive": lambda: run(controls=(POSITIVE,)),
        "dglm greedy, stop": lambda: run(controls=(POSITIVE,), temperature=0.0, stop=(".",)),
        "dglm no_repeat_ngram_size=2, top_k=40": lambda: run(no_repeat_ngram_size=2, top_k=40),
        "dglm dpmpp-2m": lambda: run(
            controls=(POSITIVE,), sampler="dpmpp-2m", num_inference_steps=6
        ),  # fmt: skip
    }
    if onnx:  # prompt guidance, RE-Control and FUDGE (no soft prompt) run in PyTorch only
        return {
            "dglm prompt_guidance=1": lambda: run(prompt_guidance=1.0),
            "dglm sentiment=positive, prompt_guidance=1": lambda: run(
                controls=(POSITIVE,), prompt_guidance=1.0
            ),
        }
    both = Control("sentiment", "positive", method="both")
    cases |= {
        "dglm prompt_guidance=1": lambda: run(prompt_guidance=1.0),
        "dglm + re-control": lambda: run(controls=(both,)),
        "re-control": lambda: run(engine.re_control, controls=(POSITIVE,)),
        "re-control plausibility=0": lambda: run(
            engine.re_control, controls=(POSITIVE,), re_control_plausibility=0.0
        ),
        "fudge": lambda: run(Fudge(engine.encoder, engine.probes, top_k=20), controls=(POSITIVE,)),
    }
    return cases


def eval_requests(engine: Engine) -> dict[str, Callable[[], list[list[int]]]]:
    """Every method of `dglm eval` through generate_setting, in batches of 2 prefixes."""
    prefixes = (*PROMPTS, "Yesterday the committee decided")
    config = EvalConfig(prefixes=prefixes, num_prefixes=3, num_samples=2, max_new_tokens=10,
                        batch_size=2, fudge_top_k=20, seed=SEED)  # fmt: skip
    base = released_decoder(engine)
    neg = Control("sentiment", "negative", 1000.0)
    settings = [
        Setting("decoder", "decoder", "unguided"),
        Setting("decoder min-p", "decoder", "unguided", min_p=0.1),
        Setting("dglm", "dglm", "sentiment", (neg,), 0.95, "sentiment", "negative", 1000.0),
        Setting("re-control", "re-control", "sentiment",
                (Control("sentiment", "positive", method="re-control"),), None, "sentiment",
                "positive"),
        Setting("re-control α β", "re-control", "sentiment",
                (Control("sentiment", "positive", method="re-control"),), None, "sentiment",
                "positive", None, 8.0, 0.05),
        Setting("dglm+re-control", "dglm+re-control", "sentiment",
                (Control("sentiment", "positive", 1000.0, method="both"),), 0.95, "sentiment",
                "positive", 1000.0),
        Setting("fudge", "fudge", "sentiment", probe="sentiment", target="positive", scale=1.0),
    ]  # fmt: skip

    def run(s: Setting) -> list[list[int]]:
        return generate_setting(engine, s, list(prefixes), config, base_decoder=base).token_ids

    return {f"eval {s.name}": (lambda s=s: run(s)) for s in settings}


def diffusion_lm_requests() -> dict[str, Callable[[], list[list[int]]]]:
    engine = Engine.from_pretrained("diffusion-lm")

    def run(**kw) -> list[list[int]]:
        p = GenerationParams(seed=SEED, num_samples=2, max_new_tokens=TOKENS, **kw)
        return [s.token_ids for o in engine.generate(["the food"], p) for s in o.samples]

    return {
        "diffusion-lm": lambda: run(),
        "diffusion-lm positive": lambda: run(controls=(POSITIVE,)),
    }


def collect(onnx_dir: str | None, only: str | None) -> dict[str, dict[str, list[list[int]]]]:
    """{backend: {case: token ids per sample}}."""
    backends: dict[str, Callable[[], Engine]] = {
        "fused": lambda: Engine.from_pretrained("default"),
        "eager": lambda: Engine.from_pretrained("default", fast_decode=False),
        "traced": lambda: Engine.from_pretrained("default", quantize="none", fast_decode=True),
    }
    if onnx_dir:
        backends["onnx"] = lambda: Engine.from_pretrained(onnx_dir, backend="onnx")
    out: dict[str, dict[str, list[list[int]]]] = {}
    for name, load in backends.items():
        if only and only != name:
            continue
        engine = load()
        cases = engine_requests(engine, onnx=name == "onnx")
        if name == "fused":
            cases |= eval_requests(engine)
        out[name] = {}
        for case, fn in cases.items():
            out[name][case] = fn()
            print(f"{name:7s} {case}: {out[name][case][0][:6]}…", file=sys.stderr)
        del engine
    if not only or only == "diffusion-lm":
        out["diffusion-lm"] = {case: fn() for case, fn in diffusion_lm_requests().items()}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--record", type=Path, help="write the token ids to this JSON file")
    mode.add_argument("--check", type=Path, help="compare with this JSON file; exit 1 on a change")
    ap.add_argument("--onnx", help="a `dglm export onnx` directory of the default bundle")
    ap.add_argument("--only", help="one backend: fused, eager, traced, onnx or diffusion-lm")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    got = collect(args.onnx, args.only)
    if args.record:
        old = json.loads(args.record.read_text()) if args.record.exists() else {}
        args.record.write_text(json.dumps(old | got, indent=1) + "\n")
        print(f"recorded {sum(map(len, got.values()))} cases in {args.record}")
        return 0
    want = json.loads(args.check.read_text())
    changed, same = [], 0
    for backend, cases in got.items():
        for case, ids in cases.items():
            if backend not in want or case not in want[backend]:
                changed.append(f"{backend} / {case}: not in the fixture")
            elif want[backend][case] != ids:
                changed.append(f"{backend} / {case}: token ids differ")
            else:
                same += 1
    for line in changed:
        print("CHANGED", line)
    print(f"{same} cases identical, {len(changed)} changed")
    return 1 if changed else 0


if __name__ == "__main__":
    sys.exit(main())
