"""DGLM (Lovelace et al., 2024, "Diffusion Guided Language Modeling") as a `Method`: prefix →
sentence-encoder latent → semantic diffusion (score network, CFG, probe guidance) proposes x̂0 →
re-noised to alpha² → the prompt generator's soft-prompt vectors, spliced after each prefix.

It runs on its bundle's networks (torch modules, or their ONNX Runtime stand-ins).
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace

import torch
from dglm.engine.api import GenerationParams
from dglm.engine.bundle import BundleConfig
from dglm.engine.decoding.guidance import PromptGuidance
from dglm.engine.diffusion.captured import CapturedSampler
from dglm.engine.diffusion.sampler import Guidance, SamplerConfig, draw_noise, sample
from dglm.engine.diffusion.schedule import MULTISTEP_SAMPLERS
from dglm.engine.diffusion.score_network import ScoreNetwork
from dglm.engine.encode.encoder import SentenceEncoder
from dglm.engine.methods.base import Conditioning, Method, MethodBatch
from dglm.engine.methods.caa import SteeringVector, caa_residual, check_caa_controls
from dglm.engine.methods.re_control import ValueNetwork, value_conditioning
from dglm.engine.probes import Probe, ProbeSet
from dglm.engine.prompt.generator import PromptGenerator
from dglm.kernels.guided_update import select_guided_update

logger = logging.getLogger(__name__)


def elapsed(device: torch.device, start: float) -> float:
    """Seconds since `start` for a stage timing; on CUDA after the stage's kernels finish."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def resolve_sampler(config: BundleConfig, p: GenerationParams) -> SamplerConfig:
    """A request's sampler on a bundle: `p`'s overrides of the bundle's default, checked against
    what the bundle has (a student for "consistency", run within the cfg range it was distilled
    for, and within the sampler's step range). Needs no model: `dglm generate` runs it before
    loading one."""
    if (p.sampler or config.sampler.sampler) == "consistency" and config.student is None:
        raise ValueError(
            "sampler='consistency' needs a distilled student and this bundle has none: use "
            "'ddpm', 'ddim' or 'dpmpp-2m', or add one (`dglm train distill`, "
            "`dglm bundle add-student`)"
        )
    cfg = p.sampler_config(config.sampler)  # the sampler's step range
    if cfg.sampler == "consistency":
        lo, hi = config.student_cfg_range
        w = p.cfg_scale if p.cfg_scale is not None else config.cfg_scale
        if not lo - 1e-6 <= w <= hi + 1e-6:
            raise ValueError(
                f"cfg_scale={w} is outside the range [{lo}, {hi}] the student was distilled for: "
                "pass a cfg_scale in that range or use sampler='dpmpp-2m'"
            )
    return cfg


def check_encoder(config: BundleConfig, encoder: SentenceEncoder) -> None:
    """ValueError unless the encoder's latents have the width the score network expects."""
    if encoder.dim != config.score_network.latent_dim:
        raise ValueError(
            f"encoder {config.encoder!r} is {encoder.dim}-d but the score network expects "
            f"{config.score_network.latent_dim}-d latents"
        )


