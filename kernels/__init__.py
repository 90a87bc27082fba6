"""Fused kernels with their PyTorch references: `guided_update` (C++ on CPU, Triton on CUDA) and
`attention` (Triton)."""

import sys

if __name__ == "kernels":
    # This folder installs as dglm.kernels. Imported as top-level `kernels`, the checkout's root is
    # on sys.path (`python -m pytest` from it) and shadows the `kernels` distribution that
    # transformers imports when it is installed (a dependency of recent transformers): load that one
    # in this module's place.
    import importlib.util
    from importlib.machinery import PathFinder
    from pathlib import Path

    _root = Path(__file__).resolve().parent.parent
    _path = [p for p in sys.path if Path(p or ".").resolve() != _root]
    _spec = PathFinder.find_spec("kernels", _path)
    if _spec is None or _spec.loader is None:
        raise ImportError(
            "`kernels` here is the source folder of dglm.kernels (import dglm.kernels), and no "
            "installed `kernels` distribution was found"
        )
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module
    _spec.loader.exec_module(_module)
else:
    from dglm.kernels.guided_update import (
        GuidedUpdateInputs,
        guided_update_ref,
        select_guided_update,
    )

    __all__ = ["GuidedUpdateInputs", "guided_update_ref", "select_guided_update"]
