"""`qk_norm_attention` (Triton) against `qk_norm_attention_ref` computed in float64.

fp32 runs everywhere (CPU: Triton interpreter); bf16/fp16, the layer switch and CUDA-graph capture
need a GPU.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

from dglm.engine import layers  # noqa: E402
from dglm.kernels.attention import (  # noqa: E402
    MAX_TOKENS,
    qk_norm_attention,
    qk_norm_attention_ref,
)

# (B, T, H, Dh): the score network's shapes plus odd ones (T not a power of two, Dh = 48)
SHAPES = [(1, 8, 1, 32), (3, 9, 1, 32), (3, 32, 4, 64), (2, 64, 4, 64), (3, 33, 3, 48)]
GPU_SHAPES = [(1, 32, 4, 64), (3, 9, 4, 32), (64, 64, 4, 64), (5, 33, 3, 48)]


def make_inputs(
    b: int, t: int, h: int, dh: int, dtype: torch.dtype, device, gen: torch.Generator, packed: bool
) -> tuple[torch.Tensor, ...]:
    """q, k, v (B, T, H, Dh) — strided views of one packed (B, T, 3, H, Dh) tensor, as the layer
    hands them over, or three contiguous tensors — and norm weights near 1."""
    scale = 2.0  # peaky enough that the softmax is not uniform
    if packed:
        qkv = scale * torch.randn(b, t, 3, h, dh, generator=gen)
        q, k, v = qkv.to(device, dtype).unbind(2)
    else:
        q, k, v = (scale * torch.randn(b, t, h, dh, generator=gen) for _ in range(3))
        q, k, v = (y.to(device, dtype) for y in (q, k, v))
    w_q, w_k = (1 + 0.2 * torch.randn(dh, generator=gen) for _ in range(2))
    return q, k, v, w_q.to(device, dtype), w_k.to(device, dtype)


def ref64(q, k, v, w_q, w_k) -> torch.Tensor:
    return qk_norm_attention_ref(*(y.double() for y in (q, k, v, w_q, w_k)), eps=1e-6)


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "separate"])
@pytest.mark.parametrize(("shape", "tol"), [(s, 2e-5) for s in SHAPES], ids=str)
def test_fp32_matches_ref(shape, tol, packed, device, gen):
    q, k, v, w_q, w_k = make_inputs(*shape, torch.float32, device, gen, packed)
    out = qk_norm_attention(q, k, v, w_q, w_k, 1e-6)
    ref = ref64(q, k, v, w_q, w_k)
    assert out.shape == q.shape and out.dtype == torch.float32 and out.is_contiguous()
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)


def test_ref_is_the_layer(gen):
    """The reference is exactly `layers.Attention`'s core (norm modules + SDPA)."""
    layer = layers.Attention(dim=128, head_dim=32, time_dim=16)
    with torch.no_grad():
        layer.q_norm.weight.copy_(1 + 0.2 * torch.randn(32, generator=gen))
        layer.k_norm.weight.copy_(1 + 0.2 * torch.randn(32, generator=gen))
    q, k, v, _, _ = make_inputs(2, 9, 4, 32, torch.float32, "cpu", gen, packed=True)
    qn, kn = layer.q_norm(q), layer.k_norm(k)
    expect = torch.nn.functional.scaled_dot_product_attention(
        qn.transpose(1, 2), kn.transpose(1, 2), v.transpose(1, 2)
    ).transpose(1, 2)
    got = qk_norm_attention_ref(q, k, v, layer.q_norm.weight, layer.k_norm.weight, layer.q_norm.eps)
    torch.testing.assert_close(got, expect, atol=0, rtol=0)


def test_rejects_bad_arguments(device, gen):
    q, k, v, w_q, w_k = make_inputs(1, 8, 1, 32, torch.float32, device, gen, packed=True)
    with pytest.raises(ValueError, match="share one"):
        qk_norm_attention(q, k[:, :4], v, w_q, w_k)
    with pytest.raises(ValueError, match="q_norm_weight"):
        qk_norm_attention(q, k, v, w_q[:16], w_k)
    long = torch.randn(1, MAX_TOKENS + 1, 1, 32, generator=gen).to(device)
    with pytest.raises(ValueError, match="T="):
        qk_norm_attention(long, long, long, w_q, w_k)


