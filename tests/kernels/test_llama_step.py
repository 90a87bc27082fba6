"""The fused int8 Llama decode step (dglm.kernels.llama_step, DecodeRunner step_impl="fused")
against the traced operator-by-operator step on the same int8 decoder: logits to rounding for
every Llama-family shape (GQA, MHA with biases and a wider head, llama3 RoPE, Mistral, Qwen2),
left padding, batches on both sides of the kernel's 4-row tile, soft prompts, a hidden-state hook;
the same tokens; bit-identical results on 1 and 2 threads; the fallback for decoders it cannot
serve; the checks on its inputs."""

from __future__ import annotations

import pytest
import torch
from decoder_fixtures import VOCAB, make_tiny_hf_dir, one_thread  # noqa: F401
from dglm.engine.decoding.loop import generate
from dglm.engine.decoding.runner import FUSED_MAX_BATCH, DecodeRunner, DecodeRunnerConfig
from dglm.engine.decoding.sampling import DecodeParams
from dglm.engine.models import load_decoder
from dglm.engine.models.base import FunctionHook
from dglm.kernels import int8_linear as int8_kernel
from dglm.kernels import llama_step
from dglm.kernels.llama_step import LlamaInt8Step

pytestmark = pytest.mark.skipif(not llama_step.available(), reason="cpu_ops is not built")

LLAMAS = ["llama_gqa", "llama_tied_bias", "llama3_rope", "mistral", "qwen2"]


