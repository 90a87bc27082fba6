"""Low-rank adapters (LoRA, Hu et al. 2021) on a decoder's linear layers, and their merge.

The prompt generator is trained together with the decoder, as in the DGLM reference (which
fine-tunes GPT-2 in full). Here the decoder adapts through rank-r adapters on its blocks'
linear layers: y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ with A (r, in), B (out, r), s = alpha / r. B starts at
zero, so an adapted decoder starts equal to the base one. Bundles store A and B as safetensors
(`decoder_lora.safetensors`); at load they are merged, W ← W + s·B·A, so decoding costs nothing
extra and every decode path (eager, traced, CUDA graphs, ONNX export) sees a plain decoder.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class LoraConfig:
    rank: int = 8  # r: inner width of each adapter
    alpha: float = 16.0  # scale s = alpha / rank on the adapter's output
    # names of the nn.Linear leaves to adapt, matched against the last part of a module path
    # (Llama: wqkv, wo, w13, w2; GPT-2: wqkv, wo, fc, proj); the LM head is never adapted
    targets: tuple[str, ...] = ("wqkv", "wo", "w13", "w2", "fc", "proj")

    def __post_init__(self) -> None:
        if isinstance(self.targets, str) or not isinstance(self.targets, list | tuple):
            raise ValueError(f"LoraConfig.targets must be a list of names, got {self.targets!r}")
        object.__setattr__(self, "targets", tuple(self.targets))
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoraConfig.rank must be a positive integer, got {self.rank!r}")
        a = self.alpha
        if (
            isinstance(a, bool)
            or not isinstance(a, int | float)
            or not (a > 0 and math.isfinite(a))
        ):
            raise ValueError(f"LoraConfig.alpha must be a positive number, got {a!r}")
        if not self.targets:
            raise ValueError("LoraConfig.targets is empty: name at least one linear layer")
        if not all(isinstance(t, str) and t for t in self.targets):
            raise ValueError(
                f"LoraConfig.targets must be non-empty layer names, got {list(self.targets)!r}"
            )

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        return asdict(self)


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update (kept in fp32: the master weights)."""

    def __init__(self, base: nn.Linear, rank: int, scale: float) -> None:
        super().__init__()
        self.base, self.scale = base, scale
        self.lora_a = nn.Parameter(
            torch.empty(rank, base.in_features, device=base.weight.device, dtype=torch.float32)
        )
        self.lora_b = nn.Parameter(
            torch.zeros(base.out_features, rank, device=base.weight.device, dtype=torch.float32)
        )
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (…, in) → (…, out): base + s·(x Aᵀ) Bᵀ; under autocast the adapter runs in bf16 too
        low = F.linear(F.linear(x, self.lora_a.to(x.dtype)), self.lora_b.to(x.dtype))
        return self.base(x) + self.scale * low

    def delta(self) -> torch.Tensor:
        """s·B·A (out, in) in fp32: what merging adds to the base weight."""
        return self.scale * (self.lora_b @ self.lora_a)


def _targets(decoder: nn.Module, config: LoraConfig) -> list[tuple[nn.Module, str, nn.Linear]]:
    found = []
    for path, module in decoder.named_modules():
        for child_name, child in module.named_children():
            if isinstance(child, nn.Linear) and child_name in config.targets:
                found.append((module, f"{path}.{child_name}" if path else child_name, child))
    if not found:
        raise ValueError(
            f"no nn.Linear named any of {config.targets} in {type(decoder).__name__}; "
            "set LoraConfig.targets to its layer names"
        )
    return found


def add_lora(decoder: nn.Module, config: LoraConfig) -> dict[str, LoRALinear]:
    """Wrap every target linear layer of `decoder` in place; returns {module path: adapter}."""
    adapters = {}
    for parent, path, linear in _targets(decoder, config):
        if isinstance(linear, LoRALinear):
            raise ValueError(f"{path} already has an adapter")
        adapter = LoRALinear(linear, config.rank, config.scale)
        setattr(parent, path.rsplit(".", 1)[-1], adapter)
        adapters[path] = adapter
    return adapters


def lora_modules(decoder: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in decoder.named_modules() if isinstance(m, LoRALinear)}


def lora_state_dict(decoder: nn.Module) -> dict[str, torch.Tensor]:
    """{"<path>.lora_a": (r, in), "<path>.lora_b": (out, r)} for every adapter, fp32 on CPU."""
    state = {}
    for path, m in lora_modules(decoder).items():
        state[f"{path}.lora_a"] = m.lora_a.detach().float().cpu().contiguous()
        state[f"{path}.lora_b"] = m.lora_b.detach().float().cpu().contiguous()
    return state


def load_lora_state(decoder: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy adapter weights into a decoder that `add_lora` wrapped with the same config."""
    adapters = lora_modules(decoder)
    expected = {f"{p}.lora_{w}" for p in adapters for w in "ab"}
    if set(state) != expected:
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(
            f"adapter weights do not match the decoder (missing {missing[:4]}, unexpected "
            f"{unexpected[:4]})"
        )
    with torch.no_grad():
        for path, m in adapters.items():
            for w in "ab":
                p = getattr(m, f"lora_{w}")
                t = state[f"{path}.lora_{w}"]
                if t.shape != p.shape:
                    raise ValueError(
                        f"{path}.lora_{w} has shape {tuple(t.shape)}, expected {tuple(p.shape)}"
                    )
                p.copy_(t)


@torch.no_grad()
def merge_lora(decoder: nn.Module, config: LoraConfig, state: dict[str, torch.Tensor]) -> None:
    """W ← W + s·B·A for every adapter in `state` (computed in fp32, stored in W's dtype): the
    decoder stays a plain decoder of the same shapes and speed."""
    targets = {path: linear for _, path, linear in _targets(decoder, config)}
    names = {k.rsplit(".", 1)[0] for k in state}
    unknown = sorted(names - set(targets))
    if unknown or len(state) != 2 * len(names):
        raise ValueError(
            f"adapter weights do not match the decoder's layers {sorted(targets)[:3]}…: "
            f"unknown {unknown[:4]}, or an A without its B"
        )
    for path in names:
        w = targets[path].weight
        a, b = state[f"{path}.lora_a"].float(), state[f"{path}.lora_b"].float()
        if a.shape[1] != w.shape[1] or b.shape[0] != w.shape[0] or a.shape[0] != b.shape[1]:
            raise ValueError(
                f"{path}: adapter A {tuple(a.shape)} / B {tuple(b.shape)} do not fit the weight "
                f"{tuple(w.shape)}"
            )
        delta = config.scale * (b.to(w.device) @ a.to(w.device))  # (out, in) fp32
        w.copy_((w.float() + delta).to(w.dtype))


@torch.no_grad()
def unwrap_lora(decoder: nn.Module) -> None:
    """Merge every adapter into its base layer and put the plain nn.Linear back."""
    for path, m in lora_modules(decoder).items():
        m.base.weight.copy_(
            (m.base.weight.float() + m.delta().to(m.base.weight.device)).type_as(m.base.weight)
        )
        parent = decoder.get_submodule(path.rsplit(".", 1)[0]) if "." in path else decoder
        setattr(parent, path.rsplit(".", 1)[-1], m.base)
