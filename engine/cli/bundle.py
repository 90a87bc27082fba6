"""`dglm bundle`: make bundles (untrained, assembled from runs) and put trained parts into one."""

from __future__ import annotations

import argparse
import json

from dglm.engine.cli.common import comma_separated, command_group


def add_parser(sub) -> None:
    bsub = command_group(sub, "bundle", "make bundles")
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

    ba = bsub.add_parser("assemble", help="a trained bundle from training runs and probe files")
    ba.add_argument("out")
    ba.add_argument("--diffusion", required=True, help="run directory of `dglm train diffusion`")
    ba.add_argument(
        "--prompt-generator", required=True, help="run directory of `dglm train prompt-generator`"
    )
    ba.add_argument("--probes", nargs="*", default=[], help="probe safetensors files")
    ba.add_argument("--encoder", default="all-MiniLM-L6-v2")
    ba.add_argument("--decoder", default="smollm2")
    ba.add_argument("--sampler", default="ddpm", choices=("ddpm", "ddim", "dpmpp-2m"))
    ba.add_argument("--steps", type=int, default=50)
    ba.add_argument("--cfg-scale", type=float, default=1.0)
    ba.add_argument("--notes", default="")
    ba.set_defaults(func=cmd_bundle_assemble)

    _add_run_parser(
        bsub,
        "add-score-network",
        "put a `dglm train diffusion` run's score network in a bundle (drops a stale student)",
        "--run",
        "diffusion",
        cmd_bundle_add_score_network,
    )
    bs = _add_run_parser(
        bsub,
        "add-student",
        "put a distilled student (`dglm train distill`) into a bundle",
        "--distill",
        "distill",
        cmd_bundle_add_student,
    )
    bs.add_argument(
        "--default-steps",
        type=int,
        default=4,
        help="make the student's N-step sampler the bundle's default (default 4)",
    )
    bs.add_argument("--keep-default", action="store_true", help="keep the bundle's default sampler")
    bv = _add_run_parser(
        bsub,
        "add-value-network",
        "put a `dglm train value` run's value network (RE-Control) in a bundle",
        "--run",
        "value",
        cmd_bundle_add_value_network,
    )
    bv.add_argument("--steps", type=int, default=None, help="its default RE-Control steps n")
    bv.add_argument("--step-size", type=float, default=None, help="its default step size α")
    bv.add_argument(
        "--step-size-with-dglm",
        type=float,
        default=None,
        help="its default α when the control also acts through DGLM (method both)",
    )
    bv.add_argument(
        "--plausibility",
        type=float,
        default=None,
        help="its default plausibility mask β around the edit, in [0, 1) (0 = off)",
    )
    bv.add_argument(
        "--plausibility-with-dglm",
        type=float,
        default=None,
        help="its default β when the control also acts through DGLM (method both)",
    )
    bc = bsub.add_parser(
        "add-steering-vector",
        help="put a `dglm train steering-vector` file's vector (CAA) in a bundle",
    )
    bc.add_argument("bundle", help="bundle directory or shipped name")
    bc.add_argument("--vector", required=True, help="file of `dglm train steering-vector`")
    bc.add_argument("--out", default=None, help="write a copy here instead of in place")
    bc.add_argument(
        "--layers", type=comma_separated(int, "block indices"), default=None,
        help="its default blocks (0-based), e.g. 10,11 (default: the file's)",
    )  # fmt: skip
    bc.add_argument("--multiplier", type=float, default=None, help="its default multiplier m")
    bc.set_defaults(func=cmd_bundle_add_steering_vector)
    bt = _add_run_parser(
        bsub,
        "add-steering",
        "put a `dglm train steering` run's prompt generator and decoder adapters in a bundle",
        "--run",
        "steering",
        cmd_bundle_add_steering,
    )
    bt.add_argument(
        "--snapshot",
        default=None,
        help="take this snapshot of the run (joint/snapshots/step-N.pt, `--keep-every`) instead "
        "of its last checkpoint: a point of a learning curve",
    )


def _add_run_parser(bsub, name: str, help: str, flag: str, command: str, func):
    """A command that puts a training run's output into a bundle: BUNDLE, FLAG (the run directory
    of `dglm train <command>`), --out."""
    p = bsub.add_parser(name, help=help)
    p.add_argument("bundle", help="bundle directory or shipped name")
    p.add_argument(flag, required=True, help=f"run directory of `dglm train {command}`")
    p.add_argument("--out", default=None, help="write a copy here instead of in place")
    p.set_defaults(func=func)
    return p


def cmd_bundle_create(args: argparse.Namespace) -> int:
    from dglm.engine.encode.encoder import SentenceEncoder
    from dglm.engine.training.builder import (
        SEED_SENTIMENT,
        create_bundle,
        probe_from_texts,
        read_labelled_jsonl,
    )

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


def cmd_bundle_assemble(args: argparse.Namespace) -> int:
    from dglm.engine.diffusion.sampler import SamplerConfig
    from dglm.engine.training.recipes import assemble_bundle

    sampler = SamplerConfig(sampler=args.sampler, num_inference_steps=args.steps)
    assemble_bundle(
        args.out,
        args.diffusion,
        args.prompt_generator,
        args.probes,
        args.encoder,
        args.decoder,
        sampler,
        args.cfg_scale,
        args.notes,
    )
    print(f"wrote a trained bundle to {args.out}")
    return 0


def _print_sampler(args: argparse.Namespace, config, **extra) -> None:
    """The edited bundle and its default sampler, as one JSON line."""
    print(
        json.dumps(
            {
                "bundle": str(args.out or args.bundle),
                "default_sampler": config.sampler.sampler,
                "num_inference_steps": config.sampler.num_inference_steps,
                **extra,
            }
        )
    )


def cmd_bundle_add_score_network(args: argparse.Namespace) -> int:
    from dglm.engine.training.recipes import add_score_network

    config = add_score_network(args.bundle, args.run, args.out)
    _print_sampler(args, config, student=config.student is not None)
    return 0


def cmd_bundle_add_student(args: argparse.Namespace) -> int:
    from dglm.engine.training.recipes import add_student

    config = add_student(
        args.bundle, args.distill, args.out, None if args.keep_default else args.default_steps
    )
    _print_sampler(args, config, student_cfg_range=list(config.student_cfg_range))
    return 0


def cmd_bundle_add_value_network(args: argparse.Namespace) -> int:
    from dglm.engine.training.recipes import add_value_network

    config = add_value_network(
        args.bundle, args.run, args.out, args.steps, args.step_size, args.step_size_with_dglm,
        args.plausibility, args.plausibility_with_dglm,
    )  # fmt: skip
    nets = [v.to_dict() for v in config.value_networks]
    print(json.dumps({"bundle": str(args.out or args.bundle), "value_networks": nets}))
    return 0


def cmd_bundle_add_steering_vector(args: argparse.Namespace) -> int:
    from dglm.engine.training.recipes import add_steering_vector

    config = add_steering_vector(args.bundle, args.vector, args.out, args.layers, args.multiplier)
    vecs = [v.to_dict() for v in config.steering_vectors]
    print(json.dumps({"bundle": str(args.out or args.bundle), "steering_vectors": vecs}))
    return 0


def cmd_bundle_add_steering(args: argparse.Namespace) -> int:
    from dglm.engine.training.recipes import add_steering

    config = add_steering(args.bundle, args.run, args.out, args.snapshot)
    lora = config.decoder_lora
    print(
        json.dumps(
            {"bundle": str(args.out or args.bundle), "decoder_lora": lora and lora.to_dict()}
        )
    )
    return 0
