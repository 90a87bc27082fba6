import pytest
import torch
from dglm.engine.diffusion.score_network import SCORE_NET_PRESETS, ScoreNetConfig, ScoreNetwork
from dglm.engine.prompt.generator import (
    PROMPT_GENERATOR_PRESETS,
    PromptGenerator,
    PromptGeneratorConfig,
)


@pytest.mark.parametrize("batch", [1, 3])
def test_score_network_shapes_and_null_context(batch, gen):
    torch.manual_seed(0)
    cfg = SCORE_NET_PRESETS["tiny"]
    net = ScoreNetwork(cfg).eval()
    z = torch.randn(batch, cfg.latent_dim, generator=gen)
    ctx = torch.randn(batch, cfg.latent_dim, generator=gen)
    a2 = torch.rand(batch, generator=gen)
    v = net(z, ctx, a2)
    assert v.shape == (batch, cfg.latent_dim) and torch.isfinite(v).all()
    # dropping every row's context is the same as passing no context
    torch.testing.assert_close(
        net(z, ctx, a2, torch.ones(batch, dtype=torch.bool)), net(z, None, a2)
    )
    assert not torch.allclose(net(z, None, a2), v)
    # dropping one row changes only that row
    drop = torch.zeros(batch, dtype=torch.bool)
    drop[0] = True
    mixed = net(z, ctx, a2, drop)
    torch.testing.assert_close(mixed[1:], v[1:])


def test_score_network_uses_time_after_training_step(gen):
    """Time conditioning starts at zero (zero-init scale/shift) and becomes active once trained."""
    cfg = SCORE_NET_PRESETS["tiny"]
    net = ScoreNetwork(cfg)
    z, ctx = (
        torch.randn(2, cfg.latent_dim, generator=gen),
        torch.randn(2, cfg.latent_dim, generator=gen),
    )
    a = net.transformer.blocks[0].attn.time_cond.proj
    assert a.weight.abs().sum() == 0 and a.bias.abs().sum() == 0
    loss = net(z, ctx, torch.tensor([0.1, 0.9])).pow(2).mean()
    loss.backward()
    assert a.weight.grad.abs().sum() > 0
    assert len(net.transformer.dense) == cfg.depth // 2


def test_prompt_generator_shapes(gen):
    cfg = PROMPT_GENERATOR_PRESETS["tiny"]
    pg = PromptGenerator(cfg).eval()
    out = pg(torch.randn(3, cfg.latent_dim, generator=gen), torch.full((3,), 0.95))
    assert out.shape == (3, cfg.prompt_len, cfg.decoder_dim)


def test_default_bundle_shapes_fit_40mb():
    sn = ScoreNetwork(SCORE_NET_PRESETS["small"])
    pg = PromptGenerator(PROMPT_GENERATOR_PRESETS["small"])
    n = sum(p.numel() for m in (sn, pg) for p in m.parameters())
    assert n * 2 < 40e6, n  # fp16 bytes
    ref = ScoreNetConfig(**SCORE_NET_PRESETS["reference"].__dict__)
    assert (ref.latent_dim, ref.dim, ref.depth, ref.num_tokens) == (768, 768, 12, 32)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(dim=100), "dim"),
        (dict(depth=3), "depth"),
        (dict(latent_dim=0), "latent_dim"),
        (dict(num_tokens=7), "num_tokens"),
    ],
)
def test_score_config_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ScoreNetConfig(**kwargs)


def test_prompt_config_validation():
    with pytest.raises(ValueError, match="prompt_len"):
        PromptGeneratorConfig(prompt_len=7)
    with pytest.raises(ValueError, match="unknown fields"):
        PromptGeneratorConfig.from_dict({"latent_dim": 384, "bogus": 1})
