"""benchmarks/llama_cpp.py: without llama-cpp-python the benchmarks get a reason, not an error;
with it (optional, never a test dependency) a sample has exactly the tokens asked for."""

from __future__ import annotations

import sys

import pytest

from benchmarks import llama_cpp


def test_missing_package_gives_a_reason(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import fails
    llm, why = llama_cpp.load(1)
    assert llm is None and "llama-cpp-python" in why and "GGML_NATIVE=OFF" in why
    assert llama_cpp.version() is None


def test_a_sample_has_the_tokens_asked_for():
    pytest.importorskip("llama_cpp")
    from dglm.engine.models.loading import smollm2_gguf

    try:
        smollm2_gguf()
    except RuntimeError as e:
        pytest.skip(str(e))
    llm, why = llama_cpp.load(1, n_ctx=64)
    assert why is None
    toks, prefill, decode, cpu = llama_cpp.sample(llm, [1, 504, 3205], 5, 1.0, 0.9, seed=3)
    assert len(toks) == 5 and prefill > 0 and decode >= 0 and cpu >= 0
    again = llama_cpp.sample(llm, [1, 504, 3205], 5, 1.0, 0.9, seed=3)[0]
    assert again == toks  # its own sampler, seeded
