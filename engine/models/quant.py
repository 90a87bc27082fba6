"""Weight-only int8 decoders for CPU decoding.

Decoding at small batch streams every weight once per token, so the bytes of the weights set its
speed: int8 weights stream a quarter of fp32's. `quantize_decoder(decoder, "int8")` replaces every
`nn.Linear` of the decoder, and its LM head (tied to the embedding or not), by `Int8Linear`:
symmetric per-output-channel scales (w ≈ q · s, q ∈ [−127, 127]), activations kept in floating
point. The product runs through one of three kernels, chosen at load (`INT8_KERNELS`):
"cpu", the package's C++ kernel (`torch.ops.dglm.int8_linear`, dglm.kernels.int8_linear: fp32
activations and sums, the weights widened in registers; the CPU default, ~2× faster than the next
one at batch 1); "int8pack", `torch._weight_int8pack_mm` on bf16 activations (one fused
dequantise-and-multiply kernel; CUDA, or a CPU build without the C++ kernel); "reference", plain
PyTorch from the dequantised weights (`Int8Linear.reference`), which the others are tested against;
and "cpu-bf16" (`quantize="int8-bf16"`, opt-in), the C++ kernel with the activations rounded to bf16
and multiplied by AVX512-BF16 instructions: ~1.3-2x faster where a batch makes the products
compute-bound, the same for a row alone or batched, on CPUs that have those instructions.

Measured on SmolLM2-135M, teacher-forced on 64 held-out texts (bench_decode): perplexity +0.95%
over fp32 with the C++ kernel, top-1 agreement 94.2% (int8pack, bf16 activations: +0.87%, 93%);
per-tensor dynamic int8 activations (fbgemm's dynamic linear), which ran faster still, raised it
4.6× (activation outliers) and are not offered. bench_decode on an AMD EPYC: "cpu" +0.95%,
"cpu-bf16" +1.03%. A second set of 64 texts (one source fewer) ranked the activation formats:
fp32 +0.48%, bf16 +0.60%, int8 per 64-element block +1.6%, int8 per row +5.2%.

Inference only: an int8 decoder has no gradients to give, so training refuses it (its weights are
buffers, not parameters). LoRA adapters are merged into the fp32 weights before quantizing.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from dglm.kernels import int8_linear as int8_kernel  # registers torch.ops.dglm.int8_linear
from torch import nn

logger = logging.getLogger(__name__)

# "int8-bf16": int8 weights through the C++ kernel's bf16-activation mode (kernel "cpu-bf16")
QUANTIZE_MODES = ("none", "int8", "int8-bf16")
INT8_KERNELS = ("cpu", "cpu-bf16", "int8pack", "reference")


def int8_weights(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q (out, in) int8, scales (out,) fp32) with w ≈ q · scales[:, None], symmetric per row."""
    w = w.detach().float()
    scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale


def fused_int8_available(device: torch.device | str = "cpu") -> bool:
    """Whether torch has the fused weight-only int8 matmul on this device."""
    try:
        x = torch.zeros(1, 32, dtype=torch.bfloat16, device=device)
        q = torch.zeros(8, 32, dtype=torch.int8, device=device)
        s = torch.ones(8, dtype=torch.bfloat16, device=device)
        torch._weight_int8pack_mm(x, q, s)
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    return True


def resolve_quantize(mode: str, device: torch.device | str, dtype: torch.dtype) -> str:
    """Mode "auto" → "int8" for an fp32 decoder on CPU when the C++ kernel is built (faster decoding,
    held-out perplexity within 1% of fp32: benchmarks/results/cpu/decode.md), else "none";
    "none" / "int8" pass through; "int8-bf16" (CPU, AVX512-BF16 only) too."""
    if mode == "auto":
        cpu = torch.device(device).type == "cpu"
        return "int8" if cpu and dtype == torch.float32 and int8_kernel.available() else "none"
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"quantize must be one of {QUANTIZE_MODES + ('auto',)}, got {mode!r}")
    if mode == "int8-bf16":
        _check_bf16_kernel(device)
    return mode


def _check_bf16_kernel(device: torch.device | str) -> None:
    if torch.device(device).type != "cpu":
        raise ValueError("quantize='int8-bf16' runs on CPU only (the C++ kernel)")
    if not int8_kernel.bf16_supported():
        raise ValueError(
            "quantize='int8-bf16' needs the C++ kernel and a CPU with AVX512-BF16 "
            f"(this one: {int8_kernel.isa()}, no BF16); use 'int8'"
        )


def best_int8_kernel(device: torch.device | str = "cpu") -> str:
    """The fastest int8 kernel on `device` (see INT8_KERNELS)."""
    if torch.device(device).type == "cpu" and int8_kernel.available():
        return "cpu"
    return "int8pack" if fused_int8_available(device) else "reference"


