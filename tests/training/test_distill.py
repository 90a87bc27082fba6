"""Few-step sampling: DPM-Solver++(2M), the consistency sampler and the distilled student."""

from __future__ import annotations

import math

import pytest
import torch
from dglm.engine import bundle as bundle_io
from dglm.engine.api import GenerationParams
from dglm.engine.cli.main import main
from dglm.engine.diffusion.captured import sampler_coefficients
from dglm.engine.diffusion.sampler import SamplerConfig, sample
from dglm.engine.diffusion.schedule import NoiseSchedule, multistep_coefficients, step_coefficients
from dglm.engine.diffusion.score_network import SCORE_NET_PRESETS, ScoreNetwork
from dglm.engine.engine import Engine
from dglm.engine.probes import Control
from dglm.engine.training.distill import (
    DistillConfig,
    distill_loss,
    evaluate_student,
    student_from_teacher,
    teacher_ode,
    train_distill,
)
from dglm.engine.training.loop import TrainConfig
from dglm.engine.training.recipes import add_student, bundle_score_network
from dglm.export.onnx import ExportConfig, export_onnx
from dglm.kernels.guided_update import guided_update_ref
from safetensors.torch import save_file
from training_fixtures import log_rows

SCHED = NoiseSchedule(1.0)


# ----------------------------------------------------------------------------- coefficients
def test_dpmpp_first_step_is_ddim_and_later_steps_carry_previous_x0():
    rows, prev = multistep_coefficients(SCHED, 8, "dpmpp-2m")
    ddim, ddim_prev = multistep_coefficients(SCHED, 8, "ddim")
    assert rows[0] == ddim[0] and prev[0] == 0.0
    assert all(p == 0.0 for p in ddim_prev)
    assert all(p < 0.0 for p in prev[1:-1])  # the 2M correction on every middle step
    assert prev[-1] == 0.0 and rows[-1][2:] == (1.0, 0.0, 0.0)  # last step returns x̂0
    # with x̂0 constant across steps the 2M blend equals first order (coefficients sum the same)
    for r, p, d in zip(rows[1:-1], prev[1:-1], ddim[1:-1], strict=True):
        assert r[2] + p == pytest.approx(d[2], rel=1e-9)
        assert r[3] == pytest.approx(d[3], rel=1e-12)


def test_consistency_coefficients_renoise_from_x0():
    for t, s in ((1.0, 0.75), (0.5, 0.25)):
        a_t, s_t, c0, cz, n = step_coefficients(SCHED, t, s, "consistency")
        a2_s = float(SCHED.alpha2(torch.tensor(s, dtype=torch.float64)))
        assert (cz, c0, n) == (
            0.0,
            pytest.approx(math.sqrt(a2_s)),
            pytest.approx(math.sqrt(1 - a2_s)),
        )
    assert step_coefficients(SCHED, 0.25, 0.0, "consistency")[2:] == (1.0, 0.0, 0.0)


def _gaussian_model(scale: float):
    """Exact v̂ for data x ~ N(0, scale²·I): x̂0 = α·scale²·z / (α²·scale² + σ²)."""

    def model_fn(z, alpha2):
        a2 = alpha2[:, None].double()
        alpha, sigma = a2.sqrt(), (1 - a2).sqrt()
        x0 = alpha * scale**2 * z.double() / (a2 * scale**2 + 1 - a2)
        return ((alpha * z.double() - x0) / sigma).float(), None  # v = (α·z − x̂0)/σ

    return model_fn


@pytest.mark.parametrize("scale", [0.5, 2.0])
def test_dpmpp_2m_is_second_order_on_the_probability_flow_ode(scale):
    """Gaussian data: the ODE's exact z_t = z_T·√(α_t²·scale² + σ_t²) / √(α_T²·scale² + σ_T²);
    every sampler here returns x̂0 at the last grid time t_N = 1/steps, so compare with the exact
    x̂0(z_{t_N}) = α·scale²·z / (α²·scale² + σ²)."""
    torch.manual_seed(0)
    z_T = torch.randn(4, 16).double()

    def a2(t: float) -> float:
        return float(SCHED.alpha2(torch.tensor(t, dtype=torch.float64)))

    def var(t: float) -> float:  # Var z_t / Var x-unit
        return a2(t) * scale**2 + 1 - a2(t)

    errs = {}
    for sampler in ("ddim", "dpmpp-2m"):
        for steps in (16, 64, 128, 256):
            t_n = 1.0 / steps
            z_n = z_T * math.sqrt(var(t_n) / var(1.0))
            exact = math.sqrt(a2(t_n)) * scale**2 * z_n / var(t_n)
            cfg = SamplerConfig(sampler=sampler, num_inference_steps=steps, rescale=False)
            noise = torch.cat((z_T.float()[None], torch.zeros(steps, 4, 16)))
            x0 = sample(_gaussian_model(scale), noise, cfg, torch.ones(4), None, guided_update_ref)
            errs[sampler, steps] = float((x0.double() - exact).abs().max() / exact.abs().max())
    for steps in (16, 64, 128, 256):
        assert errs["dpmpp-2m", steps] < errs["ddim", steps] / 2, errs
    # asymptotically, halving the step size cuts the 2M error by ≈ 4 (second order) and the DDIM
    # error by ≈ 2 (first order); the first step from the clamped log-SNR keeps few-step errors
    # from following the asymptotic rate
    assert errs["dpmpp-2m", 256] < errs["dpmpp-2m", 128] / 2.8, errs
    assert errs["ddim", 256] > errs["ddim", 128] / 2.5, errs


