"""The C++ weight-only int8 linear kernel (dglm.kernels.int8_linear) against its fp32 reference:
every instruction-set path this CPU runs, ragged shapes (tails of K and of the 4-row tiles), bias,
batches, the traced operator, threads, and its refusals."""

from __future__ import annotations

import pytest
import torch
from dglm.kernels import int8_linear as k

pytestmark = pytest.mark.skipif(not k.available(), reason="dglm.kernels.cpu_ops is not built")

ISAS = [
    i for i in ("avx512", "avx2", "scalar") if k.available() and k.cpu_ops.int8_linear_supports(i)
]


def raw(x, q, s, b, isa, threads=1):
    y = torch.empty(x.shape[0], q.shape[0])
    k.cpu_ops.int8_linear(
        x.data_ptr(), q.data_ptr(), s.data_ptr(), 0 if b is None else b.data_ptr(), y.data_ptr(),
        x.shape[0], x.shape[1], q.shape[0], threads, isa,
    )  # fmt: skip
    return y


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("M,K,N", [(1, 576, 960), (3, 17, 7), (4, 16, 4), (9, 100, 13),
                                   (1, 1, 1), (6, 33, 42)])  # fmt: skip
@pytest.mark.parametrize("bias", [False, True])
def test_every_path_matches_the_reference(gen, isa, M, K, N, bias):
    x = torch.randn(M, K, generator=gen)
    q = torch.randint(-127, 128, (N, K), generator=gen, dtype=torch.int8)
    s = torch.rand(N, generator=gen) * 0.01
    b = torch.randn(N, generator=gen) if bias else None
    want = k.int8_linear_ref(x.double(), q, s.double(), None if b is None else b.double())
    got = raw(x, q, s, b, isa)
    tol = 1e-5 * (x.abs() @ (q.double().abs() * s.double()[:, None]).t().float()).max() + 1e-6
    assert (got.double() - want).abs().max() <= tol


def test_the_operator_reshapes_converts_and_traces(gen):
    x = torch.randn(2, 3, 40, generator=gen)
    q = torch.randint(-127, 128, (24, 40), generator=gen, dtype=torch.int8)
    s = torch.rand(24, generator=gen)
    b = torch.randn(24, generator=gen)
    want = k.int8_linear_ref(x, q, s, b)
    got = k.int8_linear(x, q, s, b)
    assert got.shape == (2, 3, 24) and got.dtype == torch.float32
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-5)
    half = k.int8_linear(x.bfloat16(), q, s, b)
    assert half.dtype == torch.bfloat16
    assert torch.allclose(
        half.float(), k.int8_linear_ref(x.bfloat16().float(), q, s, b), rtol=1e-2, atol=0.1
    )
    assert k.int8_linear(x[:, :0], q, s, b).shape == (2, 0, 24)

    class Layer(torch.nn.Module):
        def forward(self, x):
            return torch.ops.dglm.int8_linear(x, q, s, None).relu()

    traced = torch.jit.trace(Layer(), (x,))
    assert "dglm::int8_linear" in str(traced.graph)
    assert torch.equal(traced(x + 1), k.int8_linear(x + 1, q, s).relu())


def raw_widen(x, q, s, isa, widen):
    y = torch.empty(x.shape[0], q.shape[0])
    k.cpu_ops.int8_linear(
        x.data_ptr(), q.data_ptr(), s.data_ptr(), 0, y.data_ptr(), x.shape[0], x.shape[1],
        q.shape[0], 1, isa, widen,
    )  # fmt: skip
    return y


@pytest.mark.parametrize("isa", ISAS)
def test_a_row_gets_the_same_bits_alone_or_in_any_batch(gen, isa):
    """Batch invariance, which serving relies on (a request alone = the same request batched):
    every row of a 13-row product equals the row computed alone, bit for bit, whichever way the
    AVX-512 path widens the weights for more than 4 rows (buffer or registers; the CPU's choice,
    int8_linear_widening, is timed once)."""
    x = torch.randn(13, 100, generator=gen)
    q = torch.randint(-127, 128, (37, 100), generator=gen, dtype=torch.int8)
    s = torch.rand(37, generator=gen)
    alone = torch.cat([raw_widen(x[i : i + 1], q, s, isa, -1) for i in range(13)])
    for widen in (-1, 0, 1):
        assert torch.equal(raw_widen(x, q, s, isa, widen), alone)
        assert torch.equal(raw_widen(x[:6], q, s, isa, widen), alone[:6])
    assert k.cpu_ops.int8_linear_widening() in ("buffer", "registers")


def test_threads_give_the_same_result(gen):
    x = torch.randn(2, 64, generator=gen)
    q = torch.randint(-127, 128, (400, 64), generator=gen, dtype=torch.int8)
    s = torch.rand(400, generator=gen)
    one = raw(x, q, s, None, "", threads=1)
    assert torch.equal(one, raw(x, q, s, None, "", threads=2))  # rows split, sums unchanged


