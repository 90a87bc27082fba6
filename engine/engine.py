"""The batched DGLM engine: prefix → latent proposal (guided) → soft prompt → decoder.

engine = Engine.from_pretrained("default")
outs = engine.generate(["The movie was"], GenerationParams(controls=(Control("sentiment", "positive"),)))
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path

import torch
from dglm.engine import bundle as bundle_io
from dglm.engine.api import GenerationParams, RequestOutput, Sample
from dglm.engine.bundle import BundleConfig
from dglm.engine.diffusion.sampler import Guidance, SamplerConfig, draw_noise, sample
from dglm.engine.diffusion.schedule import MULTISTEP_SAMPLERS
from dglm.engine.diffusion.score_network import ScoreNetwork
from dglm.engine.encode.encoder import SentenceEncoder
from dglm.engine.probes import Probe, ProbeSet, load_probes, save_probes
from dglm.engine.prompt.generator import PromptGenerator
from dglm.kernels.guided_update import select_guided_update
from safetensors.torch import load_file

logger = logging.getLogger(__name__)

STAGES = ("encode", "diffusion", "prompt_generator", "prefill", "decode")
FAST_DECODE_MAX_LEN = 256  # KV slots of the persistent decode runner (prefix + soft + new tokens)
FAST_DECODE_BATCHES = (1, 2, 4, 8, 16, 32)  # its batch buckets (rows beyond: no runner)


class Engine:
    def __init__(
        self,
        config: BundleConfig,
        encoder: SentenceEncoder,
        score_net: ScoreNetwork,
        prompt_gen: PromptGenerator,
        probes: list[Probe],
        decoder: torch.nn.Module,
        tokenizer,
        device: torch.device,
        dtype: torch.dtype,
        guided_update: str = "auto",
        cuda_graphs: bool = True,
        student: ScoreNetwork | None = None,
        fast_decode: bool = False,
    ) -> None:
        self.config = config
        self.encoder = encoder
        self.score_net = score_net.eval().to(device, dtype)
        self.prompt_gen = prompt_gen.eval().to(device, dtype)
        self.student = None if student is None else student.eval().to(device, dtype)
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
        # On CUDA the `fast` sampler step replays from CUDA graphs (one per batch bucket).
        self.cuda_graphs = cuda_graphs
        self.captured = self.captured_student = None
        self._capture_samplers()
        self.decode_runner = self._decode_runner() if fast_decode else None
        if not config.trained:
            logger.warning("bundle networks are untrained (random): outputs are not meaningful")

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
        fast_decode: bool = False,
    ) -> Engine:
        """backend="onnx": `path_or_name` is a `dglm export onnx` directory, run on ONNX Runtime
        (dglm.export.runtime.OnnxEngine; the export fixes the dtype, `dtype` is not used).
        fast_decode: decode with a persistent runner (CUDA graphs on CUDA, traced steps on CPU;
        each batch/length bucket pays a one-time capture or trace at its first use)."""
        if backend == "onnx":
            from dglm.export.runtime import OnnxEngine

            return OnnxEngine.from_exported(path_or_name, device, guided_update)
        if backend != "torch":
            raise ValueError(f"backend must be 'torch' or 'onnx', got {backend!r}")
        device = torch.device(device)
        dtype = _as_dtype(dtype)
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
        probes_path = bundle_dir / bundle_io.PROBES_FILE
        probes = load_probes(probes_path) if probes_path.exists() else []
        encoder = SentenceEncoder(
            bundle_io.resolve_reference(config.encoder, bundle_dir), device=device
        )
        decoder, tokenizer = bundle_io.load_bundle_decoder(config, bundle_dir, device, dtype)
        logger.info("loaded bundle %s (%d probes)", bundle_dir, len(probes))
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
        if config.decoder_lora is not None:  # already merged; kept to write the bundle back
            engine.decoder_lora_state = load_file(str(bundle_dir / bundle_io.LORA_FILE))
        return engine

    def save_pretrained(self, path: str | Path) -> None:
        """Write this engine's bundle (networks in fp16, probes in fp32) to `path`."""
        out = Path(path)
        bundle_io.write_config(self.config, out)
        bundle_io.save_state(self.score_net, out / bundle_io.SCORE_NET_FILE)
        bundle_io.save_state(self.prompt_gen, out / bundle_io.PROMPT_GEN_FILE)
        save_probes(out / bundle_io.PROBES_FILE, list(self.probes.probes.values()))
        if self.student is not None:
            bundle_io.save_state(self.student, out / bundle_io.STUDENT_FILE)
        if self.config.decoder_lora is not None:
            if self.decoder_lora_state is None:
                raise ValueError(
                    "config.decoder_lora is set but this engine holds no adapter weights to save"
                )
            bundle_io.save_lora(self.decoder_lora_state, out / bundle_io.LORA_FILE)

    def _decode_runner(self):
        """A persistent DecodeRunner: CUDA graphs per (batch, KV) bucket on CUDA; on CPU the
        decoder's weights go input-major and each bucket's step is a TorchScript trace (made at
        its first use, ~3 s each for SmolLM2; 1.5-1.6x Hugging Face `generate` at batch 1)."""
        from dglm.engine.decoding.runner import DecodeRunner, DecodeRunnerConfig

        max_len = min(FAST_DECODE_MAX_LEN, self.decoder.max_context)
        seq = tuple(s for s in (64, 128, 256, 512, 1024) if s < max_len) + (max_len,)
        if self.device.type == "cuda":
            config = DecodeRunnerConfig(max_len=max_len, seq_buckets=seq,
                                        batch_sizes=FAST_DECODE_BATCHES)  # fmt: skip
        else:
            self.decoder.use_input_major_weights()
            config = DecodeRunnerConfig(max_len=max_len, seq_buckets=seq, enforce_eager=True,
                                        step_impl="trace", batch_sizes=FAST_DECODE_BATCHES)  # fmt: skip
        return DecodeRunner(self.decoder, config)

    def _capture_samplers(self) -> None:
        """On CUDA the `fast` sampler step replays from CUDA graphs (one per batch bucket)."""
        if not (self.cuda_graphs and self.device.type == "cuda"):
            return
        from dglm.engine.diffusion.captured import CapturedSampler

        k = self.probes.num_rows  # the static guidance buffers are sized by the probe rows
        self.captured = CapturedSampler(self.score_net, k, guided_update=self.guided_update)
        if self.student is not None:
            self.captured_student = CapturedSampler(
                self.student, k, guided_update=self.guided_update
            )

    def add_probe(self, probe: Probe) -> None:
        self.probes.add(probe)
        if self.captured is not None:
            self._capture_samplers()

    # ---------------------------------------------------------------- generation
    def validate(self, prompts: list[str], params: list[GenerationParams]) -> list[list[int]]:
        """All user-input checks, before any model work; returns the prefix token ids."""
        if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
            raise ValueError(f"prompts must be a list of strings, got {type(prompts).__name__}")
        if not prompts:
            raise ValueError("prompts is empty: pass at least one prompt")
        if len(params) != len(prompts):
            raise ValueError(f"params has {len(params)} entries for {len(prompts)} prompts")
        prefix_ids = []
        p_len = self.config.prompt_generator.prompt_len
        for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(
                    f"prompts[{i}] is empty ({prompt!r}): every prompt needs some text"
                )
            self.probes.validate(p.controls)
            self._check_sampler(p.sampler_config(self.config.sampler), p)  # and the overrides
            ids = self.tokenizer.encode(prompt)
            total = len(ids) + p_len + p.max_new_tokens
            if total > self.decoder.max_context:
                raise ValueError(
                    f"max_new_tokens={p.max_new_tokens} for prompts[{i}] ({len(ids)} tokens + {p_len} "
                    f"soft-prompt vectors) exceeds the decoder's context of {self.decoder.max_context}"
                )
            prefix_ids.append(ids)
        return prefix_ids

    def _check_sampler(self, cfg: SamplerConfig, p: GenerationParams) -> None:
        if cfg.sampler != "consistency":
            return
        if self.student is None:
            raise ValueError(
                "sampler='consistency' needs a distilled student and this bundle has none: use "
                "'ddpm', 'ddim' or 'dpmpp-2m', or add one (`dglm train distill`, "
                "`dglm bundle add-student`)"
            )
        lo, hi = self.config.student_cfg_range
        w = p.cfg_scale if p.cfg_scale is not None else self.config.cfg_scale
        if not lo - 1e-6 <= w <= hi + 1e-6:
            raise ValueError(
                f"cfg_scale={w} is outside the range [{lo}, {hi}] the student was distilled for: "
                "pass a cfg_scale in that range or use sampler='dpmpp-2m'"
            )

    def generate(
        self,
        prompts: list[str],
        params: GenerationParams | list[GenerationParams] | None = None,
    ) -> list[RequestOutput]:
        """One output per prompt, in input order; each holds `num_samples` samples."""
        from dglm.engine.decoding.loop import DecodeParams

        if params is None:
            params = GenerationParams()
        if isinstance(params, GenerationParams):
            params = [params] * (len(prompts) if isinstance(prompts, (list, tuple)) else 1)
        params = list(params)
        prefix_ids = self.validate(prompts, params)

        timings = dict.fromkeys(STAGES, 0.0)
        t0 = time.perf_counter()
        # rows: one per sample; row → (request, sample index)
        rows = [(i, j) for i, p in enumerate(params) for j in range(p.num_samples)]
        seeds = []
        for i, j in rows:
            base = params[i].seed if params[i].seed is not None else random.getrandbits(62)
            seeds.append(base + j)

        t = time.perf_counter()
        ctx = self.encoder.latents(list(prompts)).to(self.device)  # (N, d)
        timings["encode"] = self._elapsed(t)

        t = time.perf_counter()
        x0 = torch.empty(len(rows), self.encoder.dim, device=self.device)
        renoise_noise = torch.empty_like(x0)
        renoise_a2 = torch.empty(len(rows), device=self.device)
        groups: dict[SamplerConfig, list[int]] = {}
        for r, (i, _) in enumerate(rows):
            groups.setdefault(params[i].sampler_config(self.config.sampler), []).append(r)
        for sampler_cfg, idx in groups.items():
            x0[idx], renoise_noise[idx] = self._sample_group(
                sampler_cfg, [rows[r] for r in idx], [seeds[r] for r in idx], ctx, params
            )
            renoise_a2[idx] = sampler_cfg.renoise_alpha2
        timings["diffusion"] = self._elapsed(t)

        t = time.perf_counter()
        with torch.inference_mode():
            a2 = renoise_a2[:, None]
            z = a2.sqrt() * x0 + (1 - a2).sqrt() * renoise_noise
            soft_prompt = self.prompt_gen(z.to(self.dtype), renoise_a2.to(self.dtype))  # (R, P, H)
        timings["prompt_generator"] = self._elapsed(t)

        decode_params = [
            DecodeParams(
                max_new_tokens=params[i].max_new_tokens,
                temperature=params[i].temperature,
                top_p=params[i].top_p,
                top_k=params[i].top_k,
                seed=seeds[r] ^ 0x5DEECE66D,
                stop=params[i].stop,
                ignore_eos=params[i].ignore_eos,
            )
            for r, (i, _) in enumerate(rows)
        ]
        results, dec_t = self._decode([prefix_ids[i] for i, _ in rows], decode_params, soft_prompt)
        timings["prefill"] = dec_t.get("prefill_s", 0.0)
        timings["decode"] = dec_t.get("decode_s", 0.0)
        timings["total"] = time.perf_counter() - t0

        outputs = [RequestOutput(prompt=p, samples=[], timings=dict(timings)) for p in prompts]
        latents = x0.float().cpu()
        for r, (i, _) in enumerate(rows):
            res = results[r]
            outputs[i].samples.append(
                Sample(res.text, list(res.token_ids), res.finish_reason, latents[r])
            )
        return outputs

    def _elapsed(self, start: float) -> float:
        """Seconds since `start` for a stage timing; on CUDA after the stage's kernels finish."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start

    def _decode(self, prefix_ids: list[list[int]], params: list, soft_prompt: torch.Tensor):
        """The decoding stage: (results, {"prefill_s", "decode_s", ...}); backends override it."""
        from dglm.engine.decoding.loop import generate as decode

        runner = self.decode_runner
        if runner is not None:  # batches or lengths past its buffers decode without it
            slots = max(map(len, prefix_ids)) + soft_prompt.shape[1]
            slots += max(p.max_new_tokens for p in params)
            if len(prefix_ids) > runner.max_batch or slots > runner.max_len:
                runner = None
        return decode(
            self.decoder, self.tokenizer, prefix_ids, params, soft_prompt=soft_prompt, runner=runner
        )

    @torch.no_grad()
    def _sample_group(
        self,
        cfg: SamplerConfig,
        rows: list[tuple[int, int]],
        seeds: list[int],
        ctx: torch.Tensor,
        params: list[GenerationParams],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Diffusion for the rows sharing one sampler config → (x̂0 (R, d), re-noising noise (R, d))."""
        d, n = self.encoder.dim, cfg.num_inference_steps
        gens = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
        noise = draw_noise(gens, n + 2, d, self.device)  # (steps + 2, R, d)
        req = [i for i, _ in rows]
        context = ctx[req]
        cfg_scale = torch.tensor(
            [
                params[i].cfg_scale if params[i].cfg_scale is not None else self.config.cfg_scale
                for i in req
            ],
            device=self.device,
        )
        student = cfg.sampler == "consistency"
        use_cfg = not student and bool((cfg_scale != 1.0).any())
        targets, scales = self.probes.batch_targets([params[i].controls for i in req])
        guidance = Guidance(
            self.probes.weight.to(self.device),
            self.probes.bias.to(self.device),
            targets.to(self.device),
            scales.to(self.device),
        )
        net, dt = (self.student if student else self.score_net), self.dtype
        captured = self.captured_student if student else self.captured

        def model_fn(
            z: torch.Tensor, alpha2: torch.Tensor
        ) -> tuple[torch.Tensor, torch.Tensor | None]:
            if student:  # w is an input: one evaluation per step, no null-context rows
                return net(z.to(dt), context.to(dt), alpha2.to(dt), None, cfg_scale.to(dt)), None
            if not use_cfg:
                return net(z.to(dt), context.to(dt), alpha2.to(dt)).float(), None
            b = z.shape[0]
            drop = torch.arange(2 * b, device=z.device) >= b  # second half: null context
            v = net(
                torch.cat((z, z)).to(dt),
                torch.cat((context, context)).to(dt),
                torch.cat((alpha2, alpha2)).to(dt),
                drop,
            )
            return v[:b].float(), v[b:].float()

        mc = None
        if cfg.guidance_mode == "exact":

            def mc(step: int) -> torch.Tensor:
                return torch.stack([torch.randn(cfg.mc_samples, d, generator=g) for g in gens]).to(
                    self.device
                )

        if (
            captured is not None
            and cfg.guidance_mode == "fast"
            and cfg.sampler not in MULTISTEP_SAMPLERS
            and n <= captured.max_steps
        ):
            x0 = captured.sample(noise[: n + 1], cfg, context, cfg_scale, guidance)
        else:
            x0 = sample(model_fn, noise[: n + 1], cfg, cfg_scale, guidance, self.update_fn, mc)
        return x0, noise[n + 1]

    def info(self) -> dict:
        return {
            "encoder": self.config.encoder,
            "decoder": self.config.decoder,
            "latent_dim": self.encoder.dim,
            "decoder_width": self.decoder.hidden_size,
            "decoder_context": self.decoder.max_context,
            "score_network": {
                **self.config.score_network.__dict__,
                "parameters": sum(p.numel() for p in self.score_net.parameters()),
            },
            "prompt_generator": {
                **self.config.prompt_generator.__dict__,
                "parameters": sum(p.numel() for p in self.prompt_gen.parameters()),
            },
            "sampler": self.config.sampler.__dict__,
            "student": (
                None
                if self.student is None
                else {
                    **self.config.student.__dict__,
                    "cfg_range": list(self.config.student_cfg_range),
                    "parameters": sum(p.numel() for p in self.student.parameters()),
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
            "guided_update": getattr(self.update_fn, "__name__", str(self.update_fn)),
            "fast_decode": self.decode_runner is not None,
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
        }


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
