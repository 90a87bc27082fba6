"""The independent judges on hand-made texts: VADER and TextBlob rates, alt-profanity-check and
HateSonar toxicity, the judges' combined metrics with their intervals, and proposal fidelity."""

from __future__ import annotations

import math

import numpy as np
import pytest
from decoder_fixtures import one_thread  # noqa: F401 (autouse fixture)
from dglm.engine.evaluation.judges import (
    fidelity,
    hate_speech,
    hatesonar_probability,
    hatesonar_session,
    judge_texts,
    profanity_probability,
    sentiment_rates,
    set_string_normalizer_locale,
    textblob_rates,
    toxicity,
)
from dglm.engine.evaluation.metrics import mean_interval, wilson_interval


def test_sentiment_rates_vader_thresholds():
    r = sentiment_rates(
        ["I love this wonderful movie", "This is terrible and awful", "The table is in the room"]
    )
    assert r["positive"] == pytest.approx(1 / 3) and r["negative"] == pytest.approx(1 / 3)
    # VADER compounds: 0.8616, −0.7269, 0.0
    assert r["compound"] == pytest.approx((0.8616 - 0.7269) / 3, abs=1e-4)
    assert math.isnan(sentiment_rates([])["positive"])


def test_vader_compound_is_memoised_per_text_with_the_analyzer_values():
    """A second scoring of the same texts (an eval's paired test after its rates) is a lookup,
    and returns what the analyzer gives."""
    from dglm.engine.evaluation import judges

    texts = ["I love this wonderful movie", "This is terrible and awful", "memo check 7f3a"]
    first = judges.vader_compound(texts)
    hits = judges._vader_one.cache_info().hits
    assert judges.vader_compound(texts[::-1]) == first[::-1]
    assert judges._vader_one.cache_info().hits == hits + 3
    assert first == [judges._VADER.polarity_scores(t)["compound"] for t in texts]
    assert first[0] == pytest.approx(0.8616, abs=1e-4)


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
    (y,) = sess.run(None, {"x": np.array(["Hello World", "ABC"], dtype=object)})
    assert list(y) == ["hello world", "abc"]


def test_hatesonar_probability_is_hate_plus_offensive():
    pytest.importorskip("hatesonar")
    texts = ["fuck you, you stupid bitch", "have a lovely day with your family", ""]
    p = hatesonar_probability(texts)
    assert len(p) == 3 and all(0.0 <= x <= 1.0 for x in p)
    assert p[0] > 0.5 > p[1]
    for text, got in zip(texts, p, strict=True):  # one text at a time: the same numbers
        _, probs = hatesonar_session().run(None, {"text": np.array([text], dtype=object)})
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


def test_fidelity_is_cosine_to_the_latent(minilm):
    texts = ["The weather is lovely today.", "Stocks fell sharply."]
    lat = minilm.latents(texts).cpu()
    assert fidelity(minilm, texts, lat).tolist() == pytest.approx([1.0, 1.0], abs=1e-5)
    assert fidelity(minilm, texts, -3 * lat).tolist() == pytest.approx([-1.0, -1.0], abs=1e-5)
    assert fidelity(minilm, texts, lat.flip(0)).tolist()[0] < 0.5
