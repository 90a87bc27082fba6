"""`CapturedSampler` against the eager sampler (`sampling.sample` with the engine's model_fn).

On CPU the runner's bookkeeping (static buffers, buckets, device-side step index, CFG rows,
chunking) is checked with `enforce_eager=True`; the CUDA-graph replays themselves need a GPU.
"""

from __future__ import annotations

import pytest
import torch
from dglm.engine import layers
from dglm.engine.diffusion.captured import CapturedSampler, sampler_coefficients
from dglm.engine.diffusion.sampler import Guidance, SamplerConfig, sample
from dglm.engine.diffusion.score_network import ScoreNetConfig, ScoreNetwork
from dglm.engine.training.distill import student_from_teacher
from dglm.kernels.guided_update import guided_update_ref

NET = ScoreNetConfig(latent_dim=48, dim=64, depth=2, head_dim=32, num_tokens=8)
K = 2


def make_net(device, dtype=torch.float32, seed: int = 0) -> ScoreNetwork:
    torch.manual_seed(seed)
    net = ScoreNetwork(NET)
    with torch.no_grad():  # the time scale/shift layers start at zero: make them matter
        for name, p in net.named_parameters():
            if "time_cond" in name:
                p.normal_(0.0, 0.05)
    return net.to(device, dtype).eval()


def engine_model_fn(net: ScoreNetwork, context: torch.Tensor, cfg_scale: torch.Tensor):
    """Exactly the engine's model_fn: a distilled student takes w as an input; a teacher runs
    conditional and null-context rows when any cfg_scale ≠ 1."""
    dt = next(net.parameters()).dtype
    if net.config.guidance_embedding:

        def student_fn(z, alpha2):
            w = cfg_scale.to(dt)
            return net(z.to(dt), context.to(dt), alpha2.to(dt), None, w).float(), None

        return student_fn
    use_cfg = bool((cfg_scale != 1.0).any())

    def model_fn(z, alpha2):
        if not use_cfg:
            return net(z.to(dt), context.to(dt), alpha2.to(dt)).float(), None
        b = z.shape[0]
        drop = torch.arange(2 * b, device=z.device) >= b
        v = net(torch.cat((z, z)).to(dt), torch.cat((context, context)).to(dt),
                torch.cat((alpha2, alpha2)).to(dt), drop)  # fmt: skip
        return v[:b].float(), v[b:].float()

    return model_fn


def make_batch(b: int, steps: int, cfg: bool, guided: bool, device, gen: torch.Generator):
    d = NET.latent_dim
    noise = torch.randn(steps + 1, b, d, generator=gen).to(device)
    context = torch.randn(b, d, generator=gen).to(device)
    cfg_scale = (1 + 2 * torch.rand(b, generator=gen) if cfg else torch.ones(b)).to(device)
    guidance = None
    if guided:
        guidance = Guidance(
            torch.randn(K, d, generator=gen).to(device),
            torch.randn(K, generator=gen).to(device),
            torch.rand(b, K, generator=gen).to(device),
            (5 * torch.rand(b, K, generator=gen)).to(device),
        )
    return noise, context, cfg_scale, guidance


def eager(net, noise, config, context, cfg_scale, guidance) -> torch.Tensor:
    """The eager sampler with the engine's model_fn and the reference update."""
    fn = engine_model_fn(net, context, cfg_scale)
    return sample(fn, noise, config, cfg_scale, guidance, guided_update_ref)


def eager_runner(net: ScoreNetwork, max_steps: int, batch_sizes: tuple[int, ...]):
    """A CapturedSampler that launches its step op by op, with the reference update."""
    return CapturedSampler(
        net,
        K,
        max_steps=max_steps,
        batch_sizes=batch_sizes,
        guided_update="reference",
        enforce_eager=True,
    )


CASES = [  # (sampler, steps, B, cfg, guided)
    ("ddpm", 4, 3, True, True),
    ("ddim", 4, 1, False, True),
    ("ddpm", 3, 4, True, False),
    ("ddim", 5, 2, False, False),
]


# ----------------------------------------------------------------------- CPU: enforce_eager


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_needs_cuda_unless_eager():
    with pytest.raises(RuntimeError, match="enforce_eager"):
        CapturedSampler(make_net("cpu"), K)


@pytest.mark.parametrize(("sampler", "steps", "b", "cfg", "guided"), CASES, ids=str)
def test_eager_runner_matches_sample(sampler, steps, b, cfg, guided, gen):
    net = make_net("cpu")
    config = SamplerConfig(sampler=sampler, num_inference_steps=steps)
    runner = eager_runner(net, 8, (1, 4))
    for _ in range(2):  # a second batch through the same buffers and the same cached step
        batch = make_batch(b, steps, cfg, guided, "cpu", gen)
        got = runner.sample(batch[0], config, *batch[1:])
        want = eager(net, batch[0], config, *batch[1:])
        assert got.shape == want.shape == (b, NET.latent_dim) and got.dtype == torch.float32
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    assert int(runner.step) == 0  # the step index wrapped back after `steps` replays
    assert len(runner._graphs) == 1


def test_chunks_batches_beyond_largest_bucket(gen):
    net = make_net("cpu")
    config = SamplerConfig(sampler="ddpm", num_inference_steps=3)
    batch = make_batch(5, 3, True, True, "cpu", gen)
    got = eager_runner(net, 4, (2,)).sample(batch[0], config, *batch[1:])
    torch.testing.assert_close(got, eager(net, batch[0], config, *batch[1:]), atol=2e-5, rtol=2e-5)


