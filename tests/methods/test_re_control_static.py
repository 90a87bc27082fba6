"""RE-Control's edit in CUDA graphs: the hook's static form (buffers of a fixed number of rows,
refilled per batch) against the hook itself, its plausibility side output, the runner's graph
plumbing emulated on CPU (graphs replaced by running the recorded step eagerly), and, on a GPU,
real captures against the eager runner with no host sync in the replayed steps."""

from __future__ import annotations

import pytest
import torch
from decoder_fixtures import VOCAB, make_tiny_hf_dir, one_thread  # noqa: F401 - autouse fixture
from dglm.engine.decoding.loop import generate
from dglm.engine.decoding.runner import DecodeRunner, DecodeRunnerConfig, capturable
from dglm.engine.decoding.sampling import DecodeParams
from dglm.engine.methods.re_control import (
    PlausibleEdit,
    RowEdit,
    StaticValueEdit,
    ValueEdit,
    ValueNetConfig,
    ValueNetwork,
)
from dglm.engine.models import load_decoder
from dglm.engine.models.base import FunctionHook


def nets(h: int, device: str = "cpu") -> tuple[ValueNetwork, ValueNetwork]:
    torch.manual_seed(0)
    a = ValueNetwork(ValueNetConfig("a", h, 2, hidden_dim=24, depth=2)).to(device)
    b = ValueNetwork(ValueNetConfig("b", h, 1, hidden_dim=16, depth=1)).to(device)
    return a, b


def two_edits(pair, gen: torch.Generator, rows: int, device: str = "cpu") -> list[RowEdit]:
    """Edits by two value networks on `rows` rows: some rows by one, some by both, row 1 by none."""
    a, b = pair
    ca = torch.randint(-1, 2, (rows, 2), generator=gen).float()
    ca[0, 0], ca[1] = 1.0, 0.0
    cb = torch.ones(rows, 1)
    cb[1] = 0.0
    sa = torch.randint(1, 7, (rows,), generator=gen)
    sa[0] = 6  # the longest: max_steps 6 for every hook of this kind
    sb = torch.full((rows,), 4)
    return [
        RowEdit(a, ca.to(device), sa.to(device), torch.full((rows, 1), 2.0, device=device)),
        RowEdit(b, cb.to(device), sb.to(device), torch.rand(rows, 1, generator=gen).to(device)),
    ]


def test_static_form_equals_the_hook_and_refills_per_batch(gen):
    """On a bucket of 8 rows, the static form of a 3-row hook extended to 2 companion rows edits
    rows 0-4 as the hook does and passes the bucket's padding rows through bit-identical; loaded
    with another hook of the same key it follows that one (its own rows, the rest cleared)."""
    H = 16
    pair = nets(H)
    hook = ValueEdit(two_edits(pair, gen, 3), rows=3).with_companions([0, 2])
    assert capturable(hook) and not capturable(FunctionHook(lambda h: h))
    static = hook.static_copy(8)
    assert isinstance(static, StaticValueEdit)
    static.load(hook)
    hidden = torch.randn(8, 1, H, generator=gen)
    want = hook(hidden)
    got = static(hidden)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[1], hidden[1]) and torch.equal(got[5:], hidden[5:])
    assert not torch.equal(got[0], hidden[0])
    # a 2-row hook with the same networks and step counts: the same static form, refilled
    other = ValueEdit(two_edits(pair, gen, 2), rows=2)
    assert other.static_key() == ValueEdit(two_edits(pair, gen, 3), rows=3).static_key()
    assert other.static_key() != ValueEdit(two_edits(nets(H), gen, 2), rows=2).static_key()
    static2 = ValueEdit(two_edits(pair, gen, 2), rows=2).static_copy(8)
    static2.load(other)
    h4 = hidden[:4]
    torch.testing.assert_close(static2(h4), other(h4), rtol=1e-5, atol=1e-5)
    static.load(other)  # the 5-row hook's rows 2-4 are cleared
    torch.testing.assert_close(static(h4), other(h4), rtol=1e-5, atol=1e-5)
    assert torch.equal(static(h4)[2:], h4[2:])
    # what the static form refuses
    fewer = two_edits(pair, gen, 3)
    fewer[0].steps.fill_(2)  # another unrolled length
    with pytest.raises(ValueError, match="another set of value networks"):
        static.load(ValueEdit(fewer, rows=3))
    with pytest.raises(ValueError, match="holds 8"):
        static(torch.randn(9, 1, H, generator=gen))
    with pytest.raises(ValueError, match="9 rows"):
        static.load(ValueEdit(two_edits(pair, gen, 9), rows=9))


