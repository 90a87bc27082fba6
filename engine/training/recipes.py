"""The steps that build a bundle from offline data, as library functions the CLI wraps.

dglm data pairs    --out D            text → prefix/continuation pairs (train / eval by hash)
dglm data embed    D                  pairs → encoder latents (safetensors)
dglm train diffusion D --out R1       score network (resumable)
dglm train prompt-generator D --out R2
dglm train probe sentiment|topic --out P.safetensors
dglm bundle assemble OUT --diffusion R1 --prompt-generator R2 --probes P.safetensors ...
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

import torch
from dglm.engine import bundle as bundle_io
from dglm.engine.bundle import BundleConfig
from dglm.engine.decoding.loop import DecodeParams, generate
from dglm.engine.diffusion.sampler import SamplerConfig
from dglm.engine.diffusion.score_network import ScoreNetConfig, ScoreNetwork
from dglm.engine.encode.encoder import SentenceEncoder
from dglm.engine.models import load_decoder
from dglm.engine.models.lora import LoraConfig
from dglm.engine.probes import Probe, load_probes, save_probes, train_probe
from dglm.engine.prompt.generator import PromptGenerator, PromptGeneratorConfig
from dglm.engine.training import data as data_mod
from dglm.engine.training.loop import TrainConfig
from dglm.engine.training.steering import (
    SteerConfig,
    pretrain_prompt_generator,
    split_steering_state,
    train_steering,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

logger = logging.getLogger(__name__)

PAIRS = data_mod.PAIRS_FILE
LATENTS = "latents_{split}.safetensors"


def prepare_pairs(
    out: str | Path,
    sources: list[str],
    decoder: str = "smollm2",
    prefix_tokens: int = 32,
    continuation_tokens: int = 32,
    limit: int | None = None,
    skip_missing: bool = False,
    progress=None,
    tokenizer=None,
) -> dict:
    """pairs_train.jsonl / pairs_eval.jsonl / pairs.json cut with `decoder`'s tokenizer (or the
    given `tokenizer`), resumable per source: see `data.build_pairs`, which this wraps. Returns
    what pairs.json holds ("counts": pairs per split, "per_source": documents and pairs per
    source and split, "skipped": sources left out by skip_missing)."""
    if tokenizer is None:
        _, tokenizer = load_decoder(decoder)
    return data_mod.build_pairs(
        out,
        sources,
        tokenizer,
        prefix_tokens,
        continuation_tokens,
        limit,
        skip_missing,
        settings={"decoder": decoder},
        progress=progress,
    )


def _file_sha1(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _latents_current(path: Path, n: int, encoder: str, pairs_sha1: str) -> bool:
    """Whether `path` holds the latents of these n pairs (same encoder and pair file)."""
    if not path.exists():
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            rows = f.get_slice("prefix").get_shape()[0]
    except Exception:  # a truncated or foreign file: recompute
        return False
    return (
        rows == n
        and meta.get("encoder") == encoder
        and meta.get("pairs_sha1", pairs_sha1) == pairs_sha1
    )


def embed_pairs(
    data_dir: str | Path, encoder: str = "all-MiniLM-L6-v2", device: str = "cpu", progress=None
) -> dict[str, int]:
    """latents_<split>.safetensors with prefix (N, d) and continuation (N, d) latents (fp16).

    A split whose latents file already holds as many rows as its pair file, from the same
    encoder (and, when recorded, the same pair file: metadata "pairs_sha1") is skipped, so an
    interrupted run resumes at the split it was in. `progress(split, done, total)`."""
    data_dir = Path(data_dir)
    enc = None
    counts = {}
    for split in ("train", "eval"):
        pairs_path = data_dir / PAIRS.format(split=split)
        pairs = data_mod.read_pairs(pairs_path)
        digest = _file_sha1(pairs_path)
        path = data_dir / LATENTS.format(split=split)
        counts[split] = len(pairs)
        if _latents_current(path, len(pairs), encoder, digest):
            logger.info("%s is up to date, skipping", path.name)
            if progress:
                progress(split, len(pairs), len(pairs))
            continue
        enc = enc or SentenceEncoder(encoder, device=device)
        chunks_p, chunks_c = [], []
        step = 1024
        for i in range(0, len(pairs), step):
            part = pairs[i : i + step]
            chunks_p.append(enc.latents([p.prefix for p in part]).half().cpu())
            chunks_c.append(enc.latents([p.continuation for p in part]).half().cpu())
            if progress:
                progress(split, min(len(pairs), i + step), len(pairs))
        tmp = path.with_name(path.name + ".tmp")
        save_file(
            {"prefix": torch.cat(chunks_p), "continuation": torch.cat(chunks_c)},
            str(tmp),
            metadata={"encoder": encoder, "pairs_sha1": digest},
        )
        os.replace(tmp, path)
    return counts


def load_latents(data_dir: str | Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    path = Path(data_dir) / LATENTS.format(split=split)
    if not path.exists():
        raise ValueError(f"no {path.name} in {data_dir}: run `dglm data embed {data_dir}` first")
    t = load_file(str(path))
    return t["prefix"].float(), t["continuation"].float()


def load_token_pairs(
    data_dir: str | Path,
    split: str,
    tokenizer,
    limit: int | None = None,
    max_prefix_tokens: int | None = None,
    max_continuation_tokens: int | None = None,
):
    """(prefix ids, continuation ids, continuation latents) for prompt-generator training.

    Prefixes keep their last `max_prefix_tokens` tokens and continuations their first
    `max_continuation_tokens` (the latent still describes the whole continuation): the soft prompt
    shapes the start of a continuation most, and shorter rows make CPU training affordable.
    """
    pairs = data_mod.read_pairs(Path(data_dir) / PAIRS.format(split=split))
    _, cont_lat = load_latents(data_dir, split)
    n = len(pairs) if limit is None else min(limit, len(pairs))
    keep_pre = -(max_prefix_tokens or 0)
    pre = [tokenizer.encode(p.prefix, add_special_tokens=False)[keep_pre:] for p in pairs[:n]]
    cont = [
        tokenizer.encode(p.continuation, add_special_tokens=False)[:max_continuation_tokens]
        for p in pairs[:n]
    ]
    return pre, cont, cont_lat[:n]


# the offline labelled sets of the named probes: (loader, label names in the probe's order)
LABELLED_SETS = {
    "sentiment": (data_mod.sentiment_set, ("negative", "positive")),
    "topic": (data_mod.topic_set, data_mod.TOPICS),
    "toxicity": (data_mod.toxicity_set, ("low", "high")),
}


def labelled_set(which: str) -> tuple[list[str], list[str], tuple[str, ...], str]:
    """(texts, labels, label names, the loader's name) of a named probe's labelled set."""
    if which not in LABELLED_SETS:
        raise ValueError(f"probe must be one of {sorted(LABELLED_SETS)}, got {which!r}")
    loader, label_names = LABELLED_SETS[which]
    texts, labels = loader()
    return texts, labels, label_names, loader.__name__


def train_named_probe(which: str, encoder: str = "all-MiniLM-L6-v2", device: str = "cpu") -> Probe:
    """sentiment (Rotten Tomatoes fresh vs rotten) or topic (fortunes categories, one-vs-rest).

    The held-out split is the engine-wide hash split, so evaluation texts are never trained on.
    """
    texts, labels, label_names, source = labelled_set(which)
    enc = SentenceEncoder(encoder, device=device)
    emb = enc.embed(texts).cpu()
    y = torch.tensor([label_names.index(label) for label in labels])
    is_eval = torch.tensor([data_mod.split_of(t) == "eval" for t in texts])
    probe = train_probe(which, emb[~is_eval], y[~is_eval], label_names)
    pred = torch.tensor([label_names.index(p) for p in probe.predict(emb)])
    metrics = {
        "source": source,
        "train_size": int((~is_eval).sum()),
        "test_size": int(is_eval.sum()),
        "train_accuracy": float((pred[~is_eval] == y[~is_eval]).float().mean()),
        "test_accuracy": float((pred[is_eval] == y[is_eval]).float().mean()),
        "majority_baseline": float(torch.bincount(y[is_eval]).max() / is_eval.sum()),
    }
    logger.info("probe %s: %s", which, metrics)
    return Probe(probe.name, probe.labels, probe.weight, probe.bias, metrics)


M = TypeVar("M", bound=nn.Module)


def _ema_network(run_dir: str | Path, kind: str, build: Callable[[dict], M]) -> tuple[M, dict]:
    """(the network `build(model_config)` with the EMA weights of the `kind` run in `run_dir`,
    the run's model config)."""
    path = Path(run_dir) / "checkpoint.pt"
    if not path.exists():
        raise ValueError(f"no checkpoint.pt in {run_dir}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state["meta"]["kind"] != kind:
        raise ValueError(f"{run_dir} is a {state['meta']['kind']} run, not {kind}")
    meta = state["meta"]["model_config"]
    net = build(meta)
    net.load_state_dict(state["ema"])
    return net, meta


def _check_latent_dim(net: ScoreNetwork, config: BundleConfig, what: str, fix: str) -> None:
    """A score network going into a bundle must take the bundle's latent width."""
    if net.config.latent_dim != config.score_network.latent_dim:
        raise ValueError(
            f"{what} is {net.config.latent_dim}-d, the bundle's latents are "
            f"{config.score_network.latent_dim}-d: {fix}"
        )


def assemble_bundle(
    out: str | Path,
    diffusion_run: str | Path,
    prompt_generator_run: str | Path,
    probe_files: list[str | Path],
    encoder: str = "all-MiniLM-L6-v2",
    decoder: str = "smollm2",
    sampler: SamplerConfig | None = None,
    cfg_scale: float = 1.0,
    notes: str = "",
) -> BundleConfig:
    """A trained bundle from the EMA weights of two runs and probe files (fp16 networks)."""
    sn, _ = _ema_network(diffusion_run, "diffusion", lambda c: ScoreNetwork(ScoreNetConfig(**c)))
    pg, _ = _ema_network(
        prompt_generator_run,
        "prompt_generator",
        lambda c: PromptGenerator(PromptGeneratorConfig(**c)),
    )
    probes = [p for f in probe_files for p in load_probes(f)]
    config = BundleConfig(
        encoder, decoder, sn.config, pg.config, sampler or SamplerConfig(), cfg_scale, True, notes
    )
    out = Path(out)
    bundle_io.write_config(config, out)
    bundle_io.save_state(sn, out / bundle_io.SCORE_NET_FILE)
    bundle_io.save_state(pg, out / bundle_io.PROMPT_GEN_FILE)
    save_probes(out / bundle_io.PROBES_FILE, probes)
    return config


def bundle_destination(src: Path, out: str | Path | None) -> Path:
    """Where a bundle update writes: `src` itself (out None or src), or a fresh copy at `out`."""
    dst = Path(out) if out is not None else src
    if dst.resolve() != src.resolve():
        if dst.exists():
            raise ValueError(f"{dst} exists; pick a new --out directory")
        shutil.copytree(src, dst)
    return dst


def bundle_score_network(bundle: str | Path) -> ScoreNetwork:
    """The score network of a bundle, with its weights (fp32), to continue training it."""
    src = bundle_io.resolve_bundle_dir(bundle)
    net = ScoreNetwork(bundle_io.read_config(src).score_network)
    bundle_io.load_state(net, src / bundle_io.SCORE_NET_FILE)
    return net.float()


def add_score_network(
    bundle: str | Path, diffusion_run: str | Path, out: str | Path | None = None
) -> BundleConfig:
    """Put the EMA score network of a `dglm train diffusion` run into a bundle (in place, or a
    copy at `out`). A distilled student of the previous score network would no longer match its
    teacher, so it is dropped and a bundle whose default sampler was the student falls back to
    DPM-Solver++(2M) with 20 steps; re-distil (`dglm train distill`, `dglm bundle add-student`)."""
    src = bundle_io.resolve_bundle_dir(bundle)
    net, _ = _ema_network(diffusion_run, "diffusion", lambda c: ScoreNetwork(ScoreNetConfig(**c)))
    config = bundle_io.read_config(src)
    fix = "train on data embedded by the bundle's encoder"
    _check_latent_dim(net, config, "the run's score network", fix)
    sampler = config.sampler
    if sampler.sampler == "consistency":
        sampler = replace(sampler, sampler="dpmpp-2m", num_inference_steps=20)
    config = replace(config, score_network=net.config, student=None, sampler=sampler)
    dst = bundle_destination(src, out)
    bundle_io.save_state(net, dst / bundle_io.SCORE_NET_FILE)
    (dst / bundle_io.STUDENT_FILE).unlink(missing_ok=True)
    bundle_io.write_config(config, dst)
    return config


def add_value_network(
    bundle: str | Path,
    value_run: str | Path,
    out: str | Path | None = None,
    steps: int | None = None,
    step_size: float | None = None,
    step_size_with_dglm: float | None = None,
    plausibility: float | None = None,
    plausibility_with_dglm: float | None = None,
) -> BundleConfig:
    """Put the EMA value network of a `dglm train value` run into a bundle (in place, or a copy at
    `out`), replacing one for the same probe; `steps` / `step_size` / `step_size_with_dglm` /
    `plausibility` / `plausibility_with_dglm`: its decode-time defaults."""
    from dglm.engine.methods.re_control import ValueNetConfig, ValueNetwork

    src = bundle_io.resolve_bundle_dir(bundle)
    net, _ = _ema_network(value_run, "value", lambda c: ValueNetwork(ValueNetConfig.from_dict(c)))
    given = {
        "steps": steps,
        "step_size": step_size,
        "step_size_with_dglm": step_size_with_dglm,
        "plausibility": plausibility,
        "plausibility_with_dglm": plausibility_with_dglm,
    }
    overrides = {k: v for k, v in given.items() if v is not None}
    if overrides:
        net.config = replace(net.config, **overrides)  # checked by ValueNetConfig
    config = bundle_io.read_config(src)
    probes = {p.name: p for p in load_probes(src / bundle_io.PROBES_FILE)}
    name = net.config.probe
    if name not in probes or probes[name].rows != net.config.outputs:
        raise ValueError(
            f"the run's value network predicts probe {name!r} ({net.config.outputs} outputs), "
            f"which the bundle at {src} does not have with that many rows"
        )
    dst = bundle_destination(src, out)
    nets = bundle_io.load_value_networks(config, dst)
    nets[name] = net
    configs = tuple(n.config for n in nets.values())
    config = replace(config, value_networks=configs)
    bundle_io.save_value_networks(nets, dst / bundle_io.VALUE_NETS_FILE)
    bundle_io.write_config(config, dst)
    return config


def train_steering_vector(
    which: str,
    bundle: str | Path,
    layers: tuple[int, ...],
    multiplier: float = 1.0,
    position: str = "mean",
    per_label: int = 256,
    seed: int = 0,
):
    """CAA's steering vector for a named probe (training.caa): mean differences of the residual
    activations of the bundle's decoder *as released* (without its adapters: the decoder plain
    decoding, RE-Control and FUDGE run on in `dglm eval`) over the probe's labelled texts of the
    training split only (the hash split: no held-out text, no judge's test review, is read)."""
    from dglm.engine.training.caa import steering_vector

    src = bundle_io.resolve_bundle_dir(bundle)
    config = bundle_io.read_config(src)
    texts, labels, label_names, _ = labelled_set(which)
    keep = [data_mod.split_of(t) == "train" for t in texts]
    texts = [t for t, k in zip(texts, keep, strict=True) if k]
    labels = [y for y, k in zip(labels, keep, strict=True) if k]
    decoder, tokenizer = load_decoder(bundle_io.resolve_reference(config.decoder, src))
    return steering_vector(
        which, decoder, tokenizer, texts, labels, label_names, layers, multiplier, position,
        per_label, seed,
    )  # fmt: skip


def add_steering_vector(
    bundle: str | Path,
    vector_file: str | Path,
    out: str | Path | None = None,
    layers: tuple[int, ...] | None = None,
    multiplier: float | None = None,
) -> BundleConfig:
    """Put a `dglm train steering-vector` file's vector into a bundle (in place, or a copy at
    `out`), replacing one for the same probe; `layers` / `multiplier`: its defaults (chosen on
    dev), else the file's."""
    from dglm.engine.methods.caa import (
        SteeringVector,
        check_decoder,
        load_steering_vectors,
        save_steering_vectors,
    )

    src = bundle_io.resolve_bundle_dir(bundle)
    (vector,) = load_steering_vectors(vector_file).values()
    given = {"layers": layers, "multiplier": multiplier}
    overrides = {k: v for k, v in given.items() if v is not None}
    if overrides:
        vector = SteeringVector(replace(vector.config, **overrides), vector.vectors)
    config = bundle_io.read_config(src)
    probes = {p.name: p for p in load_probes(src / bundle_io.PROBES_FILE)}
    c = vector.config
    check_decoder(vector, probes.get(c.probe), c.num_layers, c.hidden_size)
    dst = bundle_destination(src, out)
    vectors = bundle_io.load_bundle_steering_vectors(config, dst)
    vectors[c.probe] = vector
    config = replace(config, steering_vectors=tuple(v.config for v in vectors.values()))
    save_steering_vectors(vectors, dst / bundle_io.STEERING_VECTORS_FILE)
    bundle_io.write_config(config, dst)
    return config


def add_student(
    bundle: str | Path,
    distill_run: str | Path,
    out: str | Path | None = None,
    default_steps: int | None = 4,
) -> BundleConfig:
    """Put the EMA student of a `dglm train distill` run into a bundle (in place, or a copy at
    `out`); with `default_steps`, the student's multistep sampler becomes the bundle's default."""
    src = bundle_io.resolve_bundle_dir(bundle)
    student, meta = _ema_network(
        distill_run, "distill", lambda c: ScoreNetwork(ScoreNetConfig(**c["student"]))
    )
    config = bundle_io.read_config(src)
    _check_latent_dim(student, config, "the student", "distil this bundle's own score network")
    sampler = config.sampler
    if default_steps is not None:
        sampler = replace(sampler, sampler="consistency", num_inference_steps=default_steps)
    lo, hi = meta["distill"]["cfg_range"]
    if default_steps is not None and not lo <= config.cfg_scale <= hi:
        raise ValueError(
            f"the bundle's cfg_scale {config.cfg_scale} is outside the student's range [{lo}, {hi}]: "
            "distil with a --cfg-range that covers it, or keep the teacher's default sampler"
        )
    config = replace(config, student=student.config, student_cfg_range=(lo, hi), sampler=sampler)
    dst = bundle_destination(src, out)
    bundle_io.save_state(student, dst / bundle_io.STUDENT_FILE)
    bundle_io.write_config(config, dst)
    return config


def train_steering_run(
    data_dir: str | Path,
    bundle: str | Path,
    out: str | Path,
    chamfer: TrainConfig | None,
    joint: TrainConfig,
    lora: LoraConfig | None,
    steer: SteerConfig,
    device: str = "cpu",
    max_prefix_tokens: int = 16,
    max_continuation_tokens: int = 24,
    limit: int | None = None,
    progress=None,
) -> dict[str, float]:
    """Both steering stages, resumable, starting from the bundle's networks (the bundle is the
    checkpoint, so runs accumulate): <out>/chamfer pre-trains the prompt generator on token
    embeddings (skipped when `chamfer` is None), <out>/joint trains it with the decoder's
    adapters. The frozen decoder runs in bf16 when `steer.autocast_bf16`. Returns the last
    logged held-out diagnostic (with its step: a time-boxed run may stop between evaluations).
    `progress(stage, step, logs)` after every step."""
    src = bundle_io.resolve_bundle_dir(bundle)
    config = bundle_io.read_config(src)
    dtype = torch.bfloat16 if steer.autocast_bf16 else torch.float32
    decoder, tok = load_decoder(bundle_io.resolve_reference(config.decoder, src), device, dtype)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    cut = {
        "max_prefix_tokens": max_prefix_tokens,
        "max_continuation_tokens": max_continuation_tokens,
    }
    train = load_token_pairs(data_dir, "train", tok, limit, **cut)
    held = load_token_pairs(data_dir, "eval", tok, **cut)
    if train[2].shape[1] != config.prompt_generator.latent_dim:
        raise ValueError(
            f"{data_dir} holds {train[2].shape[1]}-d latents, the bundle's prompt generator "
            f"takes {config.prompt_generator.latent_dim}-d ones: embed with the bundle's encoder"
        )
    pg = PromptGenerator(config.prompt_generator)
    bundle_io.load_state(pg, src / bundle_io.PROMPT_GEN_FILE)
    out = Path(out)
    if chamfer is not None:
        ema = pretrain_prompt_generator(
            pg,
            decoder.embed(torch.arange(decoder.vocab_size, device=device)).float(),
            (train[1], train[2]),
            (held[1], held[2]),
            out / "chamfer",
            chamfer,
            steer,
            device,
            None if progress is None else lambda s, logs: progress("chamfer", s, logs),
        )
        pg.load_state_dict(ema.model.state_dict())
    init_lora = None
    if config.decoder_lora is not None:
        if lora is not None and lora != config.decoder_lora:
            raise ValueError(
                f"the bundle's adapters are {config.decoder_lora}; train with the same LoRA "
                "settings to keep accumulating, or start from a bundle without adapters"
            )
        lora = config.decoder_lora
        init_lora = load_file(str(src / bundle_io.LORA_FILE))
    train_steering(
        pg,
        decoder,
        train,
        held,
        pad,
        out / "joint",
        joint,
        lora,
        steer,
        init_lora,
        device,
        None if progress is None else lambda s, logs: progress("joint", s, logs),
    )
    # the run logs the diagnostic at its last step (and every eval_every): report that row
    # rather than evaluating the same weights again
    rows = (out / "joint" / "log.jsonl").read_text().splitlines()
    last = next(json.loads(r) for r in reversed(rows) if "eval_gap" in json.loads(r))
    return {k: v for k, v in last.items() if k == "step" or k.startswith("eval_")}


def add_steering(
    bundle: str | Path,
    run: str | Path,
    out: str | Path | None = None,
    snapshot: str | Path | None = None,
) -> BundleConfig:
    """Put the prompt generator and decoder adapters of a `dglm train steering` run (its joint
    stage's last checkpoint, live weights; or one of its `snapshot` files, e.g.
    joint/snapshots/step-0000500.pt, a point of a learning curve) into a bundle, in place or as a
    copy at `out`."""
    src = bundle_io.resolve_bundle_dir(bundle)
    path = Path(snapshot) if snapshot is not None else Path(run) / "joint" / "checkpoint.pt"
    if not path.exists():
        what = snapshot if snapshot is not None else f"joint/checkpoint.pt in {run}"
        raise ValueError(f"no {what}: run `dglm train steering` first")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state["meta"]["kind"] != "steering":
        raise ValueError(f"{path} is a {state['meta']['kind']} run, not steering")
    meta = state["meta"]["model_config"]
    config = bundle_io.read_config(src)
    pg_cfg = PromptGeneratorConfig(**meta["prompt_generator"])
    if pg_cfg != config.prompt_generator:
        raise ValueError(f"the run's prompt generator {pg_cfg} differs from the bundle's")
    pg_state, lora_state = split_steering_state(state["model"])
    pg = PromptGenerator(pg_cfg)
    pg.load_state_dict(pg_state)
    lora = None if meta["lora"] is None else LoraConfig(**meta["lora"])
    config = replace(config, decoder_lora=lora)
    dst = bundle_destination(src, out)
    bundle_io.save_state(pg, dst / bundle_io.PROMPT_GEN_FILE)
    if lora is None:
        (dst / bundle_io.LORA_FILE).unlink(missing_ok=True)
    else:
        bundle_io.save_lora(lora_state, dst / bundle_io.LORA_FILE)
    bundle_io.write_config(config, dst)
    return config


DISTILL_STATE = ".state.json"  # beside the sentences file: rows done, bytes written, settings


def distill_sentences(
    sources: list[str],
    n: int,
    out: str | Path,
    decoder: str = "smollm2",
    context: int = 2,
    opening_words: tuple[int, int] = (1, 3),
    max_words: int = 30,
    max_new_tokens: int = 24,
    temperature: float = 0.7,
    top_p: float = 0.9,
    batch_size: int = 32,
    seed: int = 0,
    part: tuple[int, int] = (0, 1),
    device: str = "cpu",
    progress=None,
) -> dict:
    """A sequence-level distillation corpus for Diffusion-LM (Kim & Rush 2016's remedy for
    non-autoregressive models): the decoder rewrites the training sentences of `sources`, and the
    sentences it writes are written to `out`, one per line (`dglm train diffusion-lm out ...`).

    Real text is many-moded (a review's next word could be any of hundreds), and a model that
    predicts every position at once averages the modes into frequent function words; the
    decoder's lower-temperature sentences are nearer one mode each. Per row (n rows, training-split
    sentences of 4..`max_words` words, shuffled by `seed`): the sentence's first k words
    (k uniform in `opening_words`), after `context` other training sentences of the same sources
    as a prompt (so the decoder stays in their domain), are continued with nucleus sampling; the
    first sentence of opening + continuation is kept when it ended (a sentence end followed, or
    the decoder stopped). Held-out sentences never seed or prompt a row.

    `part` = (i, k): only rows i, i + k, i + 2k, … (k processes on k cores, each with its own
    `out`; read them together as `--data a.txt+b.txt`); a row's opening, prompt and seed depend on
    its index only, so the parts together are the whole.

    Resumable: `out` + ".state.json" records the rows done and the bytes written; a rerun with
    the same settings truncates `out` to those bytes and goes on (a larger n continues). Returns
    {"out", "rows", "kept", "seconds"}; `progress(done, n)`."""
    from dglm.engine.methods.diffusion_lm.vocab import words
    from dglm.engine.training.diffusion_lm import SOURCES_PREFIX, read_sentences, split_sentences

    lo, hi = opening_words
    if not 1 <= lo <= hi:
        raise ValueError(f"opening_words must be (lo, hi) with 1 ≤ lo ≤ hi, got {opening_words}")
    if context < 0:
        raise ValueError(f"context must be ≥ 0, got {context}")
    if n < 1:
        raise ValueError(f"n must be ≥ 1, got {n}")
    index, parts = part
    if not 0 <= index < parts:
        raise ValueError(f"part must be (i, k) with 0 ≤ i < k, got {part}")
    out = Path(out)
    state_path = out.with_name(out.name + DISTILL_STATE)
    settings = {"sources": sorted(sources), "decoder": str(decoder), "context": context,
                "opening_words": [lo, hi], "max_words": max_words,
                "max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
                "seed": seed, "part": [index, parts]}  # fmt: skip
    state = {"rows": 0, "kept": 0, "bytes": 0, "seconds": 0.0, "settings": settings}
    if state_path.is_file():
        old = json.loads(state_path.read_text(encoding="utf-8"))
        if old["settings"] != settings:
            raise ValueError(
                f"{out} was distilled with other settings ({old['settings']}); "
                "use another --out or delete it and its .state.json"
            )
        state = old
    elif out.exists() and out.stat().st_size:
        raise ValueError(f"{out} exists without its {DISTILL_STATE}: not resuming over it")
    out.parent.mkdir(parents=True, exist_ok=True)
    corpus = SOURCES_PREFIX + ",".join(sources)
    train = [s for s in read_sentences(corpus, "train") if 4 <= len(words(s)) <= max_words]
    if not train:
        raise ValueError(f"no training sentences of 4..{max_words} words in {sources}")
    random.Random(seed).shuffle(train)
    rows = list(range(index, min(n, len(train)), parts))  # this part's row indices
    dec, tok = load_decoder(decoder, device=device)
    t0 = time.perf_counter() - state["seconds"]
    with open(out, "ab") as f:
        f.truncate(state["bytes"])  # a torn tail goes; append mode writes after it
        for start in range(state["rows"], len(rows), batch_size):
            batch = rows[start : start + batch_size]
            seeds = [seed * 1_000_003 + row for row in batch]  # a row's own, whatever its part
            openings, prompts = [], []
            for row, row_seed in zip(batch, seeds, strict=True):
                sentence, r = train[row], random.Random(row_seed)
                opening = " ".join(sentence.split()[: r.randint(lo, hi)])
                shown = [p for p in r.sample(train, min(len(train), context + 1)) if p != sentence]
                openings.append(opening)
                prompts.append(" ".join(shown[:context] + [opening]))
            ids = [tok.encode(p, add_special_tokens=False) for p in prompts]
            params = [
                DecodeParams(
                    max_new_tokens=max_new_tokens,
                    temperature=temperature,
                    top_p=top_p,
                    seed=row_seed,
                    stop=("\n",),
                )  # fmt: skip
                for row_seed in seeds
            ]
            results, _ = generate(dec, tok, ids, params)
            lines = []
            for opening, res in zip(openings, results, strict=True):
                said = split_sentences(opening + res.text)
                ended = len(said) > 1 or (res.finish_reason == "stop" and bool(said))
                if ended and len(words(said[0])) >= 4:
                    lines.append(said[0].replace("\n", " ").strip() + "\n")
            f.write("".join(lines).encode("utf-8"))
            f.flush()
            state.update(rows=start + len(batch), kept=state["kept"] + len(lines),
                         bytes=f.tell(), seconds=time.perf_counter() - t0)  # fmt: skip
            data_mod._write_atomic(state_path, json.dumps(state))
            if progress:
                progress(state["rows"], len(rows))
    return {"out": str(out), "rows": state["rows"], "kept": state["kept"],
            "seconds": state["seconds"]}  # fmt: skip


def sample_decoder_continuations(
    sources: list[str],
    n: int,
    out: str | Path | None = None,
    decoder: str = "smollm2",
    prefix_tokens: int = 32,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    top_p: float = 0.95,
    seed: int = 0,
    device: str = "cpu",
    progress=None,
) -> Path:
    """Continue the first `prefix_tokens` tokens of n training-split documents of `sources` with
    the decoder (nucleus sampling) and append {"prefix", "continuation", "source"} rows to `out`
    (default: the `decoder_samples` source's file). Resumable: rows already in the file are kept
    and their prefixes skipped (the document order is deterministic). `progress(done, n)`."""
    out = Path(out) if out is not None else data_mod.data_cache() / data_mod.DECODER_SAMPLES_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    done = sum(1 for line in open(out, encoding="utf-8") if line.strip()) if out.exists() else 0
    dec, tok = load_decoder(decoder, device=device)
    names = [s for s in sources if s != "decoder_samples"]
    if not names:
        raise ValueError("name at least one text source to take prefixes from")
    prefixes: list[tuple[str, str]] = []
    for k, name in enumerate(names):  # an equal share of the n prefixes from each source
        quota = n * (k + 1) // len(names) - n * k // len(names)
        for doc in data_mod.documents([name]):
            if quota == 0:
                break
            if data_mod.split_of(doc.text) != "train":
                continue  # held-out texts never seed training data
            ids = tok.encode(doc.text, add_special_tokens=False)
            if len(ids) >= prefix_tokens:
                prefixes.append((tok.decode(ids[:prefix_tokens]), doc.source))
                quota -= 1
    with open(out, "a", encoding="utf-8") as f:
        for start in range(done, len(prefixes), batch_size):
            part = prefixes[start : start + batch_size]
            rows = [tok.encode(p, add_special_tokens=False) for p, _ in part]
            params = [
                DecodeParams(max_new_tokens=max_new_tokens, top_p=top_p, seed=seed + start + i)
                for i in range(len(part))
            ]
            results, _ = generate(dec, tok, rows, params)
            for (prefix, source), r in zip(part, results, strict=True):
                if r.text.strip():
                    row = {"prefix": prefix, "continuation": r.text, "source": source}
                    f.write(json.dumps(row) + "\n")
            f.flush()
            if progress:
                progress(min(len(prefixes), start + batch_size), len(prefixes))
    return out
