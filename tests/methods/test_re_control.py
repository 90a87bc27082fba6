"""RE-Control: the analytic value ascent against autograd, the hook's pass-through rows, the edit
in the decode loop, the TD loss's terminal index and detached target, and training on rollouts
whose reward a value network can learn."""

from __future__ import annotations

import pytest
import torch
from decoder_fixtures import EOS, VOCAB, make_tiny_hf_dir, one_thread  # noqa: F401 - autouse fixture
from dglm.engine.decoding.loop import generate
from dglm.engine.decoding.runner import DecodeRunner, DecodeRunnerConfig
from dglm.engine.decoding.sampling import DecodeParams
from dglm.engine.methods.re_control import (
    RowEdit,
    ValueEdit,
    ValueNetConfig,
    ValueNetwork,
    check_edit,
    value_ascent,
)
from dglm.engine.models import load_decoder
from dglm.engine.models.base import FunctionHook
from dglm.engine.training.loop import TrainConfig
from dglm.engine.training.value import Rollouts, td_loss, train_value
from dglm.kernels import value_edit


def net_of(h: int = 16, k: int = 2, depth: int = 2, seed: int = 0) -> ValueNetwork:
    torch.manual_seed(seed)
    return ValueNetwork(ValueNetConfig("p", h, k, hidden_dim=24, depth=depth))


def autograd_ascent(h, net, coef, steps, size, n):
    h = h.clone()
    for i in range(n):
        x = h.detach().requires_grad_(True)
        v = net(x)
        j = (torch.nn.functional.logsigmoid(coef * v) * (coef != 0)).sum()
        (g,) = torch.autograd.grad(j, x)
        h = h + (steps > i).float()[:, None] * size * g
    return h


NATIVE = [False] + ([True] if value_edit.available() else [])


@pytest.mark.parametrize("native", NATIVE, ids=lambda n: "cpp" if n else "torch")
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_value_ascent_matches_autograd(gen, depth, native):
    """Both forms of the analytic edit (PyTorch, and the C++ loop on CPU) against autograd."""
    net = net_of(depth=depth)
    h = torch.randn(5, 16, generator=gen)
    coef = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [1.0, -1.0], [0.0, 0.0]])
    steps = torch.tensor([3, 1, 0, 4, 2])
    size = torch.tensor([[0.5], [2.0], [1.0], [0.3], [1.0]])
    got = value_ascent(h, net, coef, steps, size, 4, native=native)
    want = autograd_ascent(h, net, coef, steps, size, 4)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[2], h[2]) and torch.equal(got[4], h[4])  # 0 steps / no target
    assert not torch.equal(got[0], h[0])


@pytest.mark.skipif(not value_edit.available(), reason="cpu_ops is not built")
@pytest.mark.parametrize("rows, width, hidden, depth, steps", [(1, 576, 256, 2, 30),
                         (8, 64, 32, 1, 7), (33, 48, 96, 3, 12)])  # fmt: skip
def test_cpp_edit_equals_the_torch_form(gen, rows, width, hidden, depth, steps):
    """Batch sizes, widths, depths and step counts (SmolLM2's 576 with the default 30 steps):
    the C++ loop stays within fp32 rounding of the PyTorch form over every step."""
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    net = ValueNetwork(ValueNetConfig("p", width, 3, hidden, depth))
    h = torch.randn(rows, width, generator=gen)
    coef = torch.randint(-1, 2, (rows, 3), generator=gen).float()
    n = torch.randint(0, steps + 1, (rows,), generator=gen)
    size = torch.rand(rows, 1, generator=gen)
    want = value_ascent(h, net, coef, n, size, steps, native=False)
    got = value_ascent(h, net, coef, n, size, steps, native=True)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    still = (n == 0) | (coef == 0).all(-1)  # no step or no target: untouched, bit for bit
    assert torch.equal(got[still], h[still])
    assert ((got - h).abs().amax(-1)[~still] > 1e-4).all()  # every other row moved


