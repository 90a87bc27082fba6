"""Generation for `dglm eval`: one setting's continuations of every prefix through
`Engine.generate` (DGLM, RE-Control, their composition, FUDGE or plain decoding), in batches,
with per-stage timings."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from dglm.engine.api import GenerationParams
from dglm.engine.bundle import resolve_reference
from dglm.engine.decoding.core import DecodeCore
from dglm.engine.engine import Engine
from dglm.engine.evaluation.settings import EvalConfig, Setting
from dglm.engine.methods.base import Method
from dglm.engine.methods.caa import CAA, SteeringVector
from dglm.engine.methods.fudge import Fudge
from dglm.engine.methods.plain import PlainDecoding
from dglm.engine.models import load_decoder
from dglm.engine.probes import Control


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


def request_params(setting: Setting, config: EvalConfig, prefix: int, no_repeat: int):
    """The request of one prefix under a setting: the sampling every method shares (the config's
    temperature, top_p, length and n-gram ban; seed: the prefix's, sample j at seed + j) and the
    setting's controls and knobs."""
    controls = setting.controls
    if setting.method == "fudge":  # FUDGE reranks by one (probe, target): no implied controls
        controls = (Control(setting.probe, setting.target),)
    return GenerationParams(
        controls=controls,
        num_samples=config.num_samples,
        seed=_seed(config, prefix),
        max_new_tokens=config.max_new_tokens,
        temperature=config.temperature,
        top_p=config.top_p,
        no_repeat_ngram_size=no_repeat,
        renoise_alpha2=setting.renoise_alpha2,
        re_control_step_size=setting.re_control_step_size,
        re_control_plausibility=setting.re_control_plausibility,
        caa_multiplier=setting.caa_multiplier,
        implied_controls=setting.implied_controls and setting.method != "fudge",
    )


def setting_method(
    engine: Engine,
    setting: Setting,
    config: EvalConfig,
    steering_vectors: dict[str, SteeringVector] | None = None,
) -> Method:
    """The engine method a setting runs: DGLM (alone or composed with RE-Control), RE-Control
    alone, CAA alone (at the setting's blocks, with `steering_vectors`, default: the engine's),
    FUDGE at the setting's λ, or plain decoding (with the setting's min-p)."""
    if setting.method in ("dglm", "dglm+re-control"):
        return engine.dglm
    if setting.method == "re-control":
        return engine.re_control
    if setting.method == "caa":
        vectors = engine.steering_vectors if steering_vectors is None else steering_vectors
        dec = engine.decoder
        return CAA(vectors, dec.num_layers, dec.hidden_size, engine.value_nets,
                   engine.probes.probes, None, setting.caa_layers)  # fmt: skip
    if setting.method == "fudge":
        return Fudge(engine.encoder, engine.probes, config.fudge_top_k, setting.scale)
    if setting.method == "decoder":
        return PlainDecoding(setting.min_p or 0.0)
    raise ValueError(f"setting {setting.name!r}: unknown method {setting.method!r}")


def generate_setting(
    engine: Engine,
    setting: Setting,
    prefixes: list[str],
    config: EvalConfig,
    tick=None,
    base_decoder=None,
    steering_vectors: dict[str, SteeringVector] | None = None,
) -> Generations:
    """Run one setting over every prefix in batches of config.batch_size prompts, every method
    through `Engine.generate`. Plain decoding, RE-Control, CAA and FUDGE run on `base_decoder`
    (the released decoder, without the bundle's adapters; default: the engine's decoder): the
    engine's methods over a decode core of that decoder; CAA with `steering_vectors` (default:
    the engine's)."""
    method = setting_method(engine, setting, config, steering_vectors)
    if setting.method not in ("dglm", "dglm+re-control") and base_decoder is not None:
        core = DecodeCore(base_decoder, engine.tokenizer)  # eager steps, as released
        engine = Engine(core, engine.methods.values(), engine.default, engine.no_repeat_ngram_size)
    # the n-gram ban of every row, resolved once: the config's, else the bundle's default
    no_repeat = config.no_repeat_ngram_size
    no_repeat = engine.no_repeat_ngram_size if no_repeat is None else no_repeat
    rows_idx, texts, toks, lats = [], [], [], []
    timings: dict[str, float] = {}
    for chunk in batches(len(prefixes), config.batch_size):
        t0 = time.perf_counter()
        params = [request_params(setting, config, i, no_repeat) for i in chunk]
        outs = engine.generate([prefixes[i] for i in chunk], params, method=method)
        for i, o in zip(chunk, outs, strict=True):
            for s in o.samples:
                rows_idx.append(i)
                texts.append(s.text)
                toks.append(list(s.token_ids))
                lats.append(s.latent)
        for k, v in outs[0].timings.items():
            if k != "total" and v > 0:  # the stages the method has
                timings[k + "_s"] = timings.get(k + "_s", 0.0) + v
        timings["wall_s"] = timings.get("wall_s", 0.0) + time.perf_counter() - t0
        if tick is not None:
            tick()
    timings["per_sample_s"] = timings["wall_s"] / len(texts)
    latents = torch.stack(lats) if all(x is not None for x in lats) else None
    return Generations(rows_idx, texts, toks, latents, timings)


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
