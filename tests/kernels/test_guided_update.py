"""The C++ op `dglm.kernels.cpu_ops.guided_update` against `guided_update_ref` run in float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from dglm.kernels.guided_update import (
    GuidedUpdateInputs,
    guided_update_cpu,
    guided_update_ref,
    select_guided_update,
)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """The float64 reference on ≤ 64 × 768 inputs: torch's intra-op threads only add barrier
    waits (seconds per test on a busy 2-core machine). The C++ op's OpenMP pool is separate."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def cpu_ext():
    return pytest.importorskip(
        "dglm.kernels.cpu_ops",
        reason="C++ extension dglm.kernels.cpu_ops not built; run `pip install -e .`",
    )


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(20240611)


def make_inputs(
    gen: torch.Generator, b: int, d: int, k: int, cfg: bool, dtype: torch.dtype = torch.float32
) -> GuidedUpdateInputs:
    """Random inputs with per-row coefficients, CFG weights and probe scales (some zero)."""

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    def uniform(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(*shape, generator=gen)

    scale = uniform(0.1, 4.0, b, k)
    scale[torch.rand(b, k, generator=gen) < 0.3] = 0.0
    if scale.numel() > 0:
        scale.view(-1)[0] = 0.0  # always at least one probe switched off
    coefs = torch.stack(
        [
            uniform(0.05, 1.0, b),  # alpha_t
            uniform(0.05, 1.0, b),  # sigma_t
            uniform(0.1, 1.2, b),  # coef_x0
            uniform(0.1, 1.2, b),  # coef_z
            uniform(0.0, 0.6, b),  # noise_std
        ],
        dim=1,
    )  # (B, 5)
    inputs = GuidedUpdateInputs(
        z=randn(b, d),
        v_cond=randn(b, d),
        v_uncond=randn(b, d) if cfg else None,
        cfg_scale=uniform(0.5, 7.5, b),
        probe_weight=randn(k, d) / d**0.5 * 4,
        probe_bias=randn(k),
        probe_target=torch.randint(0, 2, (b, k), generator=gen).float(),
        probe_scale=scale,
        noise=randn(b, d),
        coefs=coefs,
    )
    return GuidedUpdateInputs(*(None if t is None else t.to(dtype) for t in inputs))


def as_arrays(inputs: GuidedUpdateInputs) -> dict[str, np.ndarray | None]:
    """The C++ op's inputs by name, in its argument order."""
    return {n: None if t is None else t.numpy() for n, t in inputs._asdict().items()}


def ref_fp64(inputs: GuidedUpdateInputs, rescale: bool) -> tuple[torch.Tensor, ...]:
    """`guided_update_ref` in float64: inputs cast up, and its `.float()` casts made `.double()`."""
    args = GuidedUpdateInputs(*(None if t is None else t.double() for t in inputs))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.Tensor, "float", torch.Tensor.double)
        z_next, x0 = guided_update_ref(args, rescale=rescale)
    assert z_next.dtype == x0.dtype == torch.float64
    return z_next, x0


def assert_matches_fp64(out: tuple[torch.Tensor, ...], ref: tuple[torch.Tensor, ...]) -> None:
    for name, o, r in zip(("z_next", "x0"), out, ref, strict=True):
        assert o.dtype == torch.float32 and o.shape == r.shape, (name, o.dtype, o.shape)
        # outputs are O(1) (x0 on the √D sphere), so atol is ~3e-6 of the rows' scale
        torch.testing.assert_close(o.double(), r, rtol=3e-6, atol=3e-6, msg=name)


@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("cfg", [True, False])
@pytest.mark.parametrize("k", [0, 1, 2, 3])
@pytest.mark.parametrize("d", [384, 768, 41])
@pytest.mark.parametrize("b", [1, 2, 7, 64])
def test_cpp_matches_reference(cpu_ext, gen, b, d, k, cfg, rescale):
    inputs = make_inputs(gen, b, d, k, cfg)
    out = guided_update_cpu(inputs, rescale=rescale)
    assert_matches_fp64(out, ref_fp64(inputs, rescale))


@pytest.mark.parametrize(
    ("b", "d", "k"),
    [(9, 41, 5), (3, 384, 8), (300, 768, 3), (257, 384, 6)],
    ids=["generic-K", "generic-K-8", "threaded", "threaded-generic-K"],
)
@pytest.mark.parametrize("rescale", [True, False])
def test_cpp_generic_and_threaded_paths(cpu_ext, gen, b, d, k, rescale):
    inputs = make_inputs(gen, b, d, k, cfg=True)
    out = guided_update_cpu(inputs, rescale=rescale)
    assert_matches_fp64(out, ref_fp64(inputs, rescale))