def test_ascent_raises_the_targeted_value(gen):
    net = net_of()
    h = torch.randn(64, 16, generator=gen)
    coef = torch.tensor([[1.0, 0.0]]).repeat(64, 1)
    coef[32:, 0] = -1.0
    before = net(h)[:, 0]
    after = net(value_ascent(h, net, coef, torch.full((64,), 20), torch.full((64, 1), 0.5), 20))
    assert (after[:32, 0] >= before[:32] - 1e-6).all() and (after[:32, 0] > before[:32]).any()
    assert (after[32:, 0] <= before[32:] + 1e-6).all()


def test_hook_passes_other_rows_through_bit_identical(gen):
    net = net_of()
    coef = torch.tensor([[1.0, 0.0], [0.0, 0.0], [-1.0, 0.0]])
    edit = RowEdit(net, coef, torch.tensor([5, 5, 0]), torch.tensor([[1.0], [1.0], [1.0]]))
    hook = ValueEdit([edit], rows=3)
    hidden = torch.randn(5, 2, 16, generator=gen)  # 3 rows + 2 companion rows, T = 2
    out = hook(hidden)
    assert out.shape == hidden.shape
    assert torch.equal(out[1:], hidden[1:])  # no target, 0 steps, companions
    want = value_ascent(hidden[0], net, coef[:1].repeat(2, 1), torch.tensor([5, 5]),
                        torch.ones(2, 1), 5)  # fmt: skip
    torch.testing.assert_close(out[0], want)
    with pytest.raises(ValueError, match="built for 3 rows"):
        hook(hidden[:2])


