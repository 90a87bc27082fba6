"""Generation for `dglm eval`: one setting's continuations of every prefix, by the engine (DGLM),
plain decoding or FUDGE, in batches, with per-stage timings."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from dglm.engine.api import GenerationParams
from dglm.engine.bundle import resolve_reference
from dglm.engine.decoding.loop import DecodeParams
from dglm.engine.decoding.loop import generate as decode
from dglm.engine.decoding.sampling import MinP, NoRepeatNGram
from dglm.engine.evaluation.settings import EvalConfig, Setting
from dglm.engine.methods.base import MethodBatch
from dglm.engine.methods.caa import CAA, SteeringVector
from dglm.engine.methods.fudge import FudgeParams, fudge_generate
from dglm.engine.methods.re_control import value_conditioning
from dglm.engine.models import load_decoder


@dataclass
class Generations:
    """The continuations of one setting, row r = prefix r // num_samples, sample r % num_samples."""

    prefix_index: list[int]
    texts: list[str]
    token_ids: list[list[int]]
    latents: torch.Tensor | None  # (N, d) fp32, dglm only
    timings: dict[str, float] = field(default_factory=dict)  # seconds, generation only


def batches(n: int, size: int) -> list[range]:
    """Row ranges of at most `size` covering range(n)."""
    return [range(lo, min(n, lo + size)) for lo in range(0, n, size)]


def _seed(config: EvalConfig, prefix: int) -> int:
    return config.seed + 1000 * prefix  # sample j of a prefix uses seed + j


