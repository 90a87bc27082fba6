"""Training loops on tiny models: losses fall, runs resume, bundles assemble and load."""

import pytest
import torch
from dglm.engine.api import GenerationParams
from dglm.engine.diffusion.score_network import ScoreNetConfig, ScoreNetwork
from dglm.engine.engine import Engine
from dglm.engine.models import load_decoder
from dglm.engine.probes import Control, save_probes
from dglm.engine.prompt.generator import (
    PROMPT_GENERATOR_PRESETS,
    PromptGenerator,
    PromptGeneratorConfig,
)
from dglm.engine.training.diffusion import train_diffusion
from dglm.engine.training.loop import LogNormalVWeighting, LossEMASampler, TrainConfig
from dglm.engine.training.prompt import build_lm_batch, train_prompt_generator
from dglm.engine.training.recipes import assemble_bundle
from training_fixtures import coded_task, log_rows, split_rows


def _latent_pairs(n: int, d: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    rot = torch.linalg.qr(torch.randn(d, d, generator=g))[0]
    pre = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1) * d**0.5
    cont = (
        torch.nn.functional.normalize(pre @ rot + 0.3 * torch.randn(n, d, generator=g), dim=-1)
        * d**0.5
    )
    return pre, cont


def test_weighting_is_normalised_and_monotone_in_eps_space():
    w = LogNormalVWeighting()
    gamma = torch.linspace(-15, 15, 301)
    v = w(gamma)
    assert float(v.max()) == pytest.approx(1.0, abs=1e-3) and (v > 0).all()
    eps_w = v * (torch.exp(-gamma) + 1)
    assert (eps_w[1:] <= eps_w[:-1] * (1 + 1e-2)).all()  # grid lookup: ±0.3% per step


def test_loss_ema_sampler_follows_losses():
    s = LossEMASampler(n_bins=10)
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        s.update(torch.tensor([-14.0, 14.0]), torch.tensor([10.0, 0.01]))
    gamma, density = s.sample(2000, g)
    # bin weights: 10 (γ < −12), 0.01 (γ ≥ 12), the 8 untouched bins 1 each
    assert (gamma < -12).float().mean() == pytest.approx(10 / 18.01, abs=0.04)
    assert (gamma >= 12).float().mean() < 0.005
    assert gamma.min() >= -15 and gamma.max() <= 15 and (density > 0).all()


def test_diffusion_training_learns_and_resumes(tmp_path):
    torch.manual_seed(0)
    cfg_net = ScoreNetConfig(latent_dim=32, dim=64, depth=2, head_dim=32, num_tokens=8)
    pre, cont = _latent_pairs(600, 32, 0)
    cfg = TrainConfig(steps=60, batch_size=64, lr=2e-3, warmup=5, eval_every=30, save_every=30)
    train_diffusion(
        ScoreNetwork(cfg_net), (pre[:500], cont[:500]), (pre[500:], cont[500:]), tmp_path, cfg
    )
    logs = log_rows(tmp_path)
    assert [r["step"] for r in logs] == [30, 60]
    assert logs[-1]["eval_mse_gamma+0"] < 0.9  # untrained ≈ 1 (v has unit variance)
    # resuming continues from step 60 to 80, not from scratch
    steps = []
    cfg2 = TrainConfig(steps=80, batch_size=64, lr=2e-3, warmup=5, eval_every=30, save_every=30)
    train_diffusion(
        ScoreNetwork(cfg_net),
        (pre[:500], cont[:500]),
        (pre[500:], cont[500:]),
        tmp_path,
        cfg2,
        progress=lambda s, _: steps.append(s),
    )
    assert steps[0] == 61 and steps[-1] == 80
    with pytest.raises(ValueError, match="different run"):
        other = ScoreNetConfig(latent_dim=32, dim=64, depth=4, head_dim=32, num_tokens=8)
        train_diffusion(ScoreNetwork(other), (pre, cont), (pre, cont), tmp_path, cfg2)


