"""Data parallelism on one machine: N processes × 1 thread, gradients averaged over gloo.

On a CPU, the small matmuls of training scale badly across the OpenMP threads of one process
(every op ends in a barrier); N single-threaded processes, each on its own rows, keep every core
busy and meet only once per step, in one all_reduce of the gradients. The trainers
(dglm.engine.training) and benchmarks/bench_train.py share this module:

    spawn(fn, world_size, *args)      # fn(rank, world_size, *args) in each process
    average_gradients(params)         # between backward and clipping: every rank the mean

Outside a process group every function here is a no-op (world size 1, rank 0).
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn


def free_port() -> int:
    """A TCP port on localhost that nothing listens on (for the process group's rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def init(rank: int, world_size: int, port: int) -> None:
    """Join a gloo process group of `world_size` processes on this machine, one CPU thread each."""
    torch.set_num_threads(1)
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # localhost only, whatever the hostname
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )


def _entry(rank: int, fn: Callable, world_size: int, port: int, args: tuple) -> None:
    init(rank, world_size, port)
    try:
        fn(rank, world_size, *args)
        # every rank done before any tears down: a rank destroying its gloo group while a peer
        # still holds the connection aborted the peer now and then ("terminate called without
        # an active exception", SIGABRT)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn(fn: Callable, world_size: int, *args) -> None:
    """Run fn(rank, world_size, *args) in `world_size` fresh processes (one thread each, in one
    gloo group) and wait for all of them; a failure in any of them raises a RuntimeError here,
    with its traceback. `fn` and `args` must pickle (a module-level function; dataclasses,
    tensors, paths)."""
    if not (isinstance(world_size, int) and world_size >= 1):
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
    try:
        mp.spawn(_entry, args=(fn, world_size, free_port(), args), nprocs=world_size, join=True)
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
        raise RuntimeError(f"a process of the data-parallel group failed: {e}") from e


def shard(n: int) -> slice:
    """This rank's rows of a batch of n: rank r of N gets [r·n/N, (r+1)·n/N) (all of it alone)."""
    w, r = world_size(), rank()
    if n < w:
        raise ValueError(f"a batch of {n} rows cannot be shared by {w} processes: use more rows")
    return slice(r * n // w, (r + 1) * n // w)


@torch.no_grad()
def broadcast_parameters(model: nn.Module) -> None:
    """Every rank takes rank 0's parameters and buffers (so all start from the same weights)."""
    if world_size() == 1:
        return
    for t in [*model.parameters(), *model.buffers()]:
        dist.broadcast(t.data, src=0)


@torch.no_grad()
def average_gradients(
    params: Iterable[torch.nn.Parameter], *scalars: torch.Tensor
) -> list[torch.Tensor]:
    """Replace each trainable parameter's gradient by its mean over the ranks (a missing gradient
    counts as zeros), in one all_reduce of a flat fp32 buffer; `scalars` (e.g. the loss) ride in
    the same buffer and come back averaged. Outside a process group: nothing changes."""
    if world_size() == 1:
        return [s.detach().float() for s in scalars]
    params = [p for p in params if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat(
        [p.grad.reshape(-1).float() for p in params]
        + [s.detach().reshape(1).float() for s in scalars]
    )
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
        offset += n
    return list(flat[offset:].unbind())


def all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """The concatenation over ranks (in rank order) of every rank's rows of x (n_r, ...)."""
    if world_size() == 1:
        return x
    sizes = [torch.zeros(1, dtype=torch.long) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([x.shape[0]]))
    n = [int(s) for s in sizes]
    padded = x.new_zeros(max(n), *x.shape[1:])  # gloo gathers equal shapes only
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in n]
    dist.all_gather(parts, padded)
    return torch.cat([p[:k] for p, k in zip(parts, n, strict=True)])