class Int8Linear(nn.Module):
    """y = x · (q · s)ᵀ + b with q int8 (out, in) and per-row scales s; x, y fp32 (or the input's
    dtype); `kernel` one of INT8_KERNELS (module docstring)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, kernel: str) -> None:
        super().__init__()
        if kernel not in INT8_KERNELS:
            raise ValueError(f"int8 kernel must be one of {INT8_KERNELS}, got {kernel!r}")
        q, scale = int8_weights(weight)
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale)
        self.register_buffer("scale_bf16", scale.to(torch.bfloat16))
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.kernel = kernel

    @classmethod
    def from_linear(cls, linear: nn.Linear, kernel: str) -> Int8Linear:
        return cls(linear.weight, linear.bias, kernel)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The same product in fp32 from the dequantised weights."""
        w = self.qweight.float() * self.scale[:, None]
        return F.linear(x.float(), w, self.bias).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel in ("cpu", "cpu-bf16") and x.device.type == "cpu":
            bf16 = self.kernel == "cpu-bf16"
            return torch.ops.dglm.int8_linear(x, self.qweight, self.scale, self.bias, bf16)
        if self.kernel == "reference":
            return self.reference(x)
        shape = x.shape
        y = torch._weight_int8pack_mm(
            x.reshape(-1, shape[-1]).to(torch.bfloat16), self.qweight, self.scale_bf16
        )
        y = y.reshape(*shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, kernel={self.kernel}"


def quantize_decoder(decoder, mode: str = "int8", kernel: str | None = None):
    """Quantize `decoder` in place (see the module docstring) → decoder. mode "none" does
    nothing; "int8": weight-only int8 for every nn.Linear and the LM head. CPU or CUDA, fp32;
    "int8-bf16": the same with kernel "cpu-bf16" (the C++ kernel, activations rounded to bf16,
    AVX512-BF16 CPUs). kernel: one of INT8_KERNELS, None = the fastest on the decoder's device."""
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"quantize must be one of {QUANTIZE_MODES}, got {mode!r}")
    if mode == "none":
        return decoder
    if decoder.quantized != "none":
        raise ValueError(f"the decoder is already quantized ({decoder.quantized})")
    if decoder.dtype != torch.float32:
        raise ValueError(f"quantize='int8' takes an fp32 decoder, got {decoder.dtype}")
    if mode == "int8-bf16":
        if kernel not in (None, "cpu-bf16"):
            raise ValueError(f"quantize='int8-bf16' uses kernel 'cpu-bf16', got {kernel!r}")
        kernel, mode = "cpu-bf16", "int8"
    if kernel is None:
        kernel = best_int8_kernel(decoder.device)
    elif kernel not in INT8_KERNELS:
        raise ValueError(f"int8 kernel must be one of {INT8_KERNELS}, got {kernel!r}")
    elif kernel == "cpu" and not int8_kernel.available():
        raise ValueError("int8 kernel 'cpu' needs dglm.kernels.cpu_ops; reinstall the package")
    if kernel == "cpu-bf16":
        _check_bf16_kernel(decoder.device)
    head = decoder.lm_head_weight()
    # an untied head keeps its fp32 module (the decoder's dtype and device are read from it)
    untied_head = getattr(decoder, "lm_head", None)
    for parent in list(decoder.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and child is not untied_head:
                setattr(parent, name, Int8Linear.from_linear(child, kernel))
    decoder.quant_head = Int8Linear(head, None, kernel)
    isa = f" ({int8_kernel.isa()})" if kernel in ("cpu", "cpu-bf16") else ""
    logger.info("int8 decoder: kernel %s%s", kernel, isa)
    decoder.__dict__["_quantized"] = mode
    return decoder


def quantize_label(decoder) -> str:
    """The `quantize` mode a decoder runs in, as Engine.from_pretrained takes it: "none", "int8",
    or "int8-bf16" (int8 weights whose kernel takes bf16 activations; `decoder.quantized` says
    "int8" for both, the weights' format)."""
    mode = getattr(decoder, "quantized", "none")
    head = decoder.__dict__.get("_modules", {}).get("quant_head")
    if mode == "int8" and getattr(head, "kernel", None) == "cpu-bf16":
        return "int8-bf16"
    return mode


__all__ = [
    "INT8_KERNELS",
    "QUANTIZE_MODES",
    "best_int8_kernel",
    "quantize_label",
    "Int8Linear",
    "fused_int8_available",
    "int8_weights",
    "quantize_decoder",
    "resolve_quantize",
]
