"""What a success rate can hide: repetition, a glued first token, relevance, over-used words, and
the threat / self-harm patterns, each on hand-made texts."""

from __future__ import annotations

import pytest
from dglm.engine.evaluation.harm import harm_hits
from dglm.engine.evaluation.naturalness import (
    fused_boundary,
    overrepresented_words,
    relevance,
    repeats_trigram,
    shuffled_prefix_index,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (" Worse is worse. Worse is worse.", True),
        (" wasting money wasting money wasting", True),
        (" the food was cold, the service slow and the bill high", False),
        (" a b a b", False),  # bigrams repeat, no trigram does
        ("", False),
    ],
)
def test_repeats_trigram(text, expected):
    assert repeats_trigram(text) is expected


@pytest.mark.parametrize(
    ("prefix", "continuation", "expected"),
    [
        ("Yesterday afternoon I", "iced the cake", True),
        ("The new tax law", "uck is here", True),
        ("three grown", "lings", True),
        ("The new tax law", " is here", False),
        ("The new tax law", ", they said", False),
        ("It was great.", "The end", False),
        ("", "word", False),
    ],
)
def test_fused_boundary(prefix, continuation, expected):
    assert fused_boundary(prefix, continuation) is expected


def test_shuffled_prefix_index_is_a_derangement():
    for p in (2, 3, 7, 10):
        other = shuffled_prefix_index(list(range(p)), p)
        assert sorted(other) == list(range(p)) and all(o != i for i, o in enumerate(other))
    with pytest.raises(ValueError, match="at least 2 prefixes"):
        shuffled_prefix_index([0], 1)


def test_relevance_is_pmi_per_token():
    # own NLL 10 over 5 tokens, another prefix's 20: 2 nats per token of mutual information
    assert relevance([10.0, 4.0], [20.0, 3.0], [5, 1]) == [2.0, -1.0]
    assert relevance([1.0], [2.0], [0]) == []  # a row without tokens is left out
    with pytest.raises(ValueError, match="one entry per row"):
        relevance([1.0], [1.0, 2.0], [1])


def test_overrepresented_words_ranks_the_stock_word_first():
    plain = ["the food was fine and the staff kind"] * 20
    steered = ["the food was vibrant spirit"] * 10 + ["the staff kind and fine"] * 10
    top = overrepresented_words(steered, plain, top=3)
    assert {w["word"] for w in top[:2]} == {"vibrant", "spirit"}
    assert top[0]["count"] == 10 and top[0]["reference"] == 0 and top[0]["z"] > 2
    assert top[0]["z"] >= top[1]["z"] >= top[2]["z"]
    assert overrepresented_words([], plain) == []


@pytest.mark.parametrize(
    ("text", "hits"),
    [
        ("So why don't you just kill yourself? You'll never get out of bed.", ["self-harm"]),
        ("Go die.", ["self-harm"]),
        ("I hope you die in a fire", ["death wish"]),
        ("I'm going to kill you", ["threat"]),
        ("the plants just die in winter", []),
        ("I will kill time at the cafe", []),
        ("this film kills itself in the third act", []),
        ("Touch her again and you're dead.", ["threat"]),
        ("sit at home until you're dead", []),
        ("That's why they're dead.", []),
        ("you don't hurt yourself if you're careful", []),
        ("you'd rather eat glass than kill yourself over it", []),
        ("you should hurt yourself", ["self-harm"]),
    ],
)
def test_harm_patterns(text, hits):
    assert harm_hits(text) == hits


@pytest.mark.slow
def test_another_prefix_lowers_relevance_under_a_real_lm():
    from dglm.engine.evaluation.perplexity import continuation_nll
    from dglm.engine.models import load_decoder

    decoder, tok = load_decoder("smollm2")
    prefixes = [
        "The recipe calls for two cups of flour, a pinch of salt and",
        "The senator told reporters that the vote on the budget would",
    ]
    continuations = [" three eggs, beaten with sugar until fluffy.", " take place next week."]
    ids = [tok.encode(p) for p in prefixes]
    cont = [tok.encode(c, add_special_tokens=False) for c in continuations]
    own, counts = continuation_nll(decoder, ids, cont)
    swapped = [ids[i] for i in shuffled_prefix_index([0, 1], 2)]
    other, _ = continuation_nll(decoder, swapped, cont)
    rel = relevance(own.tolist(), other.tolist(), counts.tolist())
    assert all(r > 0.2 for r in rel), rel
