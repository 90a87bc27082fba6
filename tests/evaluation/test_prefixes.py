"""Held-out prefixes: deterministic, and cut from texts of the "eval" split."""

from __future__ import annotations

import pytest
from dglm.engine.evaluation.prefixes import heldout_prefixes
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
