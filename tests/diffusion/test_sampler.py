import pytest
import torch
from dglm.engine.diffusion.sampler import (
    STEP_RANGES,
    Guidance,
    SamplerConfig,
    draw_noise,
    sample,
)
from dglm.engine.diffusion.schedule import SAMPLERS
from dglm.engine.diffusion.score_network import SCORE_NET_PRESETS, ScoreNetwork
from dglm.kernels.guided_update import guided_update_ref


def _setup(seed: int, b: int = 8):
    torch.manual_seed(seed)
    cfg = SCORE_NET_PRESETS["tiny"]
    net = ScoreNetwork(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    ctx = torch.randn(b, cfg.latent_dim, generator=g)
    probe_w = torch.randn(1, cfg.latent_dim, generator=g) * 3
    return net, ctx, probe_w, cfg.latent_dim


def _model_fn(net, ctx, cfg_on: bool):
    def fn(z, a2):
        if not cfg_on:
            return net(z, ctx, a2), None
        b = z.shape[0]
        drop = torch.arange(2 * b) >= b
        v = net(torch.cat((z, z)), torch.cat((ctx, ctx)), torch.cat((a2, a2)), drop)
        return v[:b], v[b:]

    return fn


def _probe_prob(x0, w):
    return torch.sigmoid(torch.nn.functional.normalize(x0, dim=-1) @ w.T)[:, 0]


@pytest.mark.parametrize("mode", ["fast", "exact"])
@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_probe_guidance_raises_probe_score(mode, sampler):
    net, ctx, w, d = _setup(0)
    b = ctx.shape[0]
    cfg = SamplerConfig(sampler=sampler, num_inference_steps=10, guidance_mode=mode, mc_samples=8)
    gens = [torch.Generator().manual_seed(100 + i) for i in range(b)]
    noise = draw_noise(gens, cfg.num_inference_steps + 1, d, torch.device("cpu"))
    mc_gen = torch.Generator().manual_seed(7)

    def mc(step):
        return torch.randn(b, cfg.mc_samples, d, generator=mc_gen)

    cfg_scale = torch.full((b,), 2.0)
    fn = _model_fn(net, ctx, cfg_on=True)
    off = Guidance(w, torch.zeros(1), torch.ones(b, 1), torch.zeros(b, 1))
    on = Guidance(w, torch.zeros(1), torch.ones(b, 1), torch.full((b, 1), 30.0))
    x_plain = sample(fn, noise, cfg, cfg_scale, off, guided_update_ref, mc)
    x_up = sample(fn, noise, cfg, cfg_scale, on, guided_update_ref, mc)
    on_neg = Guidance(w, torch.zeros(1), torch.zeros(b, 1), torch.full((b, 1), 30.0))
    x_down = sample(fn, noise, cfg, cfg_scale, on_neg, guided_update_ref, mc)
    p_plain, p_up, p_down = (_probe_prob(x, w) for x in (x_plain, x_up, x_down))
    assert (p_up > p_plain).float().mean() >= 0.75, (p_up, p_plain)
    assert (p_down < p_plain).float().mean() >= 0.75, (p_down, p_plain)
    assert p_up.mean() > p_plain.mean() + 0.1 and p_down.mean() < p_plain.mean() - 0.1
    if mode == "fast":  # x̂0 is projected onto the √d sphere
        torch.testing.assert_close(
            x_up.norm(dim=-1), torch.full((b,), d**0.5), rtol=1e-4, atol=1e-4
        )


def test_rows_independent_of_batch_neighbours():
    net, ctx, w, d = _setup(1, b=4)
    cfg = SamplerConfig(num_inference_steps=6)
    gens = lambda: [torch.Generator().manual_seed(50 + i) for i in range(4)]  # noqa: E731
    noise = draw_noise(gens(), 7, d, torch.device("cpu"))
    g = Guidance(w, torch.zeros(1), torch.ones(4, 1), torch.tensor([[10.0], [0.0], [5.0], [0.0]]))
    full = sample(
        _model_fn(net, ctx, True), noise, cfg, torch.full((4,), 1.5), g, guided_update_ref
    )
    sub_noise = draw_noise(gens()[2:3], 7, d, torch.device("cpu"))
    g1 = Guidance(w, torch.zeros(1), torch.ones(1, 1), torch.tensor([[5.0]]))
    one = sample(
        _model_fn(net, ctx[2:3], True), sub_noise, cfg, torch.full((1,), 1.5), g1, guided_update_ref
    )
    torch.testing.assert_close(one[0], full[2], rtol=1e-4, atol=1e-4)


def test_cfg_scale_one_equals_no_uncond():
    net, ctx, w, d = _setup(2, b=3)
    cfg = SamplerConfig(num_inference_steps=5)
    noise = draw_noise(
        [torch.Generator().manual_seed(i) for i in range(3)], 6, d, torch.device("cpu")
    )
    none = Guidance(w, torch.zeros(1), torch.zeros(3, 1), torch.zeros(3, 1))
    a = sample(_model_fn(net, ctx, False), noise, cfg, torch.ones(3), none, guided_update_ref)
    b = sample(_model_fn(net, ctx, True), noise, cfg, torch.ones(3), none, guided_update_ref)
    c = sample(
        _model_fn(net, ctx, True), noise, cfg, torch.full((3,), 3.0), none, guided_update_ref
    )
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a, c, atol=1e-3)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(sampler="x"),
        dict(num_inference_steps=0),
        dict(guidance_mode="slow"),
        dict(renoise_alpha2=1.5),
        dict(mc_samples=0),
        dict(schedule_scale=-1.0),
    ],
)
def test_sampler_config_validation(kwargs):
    with pytest.raises(ValueError):
        SamplerConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sampler="consistency", num_inference_steps=100), r"outside \[1, 4\].*'consistency'"),
        (dict(sampler="consistency", num_inference_steps=5), r"'ddpm', 'ddim', 'dpmpp-2m'"),
        (dict(sampler="ddpm", num_inference_steps=10_001), r"outside \[1, 10000\]"),
        (dict(num_inference_steps=True), "num_inference_steps must be an integer"),
        (dict(num_inference_steps=8.0), "num_inference_steps must be an integer"),
        (dict(var_lambda="0.2"), "var_lambda"),
        (dict(schedule_scale="1"), "schedule_scale"),
        (dict(mc_samples=True), "mc_samples"),
        (dict(rescale="yes"), "rescale"),
        (dict(renoise_alpha2=True), "renoise_alpha2"),
    ],
)
def test_sampler_config_names_the_setting_and_the_samplers_range(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplerConfig(**kwargs)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_takes_its_whole_step_range(sampler):
    lo, hi = STEP_RANGES[sampler]
    for steps in (lo, hi):
        assert (
            SamplerConfig(sampler=sampler, num_inference_steps=steps).num_inference_steps == steps
        )
