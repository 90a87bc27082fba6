"""The batched DGLM engine: prefix → latent proposal (guided) → soft prompt → decoder.

engine = Engine.from_pretrained("default")
outs = engine.generate(["The movie was"], GenerationParams(controls=(Control("sentiment", "positive"),)))
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch
from dglm.engine import bundle as bundle_io
from dglm.engine.api import GenerationParams, RequestOutput, Sample, check_prompts
from dglm.engine.bundle import BundleConfig
from dglm.engine.decoding.core import Core, DecodeCore, persistent_runner
from dglm.engine.decoding.loop import TokenStream
from dglm.engine.decoding.runner import DecodeRunner
from dglm.engine.decoding.sampling import NoRepeatNGram
from dglm.engine.diffusion.score_network import ScoreNetwork
from dglm.engine.encode.encoder import SentenceEncoder
from dglm.engine.methods.base import Method, MethodBatch
from dglm.engine.methods.caa import CAA, SteeringVector, check_decoder, save_steering_vectors
from dglm.engine.methods.dglm import DGLM, check_encoder
from dglm.engine.methods.fudge import Fudge
from dglm.engine.methods.plain import PlainDecoding
from dglm.engine.methods.re_control import ReControl, ValueNetwork
from dglm.engine.models.base import Decoder
from dglm.engine.models.quant import quantize_label, resolve_quantize
from dglm.engine.probes import Control, Probe, ProbeSet, save_probes, with_implied
from dglm.engine.prompt.generator import PromptGenerator
from dglm.export.runtime import OrtModels, RuntimeOptions, load_export
from dglm.kernels import llama_step

logger = logging.getLogger(__name__)

STAGES = ("encode", "diffusion", "prompt_generator", "prefill", "decode")


class Engine:
    """Routes requests to methods over one decode core: `Engine(core, methods)`.

    core (`decoding.core.DecodeCore`): the decoder, its tokenizer and its step backend — "torch"
    (a compact torch decoder: eager steps, or a persistent DecodeRunner with `fast_decode`) or
    "onnx" (`dglm export onnx` graphs on ONNX Runtime, `dglm.export.runtime`). methods: peers
    built from the bundle's parts, none holding the engine (`dglm.engine.methods`): DGLM (the
    default), RE-Control, FUDGE, plain decoding; `generate(..., method=name or Method)`. The
    engine checks each request, expands it into rows (sample j of request i) with their seeds
    (the request's seed + j), hands the rows to the method and the method's conditioning to the
    core, and assembles the outputs.

    Threads: one call at a time. `generate`, `validate` and `add_probe` hold the engine's lock for
    the whole call (its decode runner's KV buffers and step state, the captured samplers' static
    buffers, the tokenizers and the probe set are shared by every call), so calls from several
    threads run one after another, each returning what it returns alone. A call made from inside
    another on the same thread (an `on_tokens` hook or a method calling back into the engine) is
    refused with RuntimeError: it would decode on the buffers the outer call is using.
    """

    def __init__(
        self,
        core: Core,
        methods: Iterable[Method],
        default: str = "dglm",
        no_repeat_ngram_size: int = 0,
    ) -> None:
        """default: the method of a request that names none; no_repeat_ngram_size: the n-gram ban
        of a request that sets none (the bundle's; 0 = off), for every method."""
        self.core = core
        self.methods: dict[str, Method] = {m.name: m for m in methods}
        if default not in self.methods:
            raise ValueError(f"default method {default!r} is not among {sorted(self.methods)}")
        self.default = default
        self.no_repeat_ngram_size = no_repeat_ngram_size
        # the bundle's decoder adapters (merged into the decoder already), for save_pretrained
        self.decoder_lora_state: dict[str, torch.Tensor] | None = None
        self.bundle_dir: Path | None = None  # where from_pretrained read the bundle
        self._lock = threading.Lock()  # held by the call in progress (see the class docstring)
        self._holder: int | None = None  # that call's thread (threading.get_ident())
        self.onnx_models: OrtModels | None = None  # the ONNX backend's graphs (info)

    def register(self, method: Method) -> None:
        """Add (or replace) a method, reachable by its name: `generate(..., method=method.name)`."""
        if not isinstance(method, Method):
            raise ValueError(f"method must be a Method, got {method!r}")
        with self._exclusive("register"):
            self.methods[method.name] = method

    def method(self, method: Method | str | None = None) -> Method:
        """The method a request names: a registered one by name, the default for None, or a
        `Method` object as given (one built apart, e.g. FUDGE at another top_k)."""
        if method is None:
            return self.methods[self.default]
        if isinstance(method, str):
            if method not in self.methods:
                raise ValueError(
                    f"method must be one of {sorted(self.methods)} or a Method, got {method!r}"
                )
            return self.methods[method]
        if not isinstance(method, Method):
            raise ValueError(f"method must be a method name or a Method, got {method!r}")
        return method

    # the core's parts
    @property
    def decoder(self) -> Decoder:
        return self.core.decoder

    @property
    def tokenizer(self):
        return self.core.tokenizer

    @property
    def backend(self) -> str:
        return self.core.backend

    @property
    def decode_runner(self) -> DecodeRunner | None:
        return self.core.runner

    # the bundle's shared parts, as the DGLM method holds them (FUDGE and RE-Control share them)
    @property
    def dglm(self) -> DGLM:
        return self.methods["dglm"]

    @property
    def re_control(self) -> ReControl:
        """RE-Control on its own (no soft prompt): every control of a request acts through its
        probe's value network; `engine.generate(prompts, params, method="re-control")`."""
        return self.methods["re-control"]

    @property
    def caa(self) -> CAA:
        """CAA on its own (no soft prompt): every control of a request acts through its probe's
        steering vector (RE-Control's through their value networks); `method="caa"`."""
        return self.methods["caa"]

    @property
    def steering_vectors(self) -> dict[str, SteeringVector]:
        return self.dglm.steering_vectors

    def add_steering_vector(self, vector: SteeringVector) -> None:
        """Use `vector` for its probe (checked against the decoder and the probe's labels)."""
        with self._exclusive("add_steering_vector"):
            c = vector.config
            probe = self.probes.probes.get(c.probe)
            check_decoder(vector, probe, self.decoder.num_layers, self.decoder.hidden_size)
            self.steering_vectors[c.probe] = vector

    @property
    def config(self) -> BundleConfig:
        return self.dglm.config

    @property
    def probes(self) -> ProbeSet:
        return self.dglm.probes

    @property
    def encoder(self) -> SentenceEncoder:
        return self.dglm.encoder

    @property
    def value_nets(self) -> dict[str, ValueNetwork]:
        return self.dglm.value_nets

    @property
    def device(self) -> torch.device:
        return self.dglm.device

    @property
    def dtype(self) -> torch.dtype:
        return self.dglm.dtype

    # ---------------------------------------------------------------- loading and saving
    @classmethod
    def from_pretrained(
        cls,
        path_or_name: str | Path = "default",
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str = torch.float32,
        guided_update: str = "auto",
        backend: str = "torch",
        cuda_graphs: bool = True,
        fast_decode: bool | None = None,
        onnx_options: RuntimeOptions | None = None,
        quantize: str = "auto",
    ) -> Engine:
        """backend="onnx": `path_or_name` is a `dglm export onnx` directory, run on ONNX Runtime
        (`onnx_options`: threads, CUDA graphs, batch padding; the export fixes the dtype, `dtype`
        is not used).
        fast_decode: decode with a persistent runner (CUDA graphs on CUDA; on CPU the fused C++
        step of an int8 Llama decoder, else traced steps; a batch/length bucket pays a one-time
        capture or trace at its first use). None (default): on when the fused CPU step serves
        the decoder (it costs nothing to set up: no trace, no capture), off otherwise.
        quantize="int8": the decoder's weights in int8 (weight-only, per-channel scales;
        models.quant), fp32 only; "auto" (default): int8 for an fp32 decoder on CPU, else "none"
        (models.quant.resolve_quantize); "none": the checkpoint's weights in `dtype`.
        A bad device, or a bundle file that is missing or unreadable, raises ValueError naming it.
        A Diffusion-LM bundle (config.json "method": "diffusion-lm") loads as its own engine,
        `DiffusionLMEngine` (the same `generate(prompts, params)` → RequestOutput list; not yet
        behind `Engine`, issue 34); the decoder options do not apply to it."""
        device = resolve_device(device)
        if backend == "torch":
            from dglm.engine.methods.diffusion_lm.bundle import is_diffusion_lm_bundle

            if is_diffusion_lm_bundle(path_or_name):
                from dglm.engine.methods.diffusion_lm import DiffusionLMEngine

                return DiffusionLMEngine.from_pretrained(path_or_name, device=str(device))
        if backend == "onnx":
            exp = load_export(path_or_name, device, onnx_options)
            m = exp.models
            core = DecodeCore(m.decoder, exp.tokenizer, backend="onnx")
            engine = cls.from_parts(
                exp.config, exp.encoder, m.score_net, m.prompt_gen, exp.probes, {}, core,
                m.device, m.score_net.dtype, m.student, guided_update,
            )  # fmt: skip
            engine.onnx_models = m
            return engine
        if backend != "torch":
            raise ValueError(f"backend must be 'torch' or 'onnx', got {backend!r}")
        dtype = _as_dtype(dtype)
        if quantize not in ("none", "auto") and dtype != torch.float32:
            raise ValueError(f"quantize={quantize!r} needs dtype float32, got {dtype}")
        quantize = resolve_quantize(quantize, device, dtype)
        bundle_dir = bundle_io.resolve_bundle_dir(path_or_name)
        config = bundle_io.read_config(bundle_dir)
        score_net, prompt_gen, student = load_networks(config, bundle_dir)
        probes = bundle_io.load_bundle_probes(bundle_dir)
        encoder = SentenceEncoder(
            bundle_io.resolve_reference(config.encoder, bundle_dir), device=device
        )
        decoder, tokenizer = bundle_io.load_bundle_decoder(
            config, bundle_dir, device, dtype, quantize
        )
        logger.info("loaded bundle %s (%d probes)", bundle_dir, len(probes))
        if fast_decode is None:
            fast_decode = llama_step.unsupported_reason(decoder) is None
        nets = bundle_io.load_value_networks(config, bundle_dir)
        core = DecodeCore(decoder, tokenizer, persistent_runner(decoder) if fast_decode else None)
        engine = cls.from_parts(
            config, encoder, score_net, prompt_gen, probes,
            {k: v.to(device) for k, v in nets.items()}, core, device, dtype, student,
            guided_update, cuda_graphs,
        )  # fmt: skip
        engine.bundle_dir = bundle_dir
        for vector in bundle_io.load_bundle_steering_vectors(config, bundle_dir).values():
            try:
                engine.add_steering_vector(vector)
            except ValueError as e:
                raise ValueError(f"{bundle_dir / bundle_io.STEERING_VECTORS_FILE}: {e}") from None
        if config.decoder_lora is not None:  # already merged; kept to write the bundle back
            engine.decoder_lora_state = bundle_io.read_safetensors(bundle_dir / bundle_io.LORA_FILE)
        engine.check_implied_controls()
        return engine

    @classmethod
    def from_parts(
        cls,
        config: BundleConfig,
        encoder: SentenceEncoder,
        score_net: ScoreNetwork,
        prompt_gen: PromptGenerator,
        probes: list[Probe],
        value_nets: dict[str, ValueNetwork],
        core: DecodeCore,
        device: torch.device,
        dtype: torch.dtype,
        student: ScoreNetwork | None = None,
        guided_update: str = "auto",
        cuda_graphs: bool = True,
    ) -> Engine:
        """The engine of a bundle's loaded parts: DGLM (the default), RE-Control, FUDGE and plain
        decoding over `core`, sharing one probe set and one encoder."""
        check_encoder(config, encoder)
        if core.decoder.hidden_size != config.prompt_generator.decoder_dim:
            raise ValueError(
                f"decoder {config.decoder!r} has width {core.decoder.hidden_size} but the prompt "
                f"generator emits {config.prompt_generator.decoder_dim}-d vectors"
            )
        probe_set = ProbeSet(probes, encoder.dim, config.control_scale)
        dec = core.decoder
        vectors: dict[str, SteeringVector] = {}  # CAA's, by probe: from_pretrained adds them
        dglm = DGLM(
            config, encoder, score_net, prompt_gen, probe_set, value_nets, device, dtype,
            student, guided_update, cuda_graphs, core.backend, vectors,
            (dec.num_layers, dec.hidden_size),
        )  # fmt: skip
        caa = CAA(vectors, dec.num_layers, dec.hidden_size, value_nets, probe_set.probes)
        methods = (
            dglm,
            ReControl(value_nets, probe_set),
            caa,
            Fudge(encoder, probe_set),
            PlainDecoding(),
        )
        engine = cls(core, methods, "dglm", config.no_repeat_ngram_size)
        if not config.trained:
            logger.warning("bundle networks are untrained (random): outputs are not meaningful")
        return engine

    def check_implied_controls(self) -> None:
        """ValueError naming config.json's entry when an implied control names a probe or label
        the bundle lacks, or acts through RE-Control without a value network for its probe."""
        for key, specs in self.config.implied_controls.items():
            for spec in specs:
                c = Control.parse(spec)
                try:
                    self.probes.validate([c])
                except ValueError as e:
                    raise ValueError(f"config.json implied_controls[{key!r}]: {e}") from None
                if c.hidden and c.probe not in self.value_nets:
                    raise ValueError(
                        f"config.json implied_controls[{key!r}]: {spec!r} acts through "
                        f"RE-Control but the bundle has no value network for {c.probe!r}"
                    )

    def save_pretrained(self, path: str | Path) -> None:
        """Write this engine's bundle (networks in fp16, probes in fp32) to `path`."""
        if self.backend != "torch":
            raise NotImplementedError(
                "an ONNX engine has no bundle to save; export from the bundle"
            )
        out = Path(path)
        d = self.dglm
        bundle_io.write_config(d.config, out)
        bundle_io.save_state(d.score_net, out / bundle_io.SCORE_NET_FILE)
        bundle_io.save_state(d.prompt_gen, out / bundle_io.PROMPT_GEN_FILE)
        save_probes(out / bundle_io.PROBES_FILE, list(d.probes.probes.values()))
        if d.value_nets:
            bundle_io.save_value_networks(d.value_nets, out / bundle_io.VALUE_NETS_FILE)
        if d.student is not None:
            bundle_io.save_state(d.student, out / bundle_io.STUDENT_FILE)
        if d.steering_vectors:
            save_steering_vectors(d.steering_vectors, out / bundle_io.STEERING_VECTORS_FILE)
        if d.config.decoder_lora is not None:
            if self.decoder_lora_state is None:
                raise ValueError(
                    "config.decoder_lora is set but this engine holds no adapter weights to save"
                )
            bundle_io.save_lora(self.decoder_lora_state, out / bundle_io.LORA_FILE)

    def add_probe(self, probe: Probe) -> None:
        """Add (or replace) a probe of the bundle: every method sharing the probe set sees it."""
        with self._exclusive("add_probe"):
            self.dglm.add_probe(probe)

    @contextmanager
    def _exclusive(self, entry: str) -> Iterator[None]:
        """Hold the engine for one public call: another thread's call waits for it to end; a call
        from inside it on the same thread is refused (RuntimeError)."""
        if self._holder == threading.get_ident():  # only this thread sets its own ident
            raise RuntimeError(
                f"Engine.{entry} was called from inside another Engine call on the same thread "
                "(an on_tokens hook or a method calling back into the engine): the engine runs "
                "one call at a time and the outer call holds its decode buffers; make the call "
                "after the outer one returns, or from another thread (it waits its turn)"
            )
        with self._lock:
            self._holder = threading.get_ident()
            try:
                yield
            finally:
                self._holder = None

    # ---------------------------------------------------------------- generation
    def validate(
        self,
        prompts: list[str],
        params: list[GenerationParams],
        method: Method | None = None,
    ) -> list[list[int]]:
        """All user-input checks, before any model work; returns the prefix token ids."""
        with self._exclusive("validate"):
            if isinstance(params, (list, tuple)):
                params = self.with_implied_controls(list(params))
            return self._validate(prompts, params, method)

    def with_implied_controls(self, params: list) -> list:
        """Each GenerationParams with the controls the bundle implies for its own
        (BundleConfig.implied_controls; not when it sets implied_controls=False). Other entries
        are left for validation to refuse."""
        table = self.config.implied_controls
        if not table:
            return params
        out = []
        for i, p in enumerate(params):
            if isinstance(p, GenerationParams) and p.implied_controls:
                controls = with_implied(p.controls, table)
                added = controls[len(p.controls) :]
                if any(c.hidden for c in added) and self.backend != "torch":
                    raise ValueError(
                        f"params[{i}]: the bundle implies "
                        f"{[f'{c.probe}={c.target}@{c.method}' for c in added]}"
                        f" for these controls (config.json implied_controls), which act through "
                        f"RE-Control, which the {self.backend!r} decode backend does not run: pass "
                        "implied_controls=False or use backend='torch'"
                    )
                p = replace(p, controls=controls)
            out.append(p)
        return out

    def _validate(
        self, prompts: list[str], params: list[GenerationParams], method: Method | str | None
    ) -> list[list[int]]:
        check_prompts(prompts)
        method = self.method(method)
        if not isinstance(params, (list, tuple)):
            raise ValueError(
                f"params must be a list of GenerationParams, got {type(params).__name__}"
            )
        if len(params) != len(prompts):
            raise ValueError(f"params has {len(params)} entries for {len(prompts)} prompts")
        for i, p in enumerate(params):
            if not isinstance(p, GenerationParams):  # a dict is refused too: no silent defaults
                raise ValueError(
                    f"params[{i}] must be a GenerationParams, got {type(p).__name__} {p!r} "
                    "(for a dict d: GenerationParams(**d))"
                )
        method.validate(params)
        prefix_ids = []
        context = self.core.max_context
        for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
            ids = self.tokenizer.encode(prompt)
            if len(ids) + method.prompt_len + p.max_new_tokens > context:
                raise ValueError(
                    f"max_new_tokens={p.max_new_tokens} for prompts[{i}] ({len(ids)} tokens + "
                    f"{method.prompt_len} soft-prompt vectors) exceeds the decoder's context of "
                    f"{context}"
                )
            prefix_ids.append(ids)
        return prefix_ids

    def generate(
        self,
        prompts: list[str],
        params: GenerationParams | list[GenerationParams] | None = None,
        method: Method | str | None = None,
        on_tokens: TokenStream | None = None,
    ) -> list[RequestOutput]:
        """One output per prompt, in input order; each holds `num_samples` samples.
        `method`: how the rows are conditioned — a registered method's name ("dglm", the
        default; "re-control", "fudge", "plain") or a `Method` object.
        on_tokens: a streaming hook (`decoding.loop.TokenStream`), called after the conditioning
        stages with every decoded token; its rows are (prompt i, sample j) in that order, the
        order of the samples in the outputs; it runs on the calling thread, inside the call, and
        must not call the engine (see the class docstring: refused).
        Thread-safe: calls from several threads run one at a time, in the order they get the
        engine's lock; a call's timings count from when it runs, not from when it waited."""
        with self._exclusive("generate"):
            return self._generate(prompts, params, method, on_tokens)

    def _generate(
        self,
        prompts: list[str],
        params: GenerationParams | list[GenerationParams] | None,
        method: Method | str | None,
        on_tokens: TokenStream | None,
    ) -> list[RequestOutput]:
        method = self.method(method)
        if params is None:
            params = GenerationParams()
        if isinstance(params, GenerationParams):
            params = [params] * (len(prompts) if isinstance(prompts, (list, tuple)) else 1)
        if isinstance(params, (str, bytes, dict)) or not hasattr(params, "__iter__"):
            raise ValueError(
                f"params must be a GenerationParams or a list of them, got {type(params).__name__}"
            )
        params = self.with_implied_controls(list(params))
        prefix_ids = self._validate(prompts, params, method)

        timings = dict.fromkeys(STAGES, 0.0)
        t0 = time.perf_counter()
        rows, seeds = expand_rows(params)
        batch = MethodBatch(
            list(prompts), params, prefix_ids, rows, seeds, self.tokenizer, self.core.lm_head()
        )
        cond = method.condition(batch)

        decode_params = [method.decode_params(params[i], seeds[r]) for r, (i, _) in enumerate(rows)]
        processors = (*cond.processors, *self.repetition_processors(params, rows))
        row_ids = [prefix_ids[i] for i, _ in rows]
        results, dec_t = self.core.decode(
            row_ids, decode_params, cond.soft_prompt, processors, cond.hidden_hook, on_tokens,
            cond.residual,
        )  # fmt: skip
        timings.update(cond.timings)  # (after decoding: a processor may time its own share)
        timings["prefill"] = dec_t.get("prefill_s", 0.0)
        timings["decode"] = dec_t.get("decode_s", 0.0)
        timings["total"] = time.perf_counter() - t0

        outputs = [RequestOutput(prompt=p, samples=[], timings=dict(timings)) for p in prompts]
        for r, (i, _) in enumerate(rows):
            res = results[r]
            latent = None if cond.latents is None else cond.latents[r]
            outputs[i].samples.append(
                Sample(res.text, list(res.token_ids), res.finish_reason, latent)
            )
        return outputs

    def repetition_processors(
        self, params: list[GenerationParams], rows: list[tuple[int, int]]
    ) -> tuple[NoRepeatNGram, ...]:
        """One NoRepeatNGram per n-gram size the rows ask for (a request's no_repeat_ngram_size,
        else the engine's default), each over its rows; none when every row has it off (0)."""
        by_size: dict[int, list[int]] = {}
        for r, (i, _) in enumerate(rows):
            size = params[i].no_repeat_ngram_size
            size = self.no_repeat_ngram_size if size is None else size
            if size:
                by_size.setdefault(size, []).append(r)
        return tuple(
            NoRepeatNGram(n, None if len(rs) == len(rows) else rs) for n, rs in by_size.items()
        )

    def info(self) -> dict:
        def parameters(net) -> dict:
            if not isinstance(net, torch.nn.Module):  # an ONNX graph
                return {}
            return {"parameters": sum(p.numel() for p in net.parameters())}

        d = self.dglm
        info = {
            "backend": self.backend,
            "encoder": d.config.encoder,
            "decoder": d.config.decoder,
            "latent_dim": d.encoder.dim,
            "decoder_width": self.decoder.hidden_size,
            "decoder_context": self.decoder.max_context,
            "score_network": {
                **d.config.score_network.__dict__,
                **parameters(d.score_net),
            },
            "prompt_generator": {
                **d.config.prompt_generator.__dict__,
                **parameters(d.prompt_gen),
            },
            "sampler": d.config.sampler.__dict__,
            "student": (
                None
                if d.student is None
                else {
                    **d.config.student.__dict__,
                    "cfg_range": list(d.config.student_cfg_range),
                    **parameters(d.student),
                }
            ),
            "cfg_scale": d.config.cfg_scale,
            "control_scale": d.config.control_scale,
            "decoder_lora": None
            if d.config.decoder_lora is None
            else d.config.decoder_lora.to_dict(),
            "trained": d.config.trained,
            "probes": {
                name: {"labels": list(p.labels), "metrics": p.metrics}
                for name, p in d.probes.probes.items()
            },
            "value_networks": {  # RE-Control, by probe
                name: {**net.config.to_dict(), **parameters(net)}
                for name, net in d.value_nets.items()
            },
            "steering_vectors": {  # CAA, by probe
                name: v.config.to_dict() for name, v in d.steering_vectors.items()
            },
            "guided_update": getattr(d.update_fn, "__name__", str(d.update_fn)),
            "fast_decode": self.decode_runner is not None,
            "decoder_quantized": quantize_label(self.decoder),
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
        }
        if self.onnx_models is not None:
            info.update(self.onnx_models.info())
        return info


def load_networks(
    config: BundleConfig, bundle_dir: Path
) -> tuple[ScoreNetwork, PromptGenerator, ScoreNetwork | None]:
    """DGLM's networks from a bundle directory: (score network, prompt generator, student)."""
    score_net = ScoreNetwork(config.score_network)
    bundle_io.load_state(score_net, bundle_dir / bundle_io.SCORE_NET_FILE)
    prompt_gen = PromptGenerator(config.prompt_generator)
    bundle_io.load_state(prompt_gen, bundle_dir / bundle_io.PROMPT_GEN_FILE)
    student = None
    if config.student is not None:
        student = ScoreNetwork(config.student)
        bundle_io.load_state(student, bundle_dir / bundle_io.STUDENT_FILE)
    return score_net, prompt_gen, student


def expand_rows(params: list[GenerationParams]) -> tuple[list[tuple[int, int]], list[int]]:
    """Requests → rows (request i, sample j), in that order, and each row's seed: the request's
    seed + j (a fresh random base when the request has no seed)."""
    rows = [(i, j) for i, p in enumerate(params) for j in range(p.num_samples)]
    seeds = []
    for i, j in rows:
        base = params[i].seed if params[i].seed is not None else random.getrandbits(62)
        seeds.append(base + j)
    return rows, seeds


def resolve_device(device: str | torch.device) -> torch.device:
    """The torch device named by `device`; ValueError naming it if torch cannot parse it or it is
    a CUDA device this machine does not have (no GPU, or a CPU-only torch build)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(
            f"device must name a torch device such as 'cpu' or 'cuda:0', got {device!r}"
        ) from e
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(
                f"device {str(device)!r} is not available: this machine has no CUDA GPU usable by "
                "torch (or torch is a CPU-only build); use device 'cpu'"
            )
        if dev.index is not None and dev.index >= count:
            raise ValueError(
                f"device {str(device)!r} is not available: this machine has {count} CUDA GPU(s), "
                f"cuda:0..cuda:{count - 1}"
            )
    return dev


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "float16": torch.float16,
        "fp16": torch.float16,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
    }
    if dtype not in table:
        raise ValueError(f"dtype must be one of {sorted(table)}, got {dtype!r}")
    return table[dtype]