def test_checks_name_the_field():
    for bad in (-1, 1001, 2.5, True):
        with pytest.raises(ValueError, match="steps"):
            check_edit(bad, 0.5)
    for bad in (float("nan"), float("inf"), -0.1, "1"):
        with pytest.raises(ValueError, match="step_size"):
            check_edit(4, bad)
    with pytest.raises(ValueError, match="hidden_dim"):
        ValueNetConfig("p", 16, 1, hidden_dim=0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    make_tiny_hf_dir("llama_gqa", path, seed=3)
    return load_decoder(str(path))


def test_edit_in_the_decode_loop(tiny, gen):
    """Unedited rows decode bit-identically to no hook; an edited row's greedy tokens follow the
    LM head applied to its edited state; traced runners refuse the hook."""
    decoder, tok = tiny
    H = decoder.hidden_size
    torch.manual_seed(1)
    net = ValueNetwork(ValueNetConfig("p", H, 1, hidden_dim=32, depth=1))
    rows = [torch.randint(4, VOCAB, (n,), generator=gen).tolist() for n in (4, 6)]
    params = [DecodeParams(6, temperature=0.0, ignore_eos=True)] * 2
    plain, _ = generate(decoder, tok, rows, params)
    edit = RowEdit(net, torch.tensor([[0.0], [1.0]]), torch.tensor([0, 8]),
                   torch.tensor([[0.0], [40.0]]))  # fmt: skip
    got, _ = generate(decoder, tok, rows, params, hidden_hook=ValueEdit([edit], 2))
    assert got[0].token_ids == plain[0].token_ids
    # row 1 by hand: cache-free forward over prefix + tokens, last state edited, argmax
    out: list[int] = []
    for _ in range(6):
        ids = torch.tensor([rows[1] + out])

        def hook(h: torch.Tensor) -> torch.Tensor:
            e = value_ascent(h[:, -1], net, torch.ones(1, 1), torch.tensor([8]),
                             torch.tensor([[40.0]]), 8)  # fmt: skip
            return e[:, None]

        with torch.no_grad():
            logits = decoder(decoder.embed(ids), torch.arange(ids.shape[1])[None], last_only=True,
                             hidden_hook=FunctionHook(hook))  # fmt: skip
        logits[0, -1, EOS] = float("-inf")
        out.append(int(logits[0, -1].argmax()))
    assert got[1].token_ids == out
    assert got[1].token_ids != plain[1].token_ids  # a strong edit changes the text
    traced = DecodeRunner(
        decoder,
        DecodeRunnerConfig(
            batch_sizes=(2,), max_len=16, enforce_eager=True, step_impl="trace"
        ),  # fmt: skip
    )
    # a traced step runs the edit after its traced body: the same tokens
    again, _ = generate(decoder, tok, rows, params, runner=traced, hidden_hook=ValueEdit([edit], 2))
    assert [r.token_ids for r in again] == [r.token_ids for r in got]


def test_td_loss_uses_the_last_valid_state_and_a_detached_target(gen):
    net = net_of(h=8, k=1)
    states = torch.randn(3, 5, 8, generator=gen)
    lengths = torch.tensor([5, 2, 1])
    reward = torch.randn(3, 1, generator=gen)
    td, term = td_loss(net, states, lengths, reward)
    with torch.no_grad():
        v = net(states)[..., 0]
    want_term = ((torch.stack([v[0, 4], v[1, 1], v[2, 0]]) - reward[:, 0]) ** 2).mean()
    torch.testing.assert_close(term, want_term)
    pairs = [(v[0, t] - v[0, t + 1]) ** 2 for t in range(4)] + [(v[1, 0] - v[1, 1]) ** 2]
    torch.testing.assert_close(td, torch.stack(pairs).mean())
    changed = states.clone()
    changed[1, 2:] = 99.0  # past row 1's length: ignored
    changed[2, 1:] = -5.0
    torch.testing.assert_close(td_loss(net, changed, lengths, reward)[0], td)
    # the bootstrapped target is detached: the TD gradient flows through V(h_t) only
    x = states.clone().requires_grad_(True)
    td, _ = td_loss(net, x, lengths, reward)
    (g,) = torch.autograd.grad(td, x)
    assert g[0, 4].abs().sum() == 0  # the terminal state is only ever a target
    assert g[0, 0].abs().sum() > 0


def test_train_value_learns_a_learnable_reward(tmp_path, gen):
    """Reward = a fixed linear read-out of the last state: TD training makes the held-out value
    track it (correlation at the last state well above chance) and the loss falls."""
    N, T, H = 400, 6, 8
    states = torch.randn(N, T, H, generator=gen)
    states = states.cumsum(1) / 2  # a walk: early states say something about the end
    lengths = torch.randint(2, T + 1, (N,), generator=gen)
    w = torch.randn(H, generator=gen)
    reward = (states[torch.arange(N), lengths - 1] @ w)[:, None] / 3
    data = Rollouts(states.to(torch.bfloat16), lengths, reward, torch.zeros(N, dtype=bool), ["p"])
    cfg = TrainConfig(steps=300, batch_size=64, lr=3e-3, warmup=10, eval_every=100,
                      save_every=300, ema_decay=0.9)  # fmt: skip
    net = train_value(data, slice(0, 1), ValueNetConfig("p", H, 1, hidden_dim=32), cfg, tmp_path)
    import json

    logs = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert logs[-1]["eval_corr_last"] > 0.9, logs[-1]
    assert logs[-1]["eval_terminal_mse"] < 0.5 * logs[-1]["eval_reward_var"]
    assert logs[-1]["loss"] < logs[0]["loss"]
    assert isinstance(net, ValueNetwork)


def test_state_noise_smooths_training_and_still_learns(tmp_path, gen):
    N, T, H = 200, 4, 8
    states = torch.randn(N, T, H, generator=gen).cumsum(1) / 2
    lengths = torch.full((N,), T)
    w = torch.randn(H, generator=gen)
    reward = (states[:, -1] @ w)[:, None] / 3
    data = Rollouts(states.to(torch.bfloat16), lengths, reward, torch.zeros(N, dtype=bool), ["p"])
    cfg = TrainConfig(steps=200, batch_size=64, lr=3e-3, warmup=10, eval_every=200,
                      save_every=200, ema_decay=0.9)  # fmt: skip
    vc = ValueNetConfig("p", H, 1, hidden_dim=32)
    torch.manual_seed(0)
    plain = train_value(data, slice(0, 1), vc, cfg, tmp_path / "a")
    torch.manual_seed(0)
    noisy = train_value(data, slice(0, 1), vc, cfg, tmp_path / "b", state_noise=0.5)
    assert not torch.equal(plain.layers[0].weight, noisy.layers[0].weight)
    import json

    last = json.loads((tmp_path / "b" / "log.jsonl").read_text().splitlines()[-1])
    assert last["eval_corr_last"] > 0.8, last


def test_companion_rows_are_edited_as_the_rows_they_follow(gen):
    net = net_of()
    coef = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    edit = RowEdit(net, coef, torch.tensor([4, 4]), torch.tensor([[2.0], [2.0]]))
    hook = ValueEdit([edit], rows=2).with_companions([0, 1, 0])
    assert hook.rows == 5
    h = torch.randn(1, 1, 16, generator=gen).expand(5, 1, 16).contiguous()
    out = hook(h)
    assert torch.equal(out[2], out[0]) and torch.equal(out[4], out[0])  # follow row 0: edited
    assert torch.equal(out[3], h[3]) and torch.equal(out[1], h[1])  # follow row 1: untouched
    assert not torch.equal(out[0], h[0])


def test_step_size_with_dglm_is_the_default_of_combined_controls():
    from dglm.engine.api import GenerationParams
    from dglm.engine.methods.re_control import edit_settings

    net = ValueNetwork(ValueNetConfig("p", 8, 1, steps=7, step_size=16.0, step_size_with_dglm=4.0))
    p = GenerationParams()
    assert edit_settings(p, net) == (7, 16.0, 0.0)
    assert edit_settings(p, net, with_dglm=True) == (7, 4.0, 0.0)
    assert edit_settings(GenerationParams(re_control_step_size=2.0), net, True) == (7, 2.0, 0.0)
    with pytest.raises(ValueError, match="step_size_with_dglm must be"):
        ValueNetConfig("p", 8, 1, step_size_with_dglm=float("nan"))


def test_plausibility_defaults_and_checks():
    from dglm.engine.api import GenerationParams
    from dglm.engine.methods.re_control import edit_settings

    net = ValueNetwork(ValueNetConfig("p", 8, 1, plausibility=0.05, plausibility_with_dglm=0.2))
    assert edit_settings(GenerationParams(), net)[2] == 0.05
    assert edit_settings(GenerationParams(), net, with_dglm=True)[2] == 0.2
    assert edit_settings(GenerationParams(re_control_plausibility=0.0), net, True)[2] == 0.0
    plain = ValueNetwork(ValueNetConfig("p", 8, 1, plausibility=0.3))
    assert edit_settings(GenerationParams(), plain, with_dglm=True)[2] == 0.3  # falls back
    for bad in (1.0, -0.1, float("nan"), "0.1", True):
        with pytest.raises(ValueError, match="re_control_plausibility"):
            GenerationParams(re_control_plausibility=bad)
        with pytest.raises(ValueError, match="plausibility"):
            ValueNetConfig("p", 8, 1, plausibility=bad)


def test_plausible_edit_masks_by_the_unedited_state(gen):
    """PlausibleEdit keeps each masked row's scores on the tokens its *unedited* state finds
    plausible (p ≥ β · max p), leaves β = 0 rows and inactive rows alone, and a row whose every
    plausible token was already ruled out keeps its scores."""
    from dglm.engine.methods.re_control import PlausibleEdit

    H, V = 16, 40
    head = torch.randn(V, H, generator=gen) * 3

    def logits_fn(h: torch.Tensor) -> torch.Tensor:
        return h.float() @ head.T

    net = net_of()
    coef = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 0.0], [-1.0, 0.0]])
    edit = RowEdit(net, coef, torch.tensor([6, 6, 6, 6]), torch.full((4, 1), 3.0))
    beta = torch.tensor([0.2, 0.0, 0.5, 0.05])  # row 2 has β but no target: not masked
    hook = ValueEdit([edit], rows=4, plausibility=beta)
    assert hook.masked.tolist() == [0, 3]
    hidden = torch.randn(4, 1, H, generator=gen)
    edited = hook(hidden)
    logits = logits_fn(edited[:, 0])
    mask = PlausibleEdit(hook, logits_fn)
    got = mask(logits.clone(), None, None)
    base = torch.softmax(logits_fn(hidden[:, 0]), -1)
    for r, b in ((0, 0.2), (3, 0.05)):
        keep = base[r] >= b * base[r].max()
        assert torch.equal(got[r][keep], logits[r][keep])
        assert torch.isneginf(got[r][~keep]).all() and (~keep).any()
    assert torch.equal(got[1], logits[1]) and torch.equal(got[2], logits[2])
    # another processor ruled out every token row 0 finds plausible: the row keeps its scores
    ruled = logits.clone()
    ruled[0][base[0] >= 0.2 * base[0].max()] = float("-inf")
    again = mask(ruled.clone(), None, None)
    assert torch.equal(again[0], ruled[0])
    # companions extend the hook and report to the same mask
    ext = hook.with_companions([0, 3])
    ext(torch.cat((hidden, hidden[[0, 3]])))
    assert torch.equal(hook.unedited, hidden[[0, 3], -1])
    with pytest.raises(ValueError, match="plausibility > 0"):
        PlausibleEdit(ValueEdit([edit], rows=4), logits_fn)


