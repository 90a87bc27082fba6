"""Data parallelism: the collectives in 2 processes, and a 2-process steering run on the tiny
Llama that computes what one process computes, logs once, and resumes."""

from __future__ import annotations

import pytest
import torch
from dglm.engine.models import load_decoder
from dglm.engine.models.lora import LoraConfig
from dglm.engine.prompt.generator import PROMPT_GENERATOR_PRESETS, PromptGenerator
from dglm.engine.training import parallel
from dglm.engine.training.loop import TrainConfig
from dglm.engine.training.steering import SteerConfig, train_steering
from training_fixtures import coded_task, log_rows, split_rows


def _collectives(rank: int, world: int, out: str) -> None:
    assert (parallel.rank(), parallel.world_size()) == (rank, world)
    # gradients: rank r holds (r + 1)·g (one parameter without a gradient on rank 1)
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(3, 5, generator=g), torch.randn(7, generator=g)]
    params = [torch.nn.Parameter(torch.zeros_like(x)) for x in grads]
    for p, x in zip(params, grads, strict=True):
        p.grad = (rank + 1) * x
    if rank == 1:
        params[1].grad = None
    frozen = torch.nn.Parameter(torch.ones(2), requires_grad=False)
    (loss,) = parallel.average_gradients([*params, frozen], torch.tensor(10.0 * (rank + 1)))
    # shards of 5 rows, rows gathered back in rank order
    mine = parallel.shard(5)
    gathered = parallel.all_gather_rows(torch.arange(5.0)[mine])
    # parameters: rank 1 takes rank 0's
    net = torch.nn.Linear(3, 2)
    with torch.no_grad():
        net.weight.fill_(float(rank))
    parallel.broadcast_parameters(net)
    torch.save(
        {"grads": [p.grad for p in params], "frozen": frozen.grad, "loss": loss,
         "gathered": gathered, "weight": net.weight.detach(), "mine": [mine.start, mine.stop]},
        f"{out}.{rank}",
    )  # fmt: skip


def test_collectives_in_two_processes(tmp_path):
    out = tmp_path / "result"
    parallel.spawn(_collectives, 2, str(out))
    g = torch.Generator().manual_seed(0)
    expected = [torch.randn(3, 5, generator=g), torch.randn(7, generator=g)]
    expected = [1.5 * expected[0], 0.5 * expected[1]]  # (1 + 2) / 2 and (1 + 0) / 2
    shards = []
    for rank in (0, 1):
        r = torch.load(f"{out}.{rank}", weights_only=True)
        for got, want in zip(r["grads"], expected, strict=True):
            torch.testing.assert_close(got, want)
        assert r["frozen"] is None  # frozen parameters are left alone
        torch.testing.assert_close(r["loss"], torch.tensor(15.0))
        torch.testing.assert_close(r["gathered"], torch.arange(5.0))
        assert (r["weight"] == 0).all()
        shards.append(r["mine"])
    assert shards == [[0, 2], [2, 5]]
    # outside a process group everything is the identity
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.ones(2)
    assert parallel.average_gradients([p], torch.tensor(3.0))[0] == 3.0
    assert (p.grad == 1).all() and parallel.shard(5) == slice(0, 5)


def test_spawn_reports_a_failed_process():
    with pytest.raises(RuntimeError, match="data-parallel group failed"):
        parallel.spawn(_fail_on_rank_1, 2)


def _fail_on_rank_1(rank: int, world: int) -> None:
    if rank == 1:
        raise ValueError("rank 1 fails")


# ------------------------------------------------------------------------------ a training run
def _steer(decoder_dir: str, out: str, steps: int):
    train, held = split_rows(coded_task())
    decoder = load_decoder(decoder_dir)[0]
    cfg = TrainConfig(
        steps=steps, batch_size=16, lr=3e-3, warmup=2, eval_every=2, save_every=2, ema_decay=0.5
    )
    torch.manual_seed(0)  # the prompt generator's and the adapters' initial weights
    return train_steering(
        PromptGenerator(PROMPT_GENERATOR_PRESETS["tiny"]),
        decoder,
        train,
        held,
        0,
        out,
        cfg,
        LoraConfig(rank=2, alpha=4.0),
        SteerConfig(alpha2_min=0.9, shuffle_rows=8, autocast_bf16=False),
    )


def _steer_process(rank: int, world: int, decoder_dir: str, out: str, steps: int) -> None:
    _steer(decoder_dir, out, steps)


def test_two_processes_train_like_one_and_resume(tmp_path, tiny_llama_dir):
    # both stop at step 4 and resume to 6 (the learning-rate schedule depends on the steps)
    _steer(str(tiny_llama_dir), str(tmp_path / "one"), 4)
    ref = _steer(str(tiny_llama_dir), str(tmp_path / "one"), 6)
    parallel.spawn(_steer_process, 2, str(tiny_llama_dir), str(tmp_path / "two"), 4)
    state = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=True)
    assert state["step"] == 4
    parallel.spawn(_steer_process, 2, str(tiny_llama_dir), str(tmp_path / "two"), 6)  # resumes
    state = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=True)
    assert state["step"] == 6
    # the same global batches and noise, gradients averaged: the one-process weights
    expected = ref.state_dict()
    assert set(state["model"]) == set(expected)
    for k, v in expected.items():
        torch.testing.assert_close(state["model"][k], v, rtol=1e-3, atol=1e-4, msg=k)
    assert any((v != 0).any() for k, v in expected.items() if k.endswith("__b"))  # adapters trained
    # rank 0 alone logs: the start diagnostic and every 2nd step, once each, as one process does
    rows, ref_rows = log_rows(tmp_path / "two"), log_rows(tmp_path / "one")
    assert [r["step"] for r in rows] == [r["step"] for r in ref_rows] == [0, 2, 4, 6]
    for r, q in zip(rows, ref_rows, strict=True):
        for k in ("loss", "eval_matched", "eval_shuffled"):
            if k in q:
                assert r[k] == pytest.approx(q[k], rel=1e-3, abs=1e-4), (k, r, q)
