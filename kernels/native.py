"""The compiled CPU ops (`dglm.kernels.cpu_ops`, kernels/cpp) as every Python wrapper sees them:
the module, or None when the package was installed without building it."""

from __future__ import annotations

try:
    from dglm.kernels import cpu_ops
except ImportError:  # installed without the compiled kernels
    cpu_ops = None

__all__ = ["built", "cpu_ops"]


def built(name: str) -> bool:
    """Whether the compiled module is importable and has `name` (a function or class)."""
    return cpu_ops is not None and hasattr(cpu_ops, name)
