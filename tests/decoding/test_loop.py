"""The KV-cached generation loop: greedy parity with HF generate (left padding, soft prompts),
sampler semantics against HF's warpers, per-row seeds, stop strings, EOS, lengths, cache reuse."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from decoder_fixtures import (
    EOS,
    PAD,
    SMOL_PROMPTS,
    VOCAB,
    left_pad,
    make_tiny_hf_dir,
    one_thread,  # noqa: F401 - autouse fixture
    smollm2,
)
from dglm.engine.decoding.loop import generate
from dglm.engine.decoding.sampling import (
    DecodeParams,
    DecodeResult,
    filter_logits,
    filter_top,
    sample_tokens,
)
from dglm.engine.models import load_decoder
from dglm.kernels import nucleus

GREEDY = DecodeParams(max_new_tokens=12, temperature=0.0)


@pytest.fixture(scope="module", params=["llama_gqa", "gpt2"])
def tiny(request, tmp_path_factory):
    """(our decoder, tokenizer, HF model) for a random tiny model, all fp32."""
    path = tmp_path_factory.mktemp(request.param)
    hf = make_tiny_hf_dir(request.param, path, seed=7)
    decoder, tokenizer = load_decoder(str(path))
    return decoder, tokenizer, hf


def rand_rows(gen: torch.Generator, *lengths: int) -> list[list[int]]:
    return [torch.randint(4, VOCAB, (n,), generator=gen).tolist() for n in lengths]


def row_without_early_eos(decoder, tok, gen, n: int) -> tuple[list[int], DecodeResult]:
    """A random prompt whose greedy continuation runs n tokens without EOS."""
    params = DecodeParams(max_new_tokens=n, temperature=0.0)
    for _ in range(50):
        row = rand_rows(gen, 5)[0]
        res = generate(decoder, tok, [row], [params])[0][0]
        if res.finish_reason == "length" and len(res.text) >= n // 2:
            return row, res
    raise AssertionError(f"no prompt of the tiny model runs {n} tokens without EOS")


def until_eos(tokens: list[int], eos: int) -> list[int]:
    return tokens[: tokens.index(eos)] if eos in tokens else tokens


def hf_greedy(hf, rows, n, pad, eos, soft=None) -> list[list[int]]:
    """HF generate(do_sample=False) on left-padded rows (+ a soft prompt through inputs_embeds);
    new tokens per row, cut at EOS."""
    ids, mask = left_pad(rows, pad)
    kw = dict(do_sample=False, max_new_tokens=n, pad_token_id=pad, eos_token_id=eos)
    with torch.no_grad():
        if soft is None:
            out = hf.generate(input_ids=ids, attention_mask=mask, **kw)[:, ids.shape[1] :]
        else:
            embeds = torch.cat([hf.get_input_embeddings()(ids), soft.to(hf.dtype)], 1)
            mask = torch.cat([mask, torch.ones(len(rows), soft.shape[1], dtype=mask.dtype)], 1)
            out = hf.generate(inputs_embeds=embeds, attention_mask=mask, **kw)
    return [until_eos(r, eos) for r in out.tolist()]


# ------------------------------------------------------------------------- greedy parity


def test_greedy_matches_hf_batch1(tiny, gen):
    decoder, tok, hf = tiny
    rows = rand_rows(gen, 7)
    results, timings = generate(decoder, tok, rows, [GREEDY])
    assert [r.token_ids for r in results] == hf_greedy(hf, rows, 12, PAD, EOS)
    assert set(timings) >= {"prefill_s", "decode_s"}
    assert results[0].text == tok.decode(results[0].token_ids, skip_special_tokens=True)


def test_greedy_matches_hf_mixed_lengths(tiny, gen):
    decoder, tok, hf = tiny
    rows = rand_rows(gen, 9, 2, 5)
    results, _ = generate(decoder, tok, rows, [GREEDY] * 3)
    assert [r.token_ids for r in results] == hf_greedy(hf, rows, 12, PAD, EOS)
    # each row alone gives the same tokens as in the padded batch
    for row, res in zip(rows, results, strict=True):
        assert generate(decoder, tok, [row], [GREEDY])[0][0].token_ids == res.token_ids


def test_greedy_with_soft_prompt_matches_hf(tiny, gen):
    decoder, tok, hf = tiny
    rows = rand_rows(gen, 6, 3, 1)
    soft = torch.randn(3, 4, decoder.hidden_size, generator=gen)
    results, _ = generate(decoder, tok, rows, [GREEDY] * 3, soft_prompt=soft)
    assert [r.token_ids for r in results] == hf_greedy(hf, rows, 12, PAD, EOS, soft)


def test_soft_prompt_without_prefix(tiny, gen):
    decoder, tok, hf = tiny
    soft = torch.randn(2, 3, decoder.hidden_size, generator=gen)
    results, _ = generate(decoder, tok, [[], [5, 6]], [GREEDY] * 2, soft_prompt=soft)
    alone, _ = generate(decoder, tok, [[]], [GREEDY], soft_prompt=soft[:1])
    assert results[0].token_ids == alone[0].token_ids
    assert results[1].token_ids == hf_greedy(hf, [[5, 6]], 12, PAD, EOS, soft[1:])[0]


# ------------------------------------------------------------------------- sampling


def hf_warped(scores: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    from transformers import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    if top_k > 0:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1:
        warpers.append(TopPLogitsWarper(top_p))
    return warpers(None, scores.clone())


@pytest.mark.parametrize(
    "temperature, top_k, top_p",
    [(1.0, 0, 0.9), (0.7, 5, 1.0), (1.3, 12, 0.8), (0.5, 1, 1.0), (1.0, 0, 1e-6), (2.0, 41, 0.5)],
)
def test_filter_logits_matches_hf_warpers(gen, temperature, top_k, top_p):
    scores = torch.randn(5, 41, generator=gen) * 3  # (B, V)
    scores[0, :3] = scores[0, 3]  # ties at the top-k boundary
    ref = hf_warped(scores, temperature, top_k, top_p)
    k = torch.full((5, 1), top_k)
    p = torch.full((5, 1), top_p)
    filtered, ids = filter_logits(scores / temperature, k, p)
    ours = torch.full_like(scores, float("-inf")).scatter(1, ids, filtered)
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    kept = torch.isfinite(ref)
    torch.testing.assert_close(ours[kept], ref[kept])


@pytest.mark.parametrize(
    "temperature, top_k, top_p, mode",
    [(0.8, 6, 0.9, "full_sort"), (1.0, 3, 1.0, "max_k"), (1.5, 0, 1.0, "none")],
)
def test_gumbel_sampling_follows_the_filtered_softmax(gen, temperature, top_k, top_p, mode):
    """20k draws of the exponential race match softmax(top-k/top-p filtered logits / T)."""
    n, V = 20000, 8
    logits = torch.randn(1, V, generator=gen).expand(n, V)
    u = torch.rand(n, V, generator=gen)
    tokens = sample_tokens(
        logits,
        u,
        torch.full((n, 1), temperature),
        torch.full((n, 1), top_k),
        torch.full((n, 1), top_p),
        max_k=top_k if mode == "max_k" else 0,
        full_sort=mode == "full_sort",
    )
    freq = torch.bincount(tokens, minlength=V).double() / n
    expected = hf_warped(logits[:1], temperature, top_k, top_p).softmax(-1)[0].double()
    assert (freq[expected == 0] == 0).all()
    assert (freq - expected).abs().max() < 0.015


@pytest.mark.parametrize(
    "V, k, top_k, top_p, scale",
    [(341, 32, 0, 0.9, 4.0), (341, 32, 20, 0.95, 4.0), (1000, 64, 0, 0.5, 8.0), (97, 8, 5, 1.0, 3)],
)
def test_filter_top_matches_the_full_sort(gen, V, k, top_k, top_p, scale):
    """On covered rows filter_top keeps exactly the tokens filter_logits keeps, with the same
    scores; rows whose nucleus reaches past the k best are reported as not covered."""
    scores = torch.randn(9, V, generator=gen) * torch.linspace(0.5, scale, 9)[:, None]
    kk, pp = torch.full((9, 1), top_k), torch.full((9, 1), top_p, dtype=torch.float64)
    full, full_ids = filter_logits(scores, kk, pp)
    top, ids, covered = filter_top(scores, kk, pp, k)
    ref = torch.full_like(scores, float("-inf")).scatter(1, full_ids, full)
    ours = torch.full_like(scores, float("-inf")).scatter(1, ids, top)
    kept = torch.isfinite(ref)
    beyond = kept.sum(-1) > k  # the nucleus needs more than k tokens
    assert not (covered & beyond).any()
    assert covered.any()
    assert torch.equal(ours[covered], ref[covered])
    # a covered row keeps nothing outside its k best, so its kept count is ≤ k
    assert (kept[covered].sum(-1) <= k).all()


def test_partial_sort_samples_the_same_tokens(gen):
    """sample_tokens with partial sizes (CPU path) draws exactly the full sort's tokens, on
    peaked rows (covered) and flat ones (fallback to the sort)."""
    n, V = 64, 500
    logits = torch.randn(n, V, generator=gen) * torch.linspace(0.2, 6.0, n)[:, None]
    gumbel = torch.rand(n, V, generator=gen)  # the uniforms U of the Gumbel noise
    t = torch.full((n, 1), 0.9)
    for top_k, top_p in ((0, 0.9), (16, 0.95), (0, 0.99)):
        k = torch.full((n, 1), top_k)
        p = torch.full((n, 1), top_p, dtype=torch.float64)
        full = sample_tokens(logits, gumbel, t, k, p, full_sort=True)
        for sizes in ((16,), (16, 128), (32, 1000), (8, 64, 256)):
            part = sample_tokens(logits, gumbel, t, k, p, full_sort=True, partial_sizes=sizes)
            assert torch.equal(part, full)
        for row in range(0, n, 8):  # row by row, where most rows take the partial path
            one = sample_tokens(logits[row : row + 1], gumbel[row : row + 1], t[:1], k[:1],
                                p[:1], full_sort=True, partial_sizes=(16, 128))  # fmt: skip
            assert one.item() == full[row].item()


@pytest.mark.skipif(not nucleus.available(), reason="cpu_ops is not built")
def test_native_sampler_draws_the_torch_paths_tokens(gen):
    """The C++ sampler (dglm.kernels.nucleus) draws the torch full sort's tokens: peaked and flat
    rows (the candidate window widened to the whole vocabulary), top-k alone, top-k with top-p,
    top-p = 1 beside top-k, temperatures, −inf scores (a masked EOS), greedy rows in between."""
    n, V = 96, 3000
    logits = torch.randn(n, V, generator=gen) * torch.linspace(0.05, 9.0, n)[:, None]
    logits[::7, 5] = float("-inf")
    logits[3, 11] = logits[3].max() + 30  # one row with all its mass on one token
    u = torch.rand(n, V, generator=gen)
    t = torch.rand(n, 1, generator=gen) + 0.3
    checked = 0
    for top_k, top_p in ((0, 0.9), (16, 0.95), (0, 0.999), (40, 1.0), (0, 0.3), (1, 0.5)):
        k = torch.full((n, 1), top_k)
        p = torch.full((n, 1), top_p, dtype=torch.float64)
        want = sample_tokens(logits, u, t, k, p, full_sort=True)
        got = sample_tokens(logits, u, t, k, p, full_sort=True, native=True)
        assert torch.equal(got, want)
        checked += int((want != logits.argmax(-1)).sum())
    assert checked > n  # the draws are not all the greedy token
    rows = torch.arange(1, n, 2)  # every other row greedy
    k, p = torch.zeros(len(rows), 1, dtype=torch.long), torch.full((len(rows), 1), 0.8).double()
    want = sample_tokens(logits, u[rows], t[rows], k, p, rows, full_sort=True)
    got = sample_tokens(logits, u[rows], t[rows], k, p, rows, full_sort=True,
                        native=True)  # fmt: skip
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="need `rows`"):
        nucleus.sample_nucleus(logits, u[:3], t[:3], k[:3], p[:3])


def test_sample_tokens_mixes_greedy_and_sampled_rows(gen):
    logits = torch.randn(4, 30, generator=gen)
    u = torch.rand(2, 30, generator=gen)
    gumbel = -(-u.log()).log()
    rows = torch.tensor([1, 3])
    one = torch.ones(2, 1)
    for kw in (dict(max_k=1), dict(full_sort=True), dict(full_sort=True, partial_sizes=(4,)),
               dict()):  # fmt: skip
        k = torch.full((2, 1), 1 if kw else 0)
        tokens = sample_tokens(logits, u, one, k, one, rows, **kw)
        assert tokens[[0, 2]].tolist() == logits[[0, 2]].argmax(-1).tolist()
        if kw:  # top-k = 1 is greedy too
            assert tokens.tolist() == logits.argmax(-1).tolist()
        else:
            assert tokens[[1, 3]].tolist() == (logits[[1, 3]] + gumbel).argmax(-1).tolist()


def test_sampling_reproducible_and_independent_of_batch(tiny, gen):
    decoder, tok, _ = tiny
    rows = rand_rows(gen, 5, 11, 2)
    p = DecodeParams(max_new_tokens=16, temperature=0.9, top_k=30, top_p=0.95, seed=1234)
    alone, _ = generate(decoder, tok, [rows[0]], [p])
    again, _ = generate(decoder, tok, [rows[0]], [p])
    assert alone[0].token_ids == again[0].token_ids
    neighbours = [
        DecodeParams(max_new_tokens=9, temperature=1.2, seed=99),
        DecodeParams(max_new_tokens=16, temperature=0.0),
    ]
    batch, _ = generate(
        decoder, tok, [rows[1], rows[0], rows[2]], [neighbours[0], p, neighbours[1]]
    )
    assert batch[1].token_ids == alone[0].token_ids
    other, _ = generate(decoder, tok, [rows[0]], [dataclasses.replace(p, seed=4321)])
    assert other[0].token_ids != alone[0].token_ids
    # rows whose own filter needs no sort (top-k only, or none) sample the same tokens when a
    # neighbour forces the batch onto the full-sort path
    for own in (dataclasses.replace(p, top_p=1.0), dataclasses.replace(p, top_k=0, top_p=1.0)):
        alone, _ = generate(decoder, tok, [rows[0]], [own])
        batch, _ = generate(decoder, tok, [rows[0], rows[1]], [own, neighbours[0]])
        nucleus = dataclasses.replace(neighbours[0], top_p=0.5)
        mixed, _ = generate(decoder, tok, [rows[0], rows[1]], [own, nucleus])
        assert alone[0].token_ids == batch[0].token_ids == mixed[0].token_ids


def test_degenerate_sampling_is_greedy(tiny, gen):
    decoder, tok, _ = tiny
    rows = rand_rows(gen, 6)
    greedy = generate(decoder, tok, rows, [GREEDY])[0][0].token_ids
    for p in (
        DecodeParams(max_new_tokens=12, top_k=1, seed=1),
        DecodeParams(max_new_tokens=12, top_p=1e-9, seed=2),
    ):
        assert generate(decoder, tok, rows, [p])[0][0].token_ids == greedy


def test_unseeded_sampling_follows_torch_manual_seed(tiny, gen):
    decoder, tok, _ = tiny
    rows = rand_rows(gen, 4)
    p = DecodeParams(max_new_tokens=10, temperature=1.0)
    torch.manual_seed(5)
    first = generate(decoder, tok, rows, [p])[0][0].token_ids
    torch.manual_seed(5)
    assert generate(decoder, tok, rows, [p])[0][0].token_ids == first


# ------------------------------------------------------------------------- stopping and lengths


def test_stop_string_cuts_text_and_stops(tiny, gen):
    decoder, tok, _ = tiny
    row, full = row_without_early_eos(decoder, tok, gen, 40)
    rows = [row]
    long = DecodeParams(max_new_tokens=40, temperature=0.0)
    text = full.text
    stop = text[3:5]
    cut = text.find(stop)
    res, timings = generate(decoder, tok, rows, [dataclasses.replace(long, stop=(stop, "\x00"))])
    assert res[0].text == text[:cut]
    assert res[0].finish_reason == "stop"
    assert res[0].token_ids == full.token_ids[: len(res[0].token_ids)]
    assert tok.decode(res[0].token_ids, skip_special_tokens=True) == text[:cut]
    assert timings["decode_steps"] < 39  # the row stopped early


def test_eos_ends_a_row_without_touching_its_neighbours(tiny, gen):
    decoder, tok, _ = tiny
    rows = [row_without_early_eos(decoder, tok, gen, 12)[0], *rand_rows(gen, 3)]
    base = generate(decoder, tok, rows, [GREEDY] * 2)[0]
    eos = base[0].token_ids[4]
    first = base[0].token_ids.index(eos)
    saved = decoder.config
    try:
        decoder.config = dataclasses.replace(saved, eos_token_ids=(EOS, eos))
        res = generate(decoder, tok, rows, [GREEDY] * 2)[0]
        alone = generate(decoder, tok, rows[1:], [GREEDY])[0]
    finally:
        decoder.config = saved
    assert res[0] == DecodeResult(
        base[0].token_ids[:first],
        tok.decode(base[0].token_ids[:first], skip_special_tokens=True),
        "stop",
    )
    assert res[1].token_ids == alone[0].token_ids


def test_per_row_max_new_tokens(tiny, gen):
    decoder, tok, _ = tiny
    rows = rand_rows(gen, 3, 8)
    params = [DecodeParams(max_new_tokens=3, temperature=0), GREEDY]
    res = generate(decoder, tok, rows, params)[0]
    full = generate(decoder, tok, rows[:1], [GREEDY])[0][0]
    assert len(res[0].token_ids) <= 3
    assert res[0].token_ids == full.token_ids[:3]
    if len(res[0].token_ids) == 3:
        assert res[0].finish_reason == "length"


def test_cache_reuse(tiny, gen):
    decoder, tok, _ = tiny
    rows = rand_rows(gen, 4, 7)
    expected = generate(decoder, tok, rows, [GREEDY] * 2)[0]
    cache = decoder.new_cache(4, 64)
    for _ in range(2):
        assert generate(decoder, tok, rows, [GREEDY] * 2, cache=cache)[0] == expected
    with pytest.raises(ValueError, match="too small"):
        generate(decoder, tok, rows, [GREEDY] * 2, cache=decoder.new_cache(1, 64))


def test_input_errors(tiny):
    decoder, tok, _ = tiny
    with pytest.raises(ValueError, match="empty"):
        generate(decoder, tok, [[5], []], [GREEDY] * 2)
    with pytest.raises(ValueError, match="params"):
        generate(decoder, tok, [[5], [6], [7]], [GREEDY] * 2)
    with pytest.raises(ValueError, match="context"):
        generate(decoder, tok, [[5] * 100], [DecodeParams(max_new_tokens=40)])
    with pytest.raises(ValueError, match="soft_prompt"):
        generate(decoder, tok, [[5]], [GREEDY], soft_prompt=torch.zeros(2, 3, decoder.hidden_size))
    for bad in (
        dict(max_new_tokens=0),
        dict(temperature=-1),
        dict(top_p=0),
        dict(top_k=-1),
        dict(stop=("",)),
    ):
        with pytest.raises(ValueError):
            DecodeParams(**bad)
    assert DecodeParams(stop="x").stop == ("x",)


# ------------------------------------------------------------------------- SmolLM2 (real weights)


@pytest.mark.slow
@pytest.mark.parametrize("prompts", [SMOL_PROMPTS[:1], SMOL_PROMPTS[:3]], ids=["batch1", "mixed"])
def test_smollm2_greedy_matches_hf(prompts):
    smol = smollm2()
    tok = smol.tokenizer
    rows = [tok.encode(p) for p in prompts]
    params = [DecodeParams(max_new_tokens=16, temperature=0.0)] * len(rows)
    results, _ = generate(smol.decoder, tok, rows, params)
    ref = hf_greedy(smol.hf, rows, 16, tok.pad_token_id, tok.eos_token_id)
    assert [r.token_ids for r in results] == ref


@pytest.mark.slow
def test_smollm2_soft_prompt_greedy_matches_hf():
    smol = smollm2()
    tok, dec = smol.tokenizer, smol.decoder
    rows = [tok.encode(p) for p in SMOL_PROMPTS[:2]]
    gen = torch.Generator().manual_seed(0)
    # soft prompt vectors at the scale of real token embeddings
    soft = dec.embed(torch.randint(0, dec.vocab_size, (2, 4), generator=gen))
    soft = soft + 0.01 * torch.randn(soft.shape, generator=gen)
    params = [DecodeParams(max_new_tokens=16, temperature=0.0)] * 2
    results, _ = generate(dec, tok, rows, params, soft_prompt=soft)
    ref = hf_greedy(smol.hf, rows, 16, tok.pad_token_id, tok.eos_token_id, soft)
    assert [r.token_ids for r in results] == ref


def test_ignore_eos_decodes_exactly_max_new_tokens(tiny, gen):
    """Make each row's first greedy token an EOS: rows stop at once unless ignore_eos is set."""
    decoder, tok, _ = tiny
    rows = rand_rows(gen, 5, 3)
    base = generate(decoder, tok, rows, [GREEDY] * 2)[0]
    firsts = tuple(r.token_ids[0] for r in base)
    saved = decoder.config
    try:
        decoder.config = dataclasses.replace(saved, eos_token_ids=(EOS, *firsts))
        params = [GREEDY, dataclasses.replace(GREEDY, ignore_eos=True)]
        res = generate(decoder, tok, rows, params)[0]
        sampled = [DecodeParams(max_new_tokens=7, top_p=0.9, seed=3, ignore_eos=True)] * 2
        res_sampled = generate(decoder, tok, rows, sampled)[0]
    finally:
        decoder.config = saved
    assert res[0].finish_reason == "stop" and res[0].token_ids == []
    assert res[1].finish_reason == "length" and len(res[1].token_ids) == GREEDY.max_new_tokens
    assert not set(res[1].token_ids) & {EOS, *firsts}
    assert all(len(r.token_ids) == 7 and r.finish_reason == "length" for r in res_sampled)
