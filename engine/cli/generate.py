"""`dglm generate` (continue prefixes, optionally steered by probes) and `dglm info`."""

from __future__ import annotations

import argparse
import json
import sys

from dglm.engine.api import DEFAULT_MAX_NEW_TOKENS, DEFAULT_TEMPERATURE, DEFAULT_TOP_P
from dglm.engine.cli.common import device, flags

# flags passed to GenerationParams under their own names
SAMPLING_FLAGS = (
    "num_samples", "seed", "max_new_tokens", "temperature", "top_p", "top_k", "cfg_scale",
    "sampler", "renoise_alpha2", "prompt_guidance", "re_control_steps", "re_control_step_size",
    "re_control_plausibility", "implied_controls", "caa_multiplier",
)  # fmt: skip


def add_parser(sub) -> None:
    g = sub.add_parser("generate", help="continue prefixes, optionally steered by probes")
    g.add_argument("prompt", nargs="+", help="one or more prefixes")
    g.add_argument("--bundle", default="default", help="bundle directory or shipped name")
    g.add_argument(
        "--control",
        action="append",
        default=[],
        metavar="PROBE=TARGET[:SCALE][@METHOD]",
        help="steer with a probe, e.g. sentiment=positive:20 (repeatable: losses add); @METHOD: "
        "dglm (the default: through the diffusion latent), re-control (the probe's value network "
        "edits the decoder's hidden states), both, caa (the probe's steering vector is added to "
        "the decoder's residual stream); with a Diffusion-LM bundle: its classifiers, "
        "and length=N (the same as --length N)",
    )
    g.add_argument(
        "--method",
        choices=("dglm", "re-control", "caa"),
        default="dglm",
        help="re-control: RE-Control alone (no soft prompt, no diffusion): every control acts "
        "through its value network; caa: CAA alone, every control through its steering vector",
    )
    g.add_argument(
        "--caa-multiplier",
        type=float,
        default=None,
        help="CAA: the multiplier m of the steering vectors (default: each vector's)",
    )
    g.add_argument(
        "--re-control-steps",
        type=int,
        default=None,
        help="RE-Control gradient steps per token (default: the value network's)",
    )
    g.add_argument(
        "--re-control-step-size",
        type=float,
        default=None,
        help="RE-Control step size α (default: the value network's)",
    )
    g.add_argument(
        "--re-control-plausibility",
        type=float,
        default=None,
        help="RE-Control plausibility mask β in [0, 1): keep the edited choice among tokens the "
        "unedited decoder gives ≥ β × its top probability (0 = off; default: the value network's)",
    )
    g.add_argument("--num-samples", "-n", type=int, default=1)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    g.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE)
    g.add_argument("--top-p", type=float, default=DEFAULT_TOP_P)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--cfg-scale", type=float, default=None, help="classifier-free guidance weight")
    g.add_argument("--steps", type=int, default=None, help="diffusion steps (num_inference_steps)")
    g.add_argument(
        "--sampler",
        choices=("ddpm", "ddim", "dpmpp-2m", "consistency"),
        default=None,
        help="diffusion sampler (consistency: the bundle's distilled student); default: the bundle's",
    )
    g.add_argument(
        "--guidance", choices=("fast", "exact"), default=None, help="probe guidance mode"
    )
    g.add_argument("--renoise-alpha2", type=float, default=None)
    g.add_argument(
        "--prompt-guidance",
        type=float,
        default=None,
        help="classifier-free guidance of the decoder by the soft prompt (1 = off); "
        "default: the bundle's",
    )
    g.add_argument(
        "--no-implied-controls",
        dest="implied_controls",
        action="store_false",
        help="steer with exactly the --control given: without the controls the bundle adds to "
        "some of them (config.json implied_controls, e.g. toxicity=low with sentiment=negative)",
    )
    g.add_argument("--device", type=device, default="cpu", help="cpu, cuda or cuda:N")
    g.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    g.add_argument(
        "--quantize",
        default="auto",
        choices=("auto", "none", "int8", "int8-bf16"),
        help="int8: the decoder's weights in int8 (weight-only, per-channel scales, fp32 "
        "activations and sums): faster CPU decoding at held-out perplexity within 1%% of fp32; "
        "int8-bf16: the same with activations rounded to bf16 (CPUs with AVX512-BF16: faster "
        "batches); auto (default): int8 for a float32 decoder on CPU, else none",
    )
    g.add_argument(
        "--backend",
        default="torch",
        choices=("torch", "onnx"),
        help="onnx: --bundle is a `dglm export onnx` directory, run on ONNX Runtime",
    )
    g.add_argument("--json", action="store_true", help="print JSON")
    # Diffusion-LM bundles only (methods.diffusion_lm): structure controls
    g.add_argument(
        "--length", type=int, default=None, help="Diffusion-LM: exactly N words, prompt included"
    )
    g.add_argument(
        "--infill",
        default=None,
        metavar='"LEFT ___ RIGHT"',
        help='Diffusion-LM: fixed context around a gap, e.g. "the food ___ . we left early ."',
    )
    g.add_argument(
        "--candidates",
        type=int,
        default=None,
        help="Diffusion-LM: each sample is the best of N sampled candidates (see --select)",
    )
    g.add_argument(
        "--select",
        choices=("lm", "mbr", "lattice"),
        default=None,
        help="Diffusion-LM: lm = lowest perplexity under the decoder (SmolLM2); mbr = minimum "
        "Bayes risk, the candidate most like the others; lattice = the decoder's best path "
        "through the candidates' words, position by position (needs --length or --infill)",
    )
    g.set_defaults(func=cmd_generate)

    i = sub.add_parser("info", help="describe a bundle")
    i.add_argument("--bundle", default="default")
    i.add_argument("--device", type=device, default="cpu", help="cpu, cuda or cuda:N")
    i.set_defaults(func=cmd_info)


