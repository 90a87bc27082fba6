"""The decode core: a decoder, its tokenizer and its step backend behind one `decode`.

Every method reaches the one decode loop (`decoding.loop.generate`) through `DecodeCore.decode`:
the Engine hands it the rows a method conditioned (a soft prompt, logits processors, a
hidden-state hook), and the core picks the step — its persistent runner when it takes the batch
(`DecodeRunner.can_run`), else an eager static step built for the call, or the ONNX Runtime
decoder. A core knows nothing of methods; several engines may share one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from dglm.engine.decoding.loop import StepBackend, TokenStream, companion_count, generate
from dglm.engine.decoding.runner import DecodeRunner, DecodeRunnerConfig
from dglm.engine.decoding.sampling import DecodeParams, DecodeResult, LogitsProcessor
from dglm.engine.models.base import Decoder, HiddenHook

FAST_DECODE_MAX_LEN = 256  # KV slots of the persistent decode runner (prefix + soft + new tokens)
FAST_DECODE_BATCHES = (1, 2, 4, 8, 16, 32)  # its batch buckets (rows beyond: no runner)


class Core(Protocol):
    """What the Engine needs of a decode core (`DecodeCore`, or a benchmark's stand-in that
    decodes the same rows another way): the tokenizer, the decoder's context, its LM head (for
    methods that score edited hidden states; None where it is not exposed), and `decode`."""

    tokenizer: object
    max_context: int
    backend: str  # "torch" runs hidden-state hooks (RE-Control); anything else does not

    def lm_head(self) -> Callable[[torch.Tensor], torch.Tensor] | None: ...

    def decode(
        self,
        prefix_ids: list[list[int]],
        params: list[DecodeParams],
        soft_prompt: torch.Tensor | None = None,
        processors: tuple[LogitsProcessor, ...] = (),
        hidden_hook: HiddenHook | None = None,
        on_tokens: TokenStream | None = None,
        residual: torch.Tensor | None = None,
    ) -> tuple[list[DecodeResult], dict[str, float]]: ...


class DecodeCore:
    """decoder: a `Decoder` (backend "torch") or the ONNX Runtime decoder (backend "onnx", which is
    its own step backend); runner: the torch backend's persistent `DecodeRunner`, or None (each
    call builds an eager static step)."""

    def __init__(
        self,
        decoder: Decoder,
        tokenizer,
        runner: DecodeRunner | None = None,
        backend: str = "torch",
    ) -> None:
        if backend not in ("torch", "onnx"):
            raise ValueError(f"backend must be 'torch' or 'onnx', got {backend!r}")
        self.decoder, self.tokenizer, self.runner, self.backend = (
            decoder,
            tokenizer,
            runner,
            backend,
        )

    @property
    def max_context(self) -> int:
        return self.decoder.max_context

    @property
    def device(self) -> torch.device:
        return self.decoder.device

    def lm_head(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The decoder's LM head (final-norm hidden states → logits), or None where the backend
        does not expose it (ONNX Runtime)."""
        return self.decoder.logits if self.backend == "torch" else None

    def decode(
        self,
        prefix_ids: list[list[int]],
        params: list[DecodeParams],
        soft_prompt: torch.Tensor | None = None,
        processors: tuple[LogitsProcessor, ...] = (),
        hidden_hook: HiddenHook | None = None,
        on_tokens: TokenStream | None = None,
        residual: torch.Tensor | None = None,
    ) -> tuple[list[DecodeResult], dict[str, float]]:
        """The one decode loop on this core's backend → (results in row order, timings);
        residual (R, L, H): added to the residual stream after each block (CAA)."""
        runner: StepBackend | None = self.decoder if self.backend == "onnx" else self.runner
        if self.backend == "torch" and runner is not None:
            slots = max(map(len, prefix_ids)) + max(p.max_new_tokens for p in params)
            slots += 0 if soft_prompt is None else soft_prompt.shape[1]
            rows = len(prefix_ids) + companion_count(processors)  # + prompt guidance's stream
            if not runner.can_run(rows, slots, hidden_hook):
                runner = None  # past its buffers, or a hook it cannot run: an eager step
        return generate(
            self.decoder, self.tokenizer, prefix_ids, params, soft_prompt, runner=runner,
            processors=processors, hidden_hook=hidden_hook, on_tokens=on_tokens,
            residual=residual,
        )  # fmt: skip


def persistent_runner(decoder: Decoder) -> DecodeRunner:
    """A persistent DecodeRunner for `decoder`: CUDA graphs per (batch, KV) bucket on CUDA; on CPU
    the fused C++ step for an int8 Llama-family decoder (the default), else the decoder's weights
    go input-major and each bucket's step is a TorchScript trace (made at its first use, ~3 s each
    for SmolLM2)."""
    max_len = min(FAST_DECODE_MAX_LEN, decoder.max_context)
    seq = tuple(s for s in (64, 128, 256, 512, 1024) if s < max_len) + (max_len,)
    if decoder.device.type == "cuda":
        config = DecodeRunnerConfig(
            max_len=max_len, seq_buckets=seq, batch_sizes=FAST_DECODE_BATCHES
        )
    else:
        if decoder.quantized == "none":  # (an int8 decoder's matrices are its own)
            decoder.use_input_major_weights()
        config = DecodeRunnerConfig(max_len=max_len, seq_buckets=seq, enforce_eager=True,
                                    step_impl="fused", batch_sizes=FAST_DECODE_BATCHES)  # fmt: skip
    return DecodeRunner(decoder, config)


__all__ = ["FAST_DECODE_BATCHES", "FAST_DECODE_MAX_LEN", "Core", "DecodeCore", "persistent_runner"]