def test_captured_sampler_rejects_multistep_samplers():
    assert sampler_coefficients(
        SamplerConfig(sampler="consistency", num_inference_steps=4)
    ).shape == (4, 5)
    with pytest.raises(ValueError, match="previous step"):
        sampler_coefficients(SamplerConfig(sampler="dpmpp-2m", num_inference_steps=8))


# ----------------------------------------------------------------------------- student network
def test_student_starts_as_its_teacher_and_needs_w():
    torch.manual_seed(0)
    teacher = ScoreNetwork(SCORE_NET_PRESETS["tiny"]).eval()
    student = student_from_teacher(teacher).eval()
    z, ctx, a2 = torch.randn(3, 32), torch.randn(3, 32), torch.rand(3)
    ref = teacher(z, ctx, a2)
    for w in (1.0, 3.0):
        got = student(z, ctx, a2, None, torch.full((3,), w))
        torch.testing.assert_close(got, ref)  # zero-initialised w embedding
    with pytest.raises(ValueError, match="cfg_scale"):
        student(z, ctx, a2)
    with pytest.raises(ValueError, match="cfg_scale"):
        teacher(z, ctx, a2, None, torch.ones(3))
    # once trained (here: every zero-initialised weight drawn at random), w changes the output
    with torch.no_grad():
        for p in student.parameters():
            if not p.any():
                p.normal_(std=0.2)
    a = student(z, ctx, a2, None, torch.full((3,), 1.0))
    b = student(z, ctx, a2, None, torch.full((3,), 3.0))
    assert (a - b).abs().max() > 1e-3


@pytest.mark.parametrize("bad", [dict(grid=0), dict(skip=0), dict(skip=65), dict(cfg_range=(2.0, 1.0)),
                                 dict(target_ema=1.0), dict(huber_c=0.0)])  # fmt: skip
def test_distill_config_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        DistillConfig(**bad)


def _toy_data(n: int, d: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ctx = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1) * math.sqrt(d)
    mix = ctx + 0.5 * torch.randn(n, d, generator=g)
    x = torch.nn.functional.normalize(mix, dim=-1) * math.sqrt(d)
    return ctx, x


def test_distill_loss_is_zero_for_a_perfect_pair_and_has_gradients():
    torch.manual_seed(0)
    teacher = ScoreNetwork(SCORE_NET_PRESETS["tiny"]).eval().requires_grad_(False)
    student = student_from_teacher(teacher)
    ctx, x = _toy_data(8, 32)
    eps = torch.randn(8, 32)
    cfg = DistillConfig(grid=8, skip=8)  # t = 1 → s = 0: the target is the teacher's DDIM x̂0
    n = torch.full((8,), 8)
    loss = distill_loss(student, student, teacher, ctx, x, n, torch.ones(8), eps, cfg)
    assert loss.item() < 1e-3  # student = teacher: one teacher step lands on the same x̂0
    cfg = DistillConfig(grid=8, skip=1)
    n = torch.full((8,), 5)
    loss = distill_loss(student, student, teacher, ctx, x, n, torch.ones(8), eps, cfg)
    loss.backward()
    assert loss.item() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())