def test_time_boxed_run_checkpoints_and_resumes(tmp_path):
    torch.manual_seed(0)
    cfg_net = ScoreNetConfig(latent_dim=32, dim=64, depth=2, head_dim=32, num_tokens=8)
    pre, cont = _latent_pairs(200, 32, 0)
    # a limit this small is spent after the first step: the run saves and stops there
    boxed = TrainConfig(steps=20, batch_size=32, eval_every=100, save_every=100, max_minutes=1e-9)
    steps = []
    train_diffusion(
        ScoreNetwork(cfg_net), (pre, cont), (pre, cont), tmp_path, boxed,
        progress=lambda s, _: steps.append(s),
    )  # fmt: skip
    assert steps == [1]
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 1
    steps.clear()
    free = TrainConfig(steps=20, batch_size=32, eval_every=100, save_every=100)
    train_diffusion(
        ScoreNetwork(cfg_net), (pre, cont), (pre, cont), tmp_path, free,
        progress=lambda s, _: steps.append(s),
    )  # fmt: skip
    assert steps[0] == 2 and steps[-1] == 20
    with pytest.raises(ValueError, match="max_minutes"):
        TrainConfig(max_minutes=-1.0)


def test_lm_batch_layout():
    b = build_lm_batch([[5, 6, 7], [8]], [[1, 2], [3, 4, 9]], prompt_len=2, pad_id=0)
    assert b["ids"].tolist() == [[5, 6, 7, 0, 0, 1, 2], [8, 0, 0, 3, 4, 9, 0]]
    assert b["soft_mask"].tolist()[1] == [False, True, True, False, False, False, False]
    assert b["key_mask"].tolist()[1] == [True] * 6 + [False]
    # logits at j predict token j+1: the last soft slot predicts the first continuation token
    assert b["labels"].tolist() == [
        [-100, -100, -100, -100, 1, 2, -100],
        [-100, -100, 3, 4, 9, -100, -100],
    ]


def test_prompt_generator_training_lowers_lm_loss(tmp_path, tiny_llama_dir):
    decoder, tok = load_decoder(str(tiny_llama_dir))
    # continuations are a function of a latent code: a good soft prompt makes them predictable
    train, held = split_rows(coded_task(first_token=3))
    pg = PromptGenerator(PROMPT_GENERATOR_PRESETS["tiny"])
    cfg = TrainConfig(
        steps=40, batch_size=16, lr=3e-3, warmup=2, eval_every=40, save_every=40, ema_decay=0.5
    )
    train_prompt_generator(pg, decoder, train, held, 0, tmp_path, cfg)
    (row,) = log_rows(tmp_path)
    # untrained: every loss ≈ log(vocab) ≈ 5.7; the code → continuation map is only learnable
    # through the soft prompt, and pure noise (alpha² = 0) carries no code
    assert row["eval_loss_a2_1.00"] < row["eval_loss_no_prompt"] - 0.2, row
    assert row["eval_loss_a2_1.00"] < row["eval_loss_a2_0.00"] - 0.1, row
    # the decoder stayed frozen
    assert all(not p.requires_grad for p in decoder.parameters())


def test_assemble_bundle_from_runs(tmp_path, tiny_llama_dir, sentiment_probe):
    torch.manual_seed(0)
    sn_cfg = ScoreNetConfig(latent_dim=384, dim=64, depth=2, head_dim=32, num_tokens=8)
    pre, cont = _latent_pairs(80, 384, 1)
    tc = TrainConfig(steps=2, batch_size=16, eval_every=2, save_every=2, warmup=1)
    train_diffusion(ScoreNetwork(sn_cfg), (pre, cont), (pre, cont), tmp_path / "sn", tc)

    dec, _ = load_decoder(str(tiny_llama_dir))
    pg_cfg = PromptGeneratorConfig(
        latent_dim=384, decoder_dim=64, dim=64, depth=2, head_dim=32, prompt_len=4
    )
    data = ([[5, 6]] * 16, [[7, 8]] * 16, cont[:16])
    train_prompt_generator(PromptGenerator(pg_cfg), dec, data, data, 0, tmp_path / "pg", tc)
    save_probes(tmp_path / "probes.safetensors", [sentiment_probe])
    assemble_bundle(
        tmp_path / "bundle",
        tmp_path / "sn",
        tmp_path / "pg",
        [tmp_path / "probes.safetensors"],
        decoder=str(tiny_llama_dir),
    )
    engine = Engine.from_pretrained(tmp_path / "bundle")
    assert engine.config.trained
    out = engine.generate(
        ["Hello"],
        GenerationParams(seed=0, max_new_tokens=3, controls=(Control("sentiment", "positive"),)),
    )
    assert out[0].samples[0].token_ids
    with pytest.raises(ValueError, match="is a diffusion run"):
        assemble_bundle(tmp_path / "b2", tmp_path / "sn", tmp_path / "sn", [])


def test_keep_every_must_be_a_count():
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="keep_every"):
            TrainConfig(keep_every=bad)
