"""RE-Control's value ascent on CPU in C++: `value_ascent` (kernels/cpp/value_edit.cpp).

The edit runs at every decoding step of a controlled row: n gradient-ascent steps (30 by default)
of a small ReLU MLP's log-sigmoid objective, each a forward and a backward pass of a few matrix-
vector products. Through PyTorch that is ~12 operators per step, ~360 per token, each paying
dispatch (~4 ms per token at batch 1 beside a ~20 ms decode step); here each row's steps run as
plain loops. The PyTorch form, `dglm.engine.methods.re_control.value_ascent(..., native=False)`,
is the reference the tests hold this to (fp32, sums in another order).
"""

from __future__ import annotations

import torch
from dglm.kernels.native import built, cpu_ops

__all__ = ["available", "value_ascent"]


def available() -> bool:
    """Whether the compiled edit is importable (it is built with the package)."""
    return built("value_ascent")


def value_ascent(
    h: torch.Tensor,  # (R, H)
    weights: list[torch.Tensor],  # per layer (out, in) fp32
    biases: list[torch.Tensor],  # per layer (out,) fp32
    coef: torch.Tensor,  # (R, K) ±1 / 0
    steps: torch.Tensor,  # (R,) long
    step_size: torch.Tensor,  # (R, 1) or (R,)
    max_steps: int,
) -> torch.Tensor:
    """The edited states (R, H) fp32 (a new tensor; `h` is not changed)."""
    if not available():
        raise RuntimeError("dglm.kernels.cpu_ops is not built; reinstall the package")
    R, H = h.shape
    if len(weights) != len(biases) or not weights:
        raise ValueError("value_ascent: one bias per weight, at least one layer")
    ws = [w.detach().to(torch.float32).contiguous() for w in weights]
    bs = [b.detach().to(torch.float32).contiguous() for b in biases]
    if ws[0].shape[1] != H:
        raise ValueError(f"value_ascent: h has width {H}, the first layer takes {ws[0].shape[1]}")
    K = ws[-1].shape[0]
    out = h.detach().to(torch.float32).contiguous().clone()
    coef = coef.to(torch.float32).contiguous()
    steps = steps.to(torch.long).contiguous()
    step_size = step_size.reshape(-1).to(torch.float32).contiguous()
    if coef.shape != (R, K) or steps.shape != (R,) or step_size.shape != (R,):
        raise ValueError(f"value_ascent: coef ({R}, {K}), steps ({R},), step_size ({R},) expected")
    for t in (out, *ws, *bs, coef, steps, step_size):
        if t.device.type != "cpu":
            raise ValueError(f"value_ascent: tensors must be on CPU, got {t.device}")
    cpu_ops.value_ascent(
        [(w.data_ptr(), b.data_ptr()) for w, b in zip(ws, bs, strict=True)],
        [tuple(w.shape) for w in ws], out.data_ptr(), coef.data_ptr(), steps.data_ptr(),
        step_size.data_ptr(), R, int(max_steps), torch.get_num_threads(),
    )  # fmt: skip
    return out
