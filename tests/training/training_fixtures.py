"""Shared by the training tests: a task only a soft prompt made from the latent can solve, and the
rows a run logs."""

from __future__ import annotations

import json
from pathlib import Path

import torch

Rows = tuple[
    list[list[int]], list[list[int]], torch.Tensor
]  # prefix ids, continuation ids, latents


def coded_task(n: int = 64, dim: int = 32, first_token: int = 4) -> Rows:
    """n rows: prefix [7, 8, 9], a 6-token continuation (ids from `first_token` up) picked from a
    random 4-row table by the row's code in 0..3, and the latent one_hot(code)·√dim, so only the
    latent tells the continuations apart. All continuations are 6 tokens long, so per-process token
    means average to the one-process mean exactly."""
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 4, (n,), generator=g)
    table = torch.randint(first_token, 250, (4, 6), generator=g)
    lat = torch.nn.functional.one_hot(codes, dim).float() * dim**0.5
    return [[7, 8, 9]] * n, [table[c].tolist() for c in codes], lat


def split_rows(rows: Rows, n_train: int = 48) -> tuple[Rows, Rows]:
    """(the first n_train rows, the rest): a training and a held-out set."""
    pre, cont, lat = rows
    train = (pre[:n_train], cont[:n_train], lat[:n_train])
    return train, (pre[n_train:], cont[n_train:], lat[n_train:])


def log_rows(run_dir: Path) -> list[dict]:
    """The rows of a run's log.jsonl."""
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