@pytest.fixture(scope="module", params=LLAMAS)
def int8(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    make_tiny_hf_dir(request.param, path, seed=5)
    return load_decoder(str(path), quantize="int8")  # (decoder, tokenizer)


def runner(decoder, impl: str, b: int, slots: int = 24) -> DecodeRunner:
    config = DecodeRunnerConfig((b,), slots, enforce_eager=True, step_impl=impl)
    return DecodeRunner(decoder, config)


def run_steps(r: DecodeRunner, ids: torch.Tensor, key_mask, soft=None, prompt: int = 6):
    """Prefill ids[:, :prompt] (+ soft vectors), then feed the rest → logits (steps + 1, B, V)."""
    d = r.decoder
    B, T = ids.shape
    with torch.inference_mode():
        x = d.embed(ids[:, :prompt])
        if soft is not None:
            x = torch.cat([x, soft], 1)
        t0 = x.shape[1]
        pads = (~key_mask[:, :t0]).sum(1, keepdim=True)
        positions = (torch.arange(t0)[None] - pads).clamp_min(0)
        r.begin(B, t0 + T - prompt, key_mask[:, : t0 + T - prompt])
        out = [r.prefill(x, positions).clone()]
        out += [r.step(ids[:, t]).clone() for t in range(prompt, T)]
    return torch.stack(out)


@pytest.mark.parametrize("B", [1, 3, 6])
def test_fused_step_matches_the_traced_step(int8, gen, B):
    decoder, _ = int8
    ids = torch.randint(4, VOCAB, (B, 14), generator=gen)
    soft = torch.randn(B, 2, decoder.hidden_size, generator=gen)
    key_mask = torch.ones(B, 24, dtype=torch.bool)
    key_mask[0, :3] = False  # row 0 left padded by 3
    fused = runner(decoder, "fused", B)
    assert fused.fused is not None
    want = run_steps(runner(decoder, "trace", B), ids, key_mask, soft)
    got = run_steps(fused, ids, key_mask, soft)
    assert torch.isfinite(got).all()
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_batches_above_the_fused_limit_take_the_traced_step(int8, gen):
    decoder, _ = int8
    B = FUSED_MAX_BATCH + 1
    r = runner(decoder, "fused", B)
    assert r.fused is not None and r.fused_serves(FUSED_MAX_BATCH) and not r.fused_serves(B)
    ids = torch.randint(4, VOCAB, (B, 9), generator=gen)
    key_mask = torch.ones(B, 24, dtype=torch.bool)
    want = run_steps(runner(decoder, "trace", B), ids, key_mask)
    assert torch.equal(run_steps(r, ids, key_mask), want)
    assert all(step.traced is not None for step in r._graphs.values())


def test_threads_do_not_change_the_result(int8, gen):
    """Each output of a product is summed by one thread in the same order, whatever the split."""
    decoder, _ = int8
    ids = torch.randint(4, VOCAB, (5, 12), generator=gen)
    key_mask = torch.ones(5, 24, dtype=torch.bool)
    out = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        out.append(run_steps(runner(decoder, "fused", 5), ids, key_mask))
    torch.set_num_threads(1)
    assert torch.equal(out[0], out[1])


def test_same_tokens_and_the_hook_through_generate(int8, gen):
    decoder, tok = int8
    rows = [torch.randint(4, VOCAB, (n,), generator=gen).tolist() for n in (7, 3, 5)]
    soft = torch.randn(3, 2, decoder.hidden_size, generator=gen)
    params = [DecodeParams(10, top_p=0.9, seed=s, ignore_eos=True) for s in (1, 2)]
    params.append(DecodeParams(10, temperature=0.0, ignore_eos=True))
    traced = DecodeRunner(decoder, DecodeRunnerConfig((4,), 24, enforce_eager=True,
                                                      step_impl="trace"))  # fmt: skip
    want, _ = generate(decoder, tok, rows, params, soft, runner=traced)
    fused = DecodeRunner(decoder, DecodeRunnerConfig((4,), 24, enforce_eager=True,
                                                     step_impl="fused"))  # fmt: skip
    got, _ = generate(decoder, tok, rows, params, soft, runner=fused)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    again, _ = generate(decoder, tok, rows, params, soft, runner=fused)
    assert [r.token_ids for r in again] == [r.token_ids for r in got]

    # a hook sees the fused step's hidden states and edits them before the LM head
    seen = []

    def hook(h):
        seen.append(h.shape)
        return h * 1.5

    ids = torch.randint(4, VOCAB, (2, 10), generator=gen)
    key_mask = torch.ones(2, 24, dtype=torch.bool)
    logits = {}
    for impl in ("trace", "fused"):
        r = runner(decoder, impl, 2)
        with torch.inference_mode():
            r.begin(2, 10, None)
            r.hidden_hook = FunctionHook(hook)
            r.prefill(decoder.embed(ids[:, :6]), torch.arange(6).expand(2, 6))
            logits[impl] = torch.stack([r.step(ids[:, t]).clone() for t in range(6, 10)])
    assert seen[-1] == (2, 1, decoder.hidden_size)
    scale = logits["trace"].abs().max()
    assert (logits["fused"] - logits["trace"]).abs().max() <= 1e-4 * scale
    plain = run_steps(runner(decoder, "fused", 2), ids, key_mask)[1:-1]
    assert (plain - logits["fused"][:3]).abs().max() > 1e-3 * scale  # the hook did act


def test_decoders_it_cannot_serve_fall_back_to_the_trace(tmp_path, gen, caplog):
    make_tiny_hf_dir("gpt2", tmp_path / "gpt2", seed=1)
    make_tiny_hf_dir("llama_gqa", tmp_path / "llama", seed=1)
    gpt2, _ = load_decoder(str(tmp_path / "gpt2"), quantize="int8")
    fp32, _ = load_decoder(str(tmp_path / "llama"))
    assert "not a Llama-family" in llama_step.unsupported_reason(gpt2)
    assert "not quantized" in llama_step.unsupported_reason(fp32)
    for d in (gpt2, fp32):
        with caplog.at_level("INFO", logger="dglm.engine.decoding.runner"):
            r = runner(d, "fused", 2)
        assert r.fused is None and "traced step instead" in caplog.text
        ids = torch.randint(4, VOCAB, (2, 9), generator=gen)
        want = run_steps(runner(d, "trace", 2), ids, torch.ones(2, 24, dtype=torch.bool))
        got = run_steps(r, ids, torch.ones(2, 24, dtype=torch.bool))
        assert torch.equal(got, want)
        with pytest.raises(ValueError, match="LlamaInt8Step: "):
            LlamaInt8Step(d)


def test_inputs_are_checked(int8):
    decoder, _ = int8
    step = LlamaInt8Step(decoder)
    L, nkv, dh, H = decoder.num_layers, decoder.num_kv_heads, decoder.head_dim, decoder.hidden_size
    k = torch.zeros(L, 2, nkv, 8, dh)
    v = torch.zeros_like(k)
    x = torch.randn(2, H)
    pos = torch.zeros(2, dtype=torch.long)
    mask = torch.ones(2, 8, dtype=torch.bool)
    assert step(x, pos, k, v, 0, mask).shape == (2, H)
    assert k[:, :, :, 0].abs().sum() > 0 and k[:, :, :, 1:].abs().sum() == 0  # wrote slot 0 only
    with pytest.raises(ValueError, match="x must be fp32"):
        step(x.double(), pos, k, v, 0, mask)
    with pytest.raises(ValueError, match="k must be fp32"):
        step(x, pos, k[:, :1], v, 0, mask)
    with pytest.raises(ValueError, match="slot 8 is outside"):
        step(x, pos, k, v, 8, mask)
    with pytest.raises(ValueError, match="key_mask must be bool"):
        step(x, pos, k, v, 0, mask.float())
    with pytest.raises(IndexError, match="outside the RoPE table"):
        step(x, torch.tensor([0, decoder.max_context]), k, v, 0, mask)


@pytest.mark.slow
def test_smollm2_int8_fused_greedy_matches_the_traced_step():
    """SmolLM2-135M quantized to int8 (the CPU default): the fused step's greedy tokens equal the
    traced step's for one prompt and for four mixed-length prompts (left padding)."""
    from decoder_fixtures import SMOL_PROMPTS

    decoder, tok = load_decoder("smollm2", quantize="int8")
    for prompts in (SMOL_PROMPTS[:1], SMOL_PROMPTS):
        rows = [tok.encode(p) for p in prompts]
        params = [DecodeParams(max_new_tokens=24, temperature=0.0)] * len(rows)
        out = {}
        for impl in ("trace", "fused"):
            config = DecodeRunnerConfig((1, 4), 96, enforce_eager=True, step_impl=impl)
            r = DecodeRunner(decoder, config)
            out[impl], _ = generate(decoder, tok, rows, params, runner=r)
        assert [r.token_ids for r in out["fused"]] == [r.token_ids for r in out["trace"]]


@pytest.mark.skipif(not int8_kernel.bf16_supported(), reason="this CPU has no AVX512-BF16")
@pytest.mark.parametrize("family", ["llama_gqa", "qwen2"])
def test_bf16_activation_mode_fused_equals_traced_and_is_batch_invariant(tmp_path, gen, family):
    """quantize="int8-bf16": the fused step in the kernel's bf16-activation mode equals the traced
    step of the same decoder (both through the bf16 kernel), stays close to the fp32-activation
    int8 decoder, and a row's logits are the same bits alone or in a batch of 6."""
    make_tiny_hf_dir(family, tmp_path, seed=5)
    decoder, _ = load_decoder(str(tmp_path), quantize="int8-bf16")
    assert decoder.quantized == "int8" and decoder.layers[0].wqkv.kernel == "cpu-bf16"
    fp32_act, _ = load_decoder(str(tmp_path), quantize="int8")
    B = 6
    ids = torch.randint(4, VOCAB, (B, 12), generator=gen)
    key_mask = torch.ones(B, 24, dtype=torch.bool)
    fused = runner(decoder, "fused", B)
    assert fused.fused is not None
    got = run_steps(fused, ids, key_mask)
    want = run_steps(runner(decoder, "trace", B), ids, key_mask)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    ref = run_steps(runner(fp32_act, "fused", B), ids, key_mask)
    assert (got - ref).abs().max() <= 5e-2 * ref.abs().max() and not torch.equal(got, ref)
    alone = run_steps(runner(decoder, "fused", 1), ids[2:3], key_mask[2:3])
    assert torch.equal(alone[:, 0], got[:, 2])
