"""The Engine under threads: concurrent `generate` calls on one Engine return exactly what each
returns alone; a call made from inside another on the same thread is refused."""

from concurrent.futures import ThreadPoolExecutor
from threading import Barrier

import pytest
from dglm.engine.api import GenerationParams
from dglm.engine.methods.fudge import Fudge
from dglm.engine.probes import Control

THREADS, CALLS = 8, 5
PROMPTS = ["The movie was", "I loved the story, but", "Prices are rising", "A quick brown fox"]


def calls(engine) -> list[list[tuple]]:
    """THREADS × CALLS calls (prompts, params, method): plain DGLM, controls, num_samples > 1,
    prompt guidance (its companion rows), greedy and top-k sampling, FUDGE; each its own seed."""
    fudge = Fudge(engine.encoder, engine.probes, top_k=4)
    pos, neg = Control("sentiment", "positive", 20.0), Control("sentiment", "negative", 10.0)
    kinds = [
        lambda s: dict(seed=s, max_new_tokens=9),
        lambda s: dict(seed=s, max_new_tokens=7, controls=(pos,)),
        lambda s: dict(seed=s, max_new_tokens=6, num_samples=3, controls=(neg,)),
        lambda s: dict(seed=s, max_new_tokens=8, prompt_guidance=1.5),
        lambda s: dict(seed=s, max_new_tokens=5, temperature=0.0, num_inference_steps=4),
        lambda s: dict(seed=s, max_new_tokens=10, top_k=5, top_p=1.0, cfg_scale=2.0),
    ]
    table = []
    for t in range(THREADS):
        row = []
        for c in range(CALLS):
            k = t * CALLS + c
            params = GenerationParams(**kinds[k % len(kinds)](1000 + k))
            prompts = [PROMPTS[k % len(PROMPTS)], PROMPTS[(k + 1) % len(PROMPTS)]][: 1 + k % 2]
            method = fudge if k % 13 == 5 else None
            row.append((prompts, params, method))
        table.append(row)
    return table


def token_ids(outputs) -> list[list[list[int]]]:
    return [[s.token_ids for s in o.samples] for o in outputs]


def test_concurrent_generate_calls_return_what_they_return_alone(tiny_engine):
    table = calls(tiny_engine)
    alone = [[token_ids(tiny_engine.generate(*call)) for call in row] for row in table]
    start = Barrier(THREADS)  # every thread's first call begins together

    def run(row: list[tuple]) -> list:
        start.wait()
        return [token_ids(tiny_engine.generate(*call)) for call in row]

    with ThreadPoolExecutor(THREADS) as pool:
        together = list(pool.map(run, table))
    for t in range(THREADS):
        for c in range(CALLS):
            assert together[t][c] == alone[t][c], f"thread {t}, call {c}: {table[t][c]}"


def test_a_generate_call_inside_a_generate_call_is_refused(tiny_engine):
    params = GenerationParams(seed=3, max_new_tokens=4)
    inner = []

    def on_tokens(first_row: int, tokens: list[int]) -> None:
        if not inner:  # once: the streaming hook runs on the calling thread, inside the call
            with pytest.raises(RuntimeError, match="inside another") as e:
                tiny_engine.generate(["Prices are"], params)
            inner.append(e.value)

    streamed = tiny_engine.generate(["The movie was"], params, on_tokens=on_tokens)
    assert len(inner) == 1
    assert token_ids(streamed) == token_ids(tiny_engine.generate(["The movie was"], params))
