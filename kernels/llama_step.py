"""The fused int8 decode step of a Llama-family decoder on CPU: `LlamaInt8Step`.

One call runs every layer of a decode step (RMSNorm, the q/k/v projection, RoPE, the K/V write,
grouped-query attention over the cache, the output projection, the SwiGLU MLP) and the final norm,
in C++ (kernels/cpp/llama_step.cpp): the matrices through the int8 kernel's blocks
(dglm.kernels.int8_linear), everything between them as plain loops, all threads inside one
parallel region. It returns the final-norm hidden states; the LM head stays with the caller, so a
hidden-state hook (RE-Control) still acts before it. An optional residual (B, L, H) is added to the
residual stream after every layer (contrastive activation addition, methods.caa).

It serves decoders quantized by `models.quant.quantize_decoder(..., kernel="cpu")`: fp32
activations and caches, int8 weights with per-row scales; or with kernel "cpu-bf16" (quantize
"int8-bf16"), every product in the int8 kernel's bf16-activation mode. Results equal the operator-by-operator
step to rounding (sums run in another order): tests/kernels/test_llama_step.py holds it to that
and to same tokens under greedy decoding.

The step keeps the addresses of the decoder's weights and RoPE tables, and references to those
tensors: build it after the decoder's last change (quantizing, merging adapters).
"""

from __future__ import annotations

import torch
from dglm.kernels.native import built, cpu_ops

__all__ = ["LlamaInt8Step", "available", "unsupported_reason"]


def available() -> bool:
    """Whether the compiled step is importable (it is built with the package)."""
    return built("LlamaInt8Step")


def unsupported_reason(decoder) -> str | None:
    """Why `LlamaInt8Step(decoder)` cannot serve `decoder`, or None when it can."""
    from dglm.engine.models.llama import LlamaDecoder
    from dglm.engine.models.quant import Int8Linear

    if not available():
        return "dglm.kernels.cpu_ops is not built"
    if not isinstance(decoder, LlamaDecoder):
        return f"{type(decoder).__name__} is not a Llama-family decoder"
    if decoder.quantized != "int8":
        return "the decoder is not quantized to int8"
    if decoder.device.type != "cpu":
        return f"the decoder is on {decoder.device}, not the CPU"
    kernels = set()
    for i, block in enumerate(decoder.layers):
        for name in ("wqkv", "wo", "w13", "w2"):
            lin = getattr(block, name)
            if not isinstance(lin, Int8Linear) or lin.kernel not in ("cpu", "cpu-bf16"):
                return f"layers.{i}.{name} is not an Int8Linear on the C++ kernel"
            kernels.add(lin.kernel)
    if len(kernels) > 1:
        return "the matrices mix the C++ kernel's fp32 and bf16-activation modes"
        for name in ("attn_norm", "mlp_norm"):
            if getattr(block, name).weight.dtype != torch.float32:
                return f"layers.{i}.{name} is not fp32"
    if decoder.rope_cos.dtype != torch.float32 or decoder.norm.weight.dtype != torch.float32:
        return "the RoPE tables or the final norm are not fp32"
    return None


def _addr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