@pytest.mark.parametrize(
    ("dtype", "block_t", "block_d"),
    [(torch.float32, 64, 64), (torch.bfloat16, 16, 32)],  # fp16 shares bf16's code path
    ids=str,
)
def test_compiles_for_sm90(compile_sm90, dtype, block_t, block_d):
    """The compiled (non-interpreted) kernel builds for H100 and fits in shared memory."""
    ptr = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16"}[dtype]
    sig = {n: ptr for n in ("q_ptr", "k_ptr", "v_ptr", "qw_ptr", "kw_ptr", "o_ptr")}
    ints = "T H Dh sq_b sq_t sq_h sk_b sk_t sk_h sv_b sv_t sv_h so_b so_t so_h".split()
    sig |= dict.fromkeys(ints, "i32") | {"eps": "fp32", "qk_scale": "fp32"}
    precision = "ieee" if dtype == torch.float32 else "tf32"
    consts = {"BLOCK_T": block_t, "BLOCK_D": block_d, "DOT_PRECISION": precision}
    out = compile_sm90("dglm.kernels.attention:_build_kernel", sig, consts, num_warps=4)
    assert out["entry"] and out["shared"] <= 227 * 1024


# ------------------------------------------------------------------------------------------ GPU


def bound16(ref16: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # |kernel − ref64| ≤ 2·|ref16 − ref64| + ε, ε = one output ulp (plus a floor near 0)
    ulp = torch.finfo(dtype).eps
    return 2 * (ref16.double() - ref).abs() + ulp * (ref.abs() + 1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
def test_16bit_within_ref_error(shape, dtype, gen):
    q, k, v, w_q, w_k = make_inputs(*shape, dtype, "cuda", gen, packed=True)
    out = qk_norm_attention(q, k, v, w_q, w_k, 1e-6)
    assert out.dtype == dtype
    ref = ref64(q, k, v, w_q, w_k)
    ref16 = qk_norm_attention_ref(q, k, v, w_q, w_k, 1e-6)  # the eager layer's own error
    err = (out.double() - ref).abs()
    assert (err <= bound16(ref16, ref, dtype)).all(), err.max().item()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_layer_fused_path_matches_pytorch_path(dtype, gen, monkeypatch):
    """`Attention.forward` on CUDA: fused switch on vs off."""
    torch.manual_seed(0)
    layer = layers.Attention(dim=256, head_dim=64, time_dim=64).cuda().to(dtype).eval()
    with torch.no_grad():
        for p in layer.parameters():  # time_cond is zero-initialised: make it matter
            p.add_(0.05 * torch.randn(p.shape, generator=gen).to(p))
    x = torch.randn(8, 32, 256, generator=gen).cuda().to(dtype)
    temb = torch.randn(8, 64, generator=gen).cuda().to(dtype)
    with torch.no_grad():
        fused = layer(x, temb)
        monkeypatch.setattr(layers, "FUSED_ATTENTION", False)
        eager = layer(x, temb)
        ref = layer.double()(x.double(), temb.double())
    if dtype == torch.float32:
        torch.testing.assert_close(fused, eager, atol=1e-5, rtol=1e-5)
    else:
        assert (fused.double() - ref).abs().max() <= 2 * (eager.double() - ref).abs().max() + 1e-3


@pytest.mark.gpu
def test_layer_keeps_autograd(gen):
    """With gradients required the layer stays on the PyTorch path and backpropagates."""
    layer = layers.Attention(dim=128, head_dim=32, time_dim=16).cuda()
    x = torch.randn(2, 16, 128, generator=gen).cuda().requires_grad_(True)
    layer(x, torch.randn(2, 16, generator=gen).cuda()).square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.gpu
def test_cuda_graph_replay(gen):
    """Captured once, replayed on new inputs copied into the static buffers."""
    q, k, v, w_q, w_k = make_inputs(4, 32, 4, 64, torch.bfloat16, "cuda", gen, packed=False)
    qk_norm_attention(q, k, v, w_q, w_k)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = qk_norm_attention(q, k, v, w_q, w_k)
    for _ in range(2):
        new = make_inputs(4, 32, 4, 64, torch.bfloat16, "cuda", gen, packed=False)
        for static, fresh in zip((q, k, v), new[:3], strict=True):
            static.copy_(fresh)
        graph.replay()
        torch.testing.assert_close(out, qk_norm_attention(q, k, v, w_q, w_k), atol=0, rtol=0)
    assert math.isfinite(out.float().abs().max().item())
