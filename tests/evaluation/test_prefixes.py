"""Held-out prefixes: deterministic, and cut from texts of the "eval" split."""

from __future__ import annotations

import hashlib

import pytest
from dglm.engine.evaluation.prefixes import heldout_prefixes, prefix_split, tuned_prefixes
from dglm.engine.training.data import rotten_tomatoes, split_of


def test_heldout_prefixes_are_deterministic_and_held_out(tiny_engine):
    tok = tiny_engine.tokenizer
    a = heldout_prefixes(tok, 4, ("rotten_tomatoes",), min_tokens=8, max_tokens=12)
    assert a == heldout_prefixes(tok, 4, ("rotten_tomatoes",), min_tokens=8, max_tokens=12)
    assert len(a) == 4 and all(src == "rotten_tomatoes" for src, _ in a)
    evals = [d.text for d in rotten_tomatoes() if split_of(d.text) == "eval"]
    for _, p in a:
        assert 8 <= len(tok.encode(p, add_special_tokens=False)) <= 13
        assert any(t.startswith(p) for t in evals)
    with pytest.raises(ValueError, match="unknown data source"):
        heldout_prefixes(tok, 1, ("nope",))


def test_dev_and_test_splits_are_disjoint_held_out_and_cover_the_tuned_prefixes(tiny_engine):
    tok = tiny_engine.tokenizer
    kw = dict(sources=("rotten_tomatoes",), min_tokens=8, max_tokens=12)
    every = heldout_prefixes(tok, 400, **kw)
    dev = heldout_prefixes(tok, 400, split="dev", **kw)
    test = heldout_prefixes(tok, 400, split="test", **kw)
    assert dev and test and not {p for _, p in dev} & {p for _, p in test}
    assert sorted(dev + test) == sorted(every)  # the two splits partition the held-out prefixes
    assert all(prefix_split(p) == "dev" for _, p in dev)
    assert all(prefix_split(p) == "test" for _, p in test)
    # every prefix comes from a text no training set reads ("eval" by the engine-wide hash)
    evals = [d.text for d in rotten_tomatoes() if split_of(d.text) == "eval"]
    assert all(any(t.startswith(p) for t in evals) for _, p in test)
    with pytest.raises(ValueError, match="split must be one of"):
        heldout_prefixes(tok, 1, split="train", **kw)


def test_tuned_prefixes_are_dev_whatever_their_hash(monkeypatch):
    tuned = tuned_prefixes()
    assert len(tuned) == 256 and all(len(h) == 40 for h in tuned)
    # a prefix whose salted hash says test moves to dev once it is listed as tuned on
    p = next(f"prefix {i}" for i in range(1000) if prefix_split(f"prefix {i}") == "test")
    monkeypatch.setattr(
        "dglm.engine.evaluation.prefixes.tuned_prefixes",
        lambda: frozenset({hashlib.sha1(p.encode()).hexdigest()}),
    )
    assert prefix_split(p) == "dev"
