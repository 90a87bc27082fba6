"""The FUDGE-style baseline: probe log-probabilities, its KV-cached loop against plain decoding,
one batched encoder call per step, and reweighting that moves the probe score toward the target."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from dglm.engine.decoding.loop import DecodeParams, generate
from dglm.engine.methods.fudge import FudgeParams, _sample, fudge_generate, target_logprob
from dglm.engine.probes import Probe

PROMPTS = ["The movie was", "I loved the story, but", "Prices are"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class CountingEncoder:
    """Wraps the sentence encoder and records the batch size of every embed call."""

    def __init__(self, encoder):
        self.encoder, self.calls = encoder, []

    def embed(self, texts):
        self.calls.append(len(texts))
        return self.encoder.embed(texts)


def _ids(engine, prompts=PROMPTS):
    return [engine.tokenizer.encode(p) for p in prompts]


def test_target_logprob_binary_and_one_vs_rest(gen):
    emb = torch.randn(5, 8, generator=gen)
    u = F.normalize(emb, dim=-1)
    w, b = torch.randn(1, 8, generator=gen), torch.tensor([0.3])
    binary = Probe("s", ("neg", "pos"), w, b)
    z = (u @ w.T + b)[:, 0]
    torch.testing.assert_close(target_logprob(binary, "pos", emb), F.logsigmoid(z))
    torch.testing.assert_close(target_logprob(binary, "neg", emb), F.logsigmoid(-z))
    torch.testing.assert_close(target_logprob(binary, 0, emb), F.logsigmoid(-z))
    w3, b3 = torch.randn(3, 8, generator=gen), torch.randn(3, generator=gen)
    ovr = Probe("t", ("a", "b", "c"), w3, b3)
    torch.testing.assert_close(target_logprob(ovr, "c", emb), F.logsigmoid(u @ w3[2] + b3[2]))
    with pytest.raises(ValueError, match="not a label of probe 's'"):
        target_logprob(binary, "neutral", emb)


def test_sample_nucleus_and_greedy(gen):
    scores = torch.randn(4, 6, generator=gen)
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    greedy = scores.argmax(-1)
    assert torch.equal(_sample(scores, FudgeParams(temperature=0.0), gens), greedy)
    assert torch.equal(_sample(scores, FudgeParams(top_p=1e-6), gens), greedy)
    drawn = _sample(scores, FudgeParams(), gens)
    assert drawn.shape == (4,) and int(drawn.max()) < 6


def test_params_validation():
    with pytest.raises(ValueError, match="top_k"):
        FudgeParams(top_k=0)
    with pytest.raises(ValueError, match="strength"):
        FudgeParams(strength=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        FudgeParams(top_p=0.0)


def test_fudge_generates_tokens_with_one_encoder_batch_per_step(tiny_engine):
    e = tiny_engine
    enc = CountingEncoder(e.encoder)
    probe = e.probes.probes["sentiment"]
    params = FudgeParams(max_new_tokens=6, top_k=5, seed=3)
    results, t = fudge_generate(e.decoder, e.tokenizer, enc, probe, "positive", _ids(e), params)
    assert len(results) == 3
    for r in results:
        assert 0 < len(r.token_ids) <= 6 or r.finish_reason == "stop"
        assert r.text == e.tokenizer.decode(r.token_ids, skip_special_tokens=True)
        assert r.finish_reason in ("stop", "length")
    # one encoder call per step, holding top_k candidates for every unfinished row
    assert len(enc.calls) == t["steps"] and enc.calls[0] == 3 * 5
    assert t["candidates_scored"] == sum(enc.calls)
    assert t["total_s"] >= t["lm_s"] + t["probe_s"] - 1e-6
    again, _ = fudge_generate(e.decoder, e.tokenizer, enc, probe, "positive", _ids(e), params)
    assert [r.token_ids for r in again] == [r.token_ids for r in results]


def test_strength_zero_greedy_is_plain_greedy_decoding(tiny_engine):
    """λ = 0 leaves the LM's distribution alone: greedy FUDGE = the engine's greedy loop
    (padded rows of different lengths through the same KV-cached decoder)."""
    e = tiny_engine
    enc = CountingEncoder(e.encoder)
    params = FudgeParams(max_new_tokens=8, top_k=3, strength=0.0, temperature=0.0)
    ids = _ids(e)
    res, _ = fudge_generate(
        e.decoder, e.tokenizer, enc, e.probes.probes["sentiment"], "positive", ids, params
    )
    want, _ = generate(e.decoder, e.tokenizer, ids, [DecodeParams(8, temperature=0.0)])
    assert [r.token_ids for r in res] == [w.token_ids for w in want]
    assert enc.calls == []  # no probe work when λ = 0


def test_reweighting_moves_the_probe_toward_the_target(tiny_engine):
    e = tiny_engine
    probe = e.probes.probes["sentiment"]
    prompts = PROMPTS + ["The weather", "A quick brown fox", "The ending"]
    ids = _ids(e, prompts)

    def p_positive(target: str, strength: float) -> float:
        params = FudgeParams(max_new_tokens=6, top_k=20, strength=strength, temperature=0.0)
        res, _ = fudge_generate(e.decoder, e.tokenizer, e.encoder, probe, target, ids, params)
        emb = e.encoder.embed([r.text for r in res])
        return float(target_logprob(probe, "positive", emb).exp().mean())

    plain = p_positive("positive", 0.0)
    up, down = p_positive("positive", 5.0), p_positive("negative", 5.0)
    assert up > plain + 0.1 and down < plain - 0.1, (down, plain, up)
