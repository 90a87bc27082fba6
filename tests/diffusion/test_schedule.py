import math

import pytest
import torch
from dglm.engine.diffusion.schedule import NoiseSchedule, step_coefficients, time_grid


def test_cosine_alpha2_matches_formula():
    t = torch.linspace(0.01, 0.99, 17, dtype=torch.float64)
    a2 = NoiseSchedule(1.0).alpha2(t)
    torch.testing.assert_close(a2, torch.cos(t * math.pi / 2) ** 2, rtol=1e-9, atol=1e-12)
    assert (a2[1:] < a2[:-1]).all()


def test_log_snr_shift_and_clamp():
    t = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
    base, shifted = NoiseSchedule(1.0).log_snr(t), NoiseSchedule(3.0).log_snr(t)
    torch.testing.assert_close(shifted - base, torch.full_like(t, 2 * math.log(3.0)))
    assert base[0] == 20.0 and base[2] == -20.0


@pytest.mark.parametrize("var_lambda", [0.0, 0.2, 1.0])
def test_ddpm_coefficients_equal_eps_form(var_lambda):
    """c0·x0 + cz·z equals the reference's (z − (1−a²_{t|s})/σ_t·ε̂)/√a²_{t|s} form."""
    sched, gen = NoiseSchedule(), torch.Generator().manual_seed(0)
    x0, eps = (
        torch.randn(5, 16, generator=gen, dtype=torch.float64),
        torch.randn(5, 16, generator=gen, dtype=torch.float64),
    )
    for t, s in [(0.9, 0.85), (0.5, 0.3), (0.1, 0.05)]:
        a_t, s_t, c0, cz, n = step_coefficients(sched, t, s, "ddpm", var_lambda)
        z = a_t * x0 + s_t * eps
        a2_t, a2_s = (
            float(sched.alpha2(torch.tensor(t, dtype=torch.float64))),
            float(sched.alpha2(torch.tensor(s, dtype=torch.float64))),
        )
        a2_now = a2_t / a2_s
        ref_mean = (z - (1 - a2_now) / math.sqrt(1 - a2_t) * eps) / math.sqrt(a2_now)
        torch.testing.assert_close(c0 * x0 + cz * z, ref_mean, rtol=1e-9, atol=1e-9)
        min_var = (1 - a2_s) / (1 - a2_t) * (1 - a2_now)
        max_var = 1 - a2_now
        ref_var = math.exp(var_lambda * math.log(max_var) + (1 - var_lambda) * math.log(min_var))
        assert n**2 == pytest.approx(ref_var, rel=1e-9)


def test_ddim_is_exact_on_exact_predictions():
    sched, gen = NoiseSchedule(), torch.Generator().manual_seed(1)
    x0, eps = (
        torch.randn(3, 8, generator=gen, dtype=torch.float64),
        torch.randn(3, 8, generator=gen, dtype=torch.float64),
    )
    a_t, s_t, c0, cz, n = step_coefficients(sched, 0.7, 0.4, "ddim")
    a_s = math.sqrt(float(sched.alpha2(torch.tensor(0.4, dtype=torch.float64))))
    z_s = c0 * x0 + cz * (a_t * x0 + s_t * eps)
    torch.testing.assert_close(z_s, a_s * x0 + math.sqrt(1 - a_s**2) * eps)
    assert n == 0.0


def test_last_step_returns_x0_and_grid():
    grid = time_grid(4)
    assert grid[0][0] == 1.0 and grid[-1][1] == 0.0 and len(grid) == 4
    for sampler in ("ddpm", "ddim"):
        assert step_coefficients(NoiseSchedule(), *grid[-1], sampler)[2:] == (1.0, 0.0, 0.0)


@pytest.mark.parametrize("bad", [dict(sampler="euler"), dict(var_lambda=1.5)])
def test_bad_arguments(bad):
    kw = dict(sampler="ddpm", var_lambda=0.2) | bad
    with pytest.raises(ValueError, match=next(iter(bad))):
        step_coefficients(NoiseSchedule(), 0.5, 0.4, **kw)
    with pytest.raises(ValueError, match="num_inference_steps"):
        time_grid(0)


def test_sqrt_schedule_matches_formula_and_steps():
    """Diffusion-LM's sqrt schedule: alpha² = 1 − √(t + s) inside the clamp, and the shared step
    coefficients take it (DDIM's last step returns x̂0)."""
    from dglm.engine.diffusion.schedule import SqrtSchedule

    sched = SqrtSchedule()
    t = torch.linspace(0.0, 0.99, 23, dtype=torch.float64)
    torch.testing.assert_close(sched.alpha2(t), 1 - (t + 1e-4).sqrt(), rtol=1e-9, atol=1e-12)
    assert sched.log_snr(torch.tensor([1.0], dtype=torch.float64)).item() == -20.0
    grid = time_grid(4)
    assert step_coefficients(sched, *grid[-1], "ddim")[2:] == (1.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="offset"):
        SqrtSchedule(0.0)