def test_buckets_and_argument_errors(gen):
    runner = CapturedSampler(
        make_net("cpu"), K, max_steps=4, batch_sizes=(8, 1, 2), enforce_eager=True
    )
    assert [runner.bucket(n) for n in (1, 2, 3, 8)] == [1, 2, 8, 8]
    with pytest.raises(ValueError, match="largest captured size 8"):
        runner.bucket(9)
    noise, context, cfg_scale, guidance = make_batch(2, 5, False, True, "cpu", gen)
    with pytest.raises(ValueError, match="max_steps=4"):
        runner.sample(noise, SamplerConfig(num_inference_steps=5), context, cfg_scale, guidance)
    exact = SamplerConfig(num_inference_steps=4, guidance_mode="exact")
    with pytest.raises(ValueError, match="guidance_mode"):
        runner.sample(noise[:5], exact, context, cfg_scale, guidance)
    three = Guidance(torch.zeros(3, NET.latent_dim), torch.zeros(3), torch.zeros(2, 3),
                     torch.ones(2, 3))  # fmt: skip
    with pytest.raises(ValueError, match="num_probes=2"):
        runner.sample(noise[:5], SamplerConfig(num_inference_steps=4), context, cfg_scale, three)


def test_coefficients_match_the_sampler():
    config = SamplerConfig(sampler="ddim", num_inference_steps=6, schedule_scale=2.0)
    c = sampler_coefficients(config)
    assert c.shape == (6, 5) and c.dtype == torch.float32
    torch.testing.assert_close(c[-1, 2:], torch.tensor([1.0, 0.0, 0.0]))  # last step returns x̂0


def make_student(device, dtype=torch.float32) -> ScoreNetwork:
    student = student_from_teacher(make_net("cpu"))
    with torch.no_grad():  # the guidance embedding starts at zero: make it matter
        student.guidance_mlp.fc2.weight.normal_(0.0, 0.05)
    return student.to(device, dtype).eval()


@pytest.mark.parametrize("guided", [False, True])
def test_eager_runner_runs_the_student_with_w_as_input(guided, gen):
    student = make_student("cpu")
    config = SamplerConfig(sampler="consistency", num_inference_steps=4)
    runner = eager_runner(student, 8, (4,))
    noise, context, cfg_scale, guidance = make_batch(3, 4, True, guided, "cpu", gen)
    got = runner.sample(noise, config, context, cfg_scale, guidance)
    want = eager(student, noise, config, context, cfg_scale, guidance)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    assert not any(key[1] for key in runner._graphs)  # no CFG rows: one evaluation per step
    # w matters: other weights, other samples
    other = runner.sample(noise, config, context, cfg_scale + 1, guidance)
    assert (other - got).abs().max() > 1e-4


# ------------------------------------------------------------------------------- GPU: graphs


@pytest.mark.gpu
def test_student_graph_matches_the_eager_sampler(gen):
    student = make_student("cuda")
    config = SamplerConfig(sampler="consistency", num_inference_steps=4)
    graphs = CapturedSampler(student, K, max_steps=8, batch_sizes=(1, 4))
    noise, context, cfg_scale, guidance = make_batch(3, 4, True, True, "cuda", gen)
    got = graphs.sample(noise, config, context, cfg_scale, guidance)
    want = eager(student, noise, config, context, cfg_scale, guidance)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize(("sampler", "steps", "b", "cfg", "guided"), CASES, ids=str)
def test_graph_matches_eager_runner_and_sample(sampler, steps, b, cfg, guided, gen):
    net = make_net("cuda")
    config = SamplerConfig(sampler=sampler, num_inference_steps=steps)
    graphs = CapturedSampler(net, K, max_steps=8, batch_sizes=(1, 4))
    ops = CapturedSampler(net, K, max_steps=8, batch_sizes=(1, 4), enforce_eager=True)
    batch = make_batch(b, steps, cfg, guided, "cuda", gen)
    got = graphs.sample(batch[0], config, *batch[1:])
    # the same kernels launched one by one: identical up to cuBLAS's batch-size choices
    torch.testing.assert_close(got, ops.sample(batch[0], config, *batch[1:]), atol=1e-5, rtol=1e-5)
    # the plain PyTorch path: SDPA attention + the reference update
    fused = layers.FUSED_ATTENTION
    layers.FUSED_ATTENTION = False
    try:
        want = eager(net, batch[0], config, *batch[1:])
    finally:
        layers.FUSED_ATTENTION = fused
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
def test_graph_reuse_and_replay_count(gen):
    net = make_net("cuda", torch.bfloat16)
    config = SamplerConfig(sampler="ddpm", num_inference_steps=4)
    runner = CapturedSampler(net, K, max_steps=8, batch_sizes=(1, 2, 4, 8))
    first = make_batch(3, 4, True, True, "cuda", gen)
    runner.sample(first[0], config, *first[1:])
    assert list(runner._graphs) == [(4, True, True, True)]
    graph, b = runner.load(first[0], config, *first[1:])
    assert b == 3 and graph is runner._graphs[(4, True, True, True)]
    for _ in range(4):  # a 4-step sampler is 4 replays
        graph.replay()
    x0 = runner.x0[:b].clone()
    assert int(runner.step) == 0 and torch.isfinite(x0).all()
    again = runner.sample(first[0], config, *first[1:])  # deterministic replays
    torch.testing.assert_close(again, x0, atol=0, rtol=0)
    second = make_batch(5, 4, True, True, "cuda", gen)
    runner.sample(second[0], config, *second[1:])
    assert len(runner._graphs) == 2  # bucket 8 captured once more, bucket 4 reused