class LlamaInt8Step:
    """`step(x, positions, k, v, slot, key_mask) → hidden`: one decode step of an int8 Llama
    decoder (module docstring), K/V written in place at `slot`."""

    def __init__(self, decoder) -> None:
        why = unsupported_reason(decoder)
        if why is not None:
            raise ValueError(f"LlamaInt8Step: {why}")
        c = decoder.config
        keep: list[torch.Tensor] = []

        def own(t: torch.Tensor | None) -> int:
            if t is None:
                return 0
            t = t.detach().contiguous()
            keep.append(t)
            return _addr(t)

        layers = []
        for block in decoder.layers:
            ptrs = [own(block.attn_norm.weight), own(block.mlp_norm.weight)]
            for name in ("wqkv", "wo", "w13", "w2"):
                lin = getattr(block, name)
                ptrs += [own(lin.qweight), own(lin.scale), own(lin.bias)]
            layers.append(ptrs)
        self._plan = cpu_ops.LlamaInt8Step(
            c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim,
            decoder.rope_cos.shape[0], float(c.rms_norm_eps), layers, own(decoder.norm.weight),
            own(decoder.rope_cos), own(decoder.rope_sin),
            decoder.layers[0].wqkv.kernel == "cpu-bf16",
        )  # fmt: skip
        self._keep = keep
        self.hidden_size = c.hidden_size
        self.shape = (decoder.num_layers, decoder.num_kv_heads, decoder.head_dim)

    def __call__(
        self,
        x: torch.Tensor,  # (B, H) fp32 embeddings of the fed tokens
        positions: torch.Tensor,  # (B,) long
        k: torch.Tensor,  # (L, B, n_kv, S, Dh) fp32, Dh contiguous (a view of larger buffers)
        v: torch.Tensor,
        slot: int,  # cache slot of the fed tokens, < S
        key_mask: torch.Tensor,  # (B, S) bool, False at pads
        out: torch.Tensor | None = None,  # (B, H) fp32 contiguous, or None for a fresh one
        residual: torch.Tensor | None = None,  # (B, L, H) fp32, H contiguous: added after layer l
    ) -> torch.Tensor:
        B = x.shape[0]
        L, nkv, dh = self.shape
        if x.shape != (B, self.hidden_size) or x.dtype != torch.float32:
            raise ValueError(
                f"LlamaInt8Step: x must be fp32 ({B}, {self.hidden_size}), got {x.dtype} "
                f"{tuple(x.shape)}"
            )
        S = k.shape[3] if k.dim() == 5 else -1
        for name, t in (("k", k), ("v", v)):
            if (t.dim() != 5 or t.shape[:3] != (L, B, nkv) or t.shape[4] != dh
                    or t.dtype != torch.float32 or t.stride(4) != 1 or t.stride() != k.stride()):  # fmt: skip
                raise ValueError(
                    f"LlamaInt8Step: {name} must be fp32 ({L}, {B}, {nkv}, S, {dh}) with "
                    f"contiguous heads and k's strides, got {t.dtype} {tuple(t.shape)}"
                )
        if positions.shape != (B,) or positions.dtype != torch.long:
            raise ValueError(f"LlamaInt8Step: positions must be long ({B},)")
        if key_mask.shape != (B, S) or key_mask.dtype != torch.bool or key_mask.stride(1) != 1:
            raise ValueError(f"LlamaInt8Step: key_mask must be bool ({B}, {S}), rows contiguous")
        if not 0 <= slot < S:
            raise ValueError(f"LlamaInt8Step: slot {slot} is outside the cache's {S} slots")
        if residual is not None and (residual.shape != (B, L, self.hidden_size)
                                     or residual.dtype != torch.float32 or residual.stride(2) != 1):  # fmt: skip
            raise ValueError(
                f"LlamaInt8Step: residual must be fp32 ({B}, {L}, {self.hidden_size}) with "
                f"contiguous rows, got {residual.dtype} {tuple(residual.shape)}"
            )
        x = x.contiguous()
        positions = positions.contiguous()
        if out is None:
            out = torch.empty(B, self.hidden_size)
        self._plan.run(
            _addr(x), _addr(out), _addr(positions), _addr(k), _addr(v), tuple(k.stride()[:4]),
            int(slot), _addr(key_mask), key_mask.stride(0) if B > 1 else S, B,
            torch.get_num_threads(), **self._residual_args(residual),
        )  # fmt: skip
        return out

    @staticmethod
    def _residual_args(residual: torch.Tensor | None) -> dict:
        """The run's residual arguments, none when there is no residual (the call without them
        is the one every build of the extension takes)."""
        if residual is None:
            return {}
        return {"residual": _addr(residual), "residual_stride": tuple(residual.stride()[:2])}