def test_distillation_moves_the_one_step_student_toward_the_teacher(tmp_path):
    """A short schedule on a tiny model: the 1-step student gets closer to the teacher's ODE
    sample from the same z_T; the run logs, checkpoints and resumes."""
    torch.manual_seed(0)
    teacher = ScoreNetwork(SCORE_NET_PRESETS["tiny"])
    ctx, x = _toy_data(512, 32)
    held = _toy_data(64, 32, seed=1)
    cfg = TrainConfig(steps=60, batch_size=64, lr=1e-3, warmup=5, ema_decay=0.9,
                      eval_every=60, save_every=30, seed=0)  # fmt: skip
    dcfg = DistillConfig(grid=16, skip=4, cfg_range=(1.0, 2.0), eval_rows=64)
    before_student = student_from_teacher(teacher)
    ema = train_distill(teacher, (ctx, x), held, tmp_path, cfg, dcfg, teacher_eval_steps=32)
    log = log_rows(tmp_path)
    assert log[-1]["step"] == 60

    g = torch.Generator().manual_seed(5)
    z_T, w = torch.randn(64, 32, generator=g), 1 + torch.rand(64, generator=g)
    target = teacher_ode(teacher, z_T, held[0], w, 32)
    before = evaluate_student(before_student, target, z_T, held[0], w, held[1])
    after = evaluate_student(ema.model, target, z_T, held[0], w, held[1])
    assert after["eval_cos_teacher_1step"] > before["eval_cos_teacher_1step"] + 0.05, (
        before,
        after,
    )
    # resume: a longer schedule continues from the checkpoint at step 60
    cfg2 = TrainConfig(**{**cfg.__dict__, "steps": 62})
    train_distill(teacher, (ctx, x), held, tmp_path, cfg2, dcfg, teacher_eval_steps=32)
    steps = [r["step"] for r in log_rows(tmp_path)]
    assert steps[-1] == 62
    # a different teacher is a different run
    other = ScoreNetwork(SCORE_NET_PRESETS["tiny"])
    with pytest.raises(ValueError, match="different run"):
        train_distill(other, (ctx, x), held, tmp_path, cfg2, dcfg, teacher_eval_steps=4)


# ----------------------------------------------------------------------------- CLI + engine
@pytest.fixture(scope="module")
def student_bundle(tmp_path_factory, tiny_bundle):
    """`dglm train distill` (short schedule) on the tiny bundle, then `dglm bundle add-student`."""
    root = tmp_path_factory.mktemp("distill")
    data = root / "data"
    data.mkdir()
    for split, n, seed in (("train", 96, 0), ("eval", 16, 1)):
        ctx, x = _toy_data(n, 384, seed)
        save_file({"prefix": ctx, "continuation": x}, str(data / f"latents_{split}.safetensors"))
    run = root / "run"
    rc = main(["train", "distill", str(data), "--bundle", str(tiny_bundle), "--out", str(run),
               "--steps", "4", "--batch-size", "16", "--warmup", "2", "--eval-every", "2",
               "--grid", "16", "--skip", "2", "--cfg-range", "1,3"])  # fmt: skip
    assert rc == 0
    log = log_rows(run)
    assert [r["step"] for r in log] == [2, 4] and "eval_cos_teacher_4step" in log[-1]
    out = root / "bundle"
    rc = main(["bundle", "add-student", str(tiny_bundle), "--distill", str(run), "--out", str(out),
               "--default-steps", "2"])  # fmt: skip
    assert rc == 0
    return out


def test_student_bundle_defaults_to_the_student_and_keeps_the_teacher(student_bundle, tiny_bundle):
    engine = Engine.from_pretrained(student_bundle)
    assert engine.config.sampler.sampler == "consistency"
    assert engine.config.sampler.num_inference_steps == 2
    assert engine.config.student_cfg_range == (1.0, 3.0)
    info = engine.info()
    assert info["student"]["guidance_embedding"] is True and info["student"]["parameters"] > 0
    calls = []
    for name, net in (("teacher", engine.dglm.score_net), ("student", engine.dglm.student)):
        net.register_forward_hook(lambda *a, name=name: calls.append(name))
    params = [
        GenerationParams(seed=1, max_new_tokens=2),  # the bundle's default: student, 2 steps
        GenerationParams(
            seed=1, max_new_tokens=2, sampler="consistency", num_inference_steps=4, cfg_scale=2.5
        ),  # fmt: skip
        GenerationParams(seed=1, max_new_tokens=2, sampler="dpmpp-2m", num_inference_steps=8),
        GenerationParams(seed=1, max_new_tokens=2, sampler="ddpm", num_inference_steps=5),
    ]
    outs = engine.generate(["The movie was"] * 4, params)
    assert calls.count("student") == 2 + 4  # one evaluation per step, w is an input
    assert calls.count("teacher") == 8 + 5
    assert all(len(o.samples[0].token_ids) >= 1 for o in outs)
    # per request, the same seed gives the same latent alone or in a mixed batch
    alone = engine.generate(["The movie was"], params[2])
    torch.testing.assert_close(alone[0].samples[0].latent, outs[2].samples[0].latent)
    # the teacher bundle has no student
    teacher_only = Engine.from_pretrained(tiny_bundle)
    with pytest.raises(ValueError, match="distilled student"):
        teacher_only.generate(["x"], GenerationParams(sampler="consistency"))
    with pytest.raises(ValueError, match="outside the range"):
        engine.generate(["x"], GenerationParams(cfg_scale=5.0))
    # saving keeps the student
    engine.save_pretrained(student_bundle.parent / "resaved")
    again = Engine.from_pretrained(student_bundle.parent / "resaved")
    torch.testing.assert_close(
        again.dglm.student.state_dict()["guidance_mlp.fc2.weight"],
        engine.dglm.student.state_dict()["guidance_mlp.fc2.weight"],
    )


