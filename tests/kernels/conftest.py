"""Kernel tests: real Triton kernels on CUDA; without CUDA, the same kernels on CPU under the
Triton interpreter (TRITON_INTERPRET=1), fp32 only.

The kernels are decorated lazily on their first launch (the interpreter switch is read then), and
no test collected before this directory launches one, so setting the variable here is enough and
leaves the rest of the suite alone: nothing else uses Triton on a machine without CUDA.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


_COMPILE = """
import json, sys
from importlib import import_module
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
module, builder, sig, consts, warps = json.loads(sys.argv[1])
kernel = getattr(import_module(module), builder)()
compiled = triton.compile(
    ASTSource(fn=kernel, signature=sig, constexprs=consts),
    target=GPUTarget("cuda", 90, 32),
    options={"num_warps": warps},
)
print(json.dumps({"shared": compiled.metadata.shared, "entry": ".entry" in compiled.asm["ptx"]}))
"""


def _compile_sm90(builder: str, signature: dict, constexprs: dict, num_warps: int) -> dict:
    """Compile `module:builder`'s kernel for sm_90 (H100) ahead of time, no GPU needed.

    Catches what the interpreter cannot: unsupported ops, dot shapes, layouts, shared memory.
    Runs in a fresh process without TRITON_INTERPRET: triton.language's own helpers are decorated
    when triton is imported, so an interpreter-mode process cannot compile. → {shared, entry}.
    """
    sig = {**signature, **dict.fromkeys(constexprs, "constexpr")}
    module, name = builder.split(":")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    arg = json.dumps([module, name, sig, constexprs, num_warps])
    run = subprocess.run(
        [sys.executable, "-c", _COMPILE, arg], env=env, capture_output=True, text=True, timeout=300
    )
    if run.returncode and "ptxas" in run.stderr and "not found" in run.stderr.lower():
        pytest.skip("ptxas is unavailable")
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.fixture
def compile_sm90():
    return _compile_sm90
