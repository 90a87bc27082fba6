"""The residual-stream addition (CAA's static form, models.base.add_residual) on every decode path:
a zero residual leaves tokens bit-identical to no residual (reference loop, eager, traced and
fused CPU steps); a nonzero one gives the same logits on every path, and the same as adding the
vectors with forward hooks on the blocks (an implementation that shares no code with the paths);
rows without a vector in a batch decode as they do alone."""

from __future__ import annotations

import pytest
import torch
from decoder_fixtures import VOCAB, make_tiny_hf_dir, one_thread  # noqa: F401
from dglm.engine.decoding.loop import generate
from dglm.engine.decoding.runner import DecodeRunner, DecodeRunnerConfig
from dglm.engine.decoding.sampling import DecodeParams
from dglm.engine.models import load_decoder
from dglm.kernels import llama_step


@pytest.fixture(scope="module", params=["llama_gqa", "gpt2"])
def fp32(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    make_tiny_hf_dir(request.param, path, seed=3)
    return load_decoder(str(path))  # (decoder, tokenizer)


@pytest.fixture(scope="module")
def int8(tmp_path_factory):
    if not llama_step.available():
        pytest.skip("cpu_ops is not built")
    path = tmp_path_factory.mktemp("llama_int8")
    make_tiny_hf_dir("llama_gqa", path, seed=3)
    return load_decoder(str(path), quantize="int8")


def rows(gen: torch.Generator, B: int) -> list[list[int]]:
    return [torch.randint(4, VOCAB, (5 + 2 * b,), generator=gen).tolist() for b in range(B)]


def residual(decoder, gen: torch.Generator, B: int, scale: float = 0.5) -> torch.Tensor:
    """(B, L, H): random vectors at block 0 and the last block, zero elsewhere and on row 1."""
    r = torch.zeros(B, decoder.num_layers, decoder.hidden_size)
    for layer in (0, decoder.num_layers - 1):
        r[:, layer] = scale * torch.randn(B, decoder.hidden_size, generator=gen)
    if B > 1:
        r[1] = 0
    return r


def runner(decoder, impl: str, B: int, slots: int = 40) -> DecodeRunner:
    return DecodeRunner(
        decoder, DecodeRunnerConfig((B,), slots, enforce_eager=True, step_impl=impl)
    )


def greedy(decoder, tok, ids, impl: str, res=None, soft=None) -> list[list[int]]:
    params = [DecodeParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)] * len(ids)
    kw = {"static": False} if impl == "reference" else {"runner": runner(decoder, impl, len(ids))}
    out, _ = generate(decoder, tok, ids, params, soft, residual=res, **kw)
    return [list(r.token_ids) for r in out]


def step_logits(decoder, impl: str, ids: list[list[int]], res, new: int = 6) -> torch.Tensor:
    """Logits (new, B, V) of the prefill and `new` − 1 steps feeding fixed tokens, through the
    loop's backend for `impl` (the reference loop, or a runner)."""
    from dglm.engine.decoding.loop import ReferenceStep
    from dglm.engine.decoding.padding import left_pad

    B = len(ids)
    total = max(map(len, ids)) + new
    batch = left_pad(ids, 3, total, None, decoder.device)
    if impl == "reference":
        backend = ReferenceStep(decoder, decoder.new_cache(B, total))
    else:
        backend = runner(decoder, impl, B, total)
    feed = torch.arange(new, dtype=torch.long)[:, None].expand(new, B) + 10
    with torch.inference_mode():
        out = [backend.start(batch, None, res).clone()]
        out += [backend.step(feed[t]).clone() for t in range(new - 1)]
    return torch.stack(out)


def hooked_logits(decoder, ids: list[list[int]], res, new: int = 6) -> torch.Tensor:
    """The same logits by full forwards without a cache, the vectors added by forward hooks on
    the decoder's blocks: no code shared with the residual paths."""
    B = len(ids)
    feed = [[10 + t for t in range(new - 1)]] * B
    handles = [
        block.register_forward_hook(lambda m, i, out, layer=layer: out + res[:, layer, None])
        for layer, block in enumerate(decoder.blocks())
    ]
    try:
        outs = []
        for t in range(new):
            seqs = [row + f[:t] for row, f in zip(ids, feed, strict=True)]
            T = max(map(len, seqs))
            tok = torch.full((B, T), 3, dtype=torch.long)
            mask = torch.zeros(B, T, dtype=torch.bool)
            for b, s in enumerate(seqs):
                tok[b, T - len(s) :] = torch.tensor(s)
                mask[b, T - len(s) :] = True
            positions = (mask.long().cumsum(1) - 1).clamp_min(0)
            with torch.inference_mode():
                logits = decoder(decoder.embed(tok), positions, key_mask=mask, last_only=True)
            outs.append(logits[:, -1])
    finally:
        for h in handles:
            h.remove()
    return torch.stack(outs)


