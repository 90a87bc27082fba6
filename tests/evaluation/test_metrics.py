"""Metrics on hand-made inputs: Dist-n, Wilson intervals, means with their standard error."""

from __future__ import annotations

import math

import pytest
import torch
from dglm.engine.evaluation.metrics import distinct_n, mean_and_se, mean_interval, wilson_interval


def test_distinct_n_counts_over_all_texts():
    texts = ["a b a b", "a b c", ""]
    # unigrams a b a b a b c: 3 distinct / 7; bigrams ab ba ab ab bc: 3 / 5; trigrams aba bab abc
    assert distinct_n(texts, 1) == pytest.approx(3 / 7)
    assert distinct_n(texts, 2) == pytest.approx(3 / 5)
    assert distinct_n(texts, 3) == 1.0
    assert distinct_n(["a", ""], 2) == 0.0
    with pytest.raises(ValueError, match="n must be"):
        distinct_n(texts, 0)


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


def test_mean_and_se():
    m, se = mean_and_se(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert m == 2.5 and se == pytest.approx(math.sqrt(5 / 3) / 2)
