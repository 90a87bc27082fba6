"""Fused kernels with their PyTorch references: `guided_update` (C++ on CPU, Triton on CUDA) and
`attention` (Triton)."""

from dglm.kernels.guided_update import GuidedUpdateInputs, guided_update_ref, select_guided_update

__all__ = ["GuidedUpdateInputs", "guided_update_ref", "select_guided_update"]
