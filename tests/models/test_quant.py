"""Weight-only int8 decoders: the fused layer against its reference and fp32, every decoder family
quantized (logits close to fp32, soft prompts, same seed → same tokens on every step backend),
and the load-time option with its refusals."""

from __future__ import annotations

import pytest
import torch
from decoder_fixtures import FAMILIES, VOCAB, make_tiny_hf_dir, one_thread  # noqa: F401
from dglm.engine.decoding.loop import generate
from dglm.engine.decoding.runner import DecodeRunner, DecodeRunnerConfig
from dglm.engine.decoding.sampling import DecodeParams
from dglm.engine.models import load_decoder
from dglm.engine.models.quant import (
    Int8Linear,
    best_int8_kernel,
    fused_int8_available,
    int8_weights,
    quantize_decoder,
)
from dglm.kernels import int8_linear as int8_kernel
from torch import nn


def test_int8_weights_round_trip_per_row(gen):
    w = torch.randn(16, 40, generator=gen) * torch.logspace(-3, 1, 16)[:, None]
    q, s = int8_weights(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127 and s.shape == (16,)
    err = (q.float() * s[:, None] - w).abs()
    assert (err <= s[:, None] / 2 + 1e-7).all()  # half a step, each row on its own scale


@pytest.mark.parametrize("bias", [False, True])
def test_int8_linear_matches_its_reference_and_fp32(gen, bias):
    lin = nn.Linear(64, 48, bias=bias)
    x = torch.randn(3, 5, 64, generator=gen)
    ref = Int8Linear.from_linear(lin, kernel="reference")
    want = lin(x)
    got_ref = ref(x)
    scale = want.abs().max()
    assert (got_ref - want).abs().max() < 0.02 * scale  # int8 weights
    if fused_int8_available():
        fused = Int8Linear.from_linear(lin, kernel="int8pack")
        got = fused(x)
        assert got.shape == want.shape and got.dtype == torch.float32
        assert (got - got_ref).abs().max() < 0.02 * scale  # bf16 activations
    if int8_kernel.available():
        got = Int8Linear.from_linear(lin, kernel="cpu")(x)
        assert got.shape == want.shape and got.dtype == torch.float32
        assert (got - got_ref).abs().max() < 1e-5 * scale  # fp32 sums, another order


def test_the_cpu_default_is_the_cpp_kernel():
    assert best_int8_kernel("cpu") == (
        "cpu" if int8_kernel.available() else "int8pack" if fused_int8_available() else "reference"
    )
    with pytest.raises(ValueError, match="int8 kernel must be one of"):
        Int8Linear.from_linear(nn.Linear(4, 4), kernel="fast")


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    make_tiny_hf_dir(request.param, path, seed=4)
    fp32, tok = load_decoder(str(path))
    q, _ = load_decoder(str(path), quantize="int8")
    return fp32, q, tok


def test_quantized_decoder_close_to_fp32(pair, gen):
    fp32, q, _ = pair
    assert q.quantized == "int8" and fp32.quantized == "none"
    assert q.dtype == torch.float32
    linears = [n for n, m in q.named_modules() if isinstance(m, nn.Linear)]
    assert linears in ([], ["lm_head"])  # an untied head keeps its fp32 module
    ids = torch.randint(4, VOCAB, (2, 9), generator=gen)
    soft = torch.randn(2, 3, fp32.hidden_size, generator=gen)
    with torch.no_grad():
        outs = []
        for d in (fp32, q):
            x = torch.cat([d.embed(ids), soft], 1)
            outs.append(d(x, torch.arange(12).expand(2, 12)))
    a, b = outs
    assert (a - b).abs().max() < 0.05 * a.abs().max()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9


def test_same_seed_same_tokens_on_every_step_backend(pair, gen):
    _, q, tok = pair
    rows = [torch.randint(4, VOCAB, (n,), generator=gen).tolist() for n in (5, 3)]
    soft = torch.randn(2, 2, q.hidden_size, generator=gen)
    params = [DecodeParams(8, top_p=0.9, seed=s, ignore_eos=True) for s in (1, 2)]
    eager, _ = generate(q, tok, rows, params, soft)
    again, _ = generate(q, tok, rows, params, soft)
    assert [r.token_ids for r in eager] == [r.token_ids for r in again]
    config = DecodeRunnerConfig(batch_sizes=(2, 4), max_len=16, enforce_eager=True,
                                step_impl="trace")  # fmt: skip
    traced, _ = generate(q, tok, rows, params, soft, runner=DecodeRunner(q, config))
    assert [r.token_ids for r in traced] == [r.token_ids for r in eager]
    ref, _ = generate(q, tok, rows, params, soft, static=False)
    agree = sum(a == b for r, e in zip(ref, eager, strict=True)
                for a, b in zip(r.token_ids, e.token_ids, strict=True))  # fmt: skip
    assert agree >= 12  # the reference step sums in another order: near-ties may differ


def test_refusals(pair, tmp_path):
    fp32, q, _ = pair
    with pytest.raises(ValueError, match="already quantized"):
        quantize_decoder(q)
    with pytest.raises(ValueError, match="quantize must be one of"):
        quantize_decoder(fp32, "int4")
    with pytest.raises(ValueError, match="quantize must be one of"):
        load_decoder("smollm2", quantize="fp8")
    import copy

    half = copy.deepcopy(fp32).to(torch.bfloat16)
    with pytest.raises(ValueError, match="fp32 decoder"):
        quantize_decoder(half)


def test_engine_loads_an_int8_decoder(tiny_bundle):
    from dglm.engine.api import GenerationParams
    from dglm.engine.engine import Engine

    e = Engine.from_pretrained(tiny_bundle, quantize="int8", fast_decode=True)
    assert e.info()["decoder_quantized"] == "int8"
    p = GenerationParams(seed=3, max_new_tokens=6, ignore_eos=True)
    a = e.generate(["The movie was"], p)[0].samples[0].token_ids
    assert a == e.generate(["The movie was"], p)[0].samples[0].token_ids and len(a) == 6
    with pytest.raises(ValueError, match="needs dtype float32"):
        Engine.from_pretrained(tiny_bundle, quantize="int8", dtype="bfloat16")


def test_int8_bf16_mode_and_its_refusals(pair, gen):
    """quantize="int8-bf16": every matrix on the kernel's bf16-activation mode (close to the
    fp32-activation int8 decoder), or a refusal naming AVX512-BF16 on CPUs without it; a kernel
    other than cpu-bf16 is refused for it, and it is CPU-only."""
    import copy

    from dglm.engine.models.quant import resolve_quantize

    fp32, q, _ = pair
    if not int8_kernel.bf16_supported():
        with pytest.raises(ValueError, match="AVX512-BF16"):
            resolve_quantize("int8-bf16", "cpu", torch.float32)
        with pytest.raises(ValueError, match="AVX512-BF16"):
            quantize_decoder(copy.deepcopy(fp32), "int8-bf16")
        return
    assert resolve_quantize("int8-bf16", "cpu", torch.float32) == "int8-bf16"
    with pytest.raises(ValueError, match="CPU only"):
        resolve_quantize("int8-bf16", "cuda", torch.float32)
    with pytest.raises(ValueError, match="uses kernel 'cpu-bf16'"):
        quantize_decoder(copy.deepcopy(fp32), "int8-bf16", kernel="reference")
    b = quantize_decoder(copy.deepcopy(fp32), "int8-bf16")
    kernels = {m.kernel for m in b.modules() if isinstance(m, Int8Linear)}
    assert kernels == {"cpu-bf16"} and b.quantized == "int8"
    from dglm.engine.models.quant import quantize_label

    assert [quantize_label(m) for m in (b, q, fp32)] == ["int8-bf16", "int8", "none"]
    ids = torch.randint(4, VOCAB, (2, 9), generator=gen)
    pos = torch.arange(9)[None].expand(2, -1)
    with torch.inference_mode():
        want = q(q.embed(ids), pos)
        got = b(b.embed(ids), pos)
    assert (got - want).abs().max() <= 5e-2 * want.abs().max()
