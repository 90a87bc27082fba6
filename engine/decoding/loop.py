"""The one decode loop: KV-cached batched generation over any step backend.

Row layout in the cache: left padding, prefix tokens, P soft-prompt vectors, generated tokens
(`padding.left_pad`). A backend (`StepBackend`) prefills a batch and runs one step per token: a
`DecodeRunner` (`Decoder.forward_static` on static buffers: CUDA graphs, traced or eager steps),
the reference `ReferenceStep` (`Decoder.forward` over a growing KVCache), or the ONNX Runtime
decoder (`dglm.export.runtime.OrtDecoder`). Tokens come from one `sampling.Sampler` whichever the
backend, so a seed gives the same tokens on each (up to the backends' logits).

Method hooks: `processors` (`sampling.LogitsProcessor`) rewrite each step's logits before
sampling; `hidden_hook` (`models.base.HiddenHook`) edits the final-norm hidden states before the
LM head (torch backends, op by op). A processor with companion rows (`CompanionRows`, prompt
guidance's unconditional stream) gets extra rows decoded in the same batched forward as the
batch's own: after them in the step's batch, without the soft prompt, fed the sampled token of the
row each one follows; the hidden hook is extended to them by its `with_companions(follow)`
(RE-Control edits both streams alike; by default a hook acts on every row of the step). `residual (B, L, H)` is added to the
decoder's residual stream after each block (contrastive activation addition, methods.caa), at the
prefill and every step, on the torch backends; companion rows get the rows' they follow.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Protocol, runtime_checkable

import torch
from dglm.engine.decoding.buckets import row_chunks
from dglm.engine.decoding.padding import PaddedBatch, left_pad, stack
from dglm.engine.decoding.runner import DecodeRunner, DecodeRunnerConfig
from dglm.engine.decoding.sampling import (
    DecodeParams,
    DecodeResult,
    LogitsProcessor,
    Sampler,
    eos_ids,
    pad_id,
)
from dglm.engine.models.base import Decoder, HiddenHook, KVCache

logger = logging.getLogger(__name__)

# the host looks at the generated tokens (stop strings, all rows finished) every this many steps
STOP_CHECK_EVERY = 8


class StepBackend(Protocol):
    """What the loop needs from a decoder backend.

    can_run: whether it takes a batch of that many rows × KV slots (with a hidden-state hook when
    `hooked`: the hook itself, or True for any hook); max_batch: its most rows per batch; split_batches: whether the loop runs a larger
    batch in chunks of max_batch (else `start` refuses it, naming the setting to raise); start:
    prefill a PaddedBatch → fp32 logits (B, V) of its last position (`residual (B, L, H)`: added
    after each decoder block for the whole batch, the torch backends only); step: feed tokens (B,)
    long at the next slot → fp32 logits (B, V), valid until the next step. Neither syncs with the
    host.
    """

    max_batch: int
    split_batches: bool

    def can_run(self, batch_size: int, slots: int, hooked: object = False) -> bool: ...

    def start(
        self,
        batch: PaddedBatch,
        hidden_hook: HiddenHook | None = None,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor: ...

    def step(self, tokens: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class CompanionRows(Protocol):
    """A logits processor that needs rows of its own decoded beside the batch.

    companion_prefixes: G prefixes (token ids, decoded without the soft prompt); companion_rows:
    the batch row each one follows: it is fed that row's sampled token every step;
    see_companions(logits (G, V)): each step's companion logits, before the processor is called.
    """

    companion_prefixes: list[list[int]]
    companion_rows: list[int]

    def see_companions(self, logits: torch.Tensor) -> None: ...


class TokenStream(Protocol):
    """A streaming hook (`generate(..., on_tokens=...)`): called after every sampled token with
    the index of its batch's first row (a batch run in chunks calls it per chunk) and the tokens
    just sampled, one per row (pad for a finished row; EOS and stop strings are the caller's to
    cut). Returns the rows, counted from `first_row`, to finish now (e.g. a client gone: they
    feed pad from then on and the loop ends early once every row is finished), or None.
    """

    def __call__(self, first_row: int, tokens: list[int]) -> Iterable[int] | None: ...


def companion_count(processors: tuple[LogitsProcessor, ...]) -> int:
    """How many companion rows the processors add to a batch (see CompanionRows)."""
    return sum(len(p.companion_rows) for p in processors if isinstance(p, CompanionRows))


class ReferenceStep:
    """The reference step (`generate(..., static=False)`): `Decoder.forward` over a KVCache that
    grows by one slot per step, the attention mask rebuilt from the key mask every step."""

    def __init__(self, decoder: Decoder, cache: KVCache) -> None:
        self.decoder, self.cache = decoder, cache
        self.max_batch, self.split_batches = cache.batch_size, False

    def can_run(self, batch_size: int, slots: int, hooked: object = False) -> bool:
        return batch_size <= self.cache.batch_size and slots <= self.cache.max_len

    def start(
        self,
        batch: PaddedBatch,
        hidden_hook: HiddenHook | None = None,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        self.cache.reset()
        self.key_mask = batch.key_mask if batch.padded else None  # (B, slots) or None
        self.hidden_hook, self.residual = hidden_hook, residual
        km = None if self.key_mask is None else self.key_mask[:, : batch.prefill_len]
        x = batch.embeds(self.decoder)  # (B, T0, H)
        logits = self.decoder(
            x, batch.positions, self.cache, km, last_only=True, hidden_hook=hidden_hook,
            residual=residual,
        )  # fmt: skip
        self.next_pos = batch.next_positions()  # (B, 1)
        return logits[:, -1]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.decoder.embed(tokens[:, None])  # (B, 1, H)
        n = self.cache.length + 1
        km = None if self.key_mask is None else self.key_mask[:, :n]
        logits = self.decoder(
            x, self.next_pos, self.cache, km, hidden_hook=self.hidden_hook, residual=self.residual
        )
        self.next_pos += 1
        return logits[:, -1]  # (B, V)


def check_cache(cache: KVCache | None, decoder: Decoder, batch: int, need: int) -> KVCache:
    """`cache` checked to hold `batch` rows × `need` slots (a view of its first rows), or a new one."""
    if cache is None:
        return decoder.new_cache(batch, need)
    if cache.batch_size < batch or cache.max_len < need:
        raise ValueError(
            f"cache of {cache.batch_size} rows × {cache.max_len} slots is too small for "
            f"{batch} rows × {need} slots; allocate it with decoder.new_cache({batch}, {need})"
        )
    if cache.dtype != decoder.dtype or cache.device != decoder.device:
        raise ValueError(
            f"cache is {cache.dtype} on {cache.device} but the decoder is {decoder.dtype} on "
            f"{decoder.device}"
        )
    return cache.rows(batch) if cache.batch_size > batch else cache


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so a host timer reads finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def generate(
    decoder,
    tokenizer,
    prefix_ids: list[list[int]],
    params: list[DecodeParams],
    soft_prompt: torch.Tensor | None = None,
    cache: KVCache | None = None,
    runner: StepBackend | None = None,
    *,
    static: bool = True,
    processors: tuple[LogitsProcessor, ...] = (),
    hidden_hook: HiddenHook | None = None,
    on_tokens: TokenStream | None = None,
    residual: torch.Tensor | None = None,
) -> tuple[list[DecodeResult], dict[str, float]]:
    """Generate a continuation per row → (results in row order, timings: "prefill_s",
    "decode_s" (wall), "decode_steps" (steps after the first token), "decode_cpu_s").

    decoder: a `Decoder`, or the geometry of `runner`'s decoder (the ONNX Runtime one: vocab_size,
    hidden_size, max_context, eos_token_ids, config.pad_token_id, device); prefix_ids: token ids
    per row (may be empty when a soft prompt follows); params: one per row (or one for all);
    soft_prompt (B, P, H) is spliced after each prefix; cache: a KVCache of at least
    B rows × (longest prefix + P + max_new_tokens) slots to reuse, else one is allocated.

    The step: `runner` (a StepBackend: a DecodeRunner built once per engine, the ONNX Runtime
    decoder) when given, batches above its max_batch in chunks of it; otherwise an eager
    DecodeRunner over `cache` (the same static step, `Decoder.forward_static`); static=False runs
    the reference loop instead, `Decoder.forward` over a growing KVCache.
    processors rewrite each step's logits before sampling; hidden_hook edits the final-norm hidden
    states before the LM head at every step (the runner must be able to run it, see can_run);
    residual (B, L, H) is added to the residual stream after each decoder block, at every
    position (a torch backend's; zero rows decode bit-identically).
    on_tokens (streaming, `TokenStream`) sees each step's tokens: a host read every step when
    set; None costs nothing and changes nothing.

    The decode loop keeps everything on the device: no .item(), no torch.multinomial, no Python
    branch on tensor values (processors aside); the host reads the tokens only every
    STOP_CHECK_EVERY steps (stop strings and the all-rows-finished exit). Finished rows keep
    feeding pad but their output is frozen.
    """
    B = len(prefix_ids)
    if B == 0:
        raise ValueError("prefix_ids is empty: pass at least one row")
    params = list(params)
    if len(params) == 1 and B > 1:
        params = params * B
    if len(params) != B:
        raise ValueError(f"params has {len(params)} entries for {B} rows of prefix_ids")
    P = 0
    if soft_prompt is not None:
        if soft_prompt.ndim != 3 or soft_prompt.shape[0] != B:
            raise ValueError(
                f"soft_prompt has shape {tuple(soft_prompt.shape)}, expected ({B}, P, "
                f"{decoder.hidden_size})"
            )
        if soft_prompt.shape[2] != decoder.hidden_size:
            raise ValueError(
                f"soft_prompt width {soft_prompt.shape[2]} != decoder hidden_size "
                f"{decoder.hidden_size}"
            )
        P = soft_prompt.shape[1]
    if residual is not None:
        expected = (B, decoder.num_layers, decoder.hidden_size)
        if residual.shape != expected:
            raise ValueError(
                f"residual has shape {tuple(residual.shape)}, expected (rows, layers, hidden) = "
                f"{expected}"
            )
        if runner is not None and not isinstance(runner, DecodeRunner | ReferenceStep):
            raise ValueError(
                "a residual-stream addition (CAA) runs on the torch step backends only, not on "
                f"{type(runner).__name__}"
            )
        residual = residual.to(device=decoder.device, dtype=decoder.dtype)
    lens = [len(p) for p in prefix_ids]
    if P == 0 and min(lens) == 0:
        raise ValueError(f"prefix_ids[{lens.index(0)}] is empty and there is no soft prompt")
    t_prefix = max(lens)
    max_new = max(p.max_new_tokens for p in params)
    total = t_prefix + P + max_new  # KV slots
    if total > decoder.max_context:
        raise ValueError(
            f"{t_prefix} prefix tokens + {P} soft-prompt vectors + max_new_tokens={max_new} "
            f"exceed the decoder's context of {decoder.max_context}"
        )
    companions = [p for p in processors if isinstance(p, CompanionRows)]
    if len(companions) > 1:
        raise ValueError("at most one logits processor with companion rows per batch")
    G = companion_count(processors)  # rows decoded beside the batch's own
    if runner is not None:
        if cache is not None:
            raise ValueError("pass either cache or runner (the runner owns its KV buffers)")
        if isinstance(runner, DecodeRunner) and runner.decoder is not decoder:
            raise ValueError("runner was built for another decoder")
        if B + G > runner.max_batch and runner.split_batches:  # rows stay independent
            if G:
                raise ValueError(
                    f"{B} rows + {G} companion rows exceed the runner's {runner.max_batch} and a "
                    "processor with companion rows cannot be split into chunks: pass fewer rows"
                )
            return _in_chunks(
                decoder, tokenizer, prefix_ids, params, soft_prompt, runner,
                processors=processors, hidden_hook=hidden_hook, on_tokens=on_tokens,
                residual=residual,
            )  # fmt: skip
        if hidden_hook is not None and not runner.can_run(1, 1, hidden_hook):
            raise ValueError(
                "this runner cannot run this hidden-state hook (compiled steps and the ONNX "
                "graphs were recorded without one; CUDA graphs record only a hook with a static "
                "form): pass no runner, or an eager or traced one"
            )
    t_start = time.perf_counter()
    if runner is None and static:
        cache = check_cache(cache, decoder, B + G, total)
        config = DecodeRunnerConfig(batch_sizes=(B + G,), max_len=total, enforce_eager=True)
        runner = DecodeRunner(decoder, config, cache=cache)
    elif runner is None:
        runner = ReferenceStep(decoder, check_cache(cache, decoder, B + G, total))

    device = decoder.device
    eos = eos_ids(decoder, tokenizer)
    pad = pad_id(decoder, tokenizer, eos)
    batch = left_pad(prefix_ids, pad, total, soft_prompt, device)
    sampler = Sampler(params, decoder.vocab_size, eos, pad, device, tokenizer, processors)
    if G:
        (comp,) = companions
        extra = left_pad(comp.companion_prefixes, pad, total, None, device, batch.prefill_len)
        rows = comp.companion_rows
        repeats = all(comp.companion_prefixes[i] == prefix_ids[r] for i, r in enumerate(rows))
        batch = stack(batch, extra, follow=tuple(rows) if repeats else None)
        follow = torch.tensor(comp.companion_rows, device=device)
        if not isinstance(runner, DecodeRunner | ReferenceStep):
            raise ValueError(
                "companion rows (prompt guidance) run on the torch step backends only, not on "
                f"{type(runner).__name__}"
            )
        if hidden_hook is not None:  # RE-Control: the companions edited as the rows they follow
            hidden_hook = hidden_hook.with_companions(comp.companion_rows)
        if residual is not None:  # the companions steered as the rows they follow
            residual = torch.cat((residual, residual[follow]))
        if not runner.can_run(B + G, total, hidden_hook):
            raise ValueError(
                f"the runner cannot take {B} rows + {G} companion rows × {total} KV slots: "
                "pass no runner, or one with a larger batch bucket"
            )

    def sample(logits: torch.Tensor) -> torch.Tensor:  # (B [+ G], V) → tokens to feed (B [+ G],)
        if not G:
            tok = sampler.step(logits)
        else:
            comp.see_companions(logits[B:])
            tok = sampler.step(logits[:B])
        if on_tokens is not None:
            finish = on_tokens(0, tok.tolist())  # a host read: streaming only
            if finish:  # from the next step on they feed pad
                sampler.finished[list(finish)] = True
        return tok if not G else torch.cat((tok, tok[follow]))

    # ---- prefill: pads, prefix, soft prompt in one causal pass
    if residual is not None:
        tok = sample(runner.start(batch, hidden_hook, residual))
    else:  # (a backend without residual support is called as before)
        tok = sample(runner.start(batch, hidden_hook))
    sync(device)
    t_prefill, c_prefill = time.perf_counter(), time.process_time()

    # ---- decode: one token per row per step, no host sync between checks
    for step in range(1, max_new):
        if step % STOP_CHECK_EVERY == 0 and sampler.done():
            break
        tok = sample(runner.step(tok))  # (B [+ G], V) logits → (B [+ G],)
    sync(device)
    t_decode, c_decode = time.perf_counter(), time.process_time()

    timings = {
        "prefill_s": t_prefill - t_start,
        "decode_s": t_decode - t_prefill,
        "decode_steps": float(sampler.steps - 1),
        "decode_cpu_s": c_decode - c_prefill,  # this process's CPU time (all its threads)
    }
    return sampler.results(), timings


def _in_chunks(
    decoder, tokenizer, prefix_ids, params, soft_prompt, runner, on_tokens=None, residual=None,
    **hooks,
):  # fmt: skip
    """`generate` over chunks of runner.max_batch rows; results in row order, timings summed."""
    results: list[DecodeResult] = []
    timings: dict[str, float] = {}
    for rows in row_chunks(len(prefix_ids), runner.max_batch):
        soft = None if soft_prompt is None else soft_prompt[rows]
        if residual is not None:
            hooks["residual"] = residual[rows]
        stream = None
        if on_tokens is not None:  # the chunk's rows counted from its first

            def stream(first: int, tokens: list[int], start: int = rows.start):
                return on_tokens(start + first, tokens)

        res, t = generate(
            decoder, tokenizer, prefix_ids[rows], params[rows], soft, runner=runner,
            on_tokens=stream, **hooks,
        )  # fmt: skip
        results += res
        for key, value in t.items():
            timings[key] = timings.get(key, 0.0) + value
    return results, timings


__all__ = [
    "STOP_CHECK_EVERY",
    "DecodeParams",
    "DecodeResult",
    "ReferenceStep",
    "CompanionRows",
    "StepBackend",
    "TokenStream",
    "check_cache",
    "companion_count",
    "generate",
    "sync",
]