def test_plausibility_in_the_decode_loop(tiny, gen):
    """β = 0 decodes exactly as the edit alone; β > 0 with the edit: every sampled token is one
    the unedited decoder found plausible at that step (checked by replaying the rows)."""
    from dglm.engine.methods.re_control import PlausibleEdit

    decoder, tok = tiny
    H = decoder.hidden_size
    torch.manual_seed(2)
    net = ValueNetwork(ValueNetConfig("p", H, 1, hidden_dim=32, depth=1))
    rows = [torch.randint(4, VOCAB, (n,), generator=gen).tolist() for n in (4, 6)]
    params = [DecodeParams(6, temperature=1.0, seed=s, ignore_eos=True) for s in (1, 2)]
    edit = RowEdit(net, torch.tensor([[1.0], [1.0]]), torch.tensor([8, 8]),
                   torch.tensor([[60.0], [60.0]]))  # fmt: skip
    edited, _ = generate(decoder, tok, rows, params, hidden_hook=ValueEdit([edit], 2))
    off = ValueEdit([edit], 2, torch.zeros(2))
    same, _ = generate(decoder, tok, rows, params, hidden_hook=off)
    assert [r.token_ids for r in same] == [r.token_ids for r in edited]
    beta = 0.3
    hook = ValueEdit([edit], 2, torch.full((2,), beta))
    got, _ = generate(decoder, tok, rows, params, hidden_hook=hook,
                      processors=(PlausibleEdit(hook, decoder.logits),))  # fmt: skip
    assert [r.token_ids for r in got] != [r.token_ids for r in edited]
    # the unedited logits from the edited rows' LM-head call (Decoder.hooked_logits) = the mask
    # running the head apart, and a traced step's = an eager one's
    apart = ValueEdit([edit], 2, torch.full((2,), beta))
    apart.head_extra = lambda: None
    again, _ = generate(decoder, tok, rows, params, hidden_hook=apart,
                        processors=(PlausibleEdit(apart, decoder.logits),))  # fmt: skip
    assert [r.token_ids for r in again] == [r.token_ids for r in got]
    traced = DecodeRunner(decoder, DecodeRunnerConfig(batch_sizes=(2,), max_len=16,
                          enforce_eager=True, step_impl="trace"))  # fmt: skip
    hook_t = ValueEdit([edit], 2, torch.full((2,), beta))
    again, _ = generate(decoder, tok, rows, params, runner=traced, hidden_hook=hook_t,
                        processors=(PlausibleEdit(hook_t, decoder.logits),))  # fmt: skip
    assert [r.token_ids for r in again] == [r.token_ids for r in got]
    for r in range(2):
        out = got[r].token_ids
        for i, t in enumerate(out):
            ids = torch.tensor([rows[r] + out[:i]])
            with torch.no_grad():
                logits = decoder(decoder.embed(ids), torch.arange(ids.shape[1])[None],
                                 last_only=True)[0, -1]  # fmt: skip
            p = torch.softmax(logits, -1)
            assert p[t] >= beta * p.max() * (1 - 1e-4), (r, i)