def _controls(specs: list[str]):
    from dglm.engine.probes import Control

    return tuple(Control.parse(s) for s in specs)


def cmd_generate(args: argparse.Namespace) -> int:
    from dglm.engine.methods.diffusion_lm.bundle import is_diffusion_lm_bundle

    if is_diffusion_lm_bundle(args.bundle):  # a bundle of another method: its own engine
        outputs = _generate_diffusion_lm(args)
    elif any(getattr(args, k) is not None for k in ("length", "infill", "candidates", "select")):
        raise ValueError(
            "--length, --infill, --candidates and --select need a Diffusion-LM bundle (--bundle)"
        )
    else:
        outputs = _generate_engine(args)
    return _print_outputs(args, outputs)


def _generate_diffusion_lm(args: argparse.Namespace):
    from dglm.engine.methods.diffusion_lm import DiffusionLMEngine

    engine = DiffusionLMEngine.from_pretrained(args.bundle, device=args.device)
    controls, length = _controls(args.control), args.length
    lengths = [c for c in controls if c.probe == "length"]  # `--control length=N`: structure
    if lengths:
        if length is not None or len(lengths) > 1:
            raise ValueError("give the length once: --length N or --control length=N")
        try:
            length = int(lengths[0].target)
        except ValueError:
            raise ValueError(
                f"--control length=N needs a whole number of words, got {lengths[0].target!r}"
            ) from None
        controls = tuple(c for c in controls if c.probe != "length")
    own = {"length": length, "infill": args.infill, "sampler": args.sampler}
    own.update(num_inference_steps=args.steps, candidates=args.candidates, select=args.select)
    params = engine.default_params(
        controls=controls,
        num_samples=args.num_samples,
        seed=args.seed,
        **{k: v for k, v in own.items() if v is not None},
    )
    return engine.generate(list(args.prompt), params)


def _generate_engine(args: argparse.Namespace):
    from dglm.engine import bundle as bundle_io
    from dglm.engine.api import GenerationParams, check_prompts
    from dglm.engine.engine import Engine
    from dglm.engine.methods.dglm import resolve_sampler

    # the checks that need no model first: a bad prompt or setting fails in a second, not after
    # loading the encoder and decoder
    check_prompts(list(args.prompt))
    params = GenerationParams(
        controls=_controls(args.control),
        stop=tuple(args.stop),
        num_inference_steps=args.steps,
        guidance_mode=args.guidance,
        **flags(args, *SAMPLING_FLAGS),
    )
    if args.backend == "torch":  # the request's sampler on the bundle: config.json suffices
        resolve_sampler(bundle_io.read_config(bundle_io.resolve_bundle_dir(args.bundle)), params)
    engine = Engine.from_pretrained(
        args.bundle,
        device=args.device,
        dtype=args.dtype,
        backend=args.backend,
        quantize=args.quantize,
    )
    method = {"re-control": engine.re_control, "caa": engine.caa}.get(args.method)
    return engine.generate(list(args.prompt), params, method=method)


def _print_outputs(args: argparse.Namespace, outputs) -> int:
    if args.json:
        rows = [
            {
                "prompt": o.prompt,
                "samples": [
                    {
                        "text": s.text,
                        "token_ids": s.token_ids,
                        "finish_reason": s.finish_reason,
                        "latent_norm": None if s.latent is None else float(s.latent.norm()),
                    }
                    for s in o.samples
                ],
                "timings_s": o.timings,
            }
            for o in outputs
        ]
        json.dump(rows, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    for o in outputs:
        for k, s in enumerate(o.samples):
            tag = f"[{k}] " if len(o.samples) > 1 else ""
            print(
                f"{tag}{o.prompt}\x1b[1m{s.text}\x1b[0m"
                if sys.stdout.isatty()
                else f"{tag}{o.prompt}{s.text}"
            )
            print(f"    finish_reason={s.finish_reason} tokens={len(s.token_ids)}")
    t = outputs[0].timings
    stages = " ".join(f"{k}={1000 * v:.1f}ms" for k, v in t.items())
    print(f"timings: {stages}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from dglm.engine.engine import Engine
    from dglm.kernels.guided_update import cpp_available

    engine = Engine.from_pretrained(args.bundle, device=args.device)
    info = engine.info()
    info["cpp_extension"] = cpp_available()
    print(json.dumps(info, indent=2, default=str))
    return 0