def test_the_student_refuses_more_steps_than_it_was_distilled_for(student_bundle, tmp_path):
    """num_inference_steps past the student's 1-4 is refused naming the range, not run on the
    student (it used to run all of them) nor handed silently to another sampler."""
    engine = Engine.from_pretrained(student_bundle)
    calls = []
    for net in (engine.dglm.score_net, engine.dglm.student):
        net.register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(
        ValueError, match=r"outside \[1, 4\].*sampler='consistency': the bundle's default"
    ):
        engine.generate(["x"], GenerationParams(num_inference_steps=100, max_new_tokens=1))
    with pytest.raises(ValueError, match=r"outside \[1, 4\], the range of sampler 'consistency'"):
        engine.generate(["x"], GenerationParams(sampler="consistency", num_inference_steps=5))
    assert calls == []
    # the teacher's samplers take the many steps
    engine.generate(
        ["x"], GenerationParams(sampler="ddim", num_inference_steps=6, max_new_tokens=1)
    )
    assert len(calls) == 6
    # nor can a bundle writer make it the default
    with pytest.raises(ValueError, match=r"num_inference_steps=8 is outside \[1, 4\]"):
        add_student(student_bundle, student_bundle.parent / "run", tmp_path / "b", default_steps=8)


def test_probe_guidance_steers_the_student_without_retraining(student_bundle):
    """The probe was never seen by the distillation: it still steers the 1/2/4-step student."""
    engine = Engine.from_pretrained(student_bundle)
    probe = engine.probes.probes["sentiment"]
    prompts = ["The movie was"] * 6
    # `exact` follows the reference literally (autograd through the network, x̂0 = (z − σ·ε̂)/α):
    # at t = 1 (α ≈ 5e-5) that step is ill-posed, so the 1-step sampler is steered by `fast` only
    for steps, mode in ((1, "fast"), (2, "fast"), (4, "fast"), (2, "exact"), (4, "exact")):
        base = dict(max_new_tokens=1, num_inference_steps=steps, guidance_mode=mode)
        plain = engine.generate(prompts, [GenerationParams(seed=i, **base) for i in range(6)])
        pos = engine.generate(
            prompts,
            [GenerationParams(seed=i, controls=(Control("sentiment", "positive", 30.0),), **base)
             for i in range(6)],
        )  # fmt: skip
        lat = lambda outs: torch.stack([o.samples[0].latent for o in outs])  # noqa: E731
        p_plain = torch.sigmoid(probe.logits(lat(plain)))[:, 0]
        p_pos = torch.sigmoid(probe.logits(lat(pos)))[:, 0]
        assert (p_pos > p_plain).all(), (steps, mode, p_pos, p_plain)


def test_add_student_refuses_a_cfg_range_missing_the_bundle_default(
    tmp_path, student_bundle, tiny_bundle
):
    config = bundle_io.read_config(student_bundle)
    assert config.cfg_scale == 1.0
    run = student_bundle.parent / "run"
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    ckpt["meta"]["model_config"]["distill"]["cfg_range"] = [2.0, 3.0]
    bad = tmp_path / "run"
    bad.mkdir()
    torch.save(ckpt, bad / "checkpoint.pt")
    with pytest.raises(ValueError, match="outside the student's range"):
        add_student(student_bundle, bad, tmp_path / "b")
    # --keep-default: allowed where the bundle keeps a teacher sampler as its default
    cfg = add_student(tiny_bundle, bad, tmp_path / "b2", default_steps=None)
    assert cfg.student_cfg_range == (2.0, 3.0) and cfg.sampler.sampler != "consistency"
    # not where its default is the student: every request at the default cfg_scale would fail
    with pytest.raises(
        ValueError, match=r"cfg_scale 1.0 is outside student_cfg_range \[2.0, 3.0\]"
    ):
        add_student(student_bundle, bad, tmp_path / "b3", default_steps=None)


