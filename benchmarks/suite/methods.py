"""Every method of the suite as one callable `run(prompts, length, seeds) → Run`.

- hf_generate: Hugging Face `generate` of the same decoder weights, nucleus sampling,
  min_new_tokens = max_new_tokens = L (exactly L tokens), no control.
- engine / engine_1probe / engine_2probes: `Engine.generate` with the bundle's own sampler
  (whatever it is: recorded per row), 0, 1 or 2 probe controls.
- reference_dglm: reference-style DGLM (Lovelace et al. 2024): the engine's encoder, score network
  and prompt generator in fp32 with sampler="ddpm", 250 steps, guidance_mode="exact" (Monte-Carlo
  guidance by autograd through the score network), then eager Hugging Face decoding with
  inputs_embeds = [prefix token embeddings ; soft prompt] (the engine's `_decode` hook, as the ONNX
  backend overrides it), exactly L tokens.
- fudge: `dglm.engine.methods.fudge.fudge_generate` with the sentiment probe (top-k reranking per token).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from dglm.engine import bundle as bundle_io
from dglm.engine.api import GenerationParams
from dglm.engine.decoding.loop import DecodeResult
from dglm.engine.engine import Engine
from dglm.engine.evaluation.settings import low_toxicity_target
from dglm.engine.methods.fudge import FudgeParams, fudge_generate
from dglm.engine.models import loading
from dglm.engine.probes import Control

from benchmarks.suite.config import SENTIMENT_TARGET


@dataclass
class Run:
    """The output of one call: row b continues prompt b."""

    prefix_ids: list[list[int]]
    token_ids: list[list[int]]  # generated tokens, EOS excluded
    texts: list[str]
    stages: dict[str, float]  # seconds per stage


@dataclass
class Method:
    name: str  # a key of config.METHODS
    family: str  # "hf_generate" | "engine" | "reference_dglm" | "fudge"
    controls: tuple[Control, ...]  # what the method steers toward (() = uncontrolled)
    run: Callable[[list[str], int, list[int]], Run]  # (prompts, length, seeds) → Run
    info: dict = field(default_factory=dict)  # sampler, dtype, decoding: recorded per row


def control_label(controls: tuple[Control, ...]) -> str:
    def one(c: Control) -> str:
        scale = "" if c.scale is None else f":{c.scale:g}"
        how = "" if c.method == "dglm" else f"@{c.method}"
        return f"{c.probe}={c.target}{scale}{how}"

    return " + ".join(one(c) for c in controls) or "—"


def method_label(m: Method) -> str:
    """The controls column: probe=target:scale, or for FUDGE probe=target (λ strength)."""
    if m.family == "fudge":
        c = m.controls[0]
        return f"{c.probe}={c.target} (λ {c.scale:g})"
    return control_label(m.controls)


def describe(m: Method) -> str:
    """One line for the report's method list."""
    i = m.info
    parts = [i.get("decoding", m.family), i.get("dtype", "")]
    if "sampler" in i:
        s = i["sampler"]
        parts.append(
            f"sampler {s.get('sampler')} × {s.get('num_inference_steps')} steps, "
            f"{s.get('guidance_mode')} guidance, cfg {i.get('cfg_scale')}, "
            f"prompt guidance {i.get('prompt_guidance', 1.0):g}"
        )
    if "guided_update" in i:
        parts.append(f"guided update {i['guided_update']}, sampler CUDA graphs {i['cuda_graphs']}")
    if m.family == "fudge":
        parts.append(f"top-k {i['top_k']}, λ {i['strength']:g}")
    parts.append(f"controls {method_label(m)}")
    return "; ".join(p for p in parts if p)


def sampler_info(config) -> dict:
    """The sampler settings a config resolves to, as plain data (whatever its fields are)."""
    if dataclasses.is_dataclass(config):
        return dataclasses.asdict(config)
    return dict(vars(config))


# ------------------------------------------------------------------ Hugging Face decoding
def hf_decoder_dir(engine: Engine, bundle_dir: Path) -> Path:
    """The Hugging Face directory the engine's decoder was loaded from."""
    ref = bundle_io.resolve_reference(engine.config.decoder, bundle_dir)
    path = Path(ref).expanduser()
    if ref == loading.DEFAULT_DECODER:
        return loading.smollm2_dir()
    if path.is_file() and path.suffix == ".gguf":
        return loading.converted_gguf_dir(path)
    if path.is_dir():
        return path
    return loading._resolve_hub_name(ref)


def load_hf(directory: Path, device: torch.device, dtype: torch.dtype):
    """The same weights as the engine's decoder, as a transformers causal LM (eager)."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
    return hf.to(device).eval().requires_grad_(False)


class StepClock:
    """A logits processor that timestamps its calls: the first comes right after the prefill."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.calls = device, []

    def __call__(self, input_ids, scores):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.calls.append(time.perf_counter())
        return scores


