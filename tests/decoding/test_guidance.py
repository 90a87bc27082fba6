"""Prompt guidance (classifier-free guidance of the decoder by its soft prompt) on the shared loop:
the score formula and its plausibility mask, greedy tokens against a cache-free reference of
both streams, rows at scale 1 bit-identical to decoding without it, and the checks."""

from __future__ import annotations

import math

import pytest
import torch
from decoder_fixtures import VOCAB, make_tiny_hf_dir, one_thread  # noqa: F401 - autouse fixture
from dglm.engine.decoding.guidance import PromptGuidance, check_prompt_guidance, guided_scores
from dglm.engine.decoding.loop import generate
from dglm.engine.decoding.padding import left_pad, stack
from dglm.engine.decoding.runner import DecodeRunner, DecodeRunnerConfig
from dglm.engine.decoding.sampling import DecodeParams, MinP, eos_ids
from dglm.engine.models import load_decoder


@pytest.fixture(scope="module", params=["llama_gqa", "gpt2"])
def tiny(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    make_tiny_hf_dir(request.param, path, seed=5)
    return load_decoder(str(path))  # (decoder, tokenizer), fp32 CPU


def test_guided_scores_formula_and_plausibility_mask(gen):
    cond, uncond = torch.randn(4, 50, generator=gen) * 3, torch.randn(4, 50, generator=gen) * 3
    cond[1, 7] = float("-inf")  # a token the conditional stream rules out
    scale = torch.tensor([[1.0], [2.0], [3.5], [0.0]])
    lc, lu = torch.log_softmax(cond, -1), torch.log_softmax(uncond, -1)
    for alpha in (0.0, 0.1, 0.5):
        got = guided_scores(cond, uncond, scale, alpha)
        keep = lc >= lc.max(-1, keepdim=True).values + (math.log(alpha) if alpha else -math.inf)
        keep &= ~torch.isneginf(lc)
        want = torch.where(keep, lu + scale * (lc - lu), torch.full_like(lc, float("-inf")))
        torch.testing.assert_close(got, want)
        assert keep.sum() < keep.numel() or alpha == 0.0  # the mask does drop tokens
        # the conditional stream's best token always survives
        assert torch.isfinite(got.gather(1, lc.argmax(-1, keepdim=True))).all()
    assert torch.isneginf(guided_scores(cond, uncond, scale, 0.0)[1, 7])


def full_logits(decoder, ids: list[int], soft: torch.Tensor | None) -> torch.Tensor:
    """Last-position logits (V,) of one row, without a cache: prefix [+ soft prompt] + tokens."""
    with torch.no_grad():
        x = decoder.embed(torch.tensor([ids]))
        return decoder(x, torch.arange(x.shape[1])[None])[0, -1]


@pytest.mark.parametrize("alpha", [0.01, 0.1, 0.5])
def test_min_p_is_the_plausibility_mask_of_plain_decoding(gen, alpha):
    """MinP keeps exactly the tokens with p ≥ α · max p (checked on probabilities), the set prompt
    guidance keeps at g = 1 (where its scores are the conditional log-probabilities)."""
    logits = torch.randn(9, 341, generator=gen) * 3
    kept = MinP(alpha)(logits.clone(), torch.zeros(9, 0, dtype=torch.long), torch.zeros(9).bool())
    p = torch.softmax(logits.double(), -1)
    want = p >= alpha * p.max(-1, keepdim=True).values
    assert torch.equal(torch.isfinite(kept), want)
    assert torch.equal(kept[want], logits[want])  # kept logits are untouched
    guided = guided_scores(logits, torch.randn(9, 341, generator=gen), torch.ones(9, 1), alpha)
    assert torch.equal(torch.isfinite(guided), want)
    with pytest.raises(ValueError, match="plausibility must be in"):
        MinP(0.0)


@pytest.mark.parametrize("backend", ["static", "reference", "bucketed-trace"])
def test_greedy_guided_tokens_match_two_cache_free_streams(tiny, gen, backend):
    """Greedy decoding under prompt guidance picks, at every step, the argmax of the guided scores
    of the conditional stream (prefix, soft prompt, tokens) and the unconditional one (prefix,
    tokens), each recomputed from scratch; on every step backend (the companion rows ride in the
    same batch: a bucketed runner rounds 2 + 2 rows up to its bucket of 8)."""
    decoder, tok = tiny
    rows = [torch.randint(4, VOCAB, (n,), generator=gen).tolist() for n in (5, 3)]
    soft = torch.randn(2, 3, decoder.hidden_size, generator=gen)
    params = [DecodeParams(8, temperature=0.0, ignore_eos=True)] * 2
    scales, alpha = [2.5, 1.7], 0.2
    eos = eos_ids(decoder, tok)
    proc = PromptGuidance(rows, scales, alpha)
    kw = {"static": backend != "reference"}
    if backend == "bucketed-trace":
        config = DecodeRunnerConfig(batch_sizes=(2, 8), max_len=24, enforce_eager=True,
                                    step_impl="trace")  # fmt: skip
        kw = {"runner": DecodeRunner(decoder, config)}
    got, _ = generate(decoder, tok, rows, params, soft, processors=(proc,), **kw)
    for b, row in enumerate(rows):
        out: list[int] = []
        for _ in range(8):
            with torch.no_grad():
                xc = torch.cat([decoder.embed(torch.tensor([row])), soft[b : b + 1],
                                decoder.embed(torch.tensor([out], dtype=torch.long))], 1)  # fmt: skip
                lc = decoder(xc, torch.arange(xc.shape[1])[None])[0, -1]
            lc[eos] = float("-inf")  # ignore_eos
            lu = full_logits(decoder, row + out, None)
            s = guided_scores(lc[None], lu[None], torch.tensor([[scales[b]]]), alpha)
            out.append(int(s.argmax()))
        assert got[b].token_ids == out


@pytest.mark.parametrize("static", [True, False])
def test_rows_at_scale_one_are_bit_identical_and_guided_rows_change(tiny, gen, static):
    decoder, tok = tiny
    rows = [torch.randint(4, VOCAB, (n,), generator=gen).tolist() for n in (5, 2, 7)]
    seeds = torch.randint(0, 2**31, (3,), generator=gen).tolist()
    params = [DecodeParams(12, top_p=0.9, seed=s, ignore_eos=True) for s in seeds]
    soft = torch.randn(3, 2, decoder.hidden_size, generator=gen) * 3
    ref, _ = generate(decoder, tok, rows, params, soft, static=static)
    proc = PromptGuidance(rows, [1.0, 4.0, 1.0], 0.0)
    got, _ = generate(decoder, tok, rows, params, soft, static=static, processors=(proc,))
    assert got[0].token_ids == ref[0].token_ids and got[2].token_ids == ref[2].token_ids
    assert got[1].token_ids != ref[1].token_ids


def test_checks_name_the_setting(tiny):
    decoder, tok = tiny
    for bad in (-0.5, 21.0, float("nan"), True, "2"):
        with pytest.raises(ValueError, match="prompt_guidance"):
            check_prompt_guidance(bad, 0.1)
    for bad in (-0.1, 1.0, float("inf")):
        with pytest.raises(ValueError, match="prompt_plausibility"):
            check_prompt_guidance(2.0, bad)
    with pytest.raises(ValueError, match="no row"):
        PromptGuidance([[5, 6]], [1.0])
    with pytest.raises(ValueError, match="non-empty prefix"):
        PromptGuidance([[]], [2.0])
    with pytest.raises(ValueError, match="2 scales for 1 rows"):
        PromptGuidance([[5, 6]], [2.0, 1.0])
    proc = PromptGuidance([[5, 6]], [2.0])  # outside the loop it has no companion logits
    with pytest.raises(RuntimeError, match="companion"):
        proc(torch.zeros(1, VOCAB), torch.zeros(1, 0, dtype=torch.long), torch.zeros(1, dtype=bool))
    small = DecodeRunner(
        decoder, DecodeRunnerConfig(batch_sizes=(1,), max_len=16, enforce_eager=True)
    )
    with pytest.raises(ValueError, match="companion rows"):  # 1 row + 1 companion > its bucket
        generate(decoder, tok, [[5, 6]], [DecodeParams(4)], processors=(proc,), runner=small)


def test_companion_rows_reuse_their_rows_prefix_at_prefill(tiny, gen):
    """A batch stacked with `follow` (prompt guidance's companions repeat prefixes of the batch's
    rows) prefills only the batch's rows and copies the prefixes' keys and values to the
    companions, shifted past the soft prompt: the same logits, and the same keys and values at
    every real slot, as prefilling the companions themselves; later steps agree too."""
    decoder, tok = tiny
    rows = [torch.randint(4, VOCAB, (n,), generator=gen).tolist() for n in (5, 2, 7)]
    soft = torch.randn(3, 3, decoder.hidden_size, generator=gen)
    slots, follow = 16, (2, 0)
    batch = left_pad(rows, 0, slots, soft)
    extra = left_pad([rows[r] for r in follow], 0, slots, None, width=batch.prefill_len)
    feed = torch.randint(4, VOCAB, (3, 4), generator=gen)
    out = []
    for f in (None, follow):
        r = DecodeRunner(decoder, DecodeRunnerConfig((5,), slots, enforce_eager=True))
        with torch.inference_mode():
            logits = [r.start(stack(batch, extra, follow=f))]
            for t in range(4):  # the companions are fed their rows' tokens
                tokens = torch.cat([feed[:3, t], feed[list(follow), t]])
                logits.append(r.step(tokens).clone())
        real = stack(batch, extra).key_mask[:, : batch.prefill_len + 4]
        kv = [c[:, :5, :, : batch.prefill_len + 4].clone() for c in (r.k, r.v)]
        out.append((torch.stack(logits), kv, real))
    (a, kv_a, real), (b, kv_b, _) = out
    assert (a - b).abs().max() <= 1e-5 * a.abs().max()
    for x, y in zip(kv_a, kv_b, strict=True):
        m = real[None, :, None, :, None].expand_as(x)
        assert (x[m] - y[m]).abs().max() <= 1e-5 * x[m].abs().max()
    with pytest.raises(ValueError, match="one followed row per row"):
        stack(batch, extra, follow=(0,))
