"""DGLM (Lovelace et al., 2024, "Diffusion Guided Language Modeling") as a `Method`: prefix →
sentence-encoder latent → semantic diffusion (score network, CFG, probe guidance) proposes x̂0 →
re-noised to alpha² → the prompt generator's soft-prompt vectors, spliced after each prefix.

It runs on the engine's networks (torch modules, or their ONNX Runtime stand-ins).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch
from dglm.engine.api import GenerationParams
from dglm.engine.bundle import BundleConfig
from dglm.engine.decoding.guidance import PromptGuidance
from dglm.engine.diffusion.sampler import Guidance, SamplerConfig, draw_noise, sample
from dglm.engine.diffusion.schedule import MULTISTEP_SAMPLERS
from dglm.engine.methods.base import Conditioning, Method, MethodBatch
from dglm.engine.methods.caa import caa_residual, check_caa_controls
from dglm.engine.methods.re_control import value_conditioning

if TYPE_CHECKING:  # annotations only: the engine builds its DGLM method
    from dglm.engine.engine import Engine


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


class DGLM(Method):
    """The engine's own method: timings "encode", "diffusion", "prompt_generator"."""

    name = "dglm"

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def validate(self, params: list[GenerationParams]) -> None:
        e = self.engine
        for i, p in enumerate(params):
            for c in p.controls:
                if c.hidden and e.backend != "torch":
                    raise ValueError(
                        f"params[{i}].controls: method={c.method!r} edits the decoder's hidden "
                        "states in the decode loop, which the ONNX decode graph does not include: "
                        "use method='dglm' or backend='torch'"
                    )
                if c.hidden and c.probe not in e.value_nets:
                    raise ValueError(
                        f"params[{i}].controls: probe {c.probe!r} has no RE-Control value "
                        f"network in this bundle (value networks: {sorted(e.value_nets) or 'none'}"
                        "); train one with `dglm train value` or use method='dglm'"
                    )
                if c.residual and e.backend != "torch":
                    raise ValueError(
                        f"params[{i}].controls: method='caa' adds a steering vector inside the "
                        "decoder's blocks, which the ONNX decode graph does not include: use "
                        "method='dglm' or backend='torch'"
                    )
            guided = (
                p.prompt_guidance if p.prompt_guidance is not None else e.config.prompt_guidance
            )
            if guided != 1.0 and e.backend != "torch":
                raise ValueError(
                    f"prompt_guidance={guided} runs a second decoder stream in PyTorch, which the "
                    "ONNX backend does not have: pass prompt_guidance=1 or use backend='torch'"
                )
            cfg = resolve_sampler(e.config, p)
            exact = cfg.guidance_mode == "exact"
            if p.controls and exact and not isinstance(e.score_net, torch.nn.Module):
                raise ValueError(
                    "guidance_mode='exact' differentiates through the score network, which the "
                    "ONNX backend cannot; use guidance_mode='fast' or backend='torch'"
                )
        check_caa_controls(e.steering_vectors, params, False)

    def condition(self, batch: MethodBatch) -> Conditioning:
        e, rows, params = self.engine, batch.rows, batch.params
        timings = {}
        t = time.perf_counter()
        ctx = e.encoder.latents(list(batch.prompts)).to(e.device)  # (N, d)
        timings["encode"] = elapsed(e.device, t)

        t = time.perf_counter()
        x0 = torch.empty(len(rows), e.encoder.dim, device=e.device)
        renoise_noise = torch.empty_like(x0)
        renoise_a2 = torch.empty(len(rows), device=e.device)
        groups: dict[SamplerConfig, list[int]] = {}
        for r, (i, _) in enumerate(rows):
            groups.setdefault(params[i].sampler_config(e.config.sampler), []).append(r)
        for sampler_cfg, idx in groups.items():
            x0[idx], renoise_noise[idx] = self.sample_group(
                sampler_cfg, [rows[r] for r in idx], [batch.seeds[r] for r in idx], ctx, params
            )
            renoise_a2[idx] = sampler_cfg.renoise_alpha2
        timings["diffusion"] = elapsed(e.device, t)

        t = time.perf_counter()
        with torch.inference_mode():
            a2 = renoise_a2[:, None]
            z = a2.sqrt() * x0 + (1 - a2).sqrt() * renoise_noise
            soft_prompt = e.prompt_gen(z.to(e.dtype), renoise_a2.to(e.dtype))  # (R, P, H)
        timings["prompt_generator"] = elapsed(e.device, t)
        processors = self.prompt_guidance(batch)
        # (the ONNX Runtime decoder has no LM head of its own here; it refuses RE-Control anyway)
        head = getattr(e.decoder, "logits", None)
        hook, masks = value_conditioning(
            e.value_nets, e.probes.probes, batch, False, e.device, head
        )
        processors = (*processors, *masks)  # the mask acts on the guided scores
        residual = None  # controls with method "caa": their steering vectors (methods.caa)
        if e.steering_vectors:
            dec = e.decoder
            residual = caa_residual(
                e.steering_vectors, batch, False, dec.num_layers, dec.hidden_size
            )
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
        return (
            self.engine.config.prompt_guidance if p.prompt_guidance is None else p.prompt_guidance
        )

    def prompt_guidance(self, batch: MethodBatch) -> tuple[PromptGuidance, ...]:
        """The PromptGuidance processor when a row is guided (scale ≠ 1), else none."""
        scales = [self.guidance_scale(batch.params[i]) for i, _ in batch.rows]
        if all(s == 1.0 for s in scales):
            return ()
        prefixes = [batch.prefix_ids[i] for i, _ in batch.rows]
        return (PromptGuidance(prefixes, scales, self.engine.config.prompt_plausibility),)

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
        e = self.engine
        d, n = e.encoder.dim, cfg.num_inference_steps
        gens = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
        noise = draw_noise(gens, n + 2, d, e.device)  # (steps + 2, R, d)
        req = [i for i, _ in rows]
        context = ctx[req]
        cfg_scale = torch.tensor(
            [
                params[i].cfg_scale if params[i].cfg_scale is not None else e.config.cfg_scale
                for i in req
            ],
            device=e.device,
        )
        student = cfg.sampler == "consistency"
        use_cfg = not student and bool((cfg_scale != 1.0).any())
        # controls acting through the latent (RE-Control-only ones act in the decode loop)
        latent = [tuple(c for c in params[i].controls if c.latent) for i in req]
        targets, scales = e.probes.batch_targets(latent)
        guidance = Guidance(
            e.probes.weight.to(e.device),
            e.probes.bias.to(e.device),
            targets.to(e.device),
            scales.to(e.device),
        )
        net, dt = (e.student if student else e.score_net), e.dtype
        captured = e.captured_student if student else e.captured

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
                    e.device
                )

        if (
            captured is not None
            and cfg.guidance_mode == "fast"
            and cfg.sampler not in MULTISTEP_SAMPLERS
            and n <= captured.max_steps
        ):
            x0 = captured.sample(noise[: n + 1], cfg, context, cfg_scale, guidance)
        else:
            x0 = sample(model_fn, noise[: n + 1], cfg, cfg_scale, guidance, e.update_fn, mc)
        return x0, noise[n + 1]


__all__ = ["DGLM", "elapsed", "resolve_sampler"]