def _pad_id(tokenizer) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    return int(pad if pad is not None else tokenizer.eos_token_id)


def _left_pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (B, T) left padded with `pad`, mask (B, T) long, 1 on real tokens)."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, T - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[b, T - len(r) :] = 1
    return ids, mask


def hf_sample(hf, pad: int, length: int, seed: int, temperature: float, top_p: float, **inputs):
    """HF `generate`, nucleus sampling, exactly `length` new tokens per row.

    → (new tokens (B, length) as lists, prefill seconds, decode seconds). HF samples every row from
    torch's global generator, seeded once per call with `seed`.
    """
    from transformers import LogitsProcessorList

    clock = StepClock(hf.device)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(
            **inputs,
            max_new_tokens=length,
            min_new_tokens=length,
            do_sample=True,
            temperature=temperature,
            top_p=top_p,
            top_k=0,
            pad_token_id=pad,
            logits_processor=LogitsProcessorList([clock]),
        )
    if hf.device.type == "cuda":
        torch.cuda.synchronize(hf.device)
    t_end = time.perf_counter()
    new = out[:, -length:] if "input_ids" in inputs else out  # inputs_embeds: only new tokens
    first = clock.calls[0] if clock.calls else t_end
    return new.tolist(), first - t0, t_end - first


def hf_generate_method(hf, tokenizer, temperature: float, top_p: float) -> Method:
    pad = _pad_id(tokenizer)

    def run(prompts: list[str], length: int, seeds: list[int]) -> Run:
        prefix = [tokenizer.encode(p) for p in prompts]
        ids, mask = _left_pad(prefix, pad)
        toks, prefill, decode = hf_sample(
            hf, pad, length, seeds[0], temperature, top_p,
            input_ids=ids.to(hf.device), attention_mask=mask.to(hf.device),
        )  # fmt: skip
        texts = tokenizer.batch_decode(toks, skip_special_tokens=True)
        return Run(prefix, toks, texts, {"prefill": prefill, "decode": decode})

    info = {"dtype": str(hf.dtype).removeprefix("torch."), "decoding": "transformers generate"}
    return Method("hf_generate", "hf_generate", (), run, info)


# ------------------------------------------------------------------ the engine
def _engine_run(
    engine: Engine, prompts, length, seeds, controls, temperature, top_p, method=None, **overrides
):
    """One `Engine.generate` call, one sample per prompt, exactly `length` tokens per row."""
    params = [
        GenerationParams(controls=controls, seed=s, max_new_tokens=length, temperature=temperature,
                         top_p=top_p, ignore_eos=True, **overrides)
        for s in seeds
    ]  # fmt: skip
    outs = engine.generate(list(prompts), params, method=method)
    stages = {k: v for k, v in outs[0].timings.items() if k != "total"}
    samples = [o.samples[0] for o in outs]
    return Run(
        [engine.tokenizer.encode(p) for p in prompts],
        [list(s.token_ids) for s in samples],
        [s.text for s in samples],
        stages,
    )


def engine_method(
    name: str, engine: Engine, controls: tuple[Control, ...], temperature: float, top_p: float
) -> Method:
    def run(prompts: list[str], length: int, seeds: list[int]) -> Run:
        return _engine_run(engine, prompts, length, seeds, controls, temperature, top_p)

    info = {
        "sampler": sampler_info(engine.config.sampler),
        "cfg_scale": engine.config.cfg_scale,
        "prompt_guidance": engine.config.prompt_guidance,
        "student": getattr(engine, "student", None) is not None,  # a distilled few-step network
        "dtype": str(engine.dtype).removeprefix("torch."),
        "guided_update": getattr(engine.dglm.update_fn, "__name__", str(engine.dglm.update_fn)),
        "cuda_graphs": engine.dglm.captured is not None,
        "decoding": "Engine.generate"
        + (" (fast_decode: persistent runner)" if engine.decode_runner is not None else ""),
    }
    return Method(name, "engine", controls, run, info)


def re_control_method(engine: Engine, control: Control, temperature: float, top_p: float) -> Method:
    """RE-Control alone through the engine (its decoder, no soft prompt, no diffusion), at the
    value network's default steps and step size."""

    def run(prompts: list[str], length: int, seeds: list[int]) -> Run:
        return _engine_run(
            engine, prompts, length, seeds, (control,), temperature, top_p, engine.re_control
        )

    net = engine.value_nets[control.probe].config
    info = {
        "dtype": str(engine.dtype).removeprefix("torch."),
        "decoding": f"Engine.generate(method=ReControl): {net.steps} value-ascent steps of "
        f"{net.step_size:g} per token (the engine's decode step with the hidden-state hook)",
    }
    return Method("re_control", "re_control", (control,), run, info)


