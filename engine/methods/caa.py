"""Contrastive activation addition (CAA; Panickssery et al. 2024, "Steering Llama 2 via Contrastive
Activation Addition"; Turner et al.'s activation addition; repeng's "control vectors") as a
`Method`: a steering vector added to the decoder's residual stream after chosen blocks.

For a probe's labelled texts (the sets its probe was trained on), the vector of label c at block l
is the difference of the mean residual activations after block l on texts of label c and on texts
of the other labels (`training.caa`); a binary probe's two vectors are each other's negation.
Steering toward label c adds m · v_c[l] after every block l of the vector's layer set, at every
position of the row (prefix, soft prompt, generated tokens), where m is the request's multiplier
(`GenerationParams.caa_multiplier`, else the vector's default). It costs one vector add per block
per token and no model besides the decoder.

The decode loop takes the addition as a `residual (R, L, H)` per row and block, zero where a row
or a block is not steered (`models.base.add_residual`): a fixed shape whatever is steered, which
the traced step, the fused C++ step and CUDA graphs run as they run any step (decoding.runner), and
a zero vector leaves every logit bit-identical (x + 0 = x).

`CAA` is the method alone (plain decoding of the prefix, every control acting through its vector);
DGLM adds the same residual for controls with `method="caa"` beside its soft prompt (methods.dglm),
so one request can plan with DGLM and steer with a vector.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from dglm.engine.api import MAX_CAA_MULTIPLIER, GenerationParams
from dglm.engine.methods.base import Conditioning, Method, MethodBatch
from dglm.engine.methods.re_control import ValueNetwork, value_conditioning
from dglm.engine.probes import Control, Probe, read_with_header
from safetensors.torch import save_file

POSITIONS = (
    "mean",
    "last",
)  # where activations are read: the mean over a text's tokens, or its last


@dataclass(frozen=True)
class SteeringVectorConfig:
    probe: str  # the probe whose labels it steers toward (its labelled texts made it)
    labels: tuple[str, ...]  # the probe's labels, in its order: one vector per label
    num_layers: int  # L: the decoder's blocks (a vector per block is stored)
    hidden_size: int  # H: the decoder's residual width
    # the blocks (0-based) after which it is added by default: chosen on dev (`dglm eval`)
    layers: tuple[int, ...]
    multiplier: float = 1.0  # m of a request given none (GenerationParams.caa_multiplier)
    position: str = "mean"  # how the activations were read (POSITIONS)
    examples: int = 0  # labelled texts per label it was computed from (provenance)

    def __post_init__(self) -> None:
        if not isinstance(self.probe, str) or not self.probe:
            raise ValueError(f"steering vector probe must be a probe's name, got {self.probe!r}")
        labels = self.labels
        if isinstance(labels, str) or not isinstance(labels, list | tuple) or len(labels) < 2:
            raise ValueError(f"steering vector labels must list ≥ 2 labels, got {labels!r}")
        object.__setattr__(self, "labels", tuple(labels))
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"steering vector labels must be distinct, got {self.labels}")
        for name in ("num_layers", "hidden_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"steering vector {name} must be a positive integer, got {v!r}")
        object.__setattr__(self, "layers", check_layers(self.layers, self.num_layers))
        check_multiplier(self.multiplier, f"steering vector {self.probe!r} multiplier")
        object.__setattr__(self, "multiplier", float(self.multiplier))
        if self.position not in POSITIONS:
            raise ValueError(
                f"steering vector position must be one of {POSITIONS}, got {self.position!r}"
            )
        if (
            isinstance(self.examples, bool)
            or not isinstance(self.examples, int)
            or self.examples < 0
        ):
            raise ValueError(
                f"steering vector examples must be an integer ≥ 0, got {self.examples!r}"
            )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["labels"], d["layers"] = list(self.labels), list(self.layers)
        return d


def check_layers(layers: object, num_layers: int) -> tuple[int, ...]:
    """`layers` as a sorted tuple of distinct block indices in [0, num_layers); ValueError naming
    the bad one."""
    if isinstance(layers, str | int) or not isinstance(layers, list | tuple) or not layers:
        raise ValueError(
            f"steering vector layers must be a non-empty list of blocks, got {layers!r}"
        )
    for x in layers:
        if isinstance(x, bool) or not isinstance(x, int) or not 0 <= x < num_layers:
            raise ValueError(
                f"steering vector layer {x!r} is not a block of the decoder's {num_layers} "
                f"(0 to {num_layers - 1})"
            )
    return tuple(sorted(set(layers)))


def check_multiplier(m: object, what: str) -> None:
    if (
        isinstance(m, bool)
        or not isinstance(m, int | float)
        or not math.isfinite(m)
        or not (-MAX_CAA_MULTIPLIER <= m <= MAX_CAA_MULTIPLIER)
    ):
        raise ValueError(
            f"{what} must be a finite number in [{-MAX_CAA_MULTIPLIER:g}, "
            f"{MAX_CAA_MULTIPLIER:g}], got {m!r}"
        )


@dataclass(frozen=True)
class SteeringVector:
    config: SteeringVectorConfig
    vectors: torch.Tensor  # (C, L, H) fp32: per label, per block

    def __post_init__(self) -> None:
        c = self.config
        expected = (len(c.labels), c.num_layers, c.hidden_size)
        if tuple(self.vectors.shape) != expected:
            raise ValueError(
                f"steering vector {c.probe!r} has shape {tuple(self.vectors.shape)}, expected "
                f"(labels, layers, hidden) = {expected}"
            )
        if not torch.isfinite(self.vectors).all():
            raise ValueError(f"steering vector {c.probe!r} has non-finite values")

    def label_index(self, target: str | int) -> int:
        labels = self.config.labels
        if isinstance(target, int) and not isinstance(target, bool) and 0 <= target < len(labels):
            return target
        if target not in labels:
            raise ValueError(
                f"control target {target!r} is not a label of steering vector "
                f"{self.config.probe!r}; choose one of {list(labels)}"
            )
        return labels.index(target)

    def addition(
        self, target: str | int, multiplier: float, layers: tuple[int, ...] | None = None
    ) -> torch.Tensor:
        """(L, H) fp32: m · v_target at the blocks of `layers` (default: the vector's), zero at
        the others."""
        c = self.config
        layers = c.layers if layers is None else check_layers(layers, c.num_layers)
        out = torch.zeros(c.num_layers, c.hidden_size)
        idx = torch.tensor(layers)
        out[idx] = multiplier * self.vectors[self.label_index(target)][idx].float()
        return out


def check_decoder(vec: SteeringVector, probe: Probe | None, num_layers: int, hidden: int) -> None:
    """ValueError unless `vec` fits the decoder (blocks, width) and its probe (labels, in order)."""
    c = vec.config
    if (c.num_layers, c.hidden_size) != (num_layers, hidden):
        raise ValueError(
            f"steering vector {c.probe!r} was made for a decoder of {c.num_layers} blocks × "
            f"{c.hidden_size} wide; this decoder is {num_layers} × {hidden}"
        )
    if probe is None or tuple(probe.labels) != c.labels:
        have = None if probe is None else list(probe.labels)
        raise ValueError(
            f"steering vector {c.probe!r} has labels {list(c.labels)} but the bundle's probe "
            f"{c.probe!r} has {have}"
        )


def save_steering_vectors(vectors: dict[str, SteeringVector], path: str | Path) -> None:
    """One file: a (C, L, H) fp32 tensor per probe, the configs in the header."""
    tensors = {name: v.vectors.detach().float().cpu().contiguous() for name, v in vectors.items()}
    meta = {name: v.config.to_dict() for name, v in vectors.items()}
    save_file(tensors, str(path), metadata={"steering_vectors": json.dumps(meta)})


def load_steering_vectors(path: str | Path) -> dict[str, SteeringVector]:
    """The vectors of a `save_steering_vectors` file by probe; ValueError naming the file when it
    is missing, unreadable or not such a file."""
    meta, tensors = read_with_header(path, "steering_vectors", "steering-vector")
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: not a steering-vector file (no 'steering_vectors' header)")
    try:
        return {
            name: SteeringVector(SteeringVectorConfig(**cfg), tensors[name].float())
            for name, cfg in meta.items()
        }
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from e


def acts_through_caa(c: Control, every_control: bool) -> bool:
    """Whether control `c` acts through its steering vector: method "caa"; with `every_control`
    (the CAA method alone) every control but RE-Control's ("re-control", "both": those act
    through their value networks beside it, e.g. a bundle's implied toxicity=low@re-control)."""
    return c.residual or (every_control and not c.hidden)


def caa_residual(
    vectors: dict[str, SteeringVector],
    batch: MethodBatch,
    every_control: bool,
    num_layers: int,
    hidden: int,
    layers: tuple[int, ...] | None = None,
) -> torch.Tensor | None:
    """The residual (R, L, H) fp32 of a batch's rows: the sum over each row's CAA controls
    (`acts_through_caa`) of m · v_target at the vector's blocks (`layers` overrides them: the
    eval's sweep); None when no row has one."""
    out = torch.zeros(len(batch.rows), num_layers, hidden)
    steered = False
    for r, (i, _) in enumerate(batch.rows):
        p = batch.params[i]
        for c in p.controls:
            if not acts_through_caa(c, every_control):
                continue
            vec = vectors[c.probe]
            m = vec.config.multiplier if p.caa_multiplier is None else p.caa_multiplier
            out[r] += vec.addition(c.target, m, layers)
            steered = True
    return out if steered else None


def check_caa_controls(
    vectors: dict[str, SteeringVector], params: list[GenerationParams], every_control: bool
) -> None:
    """ValueError naming the request whose CAA control has no steering vector or an unknown
    target."""
    for i, p in enumerate(params):
        for c in p.controls:
            if not acts_through_caa(c, every_control):
                continue
            if c.probe not in vectors:
                raise ValueError(
                    f"params[{i}].controls: probe {c.probe!r} has no steering vector in this "
                    f"bundle (steering vectors: {sorted(vectors) or 'none'}); make one with "
                    "`dglm train steering-vector` and `dglm bundle add-steering-vector`"
                )
            vectors[c.probe].label_index(c.target)


class CAA(Method):
    """CAA on its own: the prefix decoded by the decoder (no soft prompt, no diffusion), each
    row's residual stream shifted by its controls' steering vectors (every control of a request
    acts through CAA, whatever its `method`, but RE-Control's, which act through their value
    networks beside it)."""

    name = "caa"

    def __init__(
        self,
        vectors: dict[str, SteeringVector],
        num_layers: int,
        hidden: int,
        value_nets: dict[str, ValueNetwork] | None = None,
        probes: dict[str, Probe] | None = None,
        logits_fn=None,
        layers: tuple[int, ...] | None = None,
    ) -> None:
        """value_nets, probes, logits_fn: RE-Control's, for controls acting through it (see
        methods.re_control.ReControl); layers: add at these blocks instead of each vector's
        default (a dev sweep)."""
        self.vectors, self.num_layers, self.hidden, self.layers = (
            vectors,
            num_layers,
            hidden,
            layers,
        )
        self.value_nets, self.probes, self.logits_fn = value_nets or {}, probes or {}, logits_fn

    def validate(self, params: list[GenerationParams]) -> None:
        check_caa_controls(self.vectors, params, True)
        for i, p in enumerate(params):
            for c in p.controls:
                if c.hidden and c.probe not in self.value_nets:
                    raise ValueError(
                        f"params[{i}].controls: probe {c.probe!r} acts through RE-Control "
                        f"(method {c.method!r}) but has no value network "
                        f"(value networks: {sorted(self.value_nets) or 'none'})"
                    )

    def condition(self, batch: MethodBatch) -> Conditioning:
        residual = caa_residual(
            self.vectors, batch, True, self.num_layers, self.hidden, self.layers
        )
        hook, processors = None, ()
        if self.value_nets:
            device = next(iter(self.value_nets.values())).layers[0].weight.device
            hook, processors = value_conditioning(
                self.value_nets, self.probes, batch, False, device, self.logits_fn or batch.lm_head
            )
        return Conditioning(residual=residual, hidden_hook=hook, processors=processors)


__all__ = [
    "CAA",
    "POSITIONS",
    "acts_through_caa",
    "SteeringVector",
    "SteeringVectorConfig",
    "caa_residual",
    "check_caa_controls",
    "check_decoder",
    "check_layers",
    "check_multiplier",
    "load_steering_vectors",
    "save_steering_vectors",
]
