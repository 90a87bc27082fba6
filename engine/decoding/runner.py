"""The decode step on static buffers: CUDA graphs per batch bucket on GPU, op by op elsewhere.

`DecodeRunner` owns every buffer the step touches, allocated once for the largest batch bucket and
`max_len` KV slots: the KV cache (L, Bmax, n_kv, S, Dh), the fed tokens, their positions, the write
slot, the key mask and the fp32 logits. One step is

    logits[:b] = decoder.forward_static(embed(tokens[:b]), positions[:b], k[:, :b, :, :s],
                                        v[:, :b, :, :s], write_pos, key_mask[:b, :s])
    positions += 1; write_pos += 1

on the first b rows and s slots of the buffers, so its shapes and addresses never change for a
given (b, s) and it can be captured in a CUDA graph. On CUDA every (batch bucket, KV bucket) pair
is captured at `warmup()` (vLLM/SGLang style): a batch is rounded up to a captured size with
`bisect`, its tokens are `copy_`'d in, its logits sliced out; rows past the batch hold valid
dummy tokens and are independent of the live ones (row-wise matmuls, per-row attention). KV
buckets (`seq_buckets`) let early steps attend over fewer slots than `max_len`.

With `enforce_eager` (and on CPU) the same step, with the same buckets, runs op by op on the same
buffers, through a TorchScript trace / torch.compile, or (int8 Llama-family decoders) as one
fused C++ call (`step_impl`, see STEP_IMPLS).
`decoding.generate` without a runner builds an eager one sized to the call (one bucket = the
batch, max_len = the slots it needs: no padding).
Sampling stays outside the step (`decoding.generate` samples from `logits` without a host sync).

As a step backend of the loop (`can_run`, `start`, `step`): a hidden-state hook (`start(...,
hidden_hook)`) runs op by op (step_impl "eager") or after a trace of the step's body up to the
final norm (step_impl "trace": the body is traced once per bucket at the first hooked step; the
hook and the LM head then run op by op), or after the fused step (step_impl "fused"). With CUDA
graphs, a hook that has a static form (`capturable`: RE-Control's `ValueEdit`) is recorded in
the step: one more graph per (batch bucket, KV bucket, the hook's `static_key()`), captured at
the first step that needs it, its per-row settings copied into the static form's buffers at
`start` and its side outputs handed back after each replay (`publish`); a hook without one, or a
compiled step, cannot run (`can_run` says no and the loop takes an eager runner instead).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import torch
from dglm.engine.decoding.buckets import round_up
from dglm.engine.decoding.padding import PaddedBatch, StackedBatch
from dglm.engine.models.base import Decoder, HiddenHook, KVCache, StaticHook
from dglm.kernels import llama_step
from dglm.kernels.llama_step import LlamaInt8Step
from torch import nn

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)


def capturable(hook: HiddenHook | bool) -> bool:
    """Whether a hidden-state hook has a static form a CUDA graph can record (its `static_key()`
    is not None; `static_copy` then gives the `models.base.StaticHook`); True / False (any hook,
    no hook) are not known to."""
    return not isinstance(hook, bool) and hook.static_key() is not None


# How a runner without graphs runs the step:
# - "eager": op by op from Python.
# - "trace": a TorchScript trace of the step per (batch bucket, KV bucket), made at its first use
#   (~3 s for SmolLM2): the same aten kernels in the same order, without the Python interpreter
#   between them; bit-identical logits. TorchScript is deprecated upstream but still shipped.
# - "compile": torch.compile (inductor) with dynamic shapes and frozen weights: fuses the small
#   ops (logits differ by ~1e-5), but compiling SmolLM2 takes 3-7 minutes on 2 busy cores.
# - "fused": the whole step up to the final norm in one C++ call (dglm.kernels.llama_step: int8
#   Llama-family decoders on CPU; equal to the traced step to rounding), then the hook and the LM
#   head; a decoder it cannot serve, or a batch bucket above FUSED_MAX_BATCH, runs "trace" instead.
STEP_IMPLS = ("eager", "trace", "compile", "fused")
# Largest batch bucket the fused step runs: from 64 rows the int8 products are compute-bound and
# faster through BLAS on widened weights (kernels.int8_linear.LARGE_M), which the traced step
# reaches. Measured on SmolLM2 int8, one core, ms per step fused / traced: B=32 180 / 191,
# B=64 454 / 409 (benchmarks/results/cpu/decode.md).
FUSED_MAX_BATCH = 32


@dataclass(frozen=True)
class DecodeRunnerConfig:
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES  # captured batch buckets; max = buffer rows
    max_len: int = 512  # KV slots per row: longest prefix + soft prompt + max_new_tokens
    seq_buckets: tuple[int, ...] = ()  # KV lengths with their own graphs; () = max_len only
    enforce_eager: bool = False  # run the step op by op on the static buffers (no CUDA graphs)
    step_impl: str = "eager"  # without graphs: one of STEP_IMPLS (see there)

    def __post_init__(self):
        sizes = tuple(sorted({int(b) for b in self.batch_sizes}))
        if not sizes or sizes[0] < 1:
            raise ValueError(
                f"DecodeRunnerConfig.batch_sizes must be positive integers, got {self.batch_sizes}"
            )
        object.__setattr__(self, "batch_sizes", sizes)
        if self.max_len < 1:
            raise ValueError(f"DecodeRunnerConfig.max_len must be ≥ 1, got {self.max_len}")
        buckets = tuple(sorted({int(s) for s in self.seq_buckets} | {self.max_len}))
        if buckets[0] < 1 or buckets[-1] > self.max_len:
            raise ValueError(
                f"DecodeRunnerConfig.seq_buckets must lie in [1, max_len={self.max_len}], got "
                f"{self.seq_buckets}"
            )
        object.__setattr__(self, "seq_buckets", buckets)
        if self.step_impl not in STEP_IMPLS:
            raise ValueError(
                f"DecodeRunnerConfig.step_impl={self.step_impl!r} is not one of {STEP_IMPLS}"
            )
        if self.step_impl != "eager" and not self.enforce_eager:
            raise ValueError(
                f"DecodeRunnerConfig.step_impl={self.step_impl!r} needs enforce_eager=True (CUDA "
                "graphs already remove the per-op host overhead it targets)"
            )


def decode_logits(
    decoder: Decoder,
    tokens: torch.Tensor,  # (b,) long
    positions: torch.Tensor,  # (b,) long
    k: torch.Tensor,  # (L, b, n_kv, s, Dh)
    v: torch.Tensor,
    write_pos: torch.Tensor,  # (1,) long
    key_mask: torch.Tensor,  # (b, s) bool
    residual: torch.Tensor | None = None,  # (b, L, H): added after each block (zeros: off)
    hidden_hook: HiddenHook | None = None,
) -> torch.Tensor:
    """One decode step through `forward_static`, K/V written in place → fp32 logits (b, V)."""
    x = decoder.embed(tokens[:, None])  # (b, 1, H)
    return decoder.forward_static(
        x, positions[:, None], k, v, write_pos, key_mask, hidden_hook=hidden_hook,
        residual=residual,
    )[:, 0]  # fmt: skip


def decode_hidden(
    decoder: Decoder,
    tokens: torch.Tensor,  # (b,) long
    positions: torch.Tensor,  # (b,) long
    k: torch.Tensor,
    v: torch.Tensor,
    write_pos: torch.Tensor,
    key_mask: torch.Tensor,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """`decode_logits` up to the final norm: K/V written in place → hidden states (b, 1, H)."""
    x = decoder.embed(tokens[:, None])  # (b, 1, H)
    return decoder.forward_static(
        x, positions[:, None], k, v, write_pos, key_mask, return_hidden=True, residual=residual
    )


_compiled_decode_logits: Callable | None = None


def compiled_decode_logits() -> Callable:
    """`decode_logits` through torch.compile: dynamic shapes (one compile serves every b ≥ 2 and
    every s; b = 1 gets its own), frozen weights (inductor folds them in as constants: the
    decoder must not change afterwards). Compiling SmolLM2 takes 2-4 minutes on 2 busy cores;
    it fuses the ~25 small ops per layer around the matmuls (the matmuls stay MKL's)."""
    global _compiled_decode_logits
    if _compiled_decode_logits is None:
        _compiled_decode_logits = torch.compile(
            decode_logits, dynamic=True, fullgraph=True, options={"freezing": True}
        )
    return _compiled_decode_logits


class _DecodeModule(nn.Module):
    """decode_logits as a module (what torch.jit.trace records; the decoder's weights stay its
    parameters, shared, not copied)."""

    def __init__(self, decoder: Decoder) -> None:
        super().__init__()
        self.decoder = decoder

    def forward(self, tokens, positions, k, v, write_pos, key_mask, residual) -> torch.Tensor:
        return decode_logits(self.decoder, tokens, positions, k, v, write_pos, key_mask, residual)


class _DecodeHiddenModule(_DecodeModule):
    """decode_hidden as a module: the traced body of a hooked step (hook and head run after)."""

    def forward(self, tokens, positions, k, v, write_pos, key_mask, residual) -> torch.Tensor:
        return decode_hidden(self.decoder, tokens, positions, k, v, write_pos, key_mask, residual)


class _EagerStep:
    """What a captured graph replays, run without one: `replay()` runs one step, op by op or
    (step_impl="trace") through a TorchScript trace of this bucket made at the first replay."""

    def __init__(self, runner: DecodeRunner, b: int, s: int) -> None:
        self.runner, self.b, self.s = runner, b, s
        self.traced: torch.jit.ScriptModule | None = None
        self.traced_hidden: torch.jit.ScriptModule | None = None  # made at the first hooked step

    def _trace(self, module: nn.Module, args: tuple) -> torch.jit.ScriptModule:
        # tracing runs the step once; running it again rewrites the same K/V at the same slot
        # before reading it, so the step stays idempotent
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings on shape checks: shapes are fixed
            traced = torch.jit.trace(module, args, check_trace=False)
        logger.info("traced the decode step%s: batch bucket %d, %d KV slots",
                    " up to the hidden states" if isinstance(module, _DecodeHiddenModule) else "",
                    self.b, self.s)  # fmt: skip
        return traced

    def _decode(self, decoder, *args: torch.Tensor) -> torch.Tensor:
        hook = self.runner.hidden_hook
        if hook is not None:  # the traced body, then the hook and the LM head op by op
            if self.traced_hidden is None:
                self.traced_hidden = self._trace(_DecodeHiddenModule(decoder), args)
            return decoder.hooked_logits(self.traced_hidden(*args), hook)[:, 0]
        if self.traced is None:
            self.traced = self._trace(_DecodeModule(decoder), args)
        return self.traced(*args)

    def _fused(
        self, decoder, tokens, positions, k, v, write_pos, key_mask, residual
    ) -> torch.Tensor:
        runner = self.runner
        x = decoder.embed(tokens)  # (b, H)
        residual = residual if runner.residual_on else None  # the C++ loop skips the adds
        hidden = runner.fused(x, positions, k, v, runner.slot, key_mask, residual=residual)
        hidden = hidden[:, None]  # (b, 1, H)
        return decoder.hooked_logits(hidden, runner.hidden_hook)[:, 0]

    def replay(self) -> None:
        if self.runner.fused_serves(self.b):
            return self.runner._step(self.b, self.s, self._fused)
        trace = self.runner.config.step_impl in ("trace", "fused")
        self.runner._step(self.b, self.s, self._decode if trace else None)


class DecodeRunner:
    """Static buffers and the decode step of one decoder (CUDA graphs, or eager with the same
    logic). Use: `begin(...)` a batch, `prefill(...)` its prompt, then `step(tokens)` per token.

    No host sync anywhere in begin / step: the host tracks the write slot itself (every row of a
    batch shares it, rows are left padded), and the graphs advance positions and write_pos on the
    device.
    """

    def __init__(
        self,
        decoder: Decoder,
        config: DecodeRunnerConfig | None = None,
        cache: KVCache | None = None,  # eager only: use these KV buffers instead of allocating
    ) -> None:
        config = config or DecodeRunnerConfig()
        self.decoder, self.config = decoder, config
        self.graphs = not config.enforce_eager
        device = decoder.device
        if self.graphs and (device.type != "cuda" or not torch.cuda.is_available()):
            raise RuntimeError(
                f"DecodeRunner captures CUDA graphs but the decoder is on {device}: move it to a "
                "CUDA device, or set DecodeRunnerConfig(enforce_eager=True)"
            )
        if config.max_len > decoder.max_context:
            raise ValueError(
                f"DecodeRunnerConfig.max_len={config.max_len} exceeds the decoder's context "
                f"{decoder.max_context}"
            )
        bmax, S = config.batch_sizes[-1], config.max_len
        self.batch_sizes = list(config.batch_sizes)
        try:
            if cache is not None:
                if self.graphs:
                    raise ValueError("DecodeRunner(cache=...) is for enforce_eager runners only")
                if cache.batch_size < bmax or cache.max_len < S:
                    raise ValueError(
                        f"cache of {cache.batch_size} rows × {cache.max_len} slots is smaller than "
                        f"the runner's {bmax} rows × {S} slots"
                    )
                if cache.dtype != decoder.dtype or cache.device != device:
                    raise ValueError(
                        f"cache is {cache.dtype} on {cache.device} but the decoder is "
                        f"{decoder.dtype} on {device}"
                    )
                self.k, self.v = cache.k[:, :bmax, :, :S], cache.v[:, :bmax, :, :S]
            else:
                fresh = decoder.new_cache(bmax, S)  # zeros: every slot is finite
                self.k, self.v = fresh.k, fresh.v
            self.tokens = torch.zeros(bmax, dtype=torch.long, device=device)  # fed tokens
            self.positions = torch.zeros(bmax, dtype=torch.long, device=device)
            self.write_pos = torch.zeros(1, dtype=torch.long, device=device)  # slot of the token
            self.key_mask = torch.ones(bmax, S, dtype=torch.bool, device=device)  # False = pad
            self.logits = torch.zeros(bmax, decoder.vocab_size, device=device)  # fp32
            # per row and block, added to the residual stream after the block (methods.caa):
            # always an input of the step (zeros when no row is steered: x + 0 = x), so a trace
            # or a graph records one step for both
            shape = (bmax, decoder.num_layers, decoder.hidden_size)
            self.residual = torch.zeros(shape, dtype=decoder.dtype, device=device)
        except torch.OutOfMemoryError as e:
            raise RuntimeError(
                f"allocating the decode buffers ({bmax} rows × {S} KV slots) ran out of device "
                "memory: lower DecodeRunnerConfig.max_len or the largest of "
                "DecodeRunnerConfig.batch_sizes"
            ) from e
        compiled = config.step_impl == "compile"
        self._decode = compiled_decode_logits() if compiled else decode_logits
        self.fused: LlamaInt8Step | None = None  # step_impl "fused" on a decoder it serves
        if config.step_impl == "fused":
            why = llama_step.unsupported_reason(decoder)
            if why is None:
                self.fused = LlamaInt8Step(decoder)
            else:
                logger.info("fused decode step unavailable (%s): traced step instead", why)
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph | _EagerStep] = {}
        # CUDA graphs with a hook's static form: (batch bucket, KV bucket, the hook's static key)
        self._hooked_graphs: dict[tuple[int, int, Hashable], torch.cuda.CUDAGraph] = {}
        self._static_hooks: dict[Hashable, StaticHook] = {}  # static_key → the hook's static form
        self._pool = torch.cuda.graph_pool_handle() if self.graphs else None
        self.batch = self.rows = self.slot = self.slots = 0  # current batch, set by begin()
        self.hidden_hook: HiddenHook | None = None  # of the current batch, set by start()
        self._static: tuple[Hashable, StaticHook] | None = None  # (key, static form) of that hook
        self.split_batches = False  # a batch above the largest bucket is refused (step backend)
        self.residual_on = False  # whether the current batch's residual buffer holds nonzeros

    # ------------------------------------------------------------------ buckets
    @property
    def max_batch(self) -> int:
        return self.batch_sizes[-1]

    @property
    def max_len(self) -> int:
        return self.config.max_len

    def bucket(self, batch_size: int) -> int:
        """Rows the step runs for a batch of `batch_size`: the bucket it rounds up to."""
        return round_up(self.batch_sizes, batch_size, "DecodeRunnerConfig.batch_sizes")

    def seq_bucket(self, slots: int) -> int:
        """KV slots the step attends over while `slots` are in use (the KV bucket ≥ slots)."""
        return round_up(self.config.seq_buckets, slots, "DecodeRunnerConfig.max_len")

    # ------------------------------------------------------------------ the step
    def _step(
        self, b: int, s: int, decode: Callable | None = None, static_hook: StaticHook | None = None
    ) -> None:
        """One decode step on rows [0, b) and slots [0, s) of the buffers (what a graph records;
        `static_hook`: a hook's static form, recorded with the step)."""
        args = (
            self.decoder,
            self.tokens[:b],
            self.positions[:b],
            self.k[:, :b, :, :s],
            self.v[:, :b, :, :s],
            self.write_pos,
            self.key_mask[:b, :s],
            self.residual[:b],
        )
        if decode is not None:  # a traced step (hooked or not: see _EagerStep._decode)
            logits = decode(*args)
        elif static_hook is not None:  # CUDA graphs: the hook's static form, in the graph
            logits = decode_logits(*args, hidden_hook=static_hook)
        elif self.hidden_hook is not None and not self.graphs:  # op by op (see can_run)
            logits = decode_logits(*args, hidden_hook=self.hidden_hook)
        else:
            logits = self._decode(*args)
        self.logits[:b].copy_(logits)
        self.positions[:b].add_(1)
        self.write_pos.add_(1)

    @torch.no_grad()
    def _capture(
        self, b: int, s: int, static: tuple[Hashable, StaticHook] | None = None
    ) -> torch.cuda.CUDAGraph | _EagerStep:
        if not self.graphs:
            self._graphs[b, s] = _EagerStep(self, b, s)
            return self._graphs[b, s]
        hook = None if static is None else static[1]
        saved = self.positions.clone(), self.write_pos.clone()
        # the warm-up steps rewrite the current slot's K/V and logits, which the recorded step
        # rewrites again before anything reads them (a hook's capture comes mid-batch)
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up: cuBLAS handles, SDPA kernel choice
                for _ in range(2):
                    self._step(b, s, static_hook=hook)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                self._step(b, s, static_hook=hook)
            torch.cuda.synchronize()
        except torch.OutOfMemoryError as e:
            raise RuntimeError(
                f"capturing the decode step for batch bucket {b} × {s} KV slots ran out of GPU "
                f"memory: lower the largest of DecodeRunnerConfig.batch_sizes "
                f"({self.max_batch}) or DecodeRunnerConfig.max_len ({self.max_len})"
            ) from e
        finally:  # the warm-up steps advanced them; the recorded graph did not run
            self.positions.copy_(saved[0])
            self.write_pos.copy_(saved[1])
        if static is not None:
            logger.info("captured decode step with its hidden-state hook: batch bucket %d, %d KV "
                        "slots", b, s)  # fmt: skip
            self._hooked_graphs[b, s, static[0]] = graph
            return graph
        logger.info("captured decode step: batch bucket %d, %d KV slots", b, s)
        self._graphs[b, s] = graph
        return graph

    @torch.inference_mode()
    def warmup(self, batch_sizes: tuple[int, ...] | None = None) -> None:
        """Capture every (batch bucket, KV bucket) graph, largest first so the later ones reuse
        the shared memory pool; step_impl "trace" / "compile": trace / compile them by running
        each once. `batch_sizes` limits it to the buckets those batches use. Call it before
        `begin` (it runs steps on the buffers)."""
        if not self.graphs and self.config.step_impl == "eager":
            return
        buckets = sorted({self.bucket(n) for n in (batch_sizes or self.batch_sizes)})
        for b in reversed(buckets):
            for s in reversed(self.config.seq_buckets):
                if (b, s) in self._graphs or self.fused_serves(b):
                    continue
                step = self._capture(b, s)
                if not self.graphs:  # trace / compile now: one step, its state advance undone
                    saved = self.positions.clone(), self.write_pos.clone()
                    step.replay()
                    self.positions.copy_(saved[0])
                    self.write_pos.copy_(saved[1])

    def fused_serves(self, rows: int) -> bool:
        """Whether a step of `rows` rows runs fused (step_impl "fused" on a decoder it serves, up
        to FUSED_MAX_BATCH rows; above, the traced step, whose int8 products go to BLAS)."""
        return self.fused is not None and rows <= FUSED_MAX_BATCH

    # ------------------------------------------------------------------ step backend
    def can_run(self, batch_size: int, slots: int, hooked: HiddenHook | bool = False) -> bool:
        """Whether this runner can take a batch of `batch_size` rows × `slots` KV slots, with a
        hidden-state hook when `hooked` (the hook, or True for any hook): op by op, or a trace of
        the step's body with the hook and the LM head after it; in CUDA graphs only a
        `capturable` hook (a hook given as True is not known to be); never in compiled steps."""
        if self.graphs:
            hookable = capturable(hooked)
        else:
            hookable = self.config.step_impl in ("eager", "trace", "fused")
        return batch_size <= self.max_batch and slots <= self.max_len and (hookable or not hooked)

    @torch.inference_mode()
    def start(
        self,
        batch: PaddedBatch,
        hidden_hook: HiddenHook | None = None,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Begin `batch` and prefill it (pads, prefix, soft prompt in one causal pass) → fp32
        logits (B, V) of its last position; `hidden_hook` acts at every step of this batch, and
        `residual (B, L, H)` is added after each decoder block at every position (copied into the
        runner's static buffer; None: zeros)."""
        if hidden_hook is not None and not self.can_run(1, 1, hidden_hook):
            raise ValueError(
                "a hidden-state hook runs op by op, traced, fused, or in CUDA graphs when it has "
                "a static form (static_key, static_copy): use a DecodeRunner with "
                "DecodeRunnerConfig(enforce_eager=True, step_impl='eager', 'trace' or 'fused')"
            )
        self.begin(batch.batch_size, batch.slots, batch.key_mask if batch.padded else None)
        self.hidden_hook = hidden_hook
        if residual is not None:
            if residual.shape != (batch.batch_size, *self.residual.shape[1:]):
                raise ValueError(
                    f"residual has shape {tuple(residual.shape)}, expected (rows, layers, hidden) "
                    f"= ({batch.batch_size}, {self.residual.shape[1]}, {self.residual.shape[2]})"
                )
            self.residual[: batch.batch_size].copy_(residual)
            self.residual_on = True
        if self.graphs and hidden_hook is not None:  # the graphs replay its static form
            key = hidden_hook.static_key()
            if key not in self._static_hooks:
                self._static_hooks[key] = hidden_hook.static_copy(self.max_batch)
            self._static_hooks[key].load(hidden_hook)
            self._static = (key, self._static_hooks[key])
        if isinstance(batch, StackedBatch) and batch.follow is not None:
            return self._prefill_following(batch)
        return self.prefill(batch.embeds(self.decoder), batch.positions)

    def _prefill_following(self, batch: StackedBatch) -> torch.Tensor:
        """Prefill a StackedBatch whose second part repeats prefixes of the first (`follow`):
        the first part's rows run, the followers get their followed rows' prefix keys and values
        copied (slots shifted by the soft prompt's length P: a follower is [pads; prefix], its
        row [pads; prefix; soft]) and the logits of their followed rows' last prefix slot. The
        keys and values equal what prefilling the followers would write, up to the rounding of
        attention over other slots."""
        main, follow = batch.parts[0], torch.tensor(batch.follow, device=self.k.device)
        B, T0, tp = main.batch_size, batch.prefill_len, main.ids.shape[1]
        n = batch.batch_size
        write_pos = torch.arange(T0, device=self.write_pos.device)
        h = self.decoder.forward_static(
            main.embeds(self.decoder), main.positions, self.k[:, :B, :, :T0],
            self.v[:, :B, :, :T0], write_pos, self.key_mask[:B, :T0], return_hidden=True,
            residual=self.residual[:B],
        )  # fmt: skip
        hidden = torch.cat([h[:, -1:], h.index_select(0, follow)[:, tp - 1 : tp]])  # (n, 1, H)
        logits = self.decoder.hooked_logits(hidden, self.hidden_hook)[:, 0]
        P = T0 - tp
        for cache in (self.k, self.v):
            cache[:, B:n, :, P:T0] = cache[:, :, :, :tp].index_select(1, follow)
        self.positions[:n].copy_(batch.positions[:, -1] + 1)
        self.write_pos.fill_(T0)
        self.slot = T0
        return logits

    # ------------------------------------------------------------------ one batch
    @torch.inference_mode()
    def begin(self, batch_size: int, slots: int, key_mask: torch.Tensor | None) -> None:
        """Load a batch: `key_mask (B, slots)` bool, False at the left pads (None: no pads);
        `slots` = prompt + new tokens. Rows past B (graph padding) get valid dummy tokens."""
        if slots > self.max_len:
            raise ValueError(
                f"{slots} KV slots needed but the runner holds max_len={self.max_len}: raise "
                "DecodeRunnerConfig.max_len"
            )
        if key_mask is not None and key_mask.shape != (batch_size, slots):
            raise ValueError(f"key_mask has shape {tuple(key_mask.shape)}, expected "
                             f"({batch_size}, {slots})")  # fmt: skip
        self.batch, self.rows, self.slots = batch_size, self.bucket(batch_size), slots
        self.key_mask[: self.rows] = True  # slots after a query are never visible to it
        if key_mask is not None:
            self.key_mask[:batch_size, :slots].copy_(key_mask)
        self.tokens[batch_size : self.rows] = 0
        self.positions[: self.rows] = 0
        self.slot = 0
        self.hidden_hook = None
        self._static = None
        if self.residual_on:  # the last batch's vectors: zeros again (rows past B stay zero)
            self.residual.zero_()
            self.residual_on = False

    @torch.inference_mode()
    def prefill(self, inputs_embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Prompt `inputs_embeds (B, T0, H)` at `positions (B, T0)` into slots [0, T0), eager →
        fp32 logits (B, V) of the last position. Afterwards the next fed token has position
        positions[:, -1] + 1 and slot T0."""
        B, T0, _ = inputs_embeds.shape
        assert B == self.batch and self.slot == 0, "call begin() before prefill()"
        km = self.key_mask[:B, :T0]
        write_pos = torch.arange(T0, device=self.write_pos.device)
        logits = self.decoder.forward_static(
            inputs_embeds, positions, self.k[:, :B, :, :T0], self.v[:, :B, :, :T0], write_pos, km,
            last_only=True, hidden_hook=self.hidden_hook, residual=self.residual[:B],
        )[:, -1]  # fmt: skip
        self.positions[:B].copy_(positions[:, -1] + 1)
        self.write_pos.fill_(T0)
        self.slot = T0
        return logits

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed `tokens (B,)` long at the next slot → fp32 logits (B, V), a view of the static
        buffer (valid until the next step). No host sync."""
        if self.slot >= self.slots:
            raise ValueError(f"the batch was begun with {self.slots} slots, all in use")
        B = self.batch
        self.tokens[:B].copy_(tokens)
        key = (self.rows, self.seq_bucket(self.slot + 1))
        if self._static is not None:  # CUDA graphs with the hook's static form
            hooked = (*key, self._static[0])
            graph = self._hooked_graphs.get(hooked) or self._capture(*key, self._static)
            graph.replay()
            self._static[1].publish()
        else:
            graph = self._graphs[key] if key in self._graphs else self._capture(*key)
            graph.replay()
        self.slot += 1
        return self.logits[:B]


__all__ = [
    "DEFAULT_BATCH_SIZES",
    "capturable",
    "DecodeRunner",
    "DecodeRunnerConfig",
    "STEP_IMPLS",
    "compiled_decode_logits",
    "decode_logits",
]
