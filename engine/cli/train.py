"""`dglm train`: the score network, the prompt generator, steering (prompt generator + decoder
adapters), consistency distillation, the offline probes, and Diffusion-LM (its denoiser and its
attribute classifiers)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import replace

from dglm.engine.cli.common import (
    comma_separated,
    command_group,
    configure_logging,
    flags,
    float_pair,
    progress_bar,
)

# the flags of every training command that TrainConfig takes under their own names
TRAIN_FLAGS = (
    "steps", "batch_size", "lr", "warmup", "ema_decay", "eval_every", "save_every", "keep_every",
    "seed", "max_minutes",
)  # fmt: skip


def add_parser(sub) -> None:
    tsub = command_group(sub, "train", "train the networks and probes")
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
        type=float_pair,
        default=(1.0, 1.0),
        help="guidance weights w the student learns, LO,HI (w is a student input)",
    )
    tx.add_argument(
        "--target-ema", type=float, default=0.0, help="target network EMA (0: stop-grad student)"
    )
    tx.set_defaults(func=cmd_train_distill)
    tv = tsub.add_parser(
        "value",
        help="RE-Control's value network for one probe: decoder rollouts, then TD training",
    )
    _add_train_args(tv, steps=1_500, batch=64, lr=1e-3)
    tv.add_argument("--bundle", default="default", help="the bundle whose probe is the reward")
    tv.add_argument("--probe", required=True, help="the probe whose logits the value predicts")
    tv.add_argument("--rollouts", type=int, default=4096, help="rollouts to collect (resumes)")
    tv.add_argument("--rollout-batch-size", type=int, default=32)
    tv.add_argument("--max-new-tokens", type=int, default=24, help="tokens per rollout")
    tv.add_argument("--max-prefix-tokens", type=int, default=16, help="keep the last N")
    tv.add_argument(
        "--dglm-fraction",
        type=float,
        default=0.5,
        help="share of rollouts decoded through DGLM with a random control (the rest: the "
        "released decoder on the prefix alone)",
    )
    tv.add_argument(
        "--rollouts-dir",
        default=None,
        help="read / write the rollouts here (default <out>/rollouts; one set serves every probe)",
    )
    tv.add_argument(
        "--mc-weight",
        type=float,
        default=0.0,
        help="add the Monte-Carlo regression of every state on the reward with this weight "
        "(0: the paper's TD loss alone)",
    )
    tv.add_argument(
        "--state-noise",
        type=float,
        default=2.0,
        help="Gaussian noise on the training states, relative to their RMS: a smoother value "
        "whose gradient steers without wrecking fluency (measured: 2 beat 0, 0.3 and 1)",
    )
    tv.set_defaults(func=cmd_train_value, preset="small", warmup=100, ema_decay=0.99)
    _add_diffusion_lm_parsers(tsub)
    ts = tsub.add_parser(
        "steering-vector",
        help="CAA's steering vector: mean residual-activation differences of the bundle's "
        "decoder (as released) between a probe's labelled texts (training split)",
    )
    ts.add_argument("which", choices=("sentiment", "topic", "toxicity"))
    ts.add_argument("--bundle", default="default", help="the bundle whose decoder and probe")
    ts.add_argument(
        "--layers", required=True, type=comma_separated(int, "block indices"),
        help="its default blocks (0-based), e.g. 10,11 (every block's vector is kept)",
    )  # fmt: skip
    ts.add_argument("--multiplier", type=float, default=1.0, help="its default multiplier m")
    ts.add_argument(
        "--position", choices=("mean", "last"), default="mean",
        help="activations averaged over each text's tokens, or at its last token",
    )  # fmt: skip
    ts.add_argument("--per-label", type=int, default=256, help="labelled texts per label")
    ts.add_argument("--seed", type=int, default=0)
    ts.add_argument("--out", required=True, help="steering-vector safetensors file")
    ts.set_defaults(func=cmd_train_steering_vector)
    tb = tsub.add_parser("probe", help="a logistic probe from the offline labelled sets")
    tb.add_argument("which", choices=("sentiment", "topic", "toxicity"))
    tb.add_argument("--out", required=True, help="probe safetensors file")
    tb.add_argument("--encoder", default="all-MiniLM-L6-v2")
    tb.add_argument("--device", default="cpu")
    tb.set_defaults(func=cmd_train_probe)


def _train_config(args: argparse.Namespace):
    from dglm.engine.training.loop import TrainConfig

    return TrainConfig(**flags(args, *TRAIN_FLAGS))


def _train(args: argparse.Namespace, desc: str, run: Callable) -> int:
    """Seed torch, run(TrainConfig from the flags, progress update) under a bar, print the run."""
    cfg = _train_config(args)
    _torch_seed(cfg.seed)
    bar, update = _progress(cfg.steps, desc)
    run(cfg, update)
    bar.close()
    print(json.dumps({"out": args.out, "steps": cfg.steps}))
    return 0


def _progress(total: int, desc: str):
    bar = progress_bar(total, desc)

    def update(step: int, logs: dict) -> None:
        bar.update(step - bar.n)
        bar.set_postfix(
            {
                k: f"{v:.4g}"
                for k, v in logs.items()
                if k in ("loss", "eval_loss", "eval_loss_a2_0.95", "eval_corr_last")
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
        net = ScoreNetwork(replace(preset, latent_dim=train[0].shape[1]))
    return _train(
        args,
        "diffusion",
        lambda cfg, update: train_diffusion(net, train, held, args.out, cfg, args.device, update),
    )


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
        replace(preset, latent_dim=train[2].shape[1], decoder_dim=decoder.hidden_size)
    )
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def run(cfg, update) -> None:
        train_prompt_generator(pg, decoder, train, held, pad, args.out, cfg, args.device, update)

    return _train(args, "prompt generator", run)


def cmd_train_value(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dglm.engine.engine import Engine
    from dglm.engine.evaluation.generation import released_decoder
    from dglm.engine.methods.re_control import ValueNetConfig
    from dglm.engine.training.value import (
        RolloutConfig,
        collect_rollouts,
        load_rollouts,
        reward_columns,
        train_value,
    )

    # rollouts record the decoder's own fp32 states (no int8: training data, not serving)
    engine = Engine.from_pretrained(args.bundle, device=args.device, quantize="none")
    cols = reward_columns(engine.probes, args.probe)
    rcfg = RolloutConfig(
        rollouts=args.rollouts,
        batch_size=args.rollout_batch_size,
        shard_size=args.rollout_batch_size * max(1, 256 // args.rollout_batch_size),
        max_new_tokens=args.max_new_tokens,
        max_prefix_tokens=args.max_prefix_tokens,
        dglm_fraction=args.dglm_fraction,
        seed=args.seed,
    )
    rollouts = Path(args.rollouts_dir or Path(args.out) / "rollouts")
    bar, update = _progress(args.rollouts, "rollouts")
    collect_rollouts(engine, released_decoder(engine), args.data, rollouts, rcfg, update)
    bar.close()
    data = load_rollouts(rollouts)
    if data.probes != list(engine.probes.probes):
        raise ValueError(
            f"{rollouts} holds rewards of probes {data.probes}, the bundle has "
            f"{list(engine.probes.probes)}: use another --rollouts-dir"
        )
    net_config = ValueNetConfig.preset(
        args.preset, args.probe, engine.decoder.hidden_size, cols.stop - cols.start
    )
    return _train(
        args,
        "value",
        lambda cfg, update: train_value(
            data,
            cols,
            net_config,
            cfg,
            args.out,
            update,
            args.device,
            args.mc_weight,
            args.state_noise,
        ),
    )


def cmd_train_steering_vector(args: argparse.Namespace) -> int:
    from dglm.engine.methods.caa import save_steering_vectors
    from dglm.engine.training.recipes import train_steering_vector

    vector = train_steering_vector(
        args.which, args.bundle, args.layers, args.multiplier, args.position, args.per_label,
        args.seed,
    )  # fmt: skip
    save_steering_vectors({vector.config.probe: vector}, args.out)
    norms = vector.vectors[-1].norm(dim=-1)  # (L,): the last label's vector per block
    print(json.dumps({**vector.config.to_dict(), "norms": [round(float(x), 3) for x in norms]}))
    return 0


def cmd_train_probe(args: argparse.Namespace) -> int:
    from dglm.engine.probes import save_probes
    from dglm.engine.training.recipes import train_named_probe

    probe = train_named_probe(args.which, args.encoder, args.device)
    save_probes(args.out, [probe])
    print(json.dumps({"probe": probe.name, "labels": list(probe.labels), **probe.metrics}))
    return 0


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
    return _train(
        args,
        "distill",
        lambda cfg, update: train_distill(
            teacher, train, held, args.out, cfg, distill, args.device, update
        ),
    )


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
        configure_logging(args.verbose and rank == 0)
    _torch_seed(joint.seed)
    bars: dict = {}

    def progress(stage: str, step: int, logs: dict) -> None:
        total = chamfer.steps if stage == "chamfer" else joint.steps
        bar = bars.setdefault(stage, progress_bar(total, stage))
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


def _torch_seed(seed: int) -> None:
    import torch

    torch.manual_seed(seed)


def _add_train_args(
    p: argparse.ArgumentParser,
    steps: int,
    batch: int,
    lr: float,
    preset: bool = True,
    data_help: str = "directory made by `dglm data pairs` + `dglm data embed`",
) -> None:
    p.add_argument("data", help=data_help)
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
    p.add_argument(
        "--keep-every", type=int, default=0,
        help="also keep the weights every N steps as <out>/snapshots/step-N.pt (0: none)",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--max-minutes",
        type=float,
        default=0.0,
        help="stop with a checkpoint after this many minutes (0: none); rerun to resume",
    )
    p.add_argument("--device", default="cpu")


# ------------------------------------------------------------------------- Diffusion-LM
def _add_diffusion_lm_parsers(tsub) -> None:
    tl = tsub.add_parser(
        "diffusion-lm",
        help="Diffusion-LM: a denoiser over learned word embeddings (its bundle: RUN/bundle)",
    )
    _add_train_args(
        tl,
        steps=24_000,
        batch=64,
        lr=1e-3,
        data_help="sources:NAME,NAME (offline sources, e.g. sources:rotten_tomatoes,headlines,"
        "fortunes), a `dglm data pairs` directory, a text file of one sentence per line (e.g. "
        "`dglm data distill`'s), or several of these joined by +",
    )
    tl.add_argument(
        "--vocab-size", type=int, default=None, help="words + 4 specials (default: the preset's)"
    )
    tl.add_argument("--max-unk", type=int, default=1, help="drop sentences with more unknown words")
    tl.add_argument("--limit", type=int, default=None, help="use only the first N sentences")
    tl.add_argument(
        "--self-condition", choices=("on", "off"), default=None,
        help="override the preset's self-conditioning (ablations)",
    )  # fmt: skip
    tl.add_argument(
        "--embedding-norm", type=float, default=None,
        help="override the preset's fixed word-embedding norm (0: the free table)",
    )  # fmt: skip
    tl.add_argument(
        "--x0-head", default=None, choices=("regress", "interpolate"),
        help="override the preset's x̂0 head: regress (the paper's MSE) or interpolate (word "
        "scores trained by cross-entropy, x̂0 their mean embedding)",
    )  # fmt: skip
    tl.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "bfloat16", "float32"),
        help="auto: bf16 autocast on CUDA and on CPUs with AMX, else fp32",
    )
    tl.set_defaults(func=cmd_train_diffusion_lm, preset="cpu", warmup=500, ema_decay=0.999)
    tc = tsub.add_parser(
        "diffusion-lm-classifier",
        help="a noise-aware attribute classifier on a Diffusion-LM bundle's latent sequence, "
        "added to the bundle",
    )
    _add_train_args(
        tc,
        steps=2_000,
        batch=64,
        lr=1e-3,
        preset=False,
        data_help="sentiment | seed-sentiment | topic, or a JSONL file of {text, label}",
    )
    tc.add_argument("--bundle", required=True, help="the Diffusion-LM bundle (updated in place)")
    tc.add_argument("--name", default=None, help="the classifier's name (default: DATA's)")
    tc.add_argument("--dim", type=int, default=128)
    tc.add_argument("--depth", type=int, default=2)
    tc.set_defaults(func=cmd_train_diffusion_lm_classifier, warmup=100, ema_decay=0.99)


def cmd_train_diffusion_lm(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dglm.engine.methods.diffusion_lm.model import DIFFUSION_LM_PRESETS, DiffusionLMNetwork
    from dglm.engine.methods.diffusion_lm.vocab import Vocab
    from dglm.engine.training.diffusion_lm import (
        VOCAB_FILE,
        build_vocab,
        encode_sentences,
        read_sentences,
        train_diffusion_lm,
    )
    from dglm.engine.training.steering import bf16_is_fast

    if args.preset not in DIFFUSION_LM_PRESETS:
        raise ValueError(
            f"--preset must be one of {sorted(DIFFUSION_LM_PRESETS)}, got {args.preset!r}"
        )
    preset = DIFFUSION_LM_PRESETS[args.preset]
    train_text = read_sentences(args.data, "train")[: args.limit]
    held_text = read_sentences(args.data, "eval")
    vocab_path = Path(args.out) / VOCAB_FILE
    if vocab_path.is_file():  # resuming: the run's own vocabulary
        vocab = Vocab.load(vocab_path)
    else:
        vocab = build_vocab(train_text, args.vocab_size or preset.vocab_size, preset.seq_len)
    overrides = {"vocab_size": len(vocab)}
    if args.self_condition is not None:
        overrides["self_condition"] = args.self_condition == "on"
    if args.embedding_norm is not None:
        overrides["embedding_norm"] = args.embedding_norm
    if args.x0_head is not None:
        overrides["x0_head"] = args.x0_head
    config = replace(preset, **overrides)
    train, _ = encode_sentences(train_text, vocab, config.seq_len, args.max_unk)
    held, _ = encode_sentences(held_text, vocab, config.seq_len, args.max_unk)
    print(
        json.dumps({"train_sentences": len(train), "held_out": len(held), "vocab": len(vocab)}),
        flush=True,
    )
    bf16 = args.dtype == "bfloat16" or (args.dtype == "auto" and bf16_is_fast(args.device))
    net = DiffusionLMNetwork(config)
    return _train(
        args,
        "diffusion-lm",
        lambda cfg, update: train_diffusion_lm(
            net, vocab, train, held, args.out, cfg, args.device, update, bf16
        ),
    )


def _labelled_texts(which: str) -> tuple[list[str], list[str]]:
    from pathlib import Path

    from dglm.engine.training import data
    from dglm.engine.training.builder import SEED_SENTIMENT, read_labelled_jsonl

    if which == "sentiment":  # Rotten Tomatoes, and Amazon fine-food reviews when present
        return data.sentiment_set()
    if which == "seed-sentiment":
        return read_labelled_jsonl(SEED_SENTIMENT)
    if which == "topic":
        return data.topic_set()
    if Path(which).is_file():
        return read_labelled_jsonl(which)
    raise ValueError(
        f"DATA must be sentiment, seed-sentiment, topic or a JSONL file, got {which!r}"
    )


def cmd_train_diffusion_lm_classifier(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dglm.engine.methods.diffusion_lm.bundle import load_bundle, save_bundle
    from dglm.engine.methods.diffusion_lm.model import LatentClassifier, LatentClassifierConfig
    from dglm.engine.training.diffusion_lm import labelled_sentences, train_latent_classifier

    net, vocab, classifiers, sampling = load_bundle(args.bundle)
    texts, labels = _labelled_texts(args.data)
    order = tuple(sorted(set(labels)))
    name = args.name or Path(args.data).stem
    c = net.config
    clf_config = LatentClassifierConfig(
        name, order, c.emb_dim, c.seq_len, dim=args.dim, depth=args.depth
    )
    sets = labelled_sentences(texts, labels, order, vocab, c.seq_len)
    print(
        json.dumps({"train": len(sets["train"][1]), "held_out": len(sets["eval"][1])}), flush=True
    )

    def run(cfg, update) -> None:
        clf = train_latent_classifier(
            LatentClassifier(clf_config),
            net,
            sets["train"],
            sets["eval"],
            args.out,
            cfg,
            args.device,
            update,
        )
        classifiers[name] = clf
        save_bundle(args.bundle, net, vocab, list(classifiers.values()), sampling)

    return _train(args, "diffusion-lm classifier", run)