def test_static_form_publishes_the_unedited_logits_the_mask_reads(gen):
    """With plausibility, the static form's LM-head call covers every row's unedited state;
    after `publish` the loaded hook's mask reads its masked rows' logits, equal to those of the
    hook's own call, and masks the scores the same way."""
    H, V = 16, 40
    head = torch.randn(V, H, generator=gen) * 3
    edits = two_edits(nets(H), gen, 3)
    beta = torch.tensor([0.2, 0.3, 0.05])  # row 1 has no target: not masked
    hook = ValueEdit(edits, rows=3, plausibility=beta)
    assert hook.masked.tolist() == [0, 2]

    def lm_head(states: torch.Tensor) -> torch.Tensor:  # Decoder.hooked_logits, T = 1
        edited = h(states)
        extra = h.head_extra()
        both = edited if extra is None else torch.cat((edited, extra[:, None]))
        out = both.float() @ head.T
        if extra is not None:
            h.see_head_extra(out[edited.shape[0] :, 0])
        return out[: edited.shape[0], 0]

    hidden = torch.randn(4, 1, H, generator=gen)  # bucket 4
    h = hook
    want_logits = lm_head(hidden)
    want = PlausibleEdit(hook, None)(want_logits.clone(), None, None)
    static = hook.static_copy(4)
    static.load(hook)
    hook._seen.clear()  # nothing of the eager call left behind
    h = static
    got_logits = lm_head(hidden)
    static.publish()
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(
        hook.unedited_logits(None), hidden[[0, 2], 0] @ head.T, rtol=1e-5, atol=1e-4
    )
    got = PlausibleEdit(hook, None)(got_logits.clone(), None, None)
    assert torch.equal(torch.isneginf(got), torch.isneginf(want))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    make_tiny_hf_dir("llama_gqa", path, seed=3)
    return path


def rows_params(gen: torch.Generator) -> tuple[list[list[int]], list[DecodeParams]]:
    rows = [torch.randint(4, VOCAB, (n,), generator=gen).tolist() for n in (4, 6, 3)]
    return rows, [DecodeParams(8, temperature=1.0, seed=s, ignore_eos=True) for s in (1, 2, 3)]


def value_net(decoder) -> ValueNetwork:
    torch.manual_seed(4)
    config = ValueNetConfig("p", decoder.hidden_size, 1, hidden_dim=32, depth=1)
    return ValueNetwork(config).to(decoder.device)


def value_hook(decoder, net: ValueNetwork, beta: float) -> tuple[ValueEdit, tuple]:
    device = decoder.device
    coef = torch.tensor([[1.0], [0.0], [-1.0]], device=device)
    edit = RowEdit(net, coef, torch.full((3,), 8, device=device),
                   torch.full((3, 1), 40.0, device=device))  # fmt: skip
    hook = ValueEdit([edit], 3, torch.full((3,), beta, device=device))
    return hook, ((PlausibleEdit(hook, decoder.logits),) if beta > 0 else ())


class _Replay:
    """A recorded step, run eagerly: what a CUDA graph replays, without CUDA."""

    def __init__(self, runner: DecodeRunner, b: int, s: int, static) -> None:
        self.runner, self.b, self.s, self.static = runner, b, s, static

    def replay(self) -> None:
        self.runner._step(self.b, self.s, static_hook=self.static)


def emulated_graph_runner(decoder) -> DecodeRunner:
    """A CPU runner that takes the CUDA-graph path (hooked graphs, static forms, publish), each
    'captured' step run eagerly on the same buffers."""
    runner = DecodeRunner(decoder, DecodeRunnerConfig((4,), 32, enforce_eager=True))
    runner.graphs = True

    def capture(b: int, s: int, static=None):
        step = _Replay(runner, b, s, None if static is None else static[1])
        if static is None:
            runner._graphs[b, s] = step
        else:
            runner._hooked_graphs[b, s, static[0]] = step
        return step

    runner._capture = capture
    return runner