def test_raw_op_writes_preallocated_outputs(cpu_ext, gen):
    b, d, k = 7, 341, 2
    inputs = make_inputs(gen, b, d, k, cfg=True)
    arrays = list(as_arrays(inputs).values())
    z_next = np.full((b, d), np.nan, dtype=np.float32)
    x0 = np.full((b, d), np.nan, dtype=np.float32)
    assert cpu_ext.guided_update(*arrays, True, z_next, x0) is None
    assert_matches_fp64((torch.from_numpy(z_next), torch.from_numpy(x0)), ref_fp64(inputs, True))


def test_wrapper_accepts_views_float64_and_grad(cpu_ext, gen):
    b, d, k = 9, 41, 3
    inputs = make_inputs(gen, b, d, k, cfg=True)
    ref = ref_fp64(inputs, True)
    # non-contiguous fp32 views, a float64 tensor and a tensor that requires grad
    views = GuidedUpdateInputs(*(t.T.contiguous().T if t.dim() == 2 else t for t in inputs))
    views = views._replace(
        v_uncond=inputs.v_uncond,
        cfg_scale=inputs.cfg_scale.double(),
        probe_bias=inputs.probe_bias.clone().requires_grad_(),
    )
    assert not views.z.is_contiguous()
    assert_matches_fp64(guided_update_cpu(views, rescale=True), ref)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_wrapper_keeps_dtype(cpu_ext, gen, dtype):
    b, d, k = 9, 41, 2
    inputs = make_inputs(gen, b, d, k, cfg=True, dtype=dtype)
    out = guided_update_cpu(inputs, rescale=True)
    ref64 = ref_fp64(inputs, True)
    ref_own = guided_update_ref(inputs, rescale=True)  # the reference in this dtype
    for name, o, r64, r in zip(("z_next", "x0"), out, ref64, ref_own, strict=True):
        assert o.dtype == dtype, name
        err = (o.double() - r64).abs()
        # the op computes in fp32, like the reference: judge it by the reference's own error
        bound = 2 * (r.double() - r64).abs() + 1e-5
        assert bool((err <= bound).all()), (name, (err - bound).max().item())


BAD_SHAPES = [
    ("z", (5,)),
    ("v_cond", (3, 17)),
    ("v_uncond", (4, 16)),
    ("cfg_scale", (3, 1)),
    ("probe_weight", (2, 15)),
    ("probe_bias", (3,)),
    ("probe_target", (3, 3)),
    ("probe_scale", (2, 2)),
    ("noise", (3, 15)),
    ("coefs", (3, 4)),
    ("z_next", (3, 17)),
    ("x0", (16, 3)),
]


@pytest.mark.parametrize(("name", "shape"), BAD_SHAPES, ids=[n for n, _ in BAD_SHAPES])
def test_bad_shape_raises_value_error(cpu_ext, gen, name, shape):
    b, d, k = 3, 16, 2
    arrays = as_arrays(make_inputs(gen, b, d, k, cfg=True))
    outs = {"z_next": np.empty((b, d), np.float32), "x0": np.empty((b, d), np.float32)}
    (arrays if name in arrays else outs)[name] = np.ones(shape, np.float32)
    with pytest.raises(ValueError, match=f"guided_update: {name} must"):
        cpu_ext.guided_update(*arrays.values(), True, outs["z_next"], outs["x0"])


def test_bad_outputs_raise_value_error(cpu_ext, gen):
    b, d, k = 3, 16, 2
    arrays = list(as_arrays(make_inputs(gen, b, d, k, cfg=True)).values())

    def call(z_next: np.ndarray, x0: np.ndarray) -> None:
        cpu_ext.guided_update(*arrays, True, z_next, x0)

    good = np.empty((b, d), np.float32)
    with pytest.raises(ValueError, match="z_next must be a float32"):
        call(np.empty((b, d), np.float64), good)
    with pytest.raises(ValueError, match="x0 must be C-contiguous"):
        call(good, np.empty((d, b), np.float32).T)
    read_only = np.empty((b, d), np.float32)
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="x0 must be writeable"):
        call(good, read_only)
    with pytest.raises(ValueError, match="z_next shares memory with z"):
        call(arrays[0], good)
    with pytest.raises(ValueError, match="x0 shares memory with z_next"):
        call(good, good)


def test_select_picks_cpp_on_cpu(cpu_ext, monkeypatch):
    monkeypatch.delenv("DGLM_GUIDED_UPDATE", raising=False)
    assert select_guided_update("cpu") is guided_update_cpu
    assert select_guided_update("cpu", prefer="cpp") is guided_update_cpu


def test_select_reference_when_asked(monkeypatch):
    monkeypatch.delenv("DGLM_GUIDED_UPDATE", raising=False)
    assert select_guided_update("cpu", prefer="reference") is guided_update_ref
