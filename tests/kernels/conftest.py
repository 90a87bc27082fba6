"""Kernel tests: real Triton kernels on CUDA; without CUDA, the same kernels on CPU under the
Triton interpreter (TRITON_INTERPRET=1), fp32 only.

The kernels are decorated lazily on their first launch (the interpreter switch is read then), and
no test collected before this directory launches one, so setting the variable here is enough and
leaves the rest of the suite alone: nothing else uses Triton on a machine without CUDA.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def compile_sm90(monkeypatch):
    """Compile a kernel builder's kernel for sm_90 (H100) ahead of time, no GPU needed.

    Catches what the interpreter cannot: unsupported ops, dot shapes, layouts, shared memory.
    Returns (shared memory bytes, PTX text).
    """
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as e:  # pragma: no cover - depends on the install
        pytest.skip(f"triton's ahead-of-time compiler is unavailable: {e}")

    def run(build, signature: dict, constexprs: dict, num_warps: int) -> tuple[int, str]:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        kernel = build()  # a fresh, compiled-mode JITFunction
        sig = {**signature, **{name: "constexpr" for name in constexprs}}
        try:
            compiled = triton.compile(
                ASTSource(fn=kernel, signature=sig, constexprs=constexprs),
                target=GPUTarget("cuda", 90, 32),
                options={"num_warps": num_warps},
            )
        except (FileNotFoundError, RuntimeError) as e:
            if "ptxas" in str(e):
                pytest.skip(f"ptxas is unavailable: {e}")
            raise
        return compiled.metadata.shared, compiled.asm["ptx"]

    return run
