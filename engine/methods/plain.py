"""Plain decoding as a `Method`: the prefix decoded by the frozen decoder, no conditioning (the
baseline every method is compared with), optionally with min-p truncation (`decoding.sampling.MinP`,
the plausibility mask DGLM's prompt guidance decodes with)."""

from __future__ import annotations

from dglm.engine.api import GenerationParams
from dglm.engine.decoding.sampling import MinP
from dglm.engine.methods.base import Conditioning, Method, MethodBatch


class PlainDecoding(Method):
    """min_p: keep tokens with p ≥ min_p · max p at every step (0 = off)."""

    name = "plain"

    def __init__(self, min_p: float = 0.0) -> None:
        if not 0 <= min_p < 1:
            raise ValueError(f"min_p must be in [0, 1), got {min_p!r}")
        self.min_p = min_p

    def validate(self, params: list[GenerationParams]) -> None:
        for i, p in enumerate(params):
            if p.controls:
                raise ValueError(
                    f"params[{i}].controls: plain decoding takes no controls, got "
                    f"{[c.probe for c in p.controls]}; use method 'dglm', 're-control' or 'fudge'"
                )

    def condition(self, batch: MethodBatch) -> Conditioning:
        return Conditioning(processors=(MinP(self.min_p),) if self.min_p else ())


__all__ = ["PlainDecoding"]
