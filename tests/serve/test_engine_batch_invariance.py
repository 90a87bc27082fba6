"""Engine.generate: a request's tokens do not depend on the batch it runs in (what the server's
dynamic batching relies on): alone or beside requests of other lengths, settings and seeds, the
same tokens and text. The floats are not bit-identical: the encoder pads a batch to its longest
prompt, and a one-row matmul takes another kernel than a many-row one, so the sampled latent moves
by ~1e-6 (measured here); tokens change only where that flips a near-tie."""

from __future__ import annotations

import pytest
import torch
from dglm.engine.api import GenerationParams
from dglm.engine.probes import Control

PROMPTS = ["The movie was", "I loved the story, but the ending", "A quick brown fox", "Prices"]


def requests() -> list[GenerationParams]:
    pos = (Control("sentiment", "positive", 10.0),)
    return [
        GenerationParams(controls=pos, seed=1, max_new_tokens=12),
        GenerationParams(seed=2, max_new_tokens=7, top_p=0.8, num_samples=2),
        GenerationParams(
            controls=pos,
            seed=3,
            max_new_tokens=10,
            temperature=0,
            num_inference_steps=4,
            cfg_scale=2.0,
        ),  # fmt: skip
        GenerationParams(seed=4, max_new_tokens=9, top_k=5, prompt_guidance=2.0),
    ]


@pytest.mark.parametrize("threads", [1, 2])
def test_a_request_gives_the_same_tokens_alone_and_in_a_batch(tiny_engine, threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        params = requests()
        batch = tiny_engine.generate(PROMPTS, params)
        for prompt, p, out in zip(PROMPTS, params, batch, strict=True):
            (alone,) = tiny_engine.generate([prompt], p)
            assert [s.token_ids for s in out.samples] == [s.token_ids for s in alone.samples]
            assert [s.text for s in out.samples] == [s.text for s in alone.samples]
            for a, b in zip(out.samples, alone.samples, strict=True):
                torch.testing.assert_close(a.latent, b.latent, rtol=0, atol=1e-5)
    finally:
        torch.set_num_threads(before)