def test_refusals(gen):
    x = torch.randn(2, 8, generator=gen)
    q = torch.randint(-127, 128, (4, 8), generator=gen, dtype=torch.int8)
    s = torch.rand(4, generator=gen)
    with pytest.raises(ValueError, match="last dim"):
        k.int8_linear(torch.randn(2, 9), q, s)
    with pytest.raises(ValueError, match="2-D int8"):
        k.int8_linear(x, q.int(), s)
    with pytest.raises(ValueError, match="scale must be fp32"):
        k.int8_linear(x, q, s.double())
    with pytest.raises(ValueError, match="bias must be fp32"):
        k.int8_linear(x, q, s, torch.zeros(5))
    with pytest.raises(ValueError, match="not supported"):
        raw(x, q, s, None, "avx9000")


@pytest.mark.parametrize("N", [20, 2 * k.LARGE_BLOCK + 37])  # one block; blocks, a ragged last
@pytest.mark.parametrize("blas", [True, False])  # the CPU's timed choice (blas_pays), forced
def test_large_batches_take_the_blas_path_with_the_same_result(gen, N, blas, monkeypatch):
    assert isinstance(k.blas_pays(), bool)
    monkeypatch.setattr(k, "_BLAS_PAYS", blas)
    x = torch.randn(k.LARGE_M + 3, 48, generator=gen)
    q = torch.randint(-127, 128, (N, 48), generator=gen, dtype=torch.int8)
    s = torch.rand(N, generator=gen)
    b = torch.randn(N, generator=gen)
    want = k.int8_linear_ref(x.double(), q, s.double(), b.double())
    got = k.int8_linear(x, q, s, b)
    assert got.shape == (k.LARGE_M + 3, N)
    assert (got.double() - want).abs().max() <= 1e-4 * want.abs().max()
    small = k.int8_linear(x[:5], q, s, b)  # the kernel: the same rows, another summation order
    assert torch.allclose(small, got[:5], rtol=1e-5, atol=1e-4)
    if not blas:  # the kernel for every row count: batch invariant, bit for bit
        assert torch.equal(small, got[:5])


BF16 = k.available() and k.cpu_ops.int8_linear_bf16_supported()


def raw_bf16(x, q, s, b, threads=1):
    y = torch.empty(x.shape[0], q.shape[0])
    k.cpu_ops.int8_linear(
        x.data_ptr(), q.data_ptr(), s.data_ptr(), 0 if b is None else b.data_ptr(), y.data_ptr(),
        x.shape[0], x.shape[1], q.shape[0], threads, "", -1, True,
    )  # fmt: skip
    return y


@pytest.mark.skipif(not BF16, reason="this CPU has no AVX512-BF16")
@pytest.mark.parametrize("M,K,N", [(1, 576, 960), (3, 17, 7), (4, 32, 4), (9, 100, 13),
                                   (1, 1, 1), (6, 33, 42), (16, 1536, 12)])  # fmt: skip
def test_bf16_activation_mode_matches_its_reference_and_is_batch_invariant(gen, M, K, N):
    """The bf16 mode = the product of the activations rounded to bf16 with the exact int8
    weights, summed in fp32 (K tails zero-padded); a row gets the same bits alone or in any
    batch, on one thread or two."""
    x = torch.randn(M, K, generator=gen) * 3
    q = torch.randint(-127, 128, (N, K), generator=gen, dtype=torch.int8)
    s = torch.rand(N, generator=gen) * 0.01
    b = torch.randn(N, generator=gen)
    want = k.int8_linear_ref(x.bfloat16().double(), q, s.double(), b.double())
    got = raw_bf16(x, q, s, b)
    tol = 1e-5 * (x.abs() @ (q.double().abs() * s.double()[:, None]).t().float()).max() + 1e-6
    assert (got.double() - want).abs().max() <= tol
    fp32 = raw(x, q, s, b, "")
    assert not torch.equal(got, fp32) or K == 1  # it is the other mode
    alone = torch.cat([raw_bf16(x[i : i + 1], q, s, b) for i in range(M)])
    assert torch.equal(got, alone)
    assert torch.equal(raw_bf16(x, q, s, b, threads=2), got)


@pytest.mark.skipif(BF16 or not k.available(), reason="this CPU has AVX512-BF16")
def test_bf16_activation_mode_refused_without_the_instructions(gen):
    x, q, s = torch.randn(2, 8), torch.zeros(4, 8, dtype=torch.int8), torch.ones(4)
    with pytest.raises(ValueError, match="AVX512-BF16"):
        raw_bf16(x, q, s, None)
