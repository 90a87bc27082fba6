"""The `fast` sampler step captured as one CUDA graph per batch bucket (vLLM/SGLang-style runner).

One step = the score network (with its CFG rows and the fused Triton attention) + the fused guided
update; a k-step sampler is then k `graph.replay()` calls and nothing else: the step index lives in
a device tensor that the graph itself advances, and it selects the step's coefficients and noise
from static (steps, B, ·) buffers filled once per `sample` call.

Static buffers are allocated once at the largest bucket; a batch is rounded up to a captured size
with `bisect`, its inputs `copy_`'d into the first B rows, x̂0 sliced out of the first B rows at the
end. Rows are independent (row-wise norms, per-item attention, per-row update), so the stale
padding rows never touch the live ones. Graphs are captured lazily, one per (bucket, CFG on/off,
guidance on/off, rescale), all sharing one memory pool.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Sequence

import torch
from dglm.engine.diffusion.sampler import Guidance, SamplerConfig
from dglm.engine.diffusion.schedule import MULTISTEP_SAMPLERS, NoiseSchedule, multistep_coefficients
from dglm.engine.diffusion.score_network import ScoreNetwork
from dglm.kernels.guided_update import GuidedUpdateInputs, select_guided_update

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)


def sampler_coefficients(config: SamplerConfig) -> torch.Tensor:
    """(steps, 5) fp32 [α_t, σ_t, c0, cz, n] per step, exactly as `sampling.sample` builds them."""
    if config.sampler in MULTISTEP_SAMPLERS:
        raise ValueError(
            f"CapturedSampler: sampler {config.sampler!r} needs the previous step's x̂0; "
            "run it with the eager sampler (dglm.engine.diffusion.sampler.sample)"
        )
    rows, _ = multistep_coefficients(
        NoiseSchedule(config.schedule_scale),
        config.num_inference_steps,
        config.sampler,
        config.var_lambda,
    )
    return torch.tensor(rows, dtype=torch.float32)


class _EagerStep:
    """`enforce_eager`: replay() launches the step op by op (same buffers, same device step)."""

    def __init__(self, sampler: CapturedSampler, key: tuple[int, bool, bool, bool]) -> None:
        self.sampler, self.key = sampler, key

    @torch.no_grad()
    def replay(self) -> None:
        self.sampler._step(*self.key)


class CapturedSampler:
    """Replays the `fast` guided sampler step from CUDA graphs.

    `sample(noise, config, context, cfg_scale, guidance)` returns what
    `sampling.sample(model_fn, noise, config, cfg_scale, guidance, update_fn)` returns for the
    engine's `model_fn` (conditional rows, plus null-context rows when any cfg_scale ≠ 1). No host
    sync inside the step loop; one (`cfg_scale != 1).any()` / `guidance.active`) per call.
    """

    def __init__(
        self,
        score_net: ScoreNetwork,
        num_probes: int,  # K: rows of the probe set the guidance will carry
        max_steps: int = 256,  # longest sampler the static noise/coefficient buffers hold
        batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,  # captured buckets
        guided_update: str = "auto",  # implementation, see kernels.guided_update
        enforce_eager: bool = False,  # launch the same step op by op instead of replaying graphs
    ) -> None:
        if not enforce_eager and not torch.cuda.is_available():
            raise RuntimeError(
                "CapturedSampler needs CUDA graphs but torch.cuda.is_available() is False: run on "
                "a CUDA device (device='cuda'), set enforce_eager=True, or use the eager sampler "
                "(dglm.engine.diffusion.sampler.sample)"
            )
        param = next(score_net.parameters())
        if not enforce_eager and param.device.type != "cuda":
            raise RuntimeError(
                f"CapturedSampler: the score network is on {param.device}; move it to CUDA first "
                "(score_net.to('cuda')) or set enforce_eager=True"
            )
        sizes = sorted(set(batch_sizes))
        if not sizes or sizes[0] < 1:
            raise ValueError(f"batch_sizes must be positive integers, got {list(batch_sizes)!r}")
        if num_probes < 0 or max_steps < 1:
            raise ValueError(
                f"num_probes must be ≥ 0 and max_steps ≥ 1, got {num_probes}, {max_steps}"
            )
        self.net = score_net.eval()
        self.embeds_cfg = score_net.config.guidance_embedding
        self.batch_sizes, self.max_steps, self.num_probes = sizes, max_steps, num_probes
        self.dtype, dev = param.dtype, param.device
        self.update_fn = select_guided_update(dev, guided_update)
        d, bmax, k = score_net.config.latent_dim, sizes[-1], num_probes
        f32 = dict(device=dev, dtype=torch.float32)
        # static buffers, allocated once at the largest bucket
        self.z = torch.zeros(bmax, d, **f32)  # the state z_t, advanced in place by each replay
        self.x0 = torch.zeros(bmax, d, **f32)  # x̂0 of the last replayed step
        self.context = torch.zeros(bmax, d, device=dev, dtype=self.dtype)
        self.cfg_scale = torch.ones(bmax, **f32)
        self.noise = torch.zeros(max_steps, bmax, d, **f32)  # ξ of step i
        self.coefs = torch.zeros(max_steps, bmax, 5, **f32)  # [α, σ, c0, cz, n] of step i
        self.probe_weight, self.probe_bias = torch.zeros(k, d, **f32), torch.zeros(k, **f32)
        self.probe_target, self.probe_scale = (
            torch.zeros(bmax, k, **f32),
            torch.zeros(bmax, k, **f32),
        )
        self.no_weight, self.no_bias = torch.zeros(0, d, **f32), torch.zeros(0, **f32)
        self.no_rows = torch.zeros(bmax, 0, **f32)
        self.step = torch.zeros(1, device=dev, dtype=torch.long)  # advanced by the graph
        self.n_steps = torch.full((1,), max_steps, device=dev, dtype=torch.long)
        self._drop = {b: torch.arange(2 * b, device=dev) >= b for b in sizes}  # null-context rows
        self.enforce_eager = enforce_eager
        self._graphs: dict[tuple[int, bool, bool, bool], torch.cuda.CUDAGraph | _EagerStep] = {}
        self._pool = None if enforce_eager else torch.cuda.graph_pool_handle()

    # ------------------------------------------------------------------ the captured step
    def _step(self, b: int, use_cfg: bool, guided: bool, rescale: bool) -> None:
        """One sampler step on the first b rows of the static buffers (what the graph records)."""
        net, dt = self.net, self.dtype
        z, ctx = self.z[:b], self.context[:b]  # (b, d)
        c = self.coefs[:, :b].index_select(0, self.step)[0]  # (b, 5) this step's coefficients
        noise = self.noise[:, :b].index_select(0, self.step)[0]  # (b, d)
        a2 = c[:, 0] ** 2  # alpha², as sampling.sample forms it
        if self.embeds_cfg:  # a distilled student: w is an input, one row per request
            v_c = net(z.to(dt), ctx, a2.to(dt), None, self.cfg_scale[:b].to(dt)).float()
            v_u = None
        elif use_cfg:  # conditional rows then null-context rows, as the engine's model_fn
            v = net(torch.cat((z, z)).to(dt), torch.cat((ctx, ctx)), torch.cat((a2, a2)).to(dt),
                    self._drop[b])  # fmt: skip
            v_c, v_u = v[:b].float(), v[b:].float()
        else:
            v_c, v_u = net(z.to(dt), ctx, a2.to(dt)).float(), None
        if guided:
            w, bias = self.probe_weight, self.probe_bias
            tgt, scl = self.probe_target[:b], self.probe_scale[:b]
        else:
            w, bias, tgt, scl = self.no_weight, self.no_bias, self.no_rows[:b], self.no_rows[:b]
        inputs = GuidedUpdateInputs(z, v_c, v_u, self.cfg_scale[:b], w, bias, tgt, scl, noise, c)
        z_next, x0 = self.update_fn(inputs, rescale)
        z.copy_(z_next)
        self.x0[:b].copy_(x0)
        self.step.add_(1).remainder_(self.n_steps)  # wraps: replays never index out of range

    @torch.no_grad()
    def _capture(self, key: tuple[int, bool, bool, bool]) -> torch.cuda.CUDAGraph | _EagerStep:
        if self.enforce_eager:
            self._graphs[key] = _EagerStep(self, key)
            return self._graphs[key]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: Triton compiles, cuBLAS picks its kernels
            for _ in range(2):
                self._step(*key)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            self._step(*key)
        torch.cuda.synchronize()
        logger.info("captured sampler step: bucket %d, cfg %s, guided %s, rescale %s", *key)
        self._graphs[key] = graph
        return graph

    # ------------------------------------------------------------------ public
    def bucket(self, batch_size: int) -> int:
        """The captured batch size a batch of `batch_size` rows runs in."""
        i = bisect.bisect_left(self.batch_sizes, batch_size)
        if i == len(self.batch_sizes):
            raise ValueError(
                f"batch of {batch_size} rows exceeds the largest captured size "
                f"{self.batch_sizes[-1]}; add it to batch_sizes"
            )
        return self.batch_sizes[i]

    @torch.no_grad()
    def load(
        self,
        noise: torch.Tensor,  # (steps + 1, B, d): [0] is z_T, [i] the noise of step i
        config: SamplerConfig,
        context: torch.Tensor,  # (B, d) prefix latents
        cfg_scale: torch.Tensor,  # (B,)
        guidance: Guidance | None,
    ) -> tuple[torch.cuda.CUDAGraph | _EagerStep, int]:
        """Copy one batch into the static buffers, capturing its graph first if new → (graph, B).

        Each `graph.replay()` then runs the next step; after `steps` replays x̂0 is in self.x0[:B].
        """
        if config.guidance_mode != "fast":
            raise ValueError(
                f"CapturedSampler runs guidance_mode='fast' only, got {config.guidance_mode!r}"
            )
        steps, b = config.num_inference_steps, noise.shape[1]
        if steps > self.max_steps:
            raise ValueError(
                f"num_inference_steps={steps} exceeds CapturedSampler max_steps={self.max_steps}"
            )
        assert noise.shape[0] == steps + 1, (noise.shape, steps)
        guided = guidance is not None and guidance.active
        if guided and guidance.weight.shape[0] != self.num_probes:
            raise ValueError(
                f"guidance carries {guidance.weight.shape[0]} probes, the sampler was built for "
                f"num_probes={self.num_probes}"
            )
        use_cfg = not self.embeds_cfg and bool((cfg_scale != 1.0).any())
        key = (self.bucket(b), use_cfg, guided, config.rescale)
        graph = self._graphs[key] if key in self._graphs else self._capture(key)  # (it steps)
        coefs = sampler_coefficients(config).to(self.coefs.device)  # (steps, 5)
        self.coefs[:steps, :b].copy_(coefs[:, None, :].expand(steps, b, 5))
        self.noise[:steps, :b].copy_(noise[1:])
        self.z[:b].copy_(noise[0])
        self.context[:b].copy_(context)
        self.cfg_scale[:b].copy_(cfg_scale)
        if guided:
            self.probe_weight.copy_(guidance.weight)
            self.probe_bias.copy_(guidance.bias)
            self.probe_target[:b].copy_(guidance.target)
            self.probe_scale[:b].copy_(guidance.scale)
        self.step.zero_()
        self.n_steps.fill_(steps)
        return graph, b

    @torch.no_grad()
    def sample(
        self,
        noise: torch.Tensor,  # (steps + 1, B, d)
        config: SamplerConfig,
        context: torch.Tensor,  # (B, d)
        cfg_scale: torch.Tensor,  # (B,)
        guidance: Guidance | None,
    ) -> torch.Tensor:
        """Reverse diffusion from z_T = noise[0] by graph replays → final x̂0 (B, d) fp32."""
        bmax = self.batch_sizes[-1]
        if noise.shape[1] > bmax:  # rows are independent: run the batch in chunks
            parts = []
            for lo in range(0, noise.shape[1], bmax):
                rows = slice(lo, lo + bmax)
                part = None
                if guidance is not None:
                    part = Guidance(guidance.weight, guidance.bias, guidance.target[rows],
                                    guidance.scale[rows])  # fmt: skip
                parts.append(
                    self.sample(noise[:, rows], config, context[rows], cfg_scale[rows], part)
                )
            return torch.cat(parts)
        graph, b = self.load(noise, config, context, cfg_scale, guidance)
        for _ in range(config.num_inference_steps):
            graph.replay()
        return self.x0[:b].clone()


__all__ = ["DEFAULT_BATCH_SIZES", "CapturedSampler", "sampler_coefficients"]
