"""Linear probes on unit-norm sentence embeddings, and how a batch of controls maps onto them.

A `Probe` is logistic regression: binary (one row; labels[0] ↦ y=0, labels[1] ↦ y=1) or
one-vs-rest (C rows, one label each). Every row of every probe is stacked into one (K, d) matrix so a
whole batch with different controls per request is one guided-update call: targets (B, K) and scales
(B, K), scale 0 where a request does not use that row.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

# |s| of a control's guidance scale. The step moves x̂0 by σ²·s·g with ‖g‖ ≈ ‖W‖/‖x̂0‖: from
# s ≈ 1e4 (the top of `dglm eval`'s sweep) it already swamps x̂0 and the rescale keeps only its
# direction, so larger scales steer no harder; beyond this bound they only risk fp overflow.
MAX_CONTROL_SCALE = 1e6


def check_control_scale(scale: object, what: str, positive: bool = False) -> None:
    """ValueError naming `what` unless scale is a finite number with |scale| ≤ MAX_CONTROL_SCALE
    (and > 0 when `positive`). Negative scales steer away from the target."""
    ok = (
        not isinstance(scale, bool)
        and isinstance(scale, int | float)
        and math.isfinite(scale)
        and (0 < scale if positive else -MAX_CONTROL_SCALE <= scale)
        and scale <= MAX_CONTROL_SCALE
    )
    if not ok:
        lo = "(0" if positive else f"[{-MAX_CONTROL_SCALE:g}"
        raise ValueError(
            f"{what} must be a finite number in {lo}, {MAX_CONTROL_SCALE:g}], got {scale!r}"
        )


@dataclass(frozen=True)
class Probe:
    name: str  # how controls refer to it, e.g. "sentiment"
    labels: tuple[str, ...]  # binary: (label of y=0, label of y=1); one-vs-rest: one per row
    weight: torch.Tensor  # (C, d) fp32
    bias: torch.Tensor  # (C,) fp32
    metrics: dict = field(default_factory=dict)  # e.g. held-out accuracy, kept with the weights

    def __post_init__(self) -> None:
        if not self.name or any(c in self.name for c in "=:,. "):
            raise ValueError(f"probe name must be non-empty without '=:,. ', got {self.name!r}")
        if self.weight.ndim != 2 or self.bias.shape != (self.weight.shape[0],):
            raise ValueError(
                f"probe {self.name!r}: weight must be (C, d) and bias (C,), got "
                f"{tuple(self.weight.shape)} and {tuple(self.bias.shape)}"
            )
        rows = self.weight.shape[0]
        expected = 2 if rows == 1 else rows
        if len(self.labels) != expected or len(set(self.labels)) != expected:
            raise ValueError(
                f"probe {self.name!r}: {rows} row(s) need {expected} distinct labels, got {self.labels}"
            )
        if not (torch.isfinite(self.weight).all() and torch.isfinite(self.bias).all()):
            raise ValueError(f"probe {self.name!r} has non-finite weights")

    @property
    def dim(self) -> int:
        return self.weight.shape[1]

    @property
    def rows(self) -> int:
        return self.weight.shape[0]

    def target_rows(self, target: str | int) -> list[tuple[int, float]]:
        """(row, y) pairs a control target sets; raises ValueError for an unknown target."""
        label = (
            self.labels[target]
            if isinstance(target, int) and 0 <= target < len(self.labels)
            else target
        )
        if label not in self.labels:
            raise ValueError(
                f"control target {target!r} is not a label of probe {self.name!r}; "
                f"choose one of {list(self.labels)}"
            )
        i = self.labels.index(label)
        return [(0, float(i))] if self.rows == 1 else [(i, 1.0)]

    def logits(self, emb: torch.Tensor) -> torch.Tensor:
        """(..., d) embeddings (any norm; normalised here) → (..., C) logits."""
        u = F.normalize(emb.float(), dim=-1)
        return u @ self.weight.to(u.device).T + self.bias.to(u.device)

    def predict(self, emb: torch.Tensor) -> list[str]:
        z = self.logits(emb)
        idx = (z[..., 0] > 0).long() if self.rows == 1 else z.argmax(-1)
        return [self.labels[i] for i in idx.tolist()]


def train_probe(
    name: str,
    embeddings: torch.Tensor,  # (N, d) any norm
    labels: torch.Tensor,  # (N,) int class ids
    label_names: tuple[str, ...],
    l2: float = 1e-3,
    max_iter: int = 200,
) -> Probe:
    """Logistic regression by L-BFGS (binary if two classes, else one-vs-rest), L2 on weights."""
    if embeddings.ndim != 2 or labels.shape != (embeddings.shape[0],):
        raise ValueError(
            f"embeddings (N, d) and labels (N,) expected, got {embeddings.shape}, {labels.shape}"
        )
    n_classes = len(label_names)
    if n_classes < 2 or int(labels.min()) < 0 or int(labels.max()) >= n_classes:
        raise ValueError(f"labels must be class ids in [0, {n_classes}), with ≥ 2 classes")
    x = F.normalize(embeddings.double(), dim=-1)
    rows = 1 if n_classes == 2 else n_classes
    y = labels.double()[:, None] if rows == 1 else F.one_hot(labels.long(), n_classes).double()
    w = torch.zeros(rows, x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(rows, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(x @ w.T + b, y) + l2 * w.pow(2).sum() / 2
        loss.backward()
        return loss

    opt.step(closure)
    return Probe(name, tuple(label_names), w.detach().float(), b.detach().float())


def save_probes(path: str | Path, probes: list[Probe]) -> None:
    tensors, meta = {}, {}
    for p in probes:
        tensors[f"{p.name}.weight"] = p.weight.float().contiguous()
        tensors[f"{p.name}.bias"] = p.bias.float().contiguous()
        meta[p.name] = {"labels": list(p.labels), "metrics": p.metrics}
    save_file(tensors, str(path), metadata={"probes": json.dumps(meta)})


def read_with_header(
    path: str | Path, key: str, what: str, default: str = "null"
) -> tuple[object, dict[str, torch.Tensor]]:
    """(the JSON of header entry `key`, the tensors) of a safetensors file; ValueError naming the
    file as not a readable `what` file when it is missing, truncated or its entry is not JSON."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get(key, default))
        return meta, load_file(str(path))
    except (OSError, SafetensorError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable {what} file ({e})") from e


def load_probes(path: str | Path) -> list[Probe]:
    """The probes of a `save_probes` file; ValueError naming the file if it is missing, not
    safetensors (e.g. truncated) or not a probes file."""
    meta, tensors = read_with_header(path, "probes", "probes", "{}")
    try:
        return [
            Probe(
                name,
                tuple(m["labels"]),
                tensors[f"{name}.weight"].float(),
                tensors[f"{name}.bias"].float(),
                m.get("metrics", {}),
            )
            for name, m in meta.items()
        ]
    except ValueError as e:  # a probe's own check (labels, shapes, non-finite weights)
        raise ValueError(f"{path}: {e}") from e
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: not a probes file written by save_probes ({e!r})") from e


CONTROL_METHODS = ("dglm", "re-control", "both", "caa")


@dataclass(frozen=True)
class Control:
    probe: str  # probe name
    target: str | int  # label of the probe (or its index)
    # guidance scale s (summed-loss composition across controls); None: the bundle's default
    # (BundleConfig.control_scale), the scale its networks were checked to steer at
    scale: float | None = None
    # how the control acts: "dglm" through DGLM's latent (probe guidance of the diffusion),
    # "re-control" through the decoder's hidden states (the probe's RE-Control value network,
    # methods.re_control), "both", "caa" through the probe's steering vector added to the
    # decoder's residual stream (methods.caa; its multiplier: GenerationParams.caa_multiplier)
    method: str = "dglm"

    def __post_init__(self) -> None:
        if self.scale is not None:
            what = f"controls: the scale of probe {self.probe!r}"
            check_control_scale(self.scale, what)
            object.__setattr__(self, "scale", float(self.scale))
        if self.method not in CONTROL_METHODS:
            raise ValueError(
                f"controls: the method of probe {self.probe!r} must be one of {CONTROL_METHODS}, "
                f"got {self.method!r}"
            )

    @property
    def latent(self) -> bool:
        """Whether it acts through DGLM's latent."""
        return self.method in ("dglm", "both")

    @property
    def hidden(self) -> bool:
        """Whether it acts through RE-Control's hidden-state edit."""
        return self.method in ("re-control", "both")

    @property
    def residual(self) -> bool:
        """Whether it acts through CAA's steering vector on the residual stream."""
        return self.method == "caa"

    @classmethod
    def parse(cls, spec: str) -> Control:
        """ "probe=target[:scale][@method]", e.g. "sentiment=positive:20",
        "sentiment=positive@re-control", "sentiment=negative:1000@both", "sentiment=negative@caa"."""
        spec, _, method = spec.partition("@")
        name, sep, rest = spec.partition("=")
        if not sep or not name or not rest:
            raise ValueError(f"control must look like probe=target[:scale][@method], got {spec!r}")
        target, _, scale = rest.partition(":")
        try:
            value = float(scale) if scale else None
        except ValueError:
            raise ValueError(f"control scale must be a number, got {scale!r} in {spec!r}") from None
        return cls(name.strip(), target.strip(), value, method.strip() or "dglm")


def check_implied_controls(table: object) -> dict[str, tuple[str, ...]]:
    """A bundle's `implied_controls` checked and normalised: {"probe=target": ("spec", ...)}, each
    spec a `Control.parse` string on another probe (e.g. {"sentiment=negative":
    ["toxicity=low@re-control"]}); ValueError naming the entry."""
    if not isinstance(table, dict):
        raise ValueError(
            f'implied_controls must map "probe=target" to a list of controls, got {table!r}'
        )
    out = {}
    for key, specs in table.items():
        probe, sep, target = key.partition("=") if isinstance(key, str) else ("", "", "")
        if not sep or not probe.strip() or not target.strip() or any(c in key for c in ":@"):
            raise ValueError(f'implied_controls: keys look like "probe=target", got {key!r}')
        if isinstance(specs, str) or not isinstance(specs, list | tuple) or not specs:
            raise ValueError(
                f"implied_controls[{key!r}] must be a non-empty list of controls, got {specs!r}"
            )
        for spec in specs:
            if not isinstance(spec, str):
                raise ValueError(f"implied_controls[{key!r}]: controls are strings, got {spec!r}")
            try:
                c = Control.parse(spec)
            except ValueError as e:
                raise ValueError(f"implied_controls[{key!r}]: {e}") from None
            if c.probe == probe.strip():
                raise ValueError(
                    f"implied_controls[{key!r}]: {spec!r} controls the same probe as its key"
                )
        out[f"{probe.strip()}={target.strip()}"] = tuple(specs)
    return out


def with_implied(
    controls: tuple[Control, ...], table: dict[str, tuple[str, ...]]
) -> tuple[Control, ...]:
    """`controls` and, for each control whose "probe=target" is a key of `table` (a bundle's
    implied_controls), the controls it implies on probes the request does not control itself
    (a request's own control of a probe always wins), in table order, each added once."""
    named = {c.probe for c in controls}
    added: list[Control] = []
    for c in controls:
        for spec in table.get(f"{c.probe}={c.target}", ()):
            extra = Control.parse(spec)
            if extra.probe not in named:
                named.add(extra.probe)
                added.append(extra)
    return (*controls, *added)


class ProbeSet:
    """All probes of an engine, stacked: weight (K, d), bias (K,)."""

    def __init__(self, probes: list[Probe], dim: int, default_scale: float = 10.0) -> None:
        self.dim = dim
        self.default_scale = default_scale  # for controls given without a scale
        self.probes: dict[str, Probe] = {}
        self.offsets: dict[str, int] = {}
        for p in probes:
            self.add(p, _restack=False)
        self._restack()

    def add(self, probe: Probe, _restack: bool = True) -> None:
        if probe.dim != self.dim:
            raise ValueError(
                f"probe {probe.name!r} has dimension {probe.dim}, but the encoder's latents are {self.dim}-d"
            )
        self.probes[probe.name] = probe
        if _restack:
            self._restack()

    def _restack(self) -> None:
        rows, off = [], 0
        for name, p in self.probes.items():
            self.offsets[name] = off
            rows.append(p)
            off += p.rows
        self.weight = torch.cat([p.weight for p in rows]) if rows else torch.zeros(0, self.dim)
        self.bias = torch.cat([p.bias for p in rows]) if rows else torch.zeros(0)

    @property
    def num_rows(self) -> int:
        return self.weight.shape[0]

    def validate(self, controls: list[Control] | tuple[Control, ...]) -> None:
        for c in controls:
            if c.probe not in self.probes:
                raise ValueError(
                    f"unknown probe {c.probe!r} in controls; this engine has {sorted(self.probes)}"
                )
            self.probes[c.probe].target_rows(c.target)

    def batch_targets(
        self, controls_per_row: list[list[Control] | tuple[Control, ...]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(targets (B, K), scales (B, K)) fp32 for one batch of requests."""
        b, k = len(controls_per_row), self.num_rows
        targets, scales = torch.zeros(b, k), torch.zeros(b, k)
        for i, controls in enumerate(controls_per_row):
            for c in controls:
                off = self.offsets[c.probe]
                for row, y in self.probes[c.probe].target_rows(c.target):
                    targets[i, off + row] = y
                    scales[i, off + row] += self.default_scale if c.scale is None else c.scale
        return targets, scales