def generate_setting(
    engine,
    setting: Setting,
    prefixes: list[str],
    config: EvalConfig,
    tick=None,
    base_decoder=None,
    steering_vectors: dict[str, SteeringVector] | None = None,
) -> Generations:
    """Run one setting over every prefix in batches of config.batch_size prompts. Plain decoding,
    RE-Control, CAA and FUDGE run on `base_decoder` (the released decoder, without the bundle's
    adapters; default: the engine's decoder); CAA with `steering_vectors` (default: the
    engine's)."""
    base_decoder = engine.decoder if base_decoder is None else base_decoder
    S = config.num_samples
    # the n-gram ban of every row, resolved once: the config's, else the bundle's default
    no_repeat = config.no_repeat_ngram_size
    no_repeat = engine.config.no_repeat_ngram_size if no_repeat is None else no_repeat
    rows_idx, texts, toks, lats = [], [], [], []
    timings: dict[str, float] = {}

    def add(key: str, v: float) -> None:
        timings[key] = timings.get(key, 0.0) + v

    for chunk in batches(len(prefixes), config.batch_size):
        t0 = time.perf_counter()
        if setting.method in ("dglm", "dglm+re-control"):
            params = [
                GenerationParams(
                    controls=setting.controls,
                    num_samples=S,
                    seed=_seed(config, i),
                    max_new_tokens=config.max_new_tokens,
                    temperature=config.temperature,
                    top_p=config.top_p,
                    renoise_alpha2=setting.renoise_alpha2,
                    re_control_step_size=setting.re_control_step_size,
                    re_control_plausibility=setting.re_control_plausibility,
                    no_repeat_ngram_size=no_repeat,
                    implied_controls=setting.implied_controls,
                )
                for i in chunk
            ]
            outs = engine.generate([prefixes[i] for i in chunk], params)
            for i, o in zip(chunk, outs, strict=True):
                for s in o.samples:
                    rows_idx.append(i)
                    texts.append(s.text)
                    toks.append(list(s.token_ids))
                    lats.append(s.latent)
            for k, v in outs[0].timings.items():
                if k != "total":
                    add(k + "_s", v)
        else:
            ids = [engine.tokenizer.encode(prefixes[i]) for i in chunk for _ in range(S)]
            if setting.method in ("decoder", "re-control", "caa"):
                params = [
                    DecodeParams(
                        max_new_tokens=config.max_new_tokens,
                        temperature=config.temperature,
                        top_p=config.top_p,
                        seed=(_seed(config, i) + j) ^ 0x5DEECE66D,  # the engine's decode seeds
                    )
                    for i in chunk
                    for j in range(S)
                ]
                hook, masks, residual = None, (), None
                if setting.min_p:  # plain decoding with DGLM's truncation
                    masks = (MinP(setting.min_p),)
                if setting.method == "re-control":  # the edit on the same plain decoding
                    hook, masks = re_control_hook(
                        engine, setting, prefixes, chunk, ids, S, base_decoder.logits
                    )
                if setting.method == "caa":  # the vector on the same plain decoding
                    vectors = (
                        engine.steering_vectors if steering_vectors is None else steering_vectors
                    )
                    hook, masks, residual = caa_conditioning(
                        engine, vectors, setting, prefixes, chunk, ids, S, base_decoder
                    )
                if no_repeat:  # the n-gram ban the engine gives every method's rows
                    masks = (*masks, NoRepeatNGram(no_repeat))
                results, t = decode(
                    base_decoder, engine.tokenizer, ids, params, hidden_hook=hook,
                    processors=masks, residual=residual,
                )  # fmt: skip
                for k in ("prefill_s", "decode_s"):
                    add(k, t[k])
            elif setting.method == "fudge":
                fp = FudgeParams(
                    max_new_tokens=config.max_new_tokens,
                    top_k=config.fudge_top_k,
                    strength=setting.scale,
                    temperature=config.temperature,
                    top_p=config.top_p,
                    seed=_seed(config, chunk[0]),
                )
                probe = engine.probes.probes[setting.probe]
                results, t = fudge_generate(
                    base_decoder, engine.tokenizer, engine.encoder, probe, setting.target, ids, fp
                )
                for k in ("lm_s", "probe_s", "candidates_scored"):
                    add(k, t[k])
            else:
                raise AssertionError(setting.method)
            for r, res in enumerate(results):
                rows_idx.append(chunk[r // S])
                texts.append(res.text)
                toks.append(list(res.token_ids))
        add("wall_s", time.perf_counter() - t0)
        if tick is not None:
            tick()
    n = len(texts)
    timings["per_sample_s"] = timings["wall_s"] / n
    latents = torch.stack(lats) if lats else None
    return Generations(rows_idx, texts, toks, latents, timings)


def re_control_hook(engine, setting: Setting, prefixes, chunk, ids, samples: int, logits_fn):
    """RE-Control's hidden-state hook and its plausibility mask (if any) for one batch of rows
    (every row has the setting's controls, at its step size and plausibility, else its value
    network's defaults) → (hook, processors)."""
    params = [
        GenerationParams(  # the controls the engine's RE-Control would steer with
            controls=setting.effective_controls(engine.config.implied_controls),
            re_control_step_size=setting.re_control_step_size,
            re_control_plausibility=setting.re_control_plausibility,
        )
        for _ in chunk
    ]
    rows = [(r, j) for r in range(len(chunk)) for j in range(samples)]
    per_request = [ids[k * samples] for k in range(len(chunk))]
    batch = MethodBatch(
        [prefixes[i] for i in chunk], params, per_request, rows, [0] * len(rows), None
    )
    return value_conditioning(
        engine.value_nets, engine.probes.probes, batch, True, engine.device, logits_fn
    )


def caa_conditioning(
    engine, vectors, setting: Setting, prefixes, chunk, ids, samples: int, decoder
) -> tuple:
    """CAA's residual (and RE-Control's hook and masks for the controls the bundle implies that
    act through it) for one batch of rows, as the engine's CAA method gives them, at the setting's
    blocks and multiplier (else the vector's defaults) → (hook, processors, residual)."""
    params = [
        GenerationParams(
            controls=setting.effective_controls(engine.config.implied_controls),
            caa_multiplier=setting.caa_multiplier,
        )
        for _ in chunk
    ]
    rows = [(r, j) for r in range(len(chunk)) for j in range(samples)]
    per_request = [ids[k * samples] for k in range(len(chunk))]
    batch = MethodBatch(
        [prefixes[i] for i in chunk], params, per_request, rows, [0] * len(rows), None
    )
    method = CAA(
        vectors, decoder.num_layers, decoder.hidden_size, engine.value_nets,
        engine.probes.probes, decoder.logits, setting.caa_layers,
    )  # fmt: skip
    method.validate(params)
    cond = method.condition(batch)
    return cond.hidden_hook, cond.processors, cond.residual


def warm_up(engine, prefix: str) -> None:
    """One tiny untimed call through every model, so no setting pays first-call costs."""
    engine.generate([prefix], GenerationParams(max_new_tokens=2, seed=0))
    engine.encoder.embed([prefix, prefix + " and"])


def released_decoder(engine):
    """The decoder as released, without the bundle's merged adapters: what plain decoding and
    FUDGE run on and what "PPL SmolLM2" judges with (the engine's own decoder when the bundle has
    no adapters or its directory is unknown)."""
    bundle_dir = getattr(engine, "bundle_dir", None)
    if engine.config.decoder_lora is None or bundle_dir is None:
        return engine.decoder
    ref = resolve_reference(engine.config.decoder, bundle_dir)
    return load_decoder(ref, device=engine.device, dtype=engine.dtype)[0]
