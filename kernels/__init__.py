"""Fused kernels with their PyTorch references: `guided_update` (C++ on CPU)."""

from dglm.kernels.guided_update import guided_update_ref, select_guided_update

__all__ = ["guided_update_ref", "select_guided_update"]
