"""The neural sentiment judge without Gemma: batching and last-position pooling on a tiny random
Gemma 3, the logistic head, the dev/test split of held-out texts and the accuracy computation."""

from __future__ import annotations

import math

import pytest
import torch
import transformers
from decoder_fixtures import (
    TINY,
    VOCAB,
    make_char_tokenizer,
    one_thread,  # noqa: F401 (autouse fixture)
    randomize_,
)
from dglm.engine.evaluation import neural_judge as nj
from dglm.engine.evaluation.metrics import wilson_interval
from dglm.engine.evaluation.perplexity import ReferenceLM
from dglm.engine.training.data import split_of

LABELS = ("negative", "positive")  # the character tokenizer tells these apart by "n" / "p"


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> ReferenceLM:
    """A random tiny Gemma 3 (sliding and full attention, soft-capped logits) with the character
    tokenizer."""
    out = tmp_path_factory.mktemp("gemma3")
    tok = make_char_tokenizer(out)
    _, mistral = TINY["mistral"]
    config = transformers.Gemma3TextConfig(
        vocab_size=VOCAB,
        **{
            **mistral,
            "head_dim": 16,
            "sliding_window": 4,
            "layer_types": ["sliding_attention", "full_attention"],
            "final_logit_softcapping": 5.0,
            "max_position_embeddings": 512,
            "tie_word_embeddings": True,
        },
    )
    model = transformers.AutoModelForCausalLM.from_config(config)
    randomize_(model, 0)
    return ReferenceLM("tiny-gemma3", model.eval(), tok)


def test_pad_right_and_pool_take_each_rows_real_positions():
    g = torch.Generator().manual_seed(0)
    rows = [[5, 6, 7], [8], [9, 10, 11, 12, 13]]
    ids, lengths = nj.pad_right(rows, pad_id=0)
    assert ids.tolist() == [[5, 6, 7, 0, 0], [8, 0, 0, 0, 0], [9, 10, 11, 12, 13]]
    assert lengths.tolist() == [3, 1, 5]
    states = torch.randn(3, 5, 7, generator=g)
    last = nj.pool(states, lengths, "last")
    mean = nj.pool(states, lengths, "mean")
    for i, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(last[i], states[i, n - 1])
        torch.testing.assert_close(mean[i], states[i, :n].mean(0))
    with pytest.raises(ValueError, match="pooling"):
        nj.pool(states, lengths, "max")
    with pytest.raises(ValueError, match="non-empty"):
        nj.pad_right([[1], []], 0)


@pytest.mark.parametrize("batch_size", [1, 2, 5])
def test_prompt_features_batched_match_one_full_forward_per_row(tiny_lm, batch_size):
    """Sorted, right-padded batches give each row what an unpadded forward of that row alone gives:
    the soft-capped label logits at its last token and its hidden states, in the input order."""
    model = tiny_lm.model
    g = torch.Generator().manual_seed(1)
    lengths = [9, 3, 17, 1, 12, 3]  # unsorted, some longer than the sliding window
    rows = [torch.randint(4, VOCAB, (n,), generator=g).tolist() for n in lengths]
    label_ids = [10, 20, 30]
    keys = [(1, "last"), (2, "mean"), (0, "last")]
    logits, feats = nj.prompt_features(model, rows, label_ids, keys, batch_size)
    assert logits.shape == (len(rows), 3)
    for i, r in enumerate(rows):
        with torch.inference_mode():
            out = model(torch.tensor([r]), output_hidden_states=True)
        want = out.logits[0, -1, label_ids]  # soft-capped by the model
        torch.testing.assert_close(logits[i], want, rtol=1e-4, atol=1e-5)
        for layer, pooling in keys:
            h = out.hidden_states[layer][0]  # (T, H)
            ref = h[-1] if pooling == "last" else h.mean(0)
            torch.testing.assert_close(feats[(layer, pooling)][i], ref, rtol=1e-4, atol=1e-5)


def test_prompt_ids_put_each_text_in_the_prompt_and_cut_long_texts(tiny_lm):
    tok = tiny_lm.tokenizer
    rows = nj.prompt_ids(tok, ["  Great fun. ", "x" * 50], max_text_tokens=10)
    assert tok.decode(rows[0]) == nj.PROMPT.format(text="Great fun.")
    assert tok.decode(rows[1]) == nj.PROMPT.format(text="x" * 10)