# ------------------------------------------------------------------ reference-style DGLM
class HFSoftPromptCore:
    """A decode core (`decoding.core.Core`) that decodes with eager HF `generate` from
    inputs_embeds = [left pads ; prefix token embeddings ; soft prompt] (the layout of
    `decoding.generate`), exactly params[0].max_new_tokens tokens per row: the reference's
    decoding under the engine's own DGLM stages."""

    def __init__(self, hf, tokenizer, temperature: float, top_p: float) -> None:
        self.hf, self.tokenizer = hf, tokenizer
        self.backend = "hf-generate"  # no hidden-state hooks: no RE-Control rows
        self.temperature, self.top_p = temperature, top_p
        self.max_context = hf.config.max_position_embeddings

    def lm_head(self) -> None:
        return None

    def decode(self, prefix_ids, params, soft_prompt, processors=(), hidden_hook=None,
               on_tokens=None, residual=None):  # fmt: skip
        if processors or hidden_hook is not None or on_tokens is not None or residual is not None:
            raise ValueError("the HF reference decodes plainly: no processors, hooks or streaming")
        hf, pad = self.hf, _pad_id(self.tokenizer)
        ids, mask = _left_pad(prefix_ids, pad)  # (B, T)
        B, P = soft_prompt.shape[:2]
        emb = hf.get_input_embeddings()(ids.to(hf.device))  # (B, T, H)
        x = torch.cat([emb, soft_prompt.to(device=hf.device, dtype=emb.dtype)], 1)  # (B, T+P, H)
        mask = torch.cat([mask, torch.ones(B, P, dtype=torch.long)], 1).to(hf.device)
        length = params[0].max_new_tokens
        toks, prefill, decode = hf_sample(
            hf, pad, length, params[0].seed, self.temperature, self.top_p,
            inputs_embeds=x, attention_mask=mask,
        )  # fmt: skip
        texts = self.tokenizer.batch_decode(toks, skip_special_tokens=True)
        results = [DecodeResult(t, s, "length") for t, s in zip(toks, texts, strict=True)]
        return results, {"prefill_s": prefill, "decode_s": decode}


def reference_method(
    engine: Engine,
    hf,
    controls: tuple[Control, ...],
    steps: int,
    temperature: float,
    top_p: float,
) -> Method:
    """`engine` must be fp32 (the reference's precision); it is copied, not changed."""
    # the engine's methods (its networks) over another decode core
    core = HFSoftPromptCore(hf, engine.tokenizer, temperature, top_p)
    ref = Engine(core, engine.methods.values(), engine.default, engine.no_repeat_ngram_size)
    # the reference decodes plainly from the soft prompt: no prompt guidance, no n-gram ban, no
    # controls beyond the row's own
    overrides = {
        "sampler": "ddpm",
        "num_inference_steps": steps,
        "guidance_mode": "exact",
        "prompt_guidance": 1.0,
        "no_repeat_ngram_size": 0,
        "implied_controls": False,
    }

    def run(prompts: list[str], length: int, seeds: list[int]) -> Run:
        return _engine_run(ref, prompts, length, seeds, controls, temperature, top_p, **overrides)

    resolved = GenerationParams(**overrides).sampler_config(engine.config.sampler)
    info = {
        "sampler": sampler_info(resolved),
        "cfg_scale": engine.config.cfg_scale,
        "prompt_guidance": 1.0,
        "dtype": str(engine.dtype).removeprefix("torch."),
        "decoding": "transformers generate (eager) with inputs_embeds = [prefix ; soft prompt]",
    }
    return Method("reference_dglm", "reference_dglm", controls, run, info)


# ------------------------------------------------------------------ FUDGE
def fudge_method(
    engine: Engine,
    control: Control,
    top_k: int,
    strength: float,
    temperature: float,
    top_p: float,
) -> Method:
    probe = engine.probes.probes[control.probe]

    def run(prompts: list[str], length: int, seeds: list[int]) -> Run:
        prefix = [engine.tokenizer.encode(p) for p in prompts]
        params = FudgeParams(
            max_new_tokens=length,
            top_k=top_k,
            strength=strength,
            temperature=temperature,
            top_p=top_p,
            seed=seeds[0],  # row b draws from seed + b
            ignore_eos=True,
        )
        results, t = fudge_generate(
            engine.decoder, engine.tokenizer, engine.encoder, probe, control.target, prefix, params
        )
        stages = {"decode": t["lm_s"], "rerank": t["probe_s"]}  # decode includes its prefill
        return Run(prefix, [r.token_ids for r in results], [r.text for r in results], stages)

    info = {
        "top_k": top_k,
        "strength": strength,
        "dtype": str(engine.decoder.dtype).removeprefix("torch."),
        "decoding": "fudge_generate (KV-cached, one encoder batch of k candidates per row and step)",
    }
    return Method("fudge", "fudge", (Control(control.probe, control.target, strength),), run, info)


