"""The decode loop's streaming hook (`on_tokens`): it sees every sampled token, row by row, on
every torch step backend and in chunked batches; with it the results are bit-identical to the
loop without it; rows it finishes stop there while the others do not change."""

from __future__ import annotations

import pytest
import torch
from decoder_fixtures import PAD, VOCAB, make_tiny_hf_dir, one_thread  # noqa: F401 - autouse fixture
from dglm.engine.decoding.loop import generate
from dglm.engine.decoding.runner import DecodeRunner, DecodeRunnerConfig
from dglm.engine.decoding.sampling import DecodeParams
from dglm.engine.models import load_decoder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama_gqa")
    make_tiny_hf_dir("llama_gqa", path, seed=3)
    return load_decoder(str(path))  # (decoder, tokenizer), fp32 CPU


def rows_and_params(gen: torch.Generator) -> tuple[list[list[int]], list[DecodeParams]]:
    rows = [torch.randint(4, VOCAB, (n,), generator=gen).tolist() for n in (5, 2, 7)]
    seeds = torch.randint(0, 2**31, (3,), generator=gen).tolist()
    lengths = (10, 6, 9)  # rows end at their own max_new_tokens
    return rows, [
        DecodeParams(n, top_p=0.9, seed=s, ignore_eos=True)
        for n, s in zip(lengths, seeds, strict=True)
    ]


class Recorder:
    """Collects each row's streamed tokens; finishes `cancel` rows after `after` tokens."""

    def __init__(self, rows: int, cancel: tuple[int, ...] = (), after: int = 0) -> None:
        self.tokens: list[list[int]] = [[] for _ in range(rows)]
        self.cancel, self.after = cancel, after

    def __call__(self, first_row: int, tokens: list[int]) -> list[int]:
        for k, t in enumerate(tokens):
            self.tokens[first_row + k].append(t)
        return [
            r - first_row
            for r in self.cancel
            if first_row <= r < first_row + len(tokens) and len(self.tokens[r]) == self.after
        ]


def runners(decoder):
    yield "eager static", {}
    yield "reference", {"static": False}
    chunked = DecodeRunner(
        decoder, DecodeRunnerConfig(batch_sizes=(2,), max_len=64, enforce_eager=True)
    )
    chunked.split_batches = True  # as the ONNX Runtime backend: 3 rows run as 2 + 1
    yield "chunked runner", {"runner": chunked}


def test_stream_sees_every_token_and_changes_nothing(tiny, gen):
    decoder, tok = tiny
    rows, params = rows_and_params(gen)
    soft = torch.randn(3, 2, decoder.hidden_size, generator=gen)
    for name, kwargs in runners(decoder):
        ref, _ = generate(decoder, tok, rows, params, soft, **kwargs)
        rec = Recorder(len(rows))
        got, _ = generate(decoder, tok, rows, params, soft, on_tokens=rec, **kwargs)
        assert [r.token_ids for r in got] == [r.token_ids for r in ref], name
        for r, res in enumerate(ref):  # the streamed prefix is the row's continuation
            assert rec.tokens[r][: len(res.token_ids)] == res.token_ids, name


def test_stream_finishes_the_rows_it_returns_only(tiny, gen):
    decoder, tok = tiny
    rows, params = rows_and_params(gen)
    soft = torch.randn(3, 2, decoder.hidden_size, generator=gen)
    for name, kwargs in runners(decoder):
        ref, _ = generate(decoder, tok, rows, params, soft, **kwargs)
        rec = Recorder(len(rows), cancel=(1,), after=3)
        got, _ = generate(decoder, tok, rows, params, soft, on_tokens=rec, **kwargs)
        assert got[1].token_ids[:3] == ref[1].token_ids[:3], name
        assert set(got[1].token_ids[3:]) <= {PAD}, name  # pad from then on
        for r in (0, 2):
            assert got[r].token_ids == ref[r].token_ids, name


def test_stream_ends_the_loop_when_every_row_is_finished(tiny, gen):
    decoder, tok = tiny
    rows, params = rows_and_params(gen)
    rec = Recorder(len(rows), cancel=(0, 1, 2), after=1)
    _, timings = generate(decoder, tok, rows, params, on_tokens=rec)
    assert timings["decode_steps"] < max(p.max_new_tokens for p in params) - 1
