"""The Method interface: DGLM is the engine's default method, FUDGE and a new method run through
the same `Engine.generate`, rows, seeds and decode loop."""

from __future__ import annotations

import torch
from dglm.engine.api import GenerationParams
from dglm.engine.decoding.loop import generate
from dglm.engine.decoding.sampling import DecodeParams
from dglm.engine.methods.base import Conditioning, Method, MethodBatch
from dglm.engine.methods.dglm import DGLM
from dglm.engine.methods.fudge import Fudge, FudgeProcessor
from dglm.engine.probes import Control

PROMPTS = ["The movie was", "I loved the story, but"]


class Plain(Method):
    """A new method in a few lines: no soft prompt, one token banned, a recorded batch."""

    name = "plain"

    def __init__(self, banned: int) -> None:
        self.banned, self.batches = banned, []

    def condition(self, batch: MethodBatch) -> Conditioning:
        self.batches.append(batch)

        def ban(logits, tokens, finished):
            logits[:, self.banned] = float("-inf")
            return logits

        return Conditioning(processors=(ban,), timings={"plain": 0.0})


def test_dglm_is_the_default_method(tiny_engine):
    e = tiny_engine
    assert isinstance(e.dglm, DGLM) and e.dglm.name == "dglm"
    p = GenerationParams(seed=4, max_new_tokens=6, num_samples=2)
    a, b = e.generate(PROMPTS, p), e.generate(PROMPTS, p, method=e.dglm)
    assert [[s.token_ids for s in o.samples] for o in a] == [
        [s.token_ids for s in o.samples] for o in b
    ]
    assert a[0].samples[0].latent.shape == (e.encoder.dim,)


def test_a_new_method_gets_rows_seeds_and_the_shared_loop(tiny_engine):
    e = tiny_engine
    params = [GenerationParams(seed=10, max_new_tokens=5, num_samples=2, temperature=0.0),
              GenerationParams(seed=20, max_new_tokens=5, temperature=0.0)]  # fmt: skip
    ids = [e.tokenizer.encode(p) for p in PROMPTS]
    plain, _ = generate(e.decoder, e.tokenizer, [ids[0], ids[0], ids[1]], [DecodeParams(5, 0.0)])
    banned = plain[0].token_ids[0]
    method = Plain(banned)
    outs = e.generate(PROMPTS, params, method=method)
    (batch,) = method.batches
    assert batch.rows == [(0, 0), (0, 1), (1, 0)] and batch.seeds == [10, 11, 20]
    assert batch.prefix_ids == ids and batch.prompts == PROMPTS
    got = [s.token_ids for o in outs for s in o.samples]
    assert all(banned not in t for t in got)
    assert got[2] == plain[2].token_ids or banned in plain[2].token_ids
    assert outs[0].samples[0].latent is None and "plain" in outs[0].timings


def test_fudge_method_on_the_engine(tiny_engine):
    """FUDGE through Engine.generate: one processor per call, controls per request; greedy with
    λ = 0 is the plain greedy loop on the bare prefixes."""
    e = tiny_engine
    fudge = Fudge(e.encoder, e.probes, top_k=4, strength=0.0)
    p = GenerationParams(seed=1, max_new_tokens=6, temperature=0.0,
                         controls=(Control("sentiment", "positive"),))  # fmt: skip
    cond = fudge.condition(MethodBatch(PROMPTS, [p, p], [[1], [2]], [(0, 0), (1, 0)], [1, 2],
                                       e.tokenizer))  # fmt: skip
    (proc,) = cond.processors
    assert isinstance(proc, FudgeProcessor) and cond.soft_prompt is None
    assert proc.targets[0][0] is e.probes.probes["sentiment"]
    outs = e.generate(PROMPTS, p, method=fudge)
    ids = [e.tokenizer.encode(x) for x in PROMPTS]
    want, _ = generate(e.decoder, e.tokenizer, ids, [DecodeParams(6, temperature=0.0)])
    assert [o.samples[0].token_ids for o in outs] == [w.token_ids for w in want]
    sampled = Fudge(e.encoder, e.probes, top_k=4)
    q = GenerationParams(seed=3, max_new_tokens=6, controls=(Control("sentiment", "negative"),))
    first, again = e.generate(PROMPTS, q, method=sampled), e.generate(PROMPTS, q, method=sampled)
    assert [o.samples[0].token_ids for o in first] == [o.samples[0].token_ids for o in again]
    assert torch.is_tensor(e.generate(PROMPTS, q)[0].samples[0].latent)
    # the loop's one sampler draws FUDGE's tokens: sampled with λ = 0 it is plain top-k sampling
    r = GenerationParams(seed=5, num_samples=2, max_new_tokens=6, top_p=1.0, top_k=4)
    plain = e.generate(PROMPTS, r, method="plain")
    unweighted = e.generate(PROMPTS, r, method=Fudge(e.encoder, e.probes, top_k=4, strength=0.0))
    ids = [[s.token_ids for s in o.samples] for o in plain]
    assert [[s.token_ids for s in o.samples] for o in unweighted] == ids
    assert len({tuple(t) for o in ids for t in o}) > 1  # sampled, not one greedy answer
