"""The batched DGLM engine: prefix → latent proposal (guided) → soft prompt → decoder.

engine = Engine.from_pretrained("default")
outs = engine.generate(["The movie was"], GenerationParams(controls=(Control("sentiment", "positive"),)))
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch
from dglm.engine import bundle as bundle_io
from dglm.engine.api import GenerationParams, RequestOutput, Sample, check_prompts
from dglm.engine.bundle import BundleConfig
from dglm.engine.decoding.loop import TokenStream, companion_count
from dglm.engine.decoding.loop import generate as decode
from dglm.engine.decoding.runner import DecodeRunner, DecodeRunnerConfig
from dglm.engine.decoding.sampling import (
    DecodeParams,
    DecodeResult,
    LogitsProcessor,
    NoRepeatNGram,
)
from dglm.engine.diffusion.captured import CapturedSampler
from dglm.engine.diffusion.score_network import ScoreNetwork
from dglm.engine.encode.encoder import SentenceEncoder
from dglm.engine.methods.base import Method, MethodBatch
from dglm.engine.methods.caa import CAA, SteeringVector, check_decoder, save_steering_vectors
from dglm.engine.methods.dglm import DGLM
from dglm.engine.methods.re_control import ReControl, ValueNetwork
from dglm.engine.models.base import Decoder, HiddenHook
from dglm.engine.models.quant import quantize_label, resolve_quantize
from dglm.engine.probes import Control, Probe, ProbeSet, save_probes, with_implied
from dglm.engine.prompt.generator import PromptGenerator
from dglm.export.runtime import OrtModels, RuntimeOptions, load_export
from dglm.kernels import llama_step
from dglm.kernels.guided_update import select_guided_update

logger = logging.getLogger(__name__)

STAGES = ("encode", "diffusion", "prompt_generator", "prefill", "decode")
FAST_DECODE_MAX_LEN = 256  # KV slots of the persistent decode runner (prefix + soft + new tokens)
FAST_DECODE_BATCHES = (1, 2, 4, 8, 16, 32)  # its batch buckets (rows beyond: no runner)


class Engine:
    """The loaded bundle (or ONNX export) and the one decode loop behind `generate`.

    Backends: "torch" (the bundle's networks and a compact torch decoder: eager steps, or a
    persistent DecodeRunner with `fast_decode`) or "onnx" (`dglm export onnx` graphs on ONNX
    Runtime, `dglm.export.runtime`; the same Engine, its networks and decoder swapped for the
    graphs). Methods (`dglm.engine.methods`): DGLM by default, any `Method` per call.

    Threads: one call at a time. `generate`, `validate` and `add_probe` hold the engine's lock for
    the whole call (its decode runner's KV buffers and step state, the captured samplers' static
    buffers, the tokenizers and the probe set are shared by every call), so calls from several
    threads run one after another, each returning what it returns alone. A call made from inside
    another on the same thread (an `on_tokens` hook or a method calling back into the engine) is
    refused with RuntimeError: it would decode on the buffers the outer call is using.
    """

    def __init__(
        self,
        config: BundleConfig,
        encoder: SentenceEncoder,
        score_net: ScoreNetwork,
        prompt_gen: PromptGenerator,
        probes: list[Probe],
        decoder: Decoder,  # or the ONNX backend's OrtDecoder
        tokenizer,
        device: torch.device,
        dtype: torch.dtype,
        guided_update: str = "auto",
        cuda_graphs: bool = True,
        student: ScoreNetwork | None = None,
        fast_decode: bool = False,
        onnx_models: OrtModels | None = None,
    ) -> None:
        self.encoder = encoder
        # the ONNX backend passes its graphs' stand-ins (no .eval() / .to(): the export fixed them)
        self.onnx_models = onnx_models
        self.backend = "torch" if onnx_models is None else "onnx"
        if self.backend == "onnx" and config.prompt_guidance != 1.0:
            # prompt guidance's unconditional stream is a PyTorch decoder pass: not exported yet
            logger.warning(
                "the bundle's prompt_guidance=%g is not available on ONNX Runtime: decoding "
                "without it (requests that ask for it explicitly are refused)",
                config.prompt_guidance,
            )
            config = replace(config, prompt_guidance=1.0)
        self.config = config
        torch_nets = onnx_models is None
        self.score_net = score_net.eval().to(device, dtype) if torch_nets else score_net
        self.prompt_gen = prompt_gen.eval().to(device, dtype) if torch_nets else prompt_gen
        self.student = student
        if student is not None and torch_nets:
            self.student = student.eval().to(device, dtype)
        if (student is None) != (config.student is None):
            raise ValueError(
                "the bundle config and the networks disagree about the distilled student: "
                f"config.student is {'set' if config.student else 'None'}, student network "
                f"{'given' if student is not None else 'missing'}"
            )
        self.decoder = decoder
        self.tokenizer = tokenizer
        # the bundle's decoder adapters (merged into `decoder` already), for save_pretrained
        self.decoder_lora_state: dict[str, torch.Tensor] | None = None
        self.bundle_dir: Path | None = None  # where from_pretrained read the bundle
        self.device, self.dtype = device, dtype
        if encoder.dim != config.score_network.latent_dim:
            raise ValueError(
                f"encoder {config.encoder!r} is {encoder.dim}-d but the score network expects "
                f"{config.score_network.latent_dim}-d latents"
            )
        if decoder.hidden_size != config.prompt_generator.decoder_dim:
            raise ValueError(
                f"decoder {config.decoder!r} has width {decoder.hidden_size} but the prompt generator "
                f"emits {config.prompt_generator.decoder_dim}-d vectors"
            )
        self.probes = ProbeSet(probes, encoder.dim, config.control_scale)
        self.guided_update = guided_update
        self.update_fn = select_guided_update(device, guided_update)
        # On CUDA the `fast` sampler step replays from CUDA graphs (one per batch bucket); the
        # ONNX backend captures its own graphs instead.
        self.cuda_graphs = cuda_graphs and torch_nets
        self.captured = self.captured_student = None
        self._capture_samplers()
        self.decode_runner = None  # the persistent torch DecodeRunner (fast_decode)
        if fast_decode and torch_nets:
            self.decode_runner = self._decode_runner()
        self.dglm = DGLM(self)  # the default method
        # RE-Control's value networks by probe (`dglm train value`); from_pretrained loads them
        self.value_nets: dict[str, ValueNetwork] = {}
        # CAA's steering vectors by probe (`dglm train steering-vector`); from_pretrained loads them
        self.steering_vectors: dict[str, SteeringVector] = {}
        self._lock = threading.Lock()  # held by the call in progress (see the class docstring)
        self._holder: int | None = None  # that call's thread (threading.get_ident())
        if not config.trained:
            logger.warning("bundle networks are untrained (random): outputs are not meaningful")

    @property
    def re_control(self) -> ReControl:
        """RE-Control on its own (no soft prompt): every control of a request acts through its
        probe's value network; `engine.generate(prompts, params, method=engine.re_control)`."""
        return ReControl(self.value_nets, self.probes.probes, getattr(self.decoder, "logits", None))

    @property
    def caa(self) -> CAA:
        """CAA on its own (no soft prompt): every control of a request acts through its probe's
        steering vector (RE-Control's through their value networks);
        `engine.generate(prompts, params, method=engine.caa)`."""
        dec = self.decoder
        return CAA(
            self.steering_vectors, dec.num_layers, dec.hidden_size, self.value_nets,
            self.probes.probes, getattr(dec, "logits", None),
        )  # fmt: skip

    def add_steering_vector(self, vector: SteeringVector) -> None:
        """Use `vector` for its probe (checked against the decoder and the probe's labels)."""
        with self._exclusive("add_steering_vector"):
            c = vector.config
            probe = self.probes.probes.get(c.probe)
            check_decoder(vector, probe, self.decoder.num_layers, self.decoder.hidden_size)
            self.steering_vectors[c.probe] = vector

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
        `DiffusionLMEngine` (the same `generate(prompts, params)` → RequestOutput list); the
        decoder options do not apply to it."""
        device = resolve_device(device)
        if backend == "torch":
            from dglm.engine.methods.diffusion_lm.bundle import is_diffusion_lm_bundle

            if is_diffusion_lm_bundle(path_or_name):
                from dglm.engine.methods.diffusion_lm import DiffusionLMEngine

                return DiffusionLMEngine.from_pretrained(path_or_name, device=str(device))
        if backend == "onnx":
            exp = load_export(path_or_name, device, onnx_options)
            m = exp.models
            return cls(
                exp.config, exp.encoder, m.score_net, m.prompt_gen, exp.probes, m.decoder,
                exp.tokenizer, m.device, m.score_net.dtype, guided_update, student=m.student,
                onnx_models=m,
            )  # fmt: skip
        if backend != "torch":
            raise ValueError(f"backend must be 'torch' or 'onnx', got {backend!r}")
        dtype = _as_dtype(dtype)
        if quantize not in ("none", "auto") and dtype != torch.float32:
            raise ValueError(f"quantize={quantize!r} needs dtype float32, got {dtype}")
        quantize = resolve_quantize(quantize, device, dtype)
        bundle_dir = bundle_io.resolve_bundle_dir(path_or_name)
        config = bundle_io.read_config(bundle_dir)
        score_net = ScoreNetwork(config.score_network)
        bundle_io.load_state(score_net, bundle_dir / bundle_io.SCORE_NET_FILE)
        prompt_gen = PromptGenerator(config.prompt_generator)
        bundle_io.load_state(prompt_gen, bundle_dir / bundle_io.PROMPT_GEN_FILE)
        student = None
        if config.student is not None:
            student = ScoreNetwork(config.student)
            bundle_io.load_state(student, bundle_dir / bundle_io.STUDENT_FILE)
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
        engine = cls(
            config,
            encoder,
            score_net,
            prompt_gen,
            probes,
            decoder,
            tokenizer,
            device,
            dtype,
            guided_update,
            cuda_graphs,
            student,
            fast_decode,
        )
        engine.bundle_dir = bundle_dir
        nets = bundle_io.load_value_networks(config, bundle_dir)
        engine.value_nets = {k: v.to(device) for k, v in nets.items()}
        for vector in bundle_io.load_bundle_steering_vectors(config, bundle_dir).values():
            try:
                engine.add_steering_vector(vector)
            except ValueError as e:
                raise ValueError(f"{bundle_dir / bundle_io.STEERING_VECTORS_FILE}: {e}") from None
        if config.decoder_lora is not None:  # already merged; kept to write the bundle back
            engine.decoder_lora_state = bundle_io.read_safetensors(bundle_dir / bundle_io.LORA_FILE)
        engine.check_implied_controls()
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
        bundle_io.write_config(self.config, out)
        bundle_io.save_state(self.score_net, out / bundle_io.SCORE_NET_FILE)
        bundle_io.save_state(self.prompt_gen, out / bundle_io.PROMPT_GEN_FILE)
        save_probes(out / bundle_io.PROBES_FILE, list(self.probes.probes.values()))
        if self.value_nets:
            bundle_io.save_value_networks(self.value_nets, out / bundle_io.VALUE_NETS_FILE)
        if self.student is not None:
            bundle_io.save_state(self.student, out / bundle_io.STUDENT_FILE)
        if self.steering_vectors:
            save_steering_vectors(self.steering_vectors, out / bundle_io.STEERING_VECTORS_FILE)
        if self.config.decoder_lora is not None:
            if self.decoder_lora_state is None:
                raise ValueError(
                    "config.decoder_lora is set but this engine holds no adapter weights to save"
                )
            bundle_io.save_lora(self.decoder_lora_state, out / bundle_io.LORA_FILE)

    def _decode_runner(self) -> DecodeRunner:
        """A persistent DecodeRunner: CUDA graphs per (batch, KV) bucket on CUDA; on CPU the
        fused C++ step for an int8 Llama-family decoder (the default), else the decoder's weights
        go input-major and each bucket's step is a TorchScript trace (made at its first use,
        ~3 s each for SmolLM2)."""
        max_len = min(FAST_DECODE_MAX_LEN, self.decoder.max_context)
        seq = tuple(s for s in (64, 128, 256, 512, 1024) if s < max_len) + (max_len,)
        if self.device.type == "cuda":
            config = DecodeRunnerConfig(max_len=max_len, seq_buckets=seq,
                                        batch_sizes=FAST_DECODE_BATCHES)  # fmt: skip
        else:
            if self.decoder.quantized == "none":  # (an int8 decoder's matrices are its own)
                self.decoder.use_input_major_weights()
            config = DecodeRunnerConfig(max_len=max_len, seq_buckets=seq, enforce_eager=True,
                                        step_impl="fused", batch_sizes=FAST_DECODE_BATCHES)  # fmt: skip
        return DecodeRunner(self.decoder, config)

    def _capture_samplers(self) -> None:
        """On CUDA the `fast` sampler step replays from CUDA graphs (one per batch bucket)."""
        if not (self.cuda_graphs and self.device.type == "cuda"):
            return
        k = self.probes.num_rows  # the static guidance buffers are sized by the probe rows
        self.captured = CapturedSampler(self.score_net, k, guided_update=self.guided_update)
        if self.student is not None:
            self.captured_student = CapturedSampler(
                self.student, k, guided_update=self.guided_update
            )

    def add_probe(self, probe: Probe) -> None:
        with self._exclusive("add_probe"):
            self.probes.add(probe)
            if self.captured is not None:
                self._capture_samplers()

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
                if self.backend != "torch" and any(c.hidden for c in controls[len(p.controls) :]):
                    raise ValueError(
                        f"params[{i}]: the bundle implies "
                        f"{[f'{c.probe}={c.target}@{c.method}' for c in controls[len(p.controls) :]]}"
                        f" for these controls (config.json implied_controls), which act through "
                        "RE-Control, not in the ONNX decode graph: pass implied_controls=False or "
                        "use backend='torch'"
                    )
                p = replace(p, controls=controls)
            out.append(p)
        return out

    def _validate(
        self, prompts: list[str], params: list[GenerationParams], method: Method | None
    ) -> list[list[int]]:
        check_prompts(prompts)
        if not isinstance(params, (list, tuple)):
            raise ValueError(
                f"params must be a list of GenerationParams, got {type(params).__name__}"
            )
        if len(params) != len(prompts):
            raise ValueError(f"params has {len(params)} entries for {len(prompts)} prompts")
        prefix_ids = []
        p_len = self.config.prompt_generator.prompt_len
        for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
            if not isinstance(p, GenerationParams):  # a dict is refused too: no silent defaults
                raise ValueError(
                    f"params[{i}] must be a GenerationParams, got {type(p).__name__} {p!r} "
                    "(for a dict d: GenerationParams(**d))"
                )
            self.probes.validate(p.controls)
            ids = self.tokenizer.encode(prompt)
            total = len(ids) + p_len + p.max_new_tokens
            if total > self.decoder.max_context:
                raise ValueError(
                    f"max_new_tokens={p.max_new_tokens} for prompts[{i}] ({len(ids)} tokens + {p_len} "
                    f"soft-prompt vectors) exceeds the decoder's context of {self.decoder.max_context}"
                )
            prefix_ids.append(ids)
        (method or self.dglm).validate(params)
        return prefix_ids

    def generate(
        self,
        prompts: list[str],
        params: GenerationParams | list[GenerationParams] | None = None,
        method: Method | None = None,
        on_tokens: TokenStream | None = None,
    ) -> list[RequestOutput]:
        """One output per prompt, in input order; each holds `num_samples` samples.
        `method`: how the rows are conditioned (default: DGLM, `self.dglm`).
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
        method: Method | None,
        on_tokens: TokenStream | None,
    ) -> list[RequestOutput]:
        method = method or self.dglm
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
        # rows: one per sample; row → (request, sample index)
        rows = [(i, j) for i, p in enumerate(params) for j in range(p.num_samples)]
        seeds = []
        for i, j in rows:
            base = params[i].seed if params[i].seed is not None else random.getrandbits(62)
            seeds.append(base + j)
        batch = MethodBatch(list(prompts), params, prefix_ids, rows, seeds, self.tokenizer)
        cond = method.condition(batch)
        timings.update(cond.timings)

        decode_params = [method.decode_params(params[i], seeds[r]) for r, (i, _) in enumerate(rows)]
        processors = (*cond.processors, *self.repetition_processors(params, rows))
        # the method's hooks go along only when set: benchmarks swap in their own
        # `_decode(prefix_ids, params, soft_prompt)` (HF generate on the same soft prompts)
        hooks = {"processors": processors} if processors else {}
        if cond.hidden_hook is not None:
            hooks["hidden_hook"] = cond.hidden_hook
        if cond.residual is not None:
            hooks["residual"] = cond.residual
        if on_tokens is not None:
            hooks["on_tokens"] = on_tokens
        row_ids = [prefix_ids[i] for i, _ in rows]
        results, dec_t = self._decode(row_ids, decode_params, cond.soft_prompt, **hooks)
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
        else the bundle's), each over its rows; none when every row has it off (0)."""
        default = self.config.no_repeat_ngram_size
        by_size: dict[int, list[int]] = {}
        for r, (i, _) in enumerate(rows):
            size = params[i].no_repeat_ngram_size
            size = default if size is None else size
            if size:
                by_size.setdefault(size, []).append(r)
        return tuple(
            NoRepeatNGram(n, None if len(rs) == len(rows) else rs) for n, rs in by_size.items()
        )

    def _decode(
        self,
        prefix_ids: list[list[int]],
        params: list[DecodeParams],
        soft_prompt: torch.Tensor | None,
        processors: tuple[LogitsProcessor, ...] = (),
        hidden_hook: HiddenHook | None = None,
        on_tokens: TokenStream | None = None,
        residual: torch.Tensor | None = None,
    ) -> tuple[list[DecodeResult], dict[str, float]]:
        """The decoding stage: the one loop on this engine's backend → (results, timings).
        The torch backend's persistent runner takes the batches it can (see its can_run)."""
        if self.backend == "onnx":
            runner = self.decoder
        else:
            runner = self.decode_runner
            slots = max(map(len, prefix_ids)) + max(p.max_new_tokens for p in params)
            slots += 0 if soft_prompt is None else soft_prompt.shape[1]
            rows = len(prefix_ids) + companion_count(processors)  # + prompt guidance's stream
            if runner is not None and not runner.can_run(rows, slots, hidden_hook):
                runner = None  # past its buffers, or a hook it cannot run: an eager loop
        return decode(
            self.decoder, self.tokenizer, prefix_ids, params, soft_prompt, runner=runner,
            processors=processors, hidden_hook=hidden_hook, on_tokens=on_tokens,
            residual=residual,
        )  # fmt: skip

    def info(self) -> dict:
        def parameters(net) -> dict:
            if not isinstance(net, torch.nn.Module):  # an ONNX graph
                return {}
            return {"parameters": sum(p.numel() for p in net.parameters())}

        info = {
            "backend": self.backend,
            "encoder": self.config.encoder,
            "decoder": self.config.decoder,
            "latent_dim": self.encoder.dim,
            "decoder_width": self.decoder.hidden_size,
            "decoder_context": self.decoder.max_context,
            "score_network": {
                **self.config.score_network.__dict__,
                **parameters(self.score_net),
            },
            "prompt_generator": {
                **self.config.prompt_generator.__dict__,
                **parameters(self.prompt_gen),
            },
            "sampler": self.config.sampler.__dict__,
            "student": (
                None
                if self.student is None
                else {
                    **self.config.student.__dict__,
                    "cfg_range": list(self.config.student_cfg_range),
                    **parameters(self.student),
                }
            ),
            "cfg_scale": self.config.cfg_scale,
            "control_scale": self.config.control_scale,
            "decoder_lora": None
            if self.config.decoder_lora is None
            else self.config.decoder_lora.to_dict(),
            "trained": self.config.trained,
            "probes": {
                name: {"labels": list(p.labels), "metrics": p.metrics}
                for name, p in self.probes.probes.items()
            },
            "value_networks": {  # RE-Control, by probe
                name: {**net.config.to_dict(), **parameters(net)}
                for name, net in self.value_nets.items()
            },
            "steering_vectors": {  # CAA, by probe
                name: v.config.to_dict() for name, v in self.steering_vectors.items()
            },
            "guided_update": getattr(self.update_fn, "__name__", str(self.update_fn)),
            "fast_decode": self.decode_runner is not None,
            "decoder_quantized": quantize_label(self.decoder),
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
        }
        if self.onnx_models is not None:
            info.update(self.onnx_models.info())
        return info


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