def test_judge_on_a_tiny_gemma(tiny_lm, tmp_path):
    texts = ["A fine film.", "Dull and long, a waste of an evening.", "ok"]
    judge = nj.NeuralSentimentJudge(tiny_lm, label_words=LABELS, batch_size=2)
    margins = judge.label_margins(texts)
    # contextual calibration: the mean margin on the content-free texts is subtracted
    assert judge.bias == pytest.approx(float(judge.label_margins(nj.CONTENT_FREE).mean()))
    p = judge.p_positive(texts)
    want = torch.sigmoid(margins.double() - judge.bias).tolist()
    assert p == pytest.approx(want, rel=1e-6)
    assert judge.p_positive([]) == []

    g = torch.Generator().manual_seed(2)
    head = nj.LinearHead(nj.HeadConfig(2, "last"), torch.randn(64, generator=g), 0.3)
    path = head.save(tmp_path / "head.safetensors", {"trained_on": "test"})
    loaded = nj.LinearHead.load(path)
    assert loaded.config == head.config and loaded.bias == pytest.approx(0.3)
    torch.testing.assert_close(loaded.weight, head.weight)
    with_head = nj.NeuralSentimentJudge(tiny_lm, loaded, label_words=LABELS)
    _, feats = nj.prompt_features(
        tiny_lm.model, nj.prompt_ids(tiny_lm.tokenizer, texts), judge.label_ids, [(2, "last")]
    )
    want = torch.sigmoid(feats[(2, "last")] @ head.weight + 0.3).tolist()
    assert with_head.p_positive(texts) == pytest.approx(want, rel=1e-5)
    assert "layer 2 last" in with_head.name
    with pytest.raises(RuntimeError, match="bench_neural_judge"):
        nj.LinearHead.load(tmp_path / "missing.safetensors")


def test_label_words_must_differ_in_their_first_token(tiny_lm):
    with pytest.raises(ValueError, match="share a first token"):
        nj.label_token_ids(tiny_lm.tokenizer, (" negative", " positive"))  # both start with " "


def test_train_logistic_recovers_a_separating_direction():
    g = torch.Generator().manual_seed(3)
    n, h = 600, 12
    w_true = torch.randn(h, generator=g)
    x = torch.randn(n, h, generator=g) * torch.linspace(0.1, 10, h) + 5  # unscaled, off-centre
    y = ((x - 5) @ w_true > 0).float()
    weight, bias = nj.train_logistic(x[:400], y[:400], l2=1e-4)
    held = ((x[400:] @ weight + bias > 0).float() == y[400:]).float().mean()
    assert held > 0.9
    assert weight.shape == (h,) and weight.dtype == torch.float32
    with pytest.raises(ValueError, match="need x"):
        nj.train_logistic(x, y[:10])


def test_judge_split_keeps_train_texts_out_and_cuts_held_out_texts_in_two():
    texts = [f"review number {i}: quite a film" for i in range(4000)]
    splits = {t: nj.judge_split(t) for t in texts}
    for t, s in splits.items():
        assert (s == "train") == (split_of(t) == "train")
    held = [s for s in splits.values() if s != "train"]
    assert 100 < len(held) < 300  # 5% of 4000 held out
    dev = held.count("dev") / len(held)
    assert 0.35 < dev < 0.65
    assert all(nj.judge_split(t) == s for t, s in splits.items())  # deterministic


def test_accuracy_counts_p_above_half_as_positive_and_gives_a_wilson_interval():
    p = [0.9, 0.2, 0.6, 0.5, 0.1, 0.7]
    labels = [1, 0, 0, 1, 1, 1]  # right, right, wrong, undecided, wrong, right
    acc = nj.accuracy_of(p, labels)
    assert acc["correct"] == 3 and acc["n"] == 6
    assert acc["accuracy"] == pytest.approx(0.5)
    assert acc["interval"] == pytest.approx(list(wilson_interval(3, 6)))
    assert acc["positive_rate"] == pytest.approx(3 / 6)
    empty = nj.accuracy_of([], [])
    assert empty["n"] == 0 and math.isnan(empty["accuracy"])
    with pytest.raises(ValueError, match="2 predictions but 1 labels"):
        nj.accuracy_of([0.1, 0.2], [1])
    with pytest.raises(ValueError, match="labels must be 0 or 1"):
        nj.accuracy_of([0.1], [2])


class StubJudge(nj.NeuralSentimentJudge):
    """A judge that calls a text positive when it contains "good" (no model)."""

    def __init__(self) -> None:
        self.name = "stub"

    def logits(self, texts):
        return torch.tensor([3.0 if "good" in t else -3.0 for t in texts])


def test_judge_accuracy_takes_word_labels():
    judge = StubJudge()
    texts = ["a good film", "a bad film", "good grief, awful", "not bad at all"]
    labels = ["positive", "negative", "negative", "positive"]
    acc = judge.accuracy(texts, labels)
    assert (acc["correct"], acc["n"]) == (2, 4)
    assert acc["interval"] == pytest.approx(list(wilson_interval(2, 4)))
    assert judge.accuracy(texts, [1, 0, 0, 1]) == acc
    with pytest.raises(ValueError, match="a sentiment label"):
        judge.accuracy(texts[:1], ["neutral"])
