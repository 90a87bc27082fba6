"""`dglm`: command-line front end. The CLI owns output, progress and exit codes."""

from __future__ import annotations

import argparse
import json
import logging
import sys

EXIT_USAGE = 2


def _controls(specs: list[str]):
    from dglm.engine.probes import Control

    return tuple(Control.parse(s) for s in specs)


def cmd_generate(args: argparse.Namespace) -> int:
    from dglm.engine.engine import Engine, GenerationParams

    params = GenerationParams(
        controls=_controls(args.control),
        num_samples=args.num_samples,
        seed=args.seed,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        stop=tuple(args.stop),
        cfg_scale=args.cfg_scale,
        num_inference_steps=args.steps,
        sampler=args.sampler,
        guidance_mode=args.guidance,
        renoise_alpha2=args.renoise_alpha2,
    )
    engine = Engine.from_pretrained(args.bundle, device=args.device, dtype=args.dtype)
    outputs = engine.generate(list(args.prompt), params)
    if args.json:
        rows = [
            {
                "prompt": o.prompt,
                "samples": [
                    {
                        "text": s.text,
                        "token_ids": s.token_ids,
                        "finish_reason": s.finish_reason,
                        "latent_norm": float(s.latent.norm()),
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


def cmd_bundle_create(args: argparse.Namespace) -> int:
    from dglm.engine.builder import (
        SEED_SENTIMENT,
        create_bundle,
        probe_from_texts,
        read_labelled_jsonl,
    )
    from dglm.engine.encoder import SentenceEncoder

    probes = []
    if args.seed_probes:
        enc = SentenceEncoder(args.encoder)
        texts, labels = read_labelled_jsonl(SEED_SENTIMENT)
        probes.append(probe_from_texts("sentiment", enc, texts, labels, ("negative", "positive")))
    create_bundle(
        args.out,
        args.encoder,
        args.decoder,
        args.score_net,
        args.prompt_generator,
        probes,
        args.seed,
    )
    print(f"wrote an untrained bundle to {args.out}")
    return 0


def cmd_probe_train(args: argparse.Namespace) -> int:
    from dglm.engine import bundle as bundle_io
    from dglm.engine.builder import add_probe_to_bundle, probe_from_texts, read_labelled_jsonl
    from dglm.engine.encoder import SentenceEncoder

    bundle_dir = bundle_io.resolve_bundle_dir(args.bundle)
    config = bundle_io.read_config(bundle_dir)
    texts, labels = read_labelled_jsonl(args.data)
    order = tuple(args.labels.split(",")) if args.labels else None
    enc = SentenceEncoder(bundle_io.resolve_reference(config.encoder, bundle_dir))
    probe = probe_from_texts(args.name, enc, texts, labels, order)
    add_probe_to_bundle(bundle_dir, probe)
    print(json.dumps({"probe": probe.name, "labels": list(probe.labels), **probe.metrics}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dglm", description="Diffusion-guided controllable generation")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="continue prefixes, optionally steered by probes")
    g.add_argument("prompt", nargs="+", help="one or more prefixes")
    g.add_argument("--bundle", default="default", help="bundle directory or shipped name")
    g.add_argument(
        "--control",
        action="append",
        default=[],
        metavar="PROBE=TARGET[:SCALE]",
        help="steer with a probe, e.g. sentiment=positive:20 (repeatable: losses add)",
    )
    g.add_argument("--num-samples", "-n", type=int, default=1)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--cfg-scale", type=float, default=None, help="classifier-free guidance weight")
    g.add_argument("--steps", type=int, default=None, help="diffusion steps (num_inference_steps)")
    g.add_argument("--sampler", choices=("ddpm", "ddim"), default=None)
    g.add_argument(
        "--guidance", choices=("fast", "exact"), default=None, help="probe guidance mode"
    )
    g.add_argument("--renoise-alpha2", type=float, default=None)
    g.add_argument("--device", default="cpu")
    g.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    g.add_argument("--json", action="store_true", help="print JSON")
    g.set_defaults(func=cmd_generate)

    i = sub.add_parser("info", help="describe a bundle")
    i.add_argument("--bundle", default="default")
    i.add_argument("--device", default="cpu")
    i.set_defaults(func=cmd_info)

    b = sub.add_parser("bundle", help="make bundles")
    bsub = b.add_subparsers(dest="bundle_command", required=True)
    bc = bsub.add_parser(
        "create", help="a bundle with untrained networks for an encoder/decoder pair"
    )
    bc.add_argument("out")
    bc.add_argument("--encoder", default="all-MiniLM-L6-v2")
    bc.add_argument("--decoder", default="smollm2")
    bc.add_argument("--score-net", default="small")
    bc.add_argument("--prompt-generator", default="small")
    bc.add_argument("--seed", type=int, default=0)
    bc.add_argument(
        "--seed-probes",
        action="store_true",
        help="add a sentiment probe trained on the small labelled set shipped with the engine",
    )
    bc.set_defaults(func=cmd_bundle_create)

    pr = sub.add_parser("probe", help="probes")
    psub = pr.add_subparsers(dest="probe_command", required=True)
    pt = psub.add_parser(
        "train", help="train a logistic probe from JSONL {text, label} and add it to a bundle"
    )
    pt.add_argument("name")
    pt.add_argument("data")
    pt.add_argument("--bundle", required=True)
    pt.add_argument(
        "--labels", default=None, help="label order, e.g. negative,positive (y=1 is last)"
    )
    pt.set_defaults(func=cmd_probe_train)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except ValueError as e:
        print(f"dglm: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except RuntimeError as e:
        print(f"dglm: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
