"""CAA's steering vectors from labelled texts (training.caa): activations read after every block
at the last token or averaged over the tokens but the first, independent of batching and padding;
the mean differences of the labels; a vector whose addition moves the decoder's next-token
distribution toward the texts of its label."""

from __future__ import annotations

import pytest
import torch
from decoder_fixtures import make_tiny_hf_dir, one_thread  # noqa: F401
from dglm.engine.models import load_decoder
from dglm.engine.training.caa import mean_differences, residual_activations, steering_vector

TEXTS = ["good fun", "a great, lovely day!", "bad", "awful and dull, a waste of time", "ok"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    make_tiny_hf_dir("llama_gqa", path, seed=7)
    return load_decoder(str(path))


def block_outputs(decoder, tok, text: str) -> torch.Tensor:
    """(L, T, H): the residual stream after every block for one text, by a forward pass whose
    blocks are called one by one (no hooks)."""
    ids = torch.tensor([tok.encode(text)])
    T = ids.shape[1]
    x = decoder.embed(ids)
    cos = decoder.rope_cos[torch.arange(T)][None, :, None]
    sin = decoder.rope_sin[torch.arange(T)][None, :, None]
    out = []
    with torch.inference_mode():
        for block in decoder.layers:
            x = block(x, cos, sin, None, None, True)
            out.append(x[0])
    return torch.stack(out)


def test_activations_last_and_mean(tiny):
    decoder, tok = tiny
    last = residual_activations(decoder, tok, TEXTS, "last", batch_size=2)
    mean = residual_activations(decoder, tok, TEXTS, "mean", batch_size=3)
    assert last.shape == mean.shape == (len(TEXTS), decoder.num_layers, decoder.hidden_size)
    for i, text in enumerate(TEXTS):
        acts = block_outputs(decoder, tok, text)  # (L, T, H)
        torch.testing.assert_close(last[i], acts[:, -1], atol=1e-5, rtol=1e-4)
        # the first position (the attention sink) left out of the mean
        torch.testing.assert_close(mean[i], acts[:, 1:].mean(1), atol=1e-5, rtol=1e-4)


def test_activations_do_not_depend_on_the_batch(tiny):
    decoder, tok = tiny
    together = residual_activations(decoder, tok, TEXTS, "mean", batch_size=8)
    alone = torch.cat([residual_activations(decoder, tok, [t], "mean") for t in TEXTS])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="position"):
        residual_activations(decoder, tok, TEXTS, "first")


def test_mean_differences(gen):
    acts = torch.randn(7, 3, 5, generator=gen)
    labels = torch.tensor([0, 1, 1, 0, 2, 1, 0])
    v = mean_differences(acts, labels, 3)
    for c in range(3):
        want = acts[labels == c].mean(0) - acts[labels != c].mean(0)
        torch.testing.assert_close(v[c], want)
    binary = mean_differences(acts, (labels == 1).long(), 2)
    torch.testing.assert_close(binary[0], -binary[1])
    with pytest.raises(ValueError, match="label 2"):
        mean_differences(acts, torch.tensor([0, 1, 1, 0, 1, 1, 0]), 3)


def test_steering_vector_from_labelled_texts(tiny):
    decoder, tok = tiny
    texts = ["ab xx", "cd xxx", "ef x", "gh xxxx", "ab zz", "cd zzz", "ef z"]
    labels = ["ex"] * 4 + ["zed"] * 3
    vec = steering_vector("p", decoder, tok, texts, labels, ("ex", "zed"), (1,), 2.5, per_label=3)
    c = vec.config
    assert (c.probe, c.labels, c.layers, c.multiplier, c.position) == (
        "p", ("ex", "zed"), (1,), 2.5, "mean",
    )  # fmt: skip
    assert c.examples == 3  # 3 of each label drawn (4 "ex" texts, 3 "zed")
    assert vec.vectors.shape == (2, decoder.num_layers, decoder.hidden_size)
    torch.testing.assert_close(vec.vectors[0], -vec.vectors[1])
    # the mean difference of 3 of the 4 "ex" texts and the 3 "zed" ones, recomputed
    acts = residual_activations(decoder, tok, texts, "mean")
    zed = acts[4:].mean(0)
    subsets = [[i for i in range(4) if i != left] for left in range(4)]
    diffs = [(vec.vectors[0] - (acts[s].mean(0) - zed)).abs().max() for s in subsets]
    assert min(diffs) < 1e-4 < max(diffs)
    add = vec.addition("zed", 2.0)
    assert torch.equal(add[0], torch.zeros(decoder.hidden_size))
    torch.testing.assert_close(add[1], 2.0 * vec.vectors[1, 1])
    torch.testing.assert_close(vec.addition(1, 2.0, (0,))[0], 2.0 * vec.vectors[1, 0])
    with pytest.raises(ValueError, match="not a label"):
        vec.addition("meh", 1.0)
    with pytest.raises(ValueError, match="layer 5"):
        steering_vector("p", decoder, tok, texts, labels, ("ex", "zed"), (5,))
