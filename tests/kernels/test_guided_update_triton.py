"""`guided_update_triton` against `guided_update_ref` computed in float64.

fp32 runs everywhere (CPU: Triton interpreter); bf16/fp16 and CUDA-graph capture need a GPU.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

from dglm.kernels.guided_update import (  # noqa: E402
    GuidedUpdateInputs,
    guided_update_ref,
    guided_update_triton,
    select_guided_update,
)


def make_inputs(
    b: int, d: int, k: int, cfg: bool, dtype: torch.dtype, device, gen: torch.Generator
) -> GuidedUpdateInputs:
    """Fresh random inputs: rows at different times, some probes off (scale 0) for some rows."""
    alpha = 0.05 + 0.9 * torch.rand(b, generator=gen)
    coefs = torch.stack(
        [alpha, (1 - alpha**2).sqrt(), *(torch.rand(3, b, generator=gen))], dim=1
    )  # (B, 5) [α, σ, c0, cz, n]
    scale = 8 * torch.rand(b, k, generator=gen) * (torch.rand(b, k, generator=gen) > 0.2)
    x = GuidedUpdateInputs(
        z=torch.randn(b, d, generator=gen),
        v_cond=torch.randn(b, d, generator=gen),
        v_uncond=torch.randn(b, d, generator=gen) if cfg else None,
        cfg_scale=1 + 3 * torch.rand(b, generator=gen),
        probe_weight=3 * torch.randn(k, d, generator=gen),
        probe_bias=torch.randn(k, generator=gen),
        probe_target=torch.rand(b, k, generator=gen),
        probe_scale=scale,
        noise=torch.randn(b, d, generator=gen),
        coefs=coefs,
    )
    low = {"z", "v_cond", "v_uncond", "noise"}  # the latent-width activations carry the dtype
    return GuidedUpdateInputs(
        **{
            n: None if t is None else t.to(device, dtype if n in low else torch.float32)
            for n, t in x._asdict().items()
        }
    )


def update64(x: GuidedUpdateInputs, rescale: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference computed in float64 (it keeps float64 inputs in float64)."""
    out = guided_update_ref(
        GuidedUpdateInputs(*(None if t is None else t.double() for t in x)), rescale
    )
    assert out[0].dtype == out[1].dtype == torch.float64
    return out


# (B, D, K, cfg): odd widths, no probes up to 3, with and without CFG; D up to one 1024 block
CASES = [(1, 41, 0, False), (3, 41, 1, True), (3, 384, 2, False), (5, 384, 3, True),
         (2, 1024, 3, True), (9, 341, 2, True)]  # fmt: skip


@pytest.mark.parametrize("rescale", [True, False], ids=["rescale", "no-rescale"])
@pytest.mark.parametrize(("case", "tol"), [(c, 2e-5) for c in CASES], ids=str)
def test_fp32_matches_f64(case, tol, rescale, device, gen):
    x = make_inputs(*case, torch.float32, device, gen)
    z_next, x0 = guided_update_triton(x, rescale)
    z64, x064 = update64(x, rescale)
    assert z_next.dtype == x0.dtype == torch.float32 and z_next.shape == x.z.shape
    for got, want in ((z_next, z64), (x0, x064)):
        scale = want.abs().max().item()
        torch.testing.assert_close(got.double(), want, atol=tol * scale, rtol=tol)


def test_noncontiguous_and_empty(device, gen):
    x = make_inputs(4, 64, 2, True, torch.float32, device, gen)
    wide = torch.randn(4, 128, generator=gen).to(device)
    x = x._replace(z=wide[:, ::2])  # stride 2 along D
    got = guided_update_triton(x, True)
    want = update64(x, True)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), w, atol=1e-4, rtol=2e-5)
    empty = make_inputs(0, 64, 2, True, torch.float32, device, gen)
    z_next, x0 = guided_update_triton(empty, True)
    assert z_next.shape == x0.shape == (0, 64)


def test_select_forced_triton(monkeypatch):
    """prefer='triton' runs on CUDA, or on CPU under the interpreter; auto never picks it on CPU."""
    if not torch.cuda.is_available():
        assert select_guided_update("cpu", "triton") is guided_update_triton  # TRITON_INTERPRET=1
        assert select_guided_update("cpu") is not guided_update_triton
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            select_guided_update("cpu", "triton")
    else:
        assert select_guided_update("cuda") is guided_update_triton
        assert select_guided_update("cuda", "triton") is guided_update_triton


def test_rejects_too_wide(device, gen):
    x = make_inputs(1, 4097, 0, False, torch.float32, device, gen)
    with pytest.raises(ValueError, match="D=4097"):
        guided_update_triton(x, True)


@pytest.mark.parametrize(("dtype", "block_d"), [(torch.float32, 512), (torch.bfloat16, 1024)])
def test_compiles_for_sm90(compile_sm90, dtype, block_d):
    """The compiled (non-interpreted) kernel builds for H100."""
    ptr = {torch.float32: "*fp32", torch.bfloat16: "*bf16"}[dtype]
    names = ("z_ptr", "vc_ptr", "vu_ptr", "noise_ptr", "z_next_ptr", "x0_ptr")
    sig = dict.fromkeys(names, ptr)
    sig |= dict.fromkeys(
        ("cfg_ptr", "w_ptr", "bias_ptr", "tgt_ptr", "scl_ptr", "coef_ptr"), "*fp32"
    )
    sig |= {"D": "i32", "K": "i32", "sqrt_d": "fp32", "eps": "fp32"}
    consts = {"HAS_UNCOND": True, "HAS_PROBES": True, "RESCALE": True, "BLOCK_D": block_d}
    builder = "dglm.kernels.guided_update:_build_triton_kernel"
    assert compile_sm90(builder, sig, consts, num_warps=4)["entry"]


# ------------------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(
    "case", [(1, 384, 2, True), (64, 384, 3, True), (9, 41, 0, False)], ids=str
)
def test_16bit_within_ref_error(case, dtype, gen):
    """|kernel − ref64| ≤ 2·|ref16 − ref64| + ε, ref16 = the eager reference on the same inputs."""
    x = make_inputs(*case, dtype, "cuda", gen)
    got = guided_update_triton(x, True)
    ref16 = guided_update_ref(x, True)  # fp32 math, rounded to dtype on the way out
    ulp = torch.finfo(dtype).eps
    for g, r16, r64 in zip(got, ref16, update64(x, True), strict=True):
        assert g.dtype == dtype
        bound = 2 * (r16.double() - r64).abs() + ulp * (r64.abs() + 1e-2)
        assert ((g.double() - r64).abs() <= bound).all()


@pytest.mark.gpu
def test_cuda_graph_replay(gen):
    x = make_inputs(8, 384, 3, True, torch.float32, "cuda", gen)
    guided_update_triton(x, True)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = guided_update_triton(x, True)
    for _ in range(2):
        fresh = make_inputs(8, 384, 3, True, torch.float32, "cuda", gen)
        for t, f in zip(x, fresh, strict=True):
            t.copy_(f)
        graph.replay()
        want = guided_update_triton(x, True)
        for o, w in zip(out, want, strict=True):
            torch.testing.assert_close(o, w, atol=0, rtol=0)