@pytest.mark.parametrize("beta", [0.0, 0.3])
def test_graph_path_replays_the_static_form(tiny_dir, gen, beta):
    """The runner's CUDA-graph path with a RE-Control hook — the static form loaded at start, one
    recorded step per (bucket, KV bucket, key), the mask's logits published after each replay —
    gives the eager runner's tokens; a second batch with other targets reuses the recorded step
    and follows its own hook; a hook without a static form is refused there."""
    decoder, tok = load_decoder(str(tiny_dir))
    rows, params = rows_params(gen)
    runner = emulated_graph_runner(decoder)
    net = value_net(decoder)
    eager = DecodeRunner(decoder, DecodeRunnerConfig((4,), 32, enforce_eager=True))
    hook, procs = value_hook(decoder, net, beta)
    assert runner.can_run(3, 20, hook) and not runner.can_run(3, 20, True)
    ours, _ = generate(decoder, tok, rows, params, runner=runner, hidden_hook=hook,
                       processors=procs)  # fmt: skip
    hook_e, procs_e = value_hook(decoder, net, beta)
    ref, _ = generate(decoder, tok, rows, params, runner=eager, hidden_hook=hook_e,
                      processors=procs_e)  # fmt: skip
    assert [r.token_ids for r in ours] == [r.token_ids for r in ref]
    plain, _ = generate(decoder, tok, rows, params, runner=eager)
    assert ours[1].token_ids == plain[1].token_ids and ours[0].token_ids != plain[0].token_ids
    assert len(runner._hooked_graphs) == 1 and len(runner._static_hooks) == 1
    # another batch, targets flipped: the same recorded step, its own settings
    flipped, procs_f = value_hook(decoder, net, beta)
    flipped.edits[0].coef.mul_(-1)
    ours2, _ = generate(decoder, tok, rows, params, runner=runner, hidden_hook=flipped,
                        processors=procs_f)  # fmt: skip
    flipped_e, procs_fe = value_hook(decoder, net, beta)
    flipped_e.edits[0].coef.mul_(-1)
    ref2, _ = generate(decoder, tok, rows, params, runner=eager, hidden_hook=flipped_e,
                       processors=procs_fe)  # fmt: skip
    assert (
        [r.token_ids for r in ours2] == [r.token_ids for r in ref2] != [r.token_ids for r in ours]
    )
    assert len(runner._hooked_graphs) == 1
    # unhooked batches take the unhooked recorded steps
    again, _ = generate(decoder, tok, rows, params, runner=runner)
    assert [r.token_ids for r in again] == [r.token_ids for r in plain]
    with pytest.raises(ValueError, match="hidden-state hook"):
        generate(decoder, tok, rows, params, runner=runner, hidden_hook=FunctionHook(lambda h: h))


# ------------------------------------------------------------------------- on a GPU


@pytest.mark.gpu
@pytest.mark.parametrize("beta", [0.0, 0.3])
def test_cuda_graphs_record_the_edit(tiny_dir, gen, beta):
    """Captured steps with the edit (and its mask) give the eager CUDA runner's tokens, batch 3
    in bucket 4; a second batch reuses the capture; replayed steps never sync with the host."""
    decoder, tok = load_decoder(str(tiny_dir), device="cuda")
    rows, params = rows_params(gen)
    runner = DecodeRunner(decoder, DecodeRunnerConfig((1, 4), 32))
    net = value_net(decoder)
    eager = DecodeRunner(decoder, DecodeRunnerConfig((1, 4), 32, enforce_eager=True))
    for flip in (1.0, -1.0):
        results = []
        for r in (runner, eager):
            hook, procs = value_hook(decoder, net, beta)
            hook.edits[0].coef.mul_(flip)
            results.append(generate(decoder, tok, rows, params, runner=r, hidden_hook=hook,
                                    processors=procs)[0])  # fmt: skip
        assert [x.token_ids for x in results[0]] == [x.token_ids for x in results[1]]
    assert len(runner._hooked_graphs) == 1
    assert all(isinstance(g, torch.cuda.CUDAGraph) for g in runner._hooked_graphs.values())
    # no host sync in a replayed hooked step (the first step of a key captures: run it first)
    hook, procs = value_hook(decoder, net, beta)
    runner.start(_batch(decoder, rows), hook)
    tok_ = runner.step(torch.zeros(3, dtype=torch.long, device="cuda")).argmax(-1)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(4):
            logits = runner.step(tok_)
            for p in procs:
                logits = p(logits, None, None)
            tok_ = logits.argmax(-1)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _batch(decoder, rows: list[list[int]]):
    from dglm.engine.decoding.padding import left_pad

    return left_pad(rows, 0, max(map(len, rows)) + 8, None, decoder.device)
