"""The FUDGE-style baseline: probe log-probabilities, its KV-cached loop against plain decoding,
one batched encoder call per step, and reweighting that moves the probe score toward the target."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from dglm.engine.decoding.loop import DecodeParams, generate
from dglm.engine.decoding.sampling import filter_logits
from dglm.engine.methods.fudge import FudgeParams, fudge_generate, target_logprob
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


@torch.inference_mode()
def standalone_fudge(decoder, tok, encoder, probe, target, prefix_ids, params: FudgeParams):
    """FUDGE's own KV-cached loop, as it stood before it moved onto the shared decode loop, drawing
    as the loop's sampler does (Gumbel-max over the nucleus of the reweighted scores, each row's V
    uniforms per step from its generator seeded seed + b): the reference the processor and the one
    sampler must reproduce token for token."""
    B, k = len(prefix_ids), min(params.top_k, decoder.vocab_size)
    lens = [len(r) for r in prefix_ids]
    t_prefix, eos = max(lens), list(decoder.eos_token_ids) + [tok.eos_token_id]
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    ids = torch.full((B, t_prefix), pad)
    key_mask = torch.ones(B, t_prefix + params.max_new_tokens, dtype=torch.bool)
    for b, row in enumerate(prefix_ids):
        ids[b, t_prefix - len(row) :] = torch.tensor(row)
        key_mask[b, : t_prefix - len(row)] = False
    positions = (key_mask[:, :t_prefix].long().cumsum(-1) - 1).clamp_min(0)
    padded, next_pos = min(lens) < t_prefix, torch.tensor(lens)
    gens = [torch.Generator().manual_seed(params.seed + b) for b in range(B)]
    cache = decoder.new_cache(B, key_mask.shape[1])
    km = key_mask[:, :t_prefix] if padded else None
    logits = decoder(decoder.embed(ids), positions, cache, km, last_only=True)[:, -1]
    generated, finished = [[] for _ in range(B)], [False] * B
    for _ in range(params.max_new_tokens):
        active = [b for b in range(B) if not finished[b]]
        if not active:
            break
        scaled = logits[active].float() / (params.temperature or 1.0)
        if params.ignore_eos:
            scaled[:, eos] = float("-inf")
        cand_lp, cand_ids = torch.log_softmax(scaled, -1).topk(k, dim=-1)
        texts = tok.batch_decode([generated[b] + [c] for i, b in enumerate(active)
                                  for c in cand_ids[i].tolist()], skip_special_tokens=True)  # fmt: skip
        lp = target_logprob(probe, target, encoder.embed(texts)).view(len(active), k)
        scores = cand_lp + params.strength * lp
        u = torch.stack([torch.empty(decoder.vocab_size).uniform_(generator=g) for g in gens])
        if params.temperature == 0:
            tok_ids = cand_ids.gather(-1, scores.argmax(-1, keepdim=True))[:, 0].tolist()
        else:
            full = torch.full((len(active), decoder.vocab_size), float("-inf"))
            full.scatter_(-1, cand_ids, scores)
            top_p = torch.full((len(active), 1), params.top_p)
            s, order = filter_logits(full, torch.zeros(len(active), 1, dtype=torch.long), top_p)
            g = -torch.log(-torch.log(u[active].gather(-1, order)))
            tok_ids = order.gather(-1, (s + g).argmax(-1, keepdim=True))[:, 0].tolist()
        next_tok = torch.full((B,), pad)
        for i, b in enumerate(active):
            finished[b] = finished[b] or tok_ids[i] in eos
            if not finished[b]:
                generated[b].append(tok_ids[i])
            next_tok[b] = tok_ids[i]
        km = key_mask[:, : cache.length + 1] if padded else None
        logits = decoder(decoder.embed(next_tok[:, None]), next_pos[:, None], cache, km)[:, -1]
        next_pos += 1
    return generated


@pytest.mark.parametrize(
    "params",
    [
        FudgeParams(max_new_tokens=8, top_k=6, seed=1),
        FudgeParams(max_new_tokens=8, top_k=6, seed=2, temperature=0.7, top_p=0.8, strength=3.0),
        FudgeParams(max_new_tokens=8, top_k=6, temperature=0.0, ignore_eos=True),
    ],
)
def test_processor_on_the_shared_loop_matches_the_standalone_loop(tiny_engine, params):
    e = tiny_engine
    probe, ids = e.probes.probes["sentiment"], _ids(e)
    got, _ = fudge_generate(e.decoder, e.tokenizer, e.encoder, probe, "negative", ids, params)
    want = standalone_fudge(e.decoder, e.tokenizer, e.encoder, probe, "negative", ids, params)
    assert [r.token_ids for r in got] == want