# ------------------------------------------------------------------ the suite's methods
# ------------------------------------------------------------------ llama.cpp
def llama_cpp_method(llm, tokenizer, temperature: float, top_p: float) -> Method:
    """llama.cpp (benchmarks.llama_cpp) on the GGUF the decoder was converted from, no control:
    the prompts one after another (its API decodes one sequence per call), the same token ids."""
    from benchmarks import llama_cpp

    def run(prompts: list[str], length: int, seeds: list[int]) -> Run:
        prefix = [tokenizer.encode(p) for p in prompts]
        toks, prefill, decode = [], 0.0, 0.0
        for ids, seed in zip(prefix, seeds, strict=True):
            t, pre, dec, _ = llama_cpp.sample(llm, ids, length, temperature, top_p, seed)
            toks.append(t)
            prefill, decode = prefill + pre, decode + dec
        texts = tokenizer.batch_decode(toks, skip_special_tokens=True)
        return Run(prefix, toks, texts, {"prefill": prefill, "decode": decode})

    info = {"dtype": "Q4_1 (GGUF)", "decoding": f"llama-cpp-python {llama_cpp.version()}, "
            "one prompt at a time"}  # fmt: skip
    return Method("llama_cpp", "llama_cpp", (), run, info)


def build_methods(
    config,
    engine: Engine,
    reference_engine: Engine,
    hf,
    hf_reference,
) -> tuple[list[Method], list[str]]:
    """The methods `config.methods` names → (methods in table order, notes on those left out).

    engine: the engine under test; reference_engine: the same bundle in fp32 (may be `engine`);
    hf / hf_reference: the decoder as a transformers model in the engine's / fp32 precision.
    """

    probes = engine.probes.probes
    probe, label = SENTIMENT_TARGET
    if probe not in probes or label not in probes[probe].labels:
        raise ValueError(
            f"the bundle needs a {probe!r} probe with a {label!r} label for the suite's controls; "
            f"it has {sorted(probes)}"
        )
    scale = engine.config.control_scale if config.control_scale is None else config.control_scale
    one = (Control(probe, label, scale),)
    T, p = config.temperature, config.top_p
    notes = []
    made: dict[str, Method] = {}
    for name in config.methods:
        if name == "llama_cpp":
            if config.suite != "cpu":
                notes.append("llama_cpp left out: a CPU decoder, not run in the GPU suite")
                continue
            if engine.config.decoder != loading.DEFAULT_DECODER or os.environ.get(
                loading.SHAPE_TWINS_ENV
            ):
                notes.append("llama_cpp left out: the bundle's decoder is not the SmolLM2 GGUF")
                continue
            from benchmarks import llama_cpp

            llm, why = llama_cpp.load(torch.get_num_threads())
            if llm is None:
                notes.append(f"llama_cpp left out: {why}")
                continue
            made[name] = llama_cpp_method(llm, engine.tokenizer, T, p)
        elif name == "hf_generate":
            made[name] = hf_generate_method(hf, engine.tokenizer, T, p)
        elif name == "engine":
            made[name] = engine_method(name, engine, (), T, p)
        elif name == "engine_1probe":
            made[name] = engine_method(name, engine, one, T, p)
        elif name == "engine_2probes":
            if "toxicity" not in probes:
                notes.append("engine_2probes left out: the bundle has no 'toxicity' probe")
                continue
            low = Control("toxicity", low_toxicity_target(probes["toxicity"]), scale)
            made[name] = engine_method(name, engine, (*one, low), T, p)
        elif name == "reference_dglm":
            made[name] = reference_method(
                reference_engine, hf_reference, one, config.reference_steps, T, p
            )
        elif name == "fudge":
            made[name] = fudge_method(
                engine, one[0], config.fudge_top_k, config.fudge_strength, T, p
            )
        elif name in ("re_control", "engine_re_control"):
            if probe not in engine.value_nets:
                notes.append(f"{name} left out: the bundle has no {probe!r} value network")
                continue
            if name == "re_control":
                made[name] = re_control_method(
                    engine, Control(probe, label, method="re-control"), T, p
                )
            else:
                both = (Control(probe, label, scale, method="both"),)
                made[name] = engine_method(name, engine, both, T, p)
    return list(made.values()), notes