class DGLM(Method):
    """DGLM from its bundle parts: the sentence encoder, the score network (and its distilled
    student), the prompt generator, the probes and RE-Control's value networks (for controls with
    method "re-control" or "both"). Timings "encode", "diffusion", "prompt_generator".

    backend: "torch", or "onnx" when the networks are an ONNX export's stand-ins (no `.eval()` /
    `.to()`: the export fixed them; prompt guidance and hidden-state edits are refused, the ONNX
    decode graph has neither). On CUDA the `fast` sampler step replays from CUDA graphs, one per
    batch bucket (`cuda_graphs`)."""

    name = "dglm"

    def __init__(
        self,
        config: BundleConfig,
        encoder: SentenceEncoder,
        score_net: ScoreNetwork,
        prompt_gen: PromptGenerator,
        probes: ProbeSet,
        value_nets: dict[str, ValueNetwork],
        device: torch.device,
        dtype: torch.dtype,
        student: ScoreNetwork | None = None,
        guided_update: str = "auto",
        cuda_graphs: bool = True,
        backend: str = "torch",
        steering_vectors: dict[str, SteeringVector] | None = None,
        decoder_shape: tuple[int, int] = (0, 0),
    ) -> None:
        """steering_vectors: CAA's, by probe, for controls with method "caa"; decoder_shape: the
        decoder's (blocks, width) they are added in."""
        if backend == "onnx" and config.prompt_guidance != 1.0:
            # prompt guidance's unconditional stream is a PyTorch decoder pass: not exported yet
            logger.warning(
                "the bundle's prompt_guidance=%g is not available on ONNX Runtime: decoding "
                "without it (requests that ask for it explicitly are refused)",
                config.prompt_guidance,
            )
            config = replace(config, prompt_guidance=1.0)
        if (student is None) != (config.student is None):
            raise ValueError(
                "the bundle config and the networks disagree about the distilled student: "
                f"config.student is {'set' if config.student else 'None'}, student network "
                f"{'given' if student is not None else 'missing'}"
            )
        check_encoder(config, encoder)
        torch_nets = backend == "torch"
        if torch_nets:
            score_net = score_net.eval().to(device, dtype)
            prompt_gen = prompt_gen.eval().to(device, dtype)
            student = None if student is None else student.eval().to(device, dtype)
        self.config, self.encoder, self.probes, self.value_nets = (
            config,
            encoder,
            probes,
            value_nets,
        )
        self.score_net, self.prompt_gen, self.student = score_net, prompt_gen, student
        self.device, self.dtype, self.backend = device, dtype, backend
        self.steering_vectors = {} if steering_vectors is None else steering_vectors
        self.decoder_shape = decoder_shape
        self.prompt_len = config.prompt_generator.prompt_len
        self.guided_update = guided_update
        self.update_fn = select_guided_update(device, guided_update)
        self.cuda_graphs = cuda_graphs and torch_nets
        self.captured = self.captured_student = None
        self._capture_samplers()

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
        """Add (or replace) a probe; the captured samplers are re-recorded for its rows."""
        self.probes.add(probe)
        if self.captured is not None:
            self._capture_samplers()

    def validate(self, params: list[GenerationParams]) -> None:
        for i, p in enumerate(params):
            self.probes.validate(p.controls)
            for c in p.controls:
                if c.hidden and self.backend != "torch":
                    raise ValueError(
                        f"params[{i}].controls: method={c.method!r} edits the decoder's hidden "
                        "states in the decode loop, which the ONNX decode graph does not include: "
                        "use method='dglm' or backend='torch'"
                    )
                if c.hidden and c.probe not in self.value_nets:
                    raise ValueError(
                        f"params[{i}].controls: probe {c.probe!r} has no RE-Control value "
                        f"network in this bundle (value networks: {sorted(self.value_nets) or 'none'}"
                        "); train one with `dglm train value` or use method='dglm'"
                    )
                if c.residual and self.backend != "torch":
                    raise ValueError(
                        f"params[{i}].controls: method='caa' adds a steering vector inside the "
                        "decoder's blocks, which the ONNX decode graph does not include: use "
                        "method='dglm' or backend='torch'"
                    )
            guided = (
                p.prompt_guidance if p.prompt_guidance is not None else self.config.prompt_guidance
            )
            if guided != 1.0 and self.backend != "torch":
                raise ValueError(
                    f"prompt_guidance={guided} runs a second decoder stream in PyTorch, which the "
                    "ONNX backend does not have: pass prompt_guidance=1 or use backend='torch'"
                )
            cfg = resolve_sampler(self.config, p)
            exact = cfg.guidance_mode == "exact"
            if p.controls and exact and not isinstance(self.score_net, torch.nn.Module):
                raise ValueError(
                    "guidance_mode='exact' differentiates through the score network, which the "
                    "ONNX backend cannot; use guidance_mode='fast' or backend='torch'"
                )
        check_caa_controls(self.steering_vectors, params, False)

    def condition(self, batch: MethodBatch) -> Conditioning:
        rows, params = batch.rows, batch.params
        timings = {}
        t = time.perf_counter()
        ctx = self.encoder.latents(list(batch.prompts)).to(self.device)  # (N, d)
        timings["encode"] = elapsed(self.device, t)

        t = time.perf_counter()
        x0 = torch.empty(len(rows), self.encoder.dim, device=self.device)
        renoise_noise = torch.empty_like(x0)
        renoise_a2 = torch.empty(len(rows), device=self.device)
        groups: dict[SamplerConfig, list[int]] = {}
        for r, (i, _) in enumerate(rows):
            groups.setdefault(params[i].sampler_config(self.config.sampler), []).append(r)
        for sampler_cfg, idx in groups.items():
            x0[idx], renoise_noise[idx] = self.sample_group(
                sampler_cfg, [rows[r] for r in idx], [batch.seeds[r] for r in idx], ctx, params
            )
            renoise_a2[idx] = sampler_cfg.renoise_alpha2
        timings["diffusion"] = elapsed(self.device, t)

        t = time.perf_counter()
        with torch.inference_mode():
            a2 = renoise_a2[:, None]
            z = a2.sqrt() * x0 + (1 - a2).sqrt() * renoise_noise
            soft_prompt = self.prompt_gen(z.to(self.dtype), renoise_a2.to(self.dtype))  # (R, P, H)
        timings["prompt_generator"] = elapsed(self.device, t)
        processors = self.prompt_guidance(batch)
        hook, masks = value_conditioning(
            self.value_nets, self.probes.probes, batch, False, self.device, batch.lm_head
        )
        processors = (*processors, *masks)  # the mask acts on the guided scores
        residual = None  # controls with method "caa": their steering vectors (methods.caa)
        if self.steering_vectors:
            layers, width = self.decoder_shape
            residual = caa_residual(self.steering_vectors, batch, False, layers, width)
        return Conditioning(
            soft_prompt=soft_prompt,
            processors=processors,
            hidden_hook=hook,
            residual=residual,
            latents=x0.float().cpu(),
            timings=timings,
        )

    def guidance_scale(self, p: GenerationParams) -> float:
        """A request's prompt-guidance scale: its own, else the bundle's default."""
        return self.config.prompt_guidance if p.prompt_guidance is None else p.prompt_guidance

    def prompt_guidance(self, batch: MethodBatch) -> tuple[PromptGuidance, ...]:
        """The PromptGuidance processor when a row is guided (scale ≠ 1), else none."""
        scales = [self.guidance_scale(batch.params[i]) for i, _ in batch.rows]
        if all(s == 1.0 for s in scales):
            return ()
        prefixes = [batch.prefix_ids[i] for i, _ in batch.rows]
        return (PromptGuidance(prefixes, scales, self.config.prompt_plausibility),)

    @torch.no_grad()
    def sample_group(
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
        # controls acting through the latent (RE-Control-only ones act in the decode loop)
        latent = [tuple(c for c in params[i].controls if c.latent) for i in req]
        targets, scales = self.probes.batch_targets(latent)
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


__all__ = ["DGLM", "check_encoder", "elapsed", "resolve_sampler"]
