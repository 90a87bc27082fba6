"""`dglm eval`: evaluate a bundle on held-out prefixes (see dglm.engine.evaluation)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from dglm.engine.cli.common import comma_separated, progress_bar

_floats = comma_separated(float, "numbers")


def _layer_sets(text: str) -> tuple[tuple[int, ...], ...]:
    """ "8;10;8+10" → ((8,), (10,), (8, 10)): block sets for --caa-layers."""
    blocks = comma_separated(int, "block indices")
    return tuple(blocks(s.replace("+", ",")) for s in text.split(";") if s.strip())


def add_parser(sub) -> None:
    """Register `dglm eval` on the CLI's subparsers."""
    e = sub.add_parser(
        "eval",
        help="evaluate a bundle on held-out prefixes (fluency, diversity, steering, fidelity, "
        "FUDGE baseline)",
    )
    e.add_argument("--bundle", default="default", help="bundle directory or shipped name")
    e.add_argument(
        "--split",
        choices=("dev", "test"),
        default="dev",
        help="held-out prefix split: dev (every choice is made here; default) or test (run once "
        "per shipped bundle at its defaults, what the README quotes; refuses every sweep flag)",
    )
    e.add_argument(
        "--quick",
        action="store_true",
        help="the small preset (< 20 min on CPU; one torch thread unless `dglm --threads N`)",
    )
    e.add_argument(
        "--out",
        default=None,
        help="output directory (default benchmarks/results/<device>/eval_<bundle>)",
    )
    e.add_argument("--device", default="cpu")
    e.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    e.add_argument(
        "--quantize",
        default="auto",
        choices=("auto", "none", "int8", "int8-bf16"),
        help="decoder weights as Engine.from_pretrained takes them (auto: int8 on CPU, the "
        "engine default; none: the checkpoint's fp32, as the full n=200 evaluation ran)",
    )
    e.add_argument("--prefixes", type=int, default=None, help="number of held-out prefixes")
    e.add_argument("--samples", type=int, default=None, help="continuations per prefix")
    e.add_argument("--max-new-tokens", type=int, default=None)
    e.add_argument("--scales", type=_floats, default=None, help="guidance scales, e.g. 10,50")
    e.add_argument("--renoise", type=_floats, default=None, help="alpha² sweep, e.g. 1,0.95,0")
    e.add_argument("--fudge-top-k", type=int, default=None)
    e.add_argument("--fudge-strengths", type=_floats, default=None, help="FUDGE λ, e.g. 1,3")
    e.add_argument("--batch-size", type=int, default=None, help="prompts per generation call")
    e.add_argument(
        "--re-control-step-sizes", type=_floats, default=None,
        help="extra DGLM + RE-Control rows at these step sizes α, e.g. 2,8",
    )  # fmt: skip
    e.add_argument(
        "--re-control-plausibilities", type=_floats, default=None,
        help="extra RE-Control and DGLM + RE-Control rows with the plausibility mask β around "
        "the edit (0 = off), e.g. 0,0.1",
    )  # fmt: skip
    e.add_argument(
        "--re-control-scales", type=_floats, default=None,
        help="extra DGLM + RE-Control rows with DGLM at these guidance scales (each compared "
        "with DGLM alone at the same scale when --scales holds it), e.g. 100,300",
    )  # fmt: skip
    e.add_argument(
        "--caa-layers", type=_layer_sets, default=None,
        help="dev: CAA rows at each of these block sets, sets separated by ';' and blocks by "
        "',' or '+', e.g. '8;10;8+10' (default: the steering vector's)",
    )  # fmt: skip
    e.add_argument(
        "--caa-multipliers", type=_floats, default=None,
        help="dev: CAA rows at these multipliers m, e.g. 2,4,8 (default: the vector's)",
    )  # fmt: skip
    e.add_argument(
        "--caa-vector", default=None,
        help="dev: a `dglm train steering-vector` file to evaluate instead of the bundle's",
    )  # fmt: skip
    e.add_argument(
        "--only", default=None,
        help="comma-separated substrings: run only the settings whose names contain one",
    )  # fmt: skip
    e.add_argument(
        "--no-repeat-ngram-size", type=int, default=None,
        help="every method's n-gram ban (plain decoding's too; 0 = off; default: the bundle's)",
    )  # fmt: skip
    e.add_argument("--sources", default=None, help="comma-separated held-out sources")
    e.add_argument("--seed", type=int, default=None)
    e.add_argument(
        "--prompt-guidance",
        type=float,
        default=None,
        help="evaluate with this prompt-guidance scale as the bundle's default (1 = off)",
    )
    e.add_argument(
        "--neural-judge",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also judge sentiment with Gemma-3-270M (evaluation.neural_judge; its accuracy on "
        "labelled held-out reviews is measured in the run; needs --gemma)",
    )
    e.add_argument(
        "--rescore",
        default=None,
        metavar="DIR",
        help="add the neural judge to a finished run's results in DIR (from its samples.jsonl; "
        "nothing is generated again) and write them back",
    )
    e.add_argument(
        "--gemma",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="perplexity under Gemma-3-270M too (default on; needs the `eval` extra, else the "
        "column shows — and the report says how to install it)",
    )
    e.set_defaults(func=cmd_eval)


def neural_judge(args: argparse.Namespace, reference_lm):
    """(the Gemma sentiment judge over the loaded reference LM, its held-out accuracy) or
    (None, None) when --no-neural-judge or no reference LM ran."""
    if not args.neural_judge or reference_lm is None:
        return None, None
    from dglm.engine.evaluation.neural_judge import NeuralSentimentJudge, held_out_accuracy

    judge = NeuralSentimentJudge.from_gemma(reference_lm)
    acc = held_out_accuracy(judge)
    print(
        f"neural judge {judge.name}: accuracy {acc['accuracy']:.3f} on {acc['n']} labelled "
        f"held-out reviews ({', '.join(acc['sources'])})",
        file=sys.stderr,
    )
    return judge, acc["accuracy"]


def cmd_rescore(args: argparse.Namespace) -> int:
    """`dglm eval --rescore DIR`: the neural judge added to a finished run."""
    from dglm.engine.evaluation.perplexity import load_gemma
    from dglm.engine.evaluation.report import render_markdown, write_report
    from dglm.engine.evaluation.run import add_sentiment_judge

    out = Path(args.rescore)
    report = json.loads((out / "results.json").read_text())
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines() if x]
    judge, accuracy = neural_judge(args, load_gemma(args.device))
    if judge is None:
        raise ValueError("--rescore adds the neural judge: drop --no-neural-judge")
    add_sentiment_judge(report, samples, judge, accuracy)
    paths = write_report(report, samples, out)
    print(render_markdown(report))
    print(json.dumps({k: str(v) for k, v in paths.items()}))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import torch
    from dglm.engine import bundle as bundle_io
    from dglm.engine.engine import Engine
    from dglm.engine.evaluation.perplexity import resolve_reference_lm
    from dglm.engine.evaluation.report import render_markdown, write_report
    from dglm.engine.evaluation.run import run_eval
    from dglm.engine.evaluation.settings import PRESETS

    if args.rescore:
        return cmd_rescore(args)

    if args.split == "test":
        sweeps = {
            "--quick": args.quick, "--scales": args.scales, "--renoise": args.renoise,
            "--fudge-strengths": args.fudge_strengths, "--seed": args.seed,
            "--re-control-step-sizes": args.re_control_step_sizes,
            "--re-control-plausibilities": args.re_control_plausibilities,
            "--re-control-scales": args.re_control_scales,
            "--caa-layers": args.caa_layers, "--caa-multipliers": args.caa_multipliers,
            "--caa-vector": args.caa_vector,
            "--prompt-guidance": args.prompt_guidance,
            "--no-repeat-ngram-size": args.no_repeat_ngram_size,
        }  # fmt: skip
        given = [flag for flag, v in sweeps.items() if v is not None and v is not False]
        if given:
            raise ValueError(
                f"--split test runs the bundle's defaults only; "
                f"{', '.join(given)} choose settings: tune them with --split dev"
            )
    config = PRESETS["test" if args.split == "test" else "quick" if args.quick else "full"]
    overrides = {
        "num_prefixes": args.prefixes,
        "num_samples": args.samples,
        "max_new_tokens": args.max_new_tokens,
        "guidance_scales": args.scales,
        "renoise_alpha2s": args.renoise,
        "fudge_top_k": args.fudge_top_k,
        "fudge_strengths": args.fudge_strengths,
        "batch_size": args.batch_size,
        "sources": tuple(args.sources.split(",")) if args.sources else None,
        "seed": args.seed,
        "gemma": args.gemma,
        "re_control_step_sizes": args.re_control_step_sizes,
        "re_control_plausibilities": args.re_control_plausibilities,
        "re_control_scales": args.re_control_scales,
        "caa_layer_sets": args.caa_layers,
        "caa_multipliers": args.caa_multipliers,
        "caa_vector": args.caa_vector,
        "only": tuple(args.only.split(",")) if args.only else None,
        "no_repeat_ngram_size": args.no_repeat_ngram_size,
    }
    config = replace(config, **{k: v for k, v in overrides.items() if v is not None})
    if getattr(args, "threads", None) is None and args.quick and args.device == "cpu":
        # `dglm --threads N eval` chooses; --quick on CPU defaults to one thread, by far the
        # fastest on a busy shared machine (two threads there spend their time in barriers)
        torch.set_num_threads(1)
    bundle_dir = bundle_io.resolve_bundle_dir(args.bundle)
    out = args.out or Path("benchmarks/results") / torch.device(args.device).type / (
        f"eval_{bundle_dir.name}" + ("_quick" if args.quick else "") + f"_{args.split}"
    )
    # --quantize auto (default): what Engine.from_pretrained gives users (int8 decoder on CPU)
    engine = Engine.from_pretrained(
        bundle_dir, device=args.device, dtype=args.dtype, quantize=args.quantize
    )
    if args.prompt_guidance is not None:  # the bundle as if it shipped this default
        engine.dglm.config = replace(engine.dglm.config, prompt_guidance=args.prompt_guidance)
    bar = progress_bar(None, "eval", unit="batch")

    def progress(name: str, done: int, total: int) -> None:
        bar.total = total
        bar.set_postfix_str(name)
        bar.update(done - bar.n)

    reference_lm, _ = resolve_reference_lm(config, engine.device)
    judge, accuracy = neural_judge(args, reference_lm)
    report, samples = run_eval(
        engine, config, progress, str(args.bundle), reference_lm, judge, accuracy
    )
    bar.close()
    paths = write_report(report, samples, out)
    print(render_markdown(report))
    print(json.dumps({k: str(v) for k, v in paths.items()}))
    return 0
