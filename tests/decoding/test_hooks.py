"""The decode loop's method hooks on every torch step backend: a hidden-state hook between the
blocks and the LM head (identity or no rows → bit-identical tokens; rows it edits change, the
others do not), logits processors, and backends that cannot run a hook refusing or being skipped."""

from __future__ import annotations

import pytest
import torch
from decoder_fixtures import VOCAB, make_tiny_hf_dir, one_thread  # noqa: F401 - autouse fixture
from dglm.engine.decoding.loop import generate
from dglm.engine.decoding.runner import DecodeRunner, DecodeRunnerConfig, capturable
from dglm.engine.decoding.sampling import DecodeParams
from dglm.engine.models import load_decoder
from dglm.engine.models.base import FunctionHook, HiddenHook

SAMPLED = DecodeParams(max_new_tokens=10, top_p=0.9, ignore_eos=True)


@pytest.fixture(scope="module", params=["llama_gqa", "gpt2"])
def tiny(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    make_tiny_hf_dir(request.param, path, seed=3)
    return load_decoder(str(path))  # (decoder, tokenizer), fp32 CPU


def rows_and_params(gen: torch.Generator) -> tuple[list[list[int]], list[DecodeParams]]:
    rows = [torch.randint(4, VOCAB, (n,), generator=gen).tolist() for n in (5, 2, 7)]
    seeds = torch.randint(0, 2**31, (3,), generator=gen).tolist()
    return rows, [DecodeParams(10, top_p=0.9, seed=s, ignore_eos=True) for s in seeds]


class RowNudge(HiddenHook):
    """h[rows] += scale · direction: an edit of some rows' final hidden states (RE-Control's
    place), recording the shapes it saw."""

    def __init__(self, rows: list[int], direction: torch.Tensor, scale: float) -> None:
        self.rows, self.direction, self.scale, self.shapes = rows, direction, scale, []

    def __call__(self, h: torch.Tensor) -> torch.Tensor:  # (B, T, H)
        self.shapes.append(tuple(h.shape))
        if not self.rows:
            return h
        h = h.clone()
        h[self.rows] += self.scale * self.direction.to(h.dtype)
        return h


@pytest.mark.parametrize("static", [True, False])
def test_identity_and_empty_hooks_leave_tokens_bit_identical(tiny, gen, static):
    decoder, tok = tiny
    rows, params = rows_and_params(gen)
    soft = torch.randn(3, 2, decoder.hidden_size, generator=gen)
    ref, _ = generate(decoder, tok, rows, params, soft, static=static)
    for hook in (FunctionHook(lambda h: h), RowNudge([], torch.zeros(decoder.hidden_size), 1.0)):
        got, _ = generate(decoder, tok, rows, params, soft, static=static, hidden_hook=hook)
        assert [r.token_ids for r in got] == [r.token_ids for r in ref]


@pytest.mark.parametrize("static", [True, False])
def test_hook_changes_only_the_rows_it_edits(tiny, gen, static):
    decoder, tok = tiny
    rows, params = rows_and_params(gen)
    ref, _ = generate(decoder, tok, rows, params, static=static)
    nudge = RowNudge([1], torch.randn(decoder.hidden_size, generator=gen), 50.0)
    got, _ = generate(decoder, tok, rows, params, static=static, hidden_hook=nudge)
    assert got[0].token_ids == ref[0].token_ids and got[2].token_ids == ref[2].token_ids
    assert got[1].token_ids != ref[1].token_ids
    # once at prefill (last position only), then once per step, always the whole batch
    assert nudge.shapes[0] == (3, 1, decoder.hidden_size)
    assert len(nudge.shapes) == 10 and set(nudge.shapes) == {(3, 1, decoder.hidden_size)}


def test_hook_on_a_persistent_runner(tiny, gen):
    """Eager and traced runners run the hook (same tokens as the runner-less loop; the traced one
    through a trace of the step's body, then the hook and the head); a compiled one cannot: the
    loop refuses it there."""
    decoder, tok = tiny
    rows, params = rows_and_params(gen)
    nudge = RowNudge([0, 2], torch.randn(decoder.hidden_size, generator=gen), 20.0)
    ref, _ = generate(decoder, tok, rows, params, hidden_hook=nudge)
    unhooked = [r.token_ids for r in generate(decoder, tok, rows, params)[0]]
    for impl, buckets in (("eager", (1, 4)), ("trace", (4,))):
        runner = DecodeRunner(
            decoder, DecodeRunnerConfig(buckets, 32, enforce_eager=True, step_impl=impl)
        )
        assert runner.can_run(3, 20, hooked=True)
        got, _ = generate(decoder, tok, rows, params, runner=runner, hidden_hook=nudge)
        assert [r.token_ids for r in got] == [r.token_ids for r in ref], impl
        plain, _ = generate(decoder, tok, rows, params, runner=runner)  # the hook is per batch
        assert [r.token_ids for r in plain] == unhooked, impl
    compiled = DecodeRunner(
        decoder, DecodeRunnerConfig((4,), 32, enforce_eager=True, step_impl="compile")
    )
    assert compiled.can_run(3, 20) and not compiled.can_run(3, 20, hooked=True)
    with pytest.raises(ValueError, match="hidden-state hook"):
        generate(decoder, tok, rows, params, runner=compiled, hidden_hook=nudge)


def test_logits_processor_sees_history_and_finished_rows(tiny, gen):
    """A processor banning one token per row: it never appears, the other rows' draws keep their
    own streams, and the processor sees the tokens so far and the finished mask."""
    decoder, tok = tiny
    rows, params = rows_and_params(gen)
    ref, _ = generate(decoder, tok, rows, params)
    banned = ref[1].token_ids[0]
    seen = []

    def ban(logits, tokens, finished):
        seen.append((tuple(tokens.shape), tuple(finished.shape)))
        logits[1, banned] = float("-inf")
        return logits

    got, _ = generate(decoder, tok, rows, params, processors=(ban,))
    assert got[1].token_ids[0] != banned
    assert got[0].token_ids == ref[0].token_ids and got[2].token_ids == ref[2].token_ids
    assert seen == [((3, t), (3,)) for t in range(10)]


class ExtraHead(HiddenHook):
    """Leaves the states alone and asks for the logits of other states from the same LM-head
    call (what RE-Control's plausibility mask reads)."""

    def __init__(self, states: torch.Tensor) -> None:
        self.states, self.seen = states, []

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        return h

    def head_extra(self) -> torch.Tensor:
        return self.states

    def see_head_extra(self, logits: torch.Tensor) -> None:
        self.seen.append(logits)


def test_hook_capabilities_are_members_off_by_default(tiny, gen):
    decoder, _ = tiny
    plain = FunctionHook(lambda h: h)
    assert plain.head_extra() is None and plain.with_companions([0, 0]) is plain
    assert plain.static_key() is None and not capturable(plain) and not capturable(True)
    with pytest.raises(NotImplementedError, match="no static form"):
        plain.static_copy(4)
    H = decoder.hidden_size
    hidden = torch.randn(3, 1, H, generator=gen).to(decoder.dtype)
    hook = ExtraHead(torch.randn(2, H, generator=gen).to(decoder.dtype))
    with torch.no_grad():
        got = decoder.hooked_logits(hidden, hook)
        want, want_extra = decoder.logits(hidden), decoder.logits(hook.states[:, None])[:, 0]
    torch.testing.assert_close(got, want)
    (extra,) = hook.seen
    torch.testing.assert_close(extra, want_extra)