@pytest.mark.parametrize("impl", ["reference", "eager", "trace"])
def test_zero_residual_is_bit_identical(fp32, gen, impl):
    decoder, tok = fp32
    ids = rows(gen, 3)
    soft = torch.randn(3, 2, decoder.hidden_size, generator=gen)
    zero = torch.zeros(3, decoder.num_layers, decoder.hidden_size)
    assert greedy(decoder, tok, ids, impl, zero, soft) == greedy(
        decoder, tok, ids, impl, None, soft
    )
    want = step_logits(decoder, impl, ids, None)
    assert torch.equal(step_logits(decoder, impl, ids, zero), want)


def test_zero_residual_is_bit_identical_fused(int8, gen):
    decoder, tok = int8
    ids = rows(gen, 3)
    zero = torch.zeros(3, decoder.num_layers, decoder.hidden_size)
    assert runner(decoder, "fused", 3).fused is not None
    assert greedy(decoder, tok, ids, "fused", zero) == greedy(decoder, tok, ids, "fused")
    assert torch.equal(
        step_logits(decoder, "fused", ids, zero), step_logits(decoder, "fused", ids, None)
    )


def test_residual_runs_the_same_on_every_path(fp32, gen):
    decoder, _ = fp32
    ids = rows(gen, 3)
    res = residual(decoder, gen, 3)
    want = hooked_logits(decoder, ids, res)
    plain = step_logits(decoder, "eager", ids, None)
    tol = 1e-4 * want.abs().max()
    assert (plain[:, 0] - want[:, 0]).abs().max() > 100 * tol  # the vectors change row 0 ...
    assert torch.equal(plain[:, 1], step_logits(decoder, "eager", ids, res)[:, 1])  # ... not row 1
    for impl in ("reference", "eager", "trace"):
        got = step_logits(decoder, impl, ids, res)
        assert (got - want).abs().max() <= tol, impl


def test_residual_fused_matches_traced(int8, gen):
    decoder, tok = int8
    ids = rows(gen, 3)
    res = residual(decoder, gen, 3)
    want = step_logits(decoder, "trace", ids, res)
    got = step_logits(decoder, "fused", ids, res)
    assert (got - step_logits(decoder, "fused", ids, None)).abs().max() > 1e-2  # it acts
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    assert greedy(decoder, tok, ids, "fused", res) == greedy(decoder, tok, ids, "trace", res)


def test_a_row_without_a_vector_decodes_as_alone(fp32, gen):
    decoder, tok = fp32
    ids = rows(gen, 3)
    res = residual(decoder, gen, 3, scale=2.0)  # row 1 has none
    together = greedy(decoder, tok, ids, "eager", res)
    assert together[1] == greedy(decoder, tok, [ids[1]], "eager")[0]
    assert together[0] != greedy(decoder, tok, [ids[0]], "eager")[0]


def test_residual_shape_is_checked(fp32):
    decoder, tok = fp32
    bad = torch.zeros(2, decoder.num_layers + 1, decoder.hidden_size)
    with pytest.raises(ValueError, match="residual has shape"):
        generate(decoder, tok, [[5, 6], [7, 8]], [DecodeParams(max_new_tokens=2)], residual=bad)


@pytest.mark.gpu
def test_residual_in_cuda_graphs(tmp_path, gen):
    """CUDA graphs record the residual buffer: graph replays give the eager step's logits with a
    nonzero residual, and the same graphs give the unsteered logits for the next batch (the buffer
    zeroed), a zero residual bit-identical to none."""
    make_tiny_hf_dir("llama_gqa", tmp_path, seed=3)
    decoder, tok = load_decoder(str(tmp_path), device="cuda")
    ids = rows(gen, 3)
    res = residual(decoder, gen, 3).cuda()
    graphs = DecodeRunner(decoder, DecodeRunnerConfig(batch_sizes=(4,), max_len=40))
    graphs.warmup()
    params = [DecodeParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)] * 3
    eager = runner(decoder, "eager", 3)
    for r in (res, torch.zeros_like(res), None):
        got, _ = generate(decoder, tok, ids, params, runner=graphs, residual=r)
        want, _ = generate(decoder, tok, ids, params, runner=eager, residual=r)
        assert [x.token_ids for x in got] == [x.token_ids for x in want]