def test_diffusion_continues_from_a_bundle_and_replaces_its_score_network(tmp_path, student_bundle):
    """`dglm train diffusion --bundle` starts from the bundle's weights (not a fresh preset);
    `dglm bundle add-score-network` ships the run's EMA network and drops the stale student."""
    data = student_bundle.parent / "data"
    run = tmp_path / "run"
    rc = main(["train", "diffusion", str(data), "--bundle", str(student_bundle), "--out", str(run),
               "--steps", "2", "--batch-size", "16", "--warmup", "1", "--lr", "1e-4",
               "--ema-decay", "0"])  # fmt: skip
    assert rc == 0
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    start = bundle_score_network(student_bundle).state_dict()
    config = bundle_io.read_config(student_bundle).score_network
    assert ckpt["meta"]["model_config"] == config.__dict__
    trained = ckpt["ema"]
    # two Adam steps at lr 1e-4 from the bundle's weights: moved, but only by ~the step size
    assert any(not torch.equal(start[k], trained[k]) for k in start)
    assert max((start[k] - trained[k]).abs().max().item() for k in start) < 1e-3
    out = tmp_path / "bundle"
    rc = main(
        ["bundle", "add-score-network", str(student_bundle), "--run", str(run), "--out", str(out)]
    )
    assert rc == 0
    config = bundle_io.read_config(out)
    assert config.student is None and not (out / bundle_io.STUDENT_FILE).exists()
    assert (config.sampler.sampler, config.sampler.num_inference_steps) == ("dpmpp-2m", 20)
    engine = Engine.from_pretrained(out)
    shipped = engine.dglm.score_net.state_dict()
    assert all(torch.allclose(shipped[k].float(), trained[k].half().float()) for k in trained)
    bad = ["bundle", "add-score-network", str(student_bundle), "--run",
           str(student_bundle.parent / "run"), "--out", str(tmp_path / "b2")]  # fmt: skip
    assert main(bad) == 2  # a distillation run, not a diffusion one: refused
    assert not (tmp_path / "b2").exists()


def test_onnx_export_carries_the_student(student_bundle, minilm, tmp_path):
    """The student is exported as its own graph (w as input), validated against PyTorch, and the
    ONNX engine's default (student) sampler gives the torch engine's latents and tokens."""
    manifest = export_onnx(
        student_bundle, tmp_path, ExportConfig(batch_buckets=(1, 4), max_len=64), encoder=minilm
    )
    assert manifest["graphs"]["student"]["inputs"][3]["name"] == "cfg_scale"
    assert manifest["validation"]["graphs"]["student"]["v"]["ok"]
    ref_engine, onnx_engine = (
        Engine.from_pretrained(student_bundle),
        Engine.from_pretrained(tmp_path, backend="onnx"),
    )
    assert onnx_engine.config.sampler.sampler == "consistency"
    prompts = ["The movie was", "Prices are"]
    params = [
        GenerationParams(
            seed=1, max_new_tokens=4, controls=(Control("sentiment", "positive", 20.0),)
        ),
        GenerationParams(seed=2, max_new_tokens=4, cfg_scale=2.0, num_inference_steps=1),
    ]
    ref, got = ref_engine.generate(prompts, params), onnx_engine.generate(prompts, params)
    for o_ref, o_got in zip(ref, got, strict=True):
        assert o_got.samples[0].token_ids == o_ref.samples[0].token_ids
        torch.testing.assert_close(
            o_got.samples[0].latent, o_ref.samples[0].latent, rtol=1e-4, atol=1e-4
        )


def test_ema_target_network_is_checkpointed_and_resumed(tmp_path):
    torch.manual_seed(0)
    teacher = ScoreNetwork(SCORE_NET_PRESETS["tiny"])
    data, held = _toy_data(64, 32), _toy_data(16, 32, seed=1)
    cfg = TrainConfig(steps=3, batch_size=16, lr=1e-3, warmup=1, eval_every=3, save_every=3)
    dcfg = DistillConfig(grid=8, skip=2, target_ema=0.5, eval_rows=16)
    train_distill(teacher, data, held, tmp_path, cfg, dcfg, teacher_eval_steps=4)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    target, student = state["extra"]["target"], list(state["model"].values())
    assert len(target) == len(student)
    assert any((t - s).abs().max() > 0 for t, s in zip(target, student, strict=True))  # lags
    cfg2 = TrainConfig(**{**cfg.__dict__, "steps": 4})
    train_distill(teacher, data, held, tmp_path, cfg2, dcfg, teacher_eval_steps=4)
    again = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert again["step"] == 4
    assert any(
        (a - t).abs().max() > 0 for a, t in zip(again["extra"]["target"], target, strict=True)
    )
