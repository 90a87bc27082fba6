"""ONNX Runtime backend: the graphs written by `dglm.export.onnx` driving the Engine.

    engine = Engine.from_pretrained(OUTDIR, backend="onnx")                 # CPU execution provider
    engine = Engine.from_pretrained(OUTDIR, backend="onnx", device="cuda")  # CUDA EP: I/O binding,
                                                                            # CUDA graphs per bucket
What runs where: the score network, the prompt generator and the decoder (prefill + decode) run in
ONNX Runtime; the sentence encoder (sentence-transformers), the tokenizer, the sampler loop with the
fused guided update, and token sampling stay in PyTorch/Python, exactly as in the torch backend, so
a seed gives the same tokens on both backends. `exact` probe guidance differentiates through the
score network and is refused here (use `fast`, or backend="torch").

Batches run in the manifest's batch buckets: a batch is split at the largest bucket and, on CUDA
(or with `pad_batches=True`), rounded up to a bucket with `bisect` (padding rows copy row 0 and are
sliced off). On CUDA every captured graph reads and writes static torch buffers, one set per bucket,
bound once through I/O binding on torch's current stream; each bucket is its own ORT CUDA graph
(`gpu_graph_id`). The KV buffer (L, B, n_kv, S, Dh) belongs to the runtime: the decode graph
returns the new key/value and the runtime stores it at the step's slot.
"""

from __future__ import annotations

import bisect
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from dglm.engine.api import GenerationParams
from dglm.engine.bundle import BundleConfig
from dglm.engine.decoding.loop import (
    STOP_CHECK_EVERY,
    DecodeParams,
    DecodeResult,
    _check,
    _eos_ids,
    _pad_id,
    _results,
    sample_tokens,
)
from dglm.engine.engine import Engine
from dglm.engine.probes import ProbeSet, load_probes
from dglm.kernels.guided_update import select_guided_update

logger = logging.getLogger(__name__)

FORMAT = "dglm-onnx"
VERSION = 1
MANIFEST = "manifest.json"
NP_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "bool": np.bool_}
TORCH_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "int64": torch.int64,
    "bool": torch.bool,
}


def _import_ort():
    try:
        import onnxruntime
    except ImportError as e:
        raise RuntimeError(
            "the ONNX backend needs onnxruntime: pip install 'dglm-engine[onnx]'"
        ) from e
    return onnxruntime


# ------------------------------------------------------------------------------ manifest, paths
def read_manifest(outdir: str | Path) -> dict:
    """The manifest of an export directory, checked for format and version."""
    path = Path(outdir) / MANIFEST
    if not path.is_file():
        raise ValueError(
            f"no {MANIFEST} in {str(outdir)!r}: not an ONNX export (make one with "
            "`dglm export onnx BUNDLE OUTDIR`), or its export failed validation"
        )
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ValueError(
            f"{path}: format {manifest.get('format')!r} version {manifest.get('version')!r} is not "
            f"{FORMAT!r} version {VERSION}"
        )
    return manifest


def _inside(root: Path, relative: str, what: str) -> Path:
    """root / relative, refused unless it is a relative path that stays inside root."""
    rel = Path(relative)
    target = (root / rel).resolve()
    if not relative or rel.is_absolute() or not target.is_relative_to(root.resolve()):
        raise ValueError(
            f"{what} points to {relative!r}, outside the model directory {str(root)!r}; "
            "refusing to load it (re-export the model)"
        )
    return target


def _all_tensors(graph):
    """Every TensorProto of a graph: initializers, sparse ones, node attributes, subgraphs."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _all_tensors(attr.g)
            for g in attr.graphs:
                yield from _all_tensors(g)


def check_external_data(model_path: str | Path) -> list[str]:
    """Refuse a model whose external-data locations leave its directory; returns the files used."""
    import onnx

    model_path = Path(model_path)
    model = onnx.load(str(model_path), load_external_data=False)
    files = set()
    for tensor in _all_tensors(model.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        _inside(
            model_path.parent,
            info.get("location", ""),
            f"tensor {tensor.name!r} of {model_path.name}",
        )
        files.add(info["location"])
    return sorted(files)


# ------------------------------------------------------------------------------ sessions
@dataclass(frozen=True)
class RuntimeOptions:
    threads: int | None = None  # intra-op threads of each session; None = torch.get_num_threads()
    cuda_graphs: bool = True  # CUDA EP: capture the decode step and the score network per bucket
    pad_batches: bool | None = None  # round batches up to a bucket; None = on CUDA only
    optimization: str = "all"  # ORT graph optimisation: "disable" | "basic" | "extended" | "all"

    def __post_init__(self) -> None:
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"threads must be a positive integer or None, got {self.threads!r}")
        if self.optimization not in ("disable", "basic", "extended", "all"):
            raise ValueError(
                "optimization must be one of 'disable', 'basic', 'extended', 'all', "
                f"got {self.optimization!r}"
            )


class OrtGraph:
    """One exported graph as an ONNX Runtime session; torch tensors in and out on `device`.

    CPU: inputs are handed over as numpy views (no copy), outputs wrapped with torch.from_numpy.
    CUDA: I/O binding to torch memory on torch's current stream, no host sync after a run. With
    `capture`, each bucket gets static input/output buffers at fixed addresses (the feeds are
    copied in, the returned outputs are those buffers: read them before the next run) and its own
    CUDA graph, `gpu_graph_id` = 1 + the bucket's index.
    """

    def __init__(
        self,
        root: Path,
        spec: dict,
        device: torch.device,
        options: RuntimeOptions,
        capture: bool = False,
    ) -> None:
        ort = _import_ort()
        self.name, self.spec, self.device = spec["name"], spec, device
        path = _inside(root, spec["file"], f"graph {spec['name']!r}")
        check_external_data(path)
        so = ort.SessionOptions()
        so.intra_op_num_threads = options.threads or torch.get_num_threads()
        so.inter_op_num_threads = 1
        so.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[options.optimization]
        so.log_severity_level = 3
        self.capture = capture and device.type == "cuda"
        if device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise RuntimeError(
                    "device='cuda' needs onnxruntime with the CUDA execution provider "
                    "(pip install onnxruntime-gpu)"
                )
            cuda_opts = {
                "device_id": str(device.index or 0),
                "user_compute_stream": str(torch.cuda.current_stream(device).cuda_stream),
            }
            if self.capture:
                cuda_opts["enable_cuda_graph"] = "1"
            providers = [("CUDAExecutionProvider", cuda_opts)]
        else:
            providers = ["CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(path), so, providers=providers)
        except Exception as e:  # ORT raises its own Fail types
            if not self.capture:
                raise
            # ORT refuses to capture when a compute node falls back to the CPU provider
            logger.warning(
                "graph %s: no CUDA graph capture (%s); running it uncaptured", spec["name"], e
            )
            self.capture = False
            del cuda_opts["enable_cuda_graph"]
            self.session = ort.InferenceSession(str(path), so, providers=providers)
        self.inputs = {i["name"]: i for i in spec["inputs"]}
        self.outputs = {o["name"]: o for o in spec["outputs"]}
        self.output_names = [o["name"] for o in spec["outputs"]]
        # graph id → (static inputs, static outputs, (binding, run options))
        self._static: dict[int, tuple[dict, dict, tuple]] = {}
        self._ort = ort

    def _shape(self, entry: dict, dims: dict[str, int]) -> tuple[int, ...]:
        return tuple(d if isinstance(d, int) else dims[d] for d in entry["shape"])

    def _bind(self, binding, name: str, t: torch.Tensor, entry: dict, output: bool) -> None:
        args = (
            "cuda",
            self.device.index or 0,
            NP_DTYPES[entry["dtype"]],
            list(t.shape),
            t.data_ptr(),
        )
        (binding.bind_output if output else binding.bind_input)(name, *args)

    def run(
        self,
        feeds: dict[str, torch.Tensor],
        dims: dict[str, int],
        graph_id: int = -1,
        in_place: tuple[str, ...] = (),
    ) -> dict[str, torch.Tensor]:
        """Outputs by name; `dims` sizes the symbolic dimensions (batch, prefill_len, ...).

        `in_place`: feeds the caller keeps at fixed addresses for this graph id (the KV buffers);
        a captured graph binds them as they are instead of copying them into its own buffers.
        """
        if self.device.type == "cpu":
            arrays = {n: _numpy(t, self.inputs[n]["dtype"]) for n, t in feeds.items()}
            outs = self.session.run(self.output_names, arrays)
            return {n: torch.from_numpy(o) for n, o in zip(self.output_names, outs, strict=True)}
        if self.capture and graph_id > 0:
            return self._run_captured(feeds, dims, graph_id, in_place)
        binding = self.session.io_binding()
        for n, t in feeds.items():
            t = t.contiguous().to(TORCH_DTYPES[self.inputs[n]["dtype"]])
            feeds[n] = t  # keep alive until the run is queued
            self._bind(binding, n, t, self.inputs[n], output=False)
        outs = {
            n: torch.empty(self._shape(e, dims), dtype=TORCH_DTYPES[e["dtype"]], device=self.device)
            for n, e in self.outputs.items()
        }
        for n, t in outs.items():
            self._bind(binding, n, t, self.outputs[n], output=True)
        opts = self._ort.RunOptions()
        opts.add_run_config_entry("disable_synchronize_execution_providers", "1")
        if self.capture:
            opts.add_run_config_entry("gpu_graph_id", "-1")
        self.session.run_with_iobinding(binding, opts)
        return outs

    def _run_captured(
        self,
        feeds: dict[str, torch.Tensor],
        dims: dict[str, int],
        graph_id: int,
        in_place: tuple[str, ...],
    ) -> dict[str, torch.Tensor]:
        if graph_id not in self._static:
            alloc = {
                n: torch.zeros(
                    self._shape(e, dims), dtype=TORCH_DTYPES[e["dtype"]], device=self.device
                )
                for n, e in self.inputs.items()
                if n not in in_place
            }
            alloc.update({n: feeds[n] for n in in_place})
            outs = {
                n: torch.empty(
                    self._shape(e, dims), dtype=TORCH_DTYPES[e["dtype"]], device=self.device
                )
                for n, e in self.outputs.items()
            }
            binding = self.session.io_binding()
            for n, t in alloc.items():
                self._bind(binding, n, t, self.inputs[n], output=False)
            for n, t in outs.items():
                self._bind(binding, n, t, self.outputs[n], output=True)
            opts = self._ort.RunOptions()
            opts.add_run_config_entry("disable_synchronize_execution_providers", "1")
            opts.add_run_config_entry("gpu_graph_id", str(graph_id))
            self._static[graph_id] = (alloc, outs, (binding, opts))
        alloc, outs, (binding, opts) = self._static[graph_id]
        for n, t in feeds.items():
            if t.data_ptr() != alloc[n].data_ptr():
                alloc[n].copy_(t)
        self.session.run_with_iobinding(binding, opts)
        return outs


def _numpy(t: torch.Tensor, dtype: str) -> np.ndarray:
    """A CPU tensor as a numpy array of the graph's dtype (a view when it already is one)."""
    return t.detach().contiguous().numpy().astype(NP_DTYPES[dtype], copy=False)


class _Buckets:
    """Batch buckets: split at the largest, optionally pad up to the next one."""

    def __init__(self, sizes: list[int], pad: bool) -> None:
        self.sizes, self.pad = sorted(sizes), pad

    @property
    def largest(self) -> int:
        return self.sizes[-1]

    def size(self, n: int) -> int:
        """Rows to run for n ≤ largest real rows."""
        return self.sizes[bisect.bisect_left(self.sizes, n)] if self.pad else n

    def graph_id(self, rows: int) -> int:
        """1 + the bucket's index when `rows` is a bucket size (a CUDA graph), else −1."""
        i = bisect.bisect_left(self.sizes, rows)
        return i + 1 if self.pad and i < len(self.sizes) and self.sizes[i] == rows else -1


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """Pad dim 0 to `rows` with copies of row 0."""
    n = t.shape[0]
    return t if n == rows else torch.cat((t, t[:1].expand(rows - n, *t.shape[1:])))


def _row_chunks(n: int, size: int) -> list[slice]:
    return [slice(s, min(s + size, n)) for s in range(0, n, size)]


class OrtScoreNetwork:
    """Drop-in for `ScoreNetwork.__call__`: (z, context | None, alpha² (B,), drop_context) → v̂;
    for the student graph (z, context, alpha², None, cfg_scale) → v̂."""

    def __init__(self, graph: OrtGraph, buckets: _Buckets, latent_dim: int) -> None:
        self.graph, self.buckets, self.latent_dim = graph, buckets, latent_dim
        self.dtype = TORCH_DTYPES[graph.inputs["z"]["dtype"]]

    def __call__(
        self,
        z: torch.Tensor,
        context: torch.Tensor | None,
        alpha2: torch.Tensor,
        drop_context: torch.Tensor | None = None,
        cfg_scale: torch.Tensor | None = None,  # the student graph's guidance weight w
    ) -> torch.Tensor:
        n = z.shape[0]
        student = "cfg_scale" in self.graph.inputs
        if student != (cfg_scale is not None):
            raise ValueError(
                "cfg_scale is an input of the student graph only "
                f"(this graph takes {sorted(self.graph.inputs)})"
            )
        if student:
            if context is None or drop_context is not None:
                raise ValueError("the student graph takes a context and no drop_context")
            last_name, last = "cfg_scale", cfg_scale
        else:
            if context is None:
                context = torch.zeros_like(z)
                drop_context = torch.ones(n, dtype=torch.bool, device=z.device)
            elif drop_context is None:
                drop_context = torch.zeros(n, dtype=torch.bool, device=z.device)
            last_name, last = "drop_context", drop_context
        out = []
        for rows in _row_chunks(n, self.buckets.largest):
            b = self.buckets.size(rows.stop - rows.start)
            feeds = {
                "z": _pad_rows(z[rows], b),
                "context": _pad_rows(context[rows], b),
                "alpha2": _pad_rows(alpha2[rows], b),
                last_name: _pad_rows(last[rows], b),
            }
            v = self.graph.run(feeds, {"batch": b}, self.buckets.graph_id(b))["v"]
            out.append(v[: rows.stop - rows.start].clone())
        return torch.cat(out).to(z.device)


class OrtPromptGenerator:
    """Drop-in for `PromptGenerator.__call__`: (z (B, d), alpha² (B,)) → soft prompt (B, P, H)."""

    def __init__(self, graph: OrtGraph, buckets: _Buckets) -> None:
        self.graph, self.buckets = graph, buckets

    def __call__(self, z: torch.Tensor, alpha2: torch.Tensor) -> torch.Tensor:
        out = []
        for rows in _row_chunks(z.shape[0], self.buckets.largest):
            b = self.buckets.size(rows.stop - rows.start)
            feeds = {"z": _pad_rows(z[rows], b), "alpha2": _pad_rows(alpha2[rows], b)}
            out.append(self.graph.run(feeds, {"batch": b})["soft_prompt"][: rows.stop - rows.start])
        return torch.cat(out).to(z.device)


class OrtProbes:
    """Every probe row of the bundle: normalize(emb)·Wᵀ + b → logits (B, K) fp32."""

    def __init__(self, graph: OrtGraph, buckets: _Buckets) -> None:
        self.graph, self.buckets = graph, buckets

    def logits(self, embedding: torch.Tensor) -> torch.Tensor:
        out = []
        for rows in _row_chunks(embedding.shape[0], self.buckets.largest):
            b = self.buckets.size(rows.stop - rows.start)
            feeds = {"embedding": _pad_rows(embedding[rows].float(), b)}
            out.append(self.graph.run(feeds, {"batch": b})["logits"][: rows.stop - rows.start])
        return torch.cat(out)


# ------------------------------------------------------------------------------ decoder
@dataclass
class DecodeState:
    """One batch in flight over the static KV buffer."""

    rows: int  # real rows
    batch: int  # rows run (the bucket)
    k: torch.Tensor  # (L, batch, n_kv, S, Dh)
    v: torch.Tensor
    key_mask: torch.Tensor  # (batch, S) bool: filled slots
    next_pos: torch.Tensor  # (batch, 1) int64: position of the next token
    slot: int  # buffer slot of the next token
    slot_t: torch.Tensor  # (1,) int64, the same on the device


class OrtDecoder:
    """The prefill and decode graphs over a runtime-owned static KV buffer.

    Quacks like the torch decoders where the engine looks (hidden_size, vocab_size, max_context =
    the buffer's S slots, eos_token_ids, config.pad_token_id, device, dtype); `generate` has the
    contract of `dglm.engine.decoding.loop.generate`.
    """

    def __init__(
        self,
        prefill: OrtGraph,
        decode: OrtGraph,
        spec: dict,
        buckets: _Buckets,
        device: torch.device,
    ) -> None:
        self.prefill_graph, self.decode_graph = prefill, decode
        self.buckets, self.device = buckets, device
        self.hidden_size = spec["hidden_size"]
        self.vocab_size = spec["vocab_size"]
        self.max_context = spec["max_len"]  # S
        self.num_layers, self.num_kv_heads = spec["num_layers"], spec["num_kv_heads"]
        self.head_dim, self.prompt_len = spec["head_dim"], spec["prompt_len"]
        self.eos_token_ids = tuple(spec["eos_token_ids"])
        self.config = SimpleNamespace(pad_token_id=spec["pad_token_id"])
        self.dtype = TORCH_DTYPES[decode.inputs["k_cache"]["dtype"]]
        self._buffers: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def _kv(self, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Zeroed static buffers per batch size (stale slots stay finite: masked, never NaN)."""
        if batch not in self._buffers:
            shape = (self.num_layers, batch, self.num_kv_heads, self.max_context, self.head_dim)
            k = torch.zeros(shape, dtype=self.dtype, device=self.device)
            v = torch.zeros_like(k)
            slot = torch.zeros(1, dtype=torch.long, device=self.device)
            self._buffers[batch] = (k, v, slot)
        return self._buffers[batch]

    def start(
        self, prefix_ids: list[list[int]], soft_prompt: torch.Tensor, pad: int
    ) -> tuple[torch.Tensor, DecodeState]:
        """Prefill: left-padded prefixes then the soft prompt → (last logits (B, V), state)."""
        n, p = len(prefix_ids), soft_prompt.shape[1]
        if n > self.buckets.largest:
            raise ValueError(f"{n} rows exceed the largest batch bucket {self.buckets.largest}")
        batch = self.buckets.size(n)
        lens = [len(r) for r in prefix_ids]
        t_prefix = max(lens)
        t0 = t_prefix + p
        if t0 > self.max_context:
            raise ValueError(
                f"{t_prefix} prefix tokens + {p} soft-prompt vectors exceed the exported KV buffer "
                f"of {self.max_context} slots (export with a larger --max-len)"
            )
        ids = torch.full((n, t_prefix), pad, dtype=torch.long)
        key_mask = torch.zeros(n, self.max_context, dtype=torch.bool)
        for b, row in enumerate(prefix_ids):
            if row:
                ids[b, t_prefix - len(row) :] = torch.tensor(row, dtype=torch.long)
            key_mask[b, t_prefix - len(row) : t0] = True
        positions = (key_mask[:, :t0].long().cumsum(-1) - 1).clamp_min(0)  # (B, T0)
        next_pos = torch.tensor([[r + p] for r in lens], dtype=torch.long)
        ids, key_mask, positions, next_pos = (
            _pad_rows(t, batch).to(self.device) for t in (ids, key_mask, positions, next_pos)
        )
        soft = _pad_rows(soft_prompt.to(self.device), batch)
        out = self.prefill_graph.run(
            {
                "input_ids": ids,
                "soft_prompt": soft,
                "positions": positions,
                "key_mask": key_mask[:, :t0].contiguous(),
            },
            {"batch": batch, "prefix_len": t_prefix, "prefill_len": t0},
        )
        k, v, slot_t = self._kv(batch)
        k[:, :, :, :t0].copy_(out["k"])
        v[:, :, :, :t0].copy_(out["v"])
        state = DecodeState(n, batch, k, v, key_mask, next_pos, t0, slot_t)
        return out["logits"][:n], state

    def step(self, state: DecodeState, tokens: torch.Tensor) -> torch.Tensor:
        """One token per row (tokens (B,) long) → logits (B, V); stores its keys/values."""
        if state.slot >= self.max_context:
            raise ValueError(f"the KV buffer of {self.max_context} slots is full")
        s = state.slot
        state.key_mask[:, s] = True
        state.slot_t.fill_(s)
        ids = _pad_rows(tokens.to(self.device)[:, None], state.batch)
        out = self.decode_graph.run(
            {
                "input_ids": ids,
                "positions": state.next_pos,
                "slot": state.slot_t,
                "key_mask": state.key_mask,
                "k_cache": state.k,
                "v_cache": state.v,
            },
            {"batch": state.batch},
            self.buckets.graph_id(state.batch),
            in_place=("k_cache", "v_cache", "slot"),
        )
        state.k[:, :, :, s].copy_(out["k_new"][:, :, :, 0])
        state.v[:, :, :, s].copy_(out["v_new"][:, :, :, 0])
        state.next_pos += 1
        state.slot += 1
        logits = out["logits"][: state.rows]
        return logits.clone() if self.decode_graph.capture else logits  # static buffer: copy

    @torch.inference_mode()
    def generate(
        self,
        tokenizer,
        prefix_ids: list[list[int]],
        params: list[DecodeParams],
        soft_prompt: torch.Tensor,
    ) -> tuple[list[DecodeResult], dict[str, float]]:
        """`dglm.engine.decoding.loop.generate` on the exported graphs (same sampling, same results);
        batches above the largest bucket run in chunks of it."""
        n = len(prefix_ids)
        if n == 0:
            raise ValueError("prefix_ids is empty: pass at least one row")
        params = list(params) * n if len(params) == 1 and n > 1 else list(params)
        if len(params) != n:
            raise ValueError(f"params has {len(params)} entries for {n} rows of prefix_ids")
        if soft_prompt.ndim != 3 or soft_prompt.shape[0] != n:
            raise ValueError(
                f"soft_prompt has shape {tuple(soft_prompt.shape)}, expected ({n}, P, "
                f"{self.hidden_size})"
            )
        results: list[DecodeResult] = []
        timings = {"prefill_s": 0.0, "decode_s": 0.0, "decode_steps": 0.0}
        for rows in _row_chunks(n, self.buckets.largest):
            res, t = self._generate(tokenizer, prefix_ids[rows], params[rows], soft_prompt[rows])
            results += res
            for key in timings:
                timings[key] += t[key]
        return results, timings

    def _generate(self, tokenizer, prefix_ids, params, soft_prompt):
        B, device = len(prefix_ids), self.device
        eos = _eos_ids(self, tokenizer)
        pad = _pad_id(self, tokenizer, eos)
        max_new = max(p.max_new_tokens for p in params)
        total = max(len(r) for r in prefix_ids) + soft_prompt.shape[1] + max_new
        if total > self.max_context:
            raise ValueError(
                f"prefix + soft prompt + max_new_tokens={max_new} = {total} slots exceed the "
                f"exported KV buffer of {self.max_context} (export with a larger --max-len)"
            )
        t_start = time.perf_counter()
        # sampler settings, exactly as decoding.generate chooses them
        sampled_rows = [b for b, p in enumerate(params) if p.temperature > 0]
        sampled = [params[b] for b in sampled_rows]
        some_k = any(p.top_k > 0 for p in sampled)
        all_k = bool(sampled) and all(p.top_k > 0 for p in sampled)
        full_sort = any(p.top_p < 1 for p in sampled) or (some_k and not all_k)
        max_k = min(max(p.top_k for p in sampled), self.vocab_size) if all_k else 0
        temperature = torch.tensor([[p.temperature] for p in sampled], device=device)
        top_k = torch.tensor([[p.top_k] for p in sampled], dtype=torch.long, device=device)
        top_p = torch.tensor([[p.top_p] for p in sampled], device=device)
        rows = None if len(sampled) == B else torch.tensor(sampled_rows, device=device)
        generators = []
        for p in sampled:
            seed = p.seed if p.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
            generators.append(torch.Generator(device=device).manual_seed(seed))
        gumbel = torch.empty(len(sampled), self.vocab_size, device=device) if sampled else None
        eos_t = torch.tensor(eos or [-1], dtype=torch.long, device=device)
        out = torch.full((B, max_new), pad, dtype=torch.long, device=device)
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        row_max = [p.max_new_tokens for p in params]
        no_eos = [b for b, p in enumerate(params) if p.ignore_eos]
        no_eos_rows = torch.tensor(no_eos, device=device)[:, None] if no_eos and eos else None
        no_eos_ids = torch.tensor(eos, device=device)[None, :] if eos else None

        def next_tokens(logits: torch.Tensor) -> torch.Tensor:  # (B, V) → (B,)
            if no_eos_rows is not None:
                logits[no_eos_rows, no_eos_ids] = float("-inf")
            if gumbel is not None:
                for i, g in enumerate(generators):
                    gumbel[i].uniform_(generator=g)
                gumbel.log_().neg_().log_().neg_()  # −log(−log U)
            tok = sample_tokens(logits, gumbel, temperature, top_k, top_p, rows, max_k, full_sort)
            return tok.masked_fill_(finished, pad)

        logits, state = self.start(prefix_ids, soft_prompt.to(self.dtype), pad)
        tok = next_tokens(logits.float())
        out[:, 0] = tok
        finished |= torch.isin(tok, eos_t)
        _sync(device)
        t_prefill = time.perf_counter()
        steps = 1
        for step in range(1, max_new):
            if step % STOP_CHECK_EVERY == 0 and _check(
                out, finished, steps, row_max, params, tokenizer, eos
            ):
                break
            tok = next_tokens(self.step(state, tok).float())
            out[:, step] = tok
            finished |= torch.isin(tok, eos_t)
            steps += 1
        _sync(device)
        t_decode = time.perf_counter()
        results = _results(out[:, :steps].tolist(), row_max, params, tokenizer, eos)
        timings = {
            "prefill_s": t_prefill - t_start,
            "decode_s": t_decode - t_prefill,
            "decode_steps": float(steps - 1),
        }
        return results, timings


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------ all graphs
class OrtModels:
    """Every graph of an export directory, as sessions on one device."""

    def __init__(
        self,
        outdir: str | Path,
        device: str | torch.device = "cpu",
        options: RuntimeOptions | None = None,
        manifest: dict | None = None,
    ) -> None:
        self.root = Path(outdir)
        self.manifest = manifest if manifest is not None else read_manifest(self.root)
        self.device = torch.device(device)
        self.options = options = options or RuntimeOptions()
        pad = options.pad_batches if options.pad_batches is not None else self.device.type == "cuda"
        self.buckets = _Buckets(self.manifest["batch_buckets"], pad)
        graphs = self.manifest["graphs"]
        capture = options.cuda_graphs

        def graph(name: str, captured: bool = False) -> OrtGraph:
            return OrtGraph(self.root, graphs[name], self.device, options, captured and capture)

        self.score_net = OrtScoreNetwork(
            graph("score_network", True), self.buckets, self.manifest["latent_dim"]
        )
        self.student = None
        if "student" in graphs:
            self.student = OrtScoreNetwork(
                graph("student", True), self.buckets, self.manifest["latent_dim"]
            )
        self.prompt_gen = OrtPromptGenerator(graph("prompt_generator"), self.buckets)
        self.probes = OrtProbes(graph("probes"), self.buckets) if "probes" in graphs else None
        self.decoder = OrtDecoder(
            graph("prefill"),
            graph("decode", True),
            self.manifest["decoder"],
            self.buckets,
            self.device,
        )


class OnnxEngine(Engine):
    """The Engine with its networks and decoder on ONNX Runtime (see the module docstring).

    `generate` keeps the torch Engine's semantics step for step: same validation, seeds, sampler
    groups (`Engine._sample_group`, whose score network is the ORT one), re-noising, decode
    parameters and outputs.
    """

    def __init__(
        self,
        config: BundleConfig,
        encoder,
        models: OrtModels,
        probes: list,
        tokenizer,
        guided_update: str = "auto",
    ) -> None:
        self.config, self.encoder, self.models = config, encoder, models
        self.score_net, self.prompt_gen = models.score_net, models.prompt_gen
        self.decoder, self.tokenizer = models.decoder, tokenizer
        self.device = models.device
        self.dtype = models.score_net.dtype
        if encoder.dim != config.score_network.latent_dim:
            raise ValueError(
                f"encoder {config.encoder!r} is {encoder.dim}-d but the score network expects "
                f"{config.score_network.latent_dim}-d latents"
            )
        self.probes = ProbeSet(probes, encoder.dim, config.control_scale)
        self.guided_update = guided_update
        self.update_fn = select_guided_update(self.device, guided_update)
        self.captured = None  # the torch CUDA-graph sampler: here the ORT graphs capture instead
        self.student, self.captured_student = models.student, None
        self.decode_runner = None  # ORT decodes with its own graphs (OrtDecoder)
        if (config.student is None) != (models.student is None):
            raise ValueError(
                "the export's config and graphs disagree about the distilled student: re-export "
                "the bundle"
            )
        if not config.trained:
            logger.warning("bundle networks are untrained (random): outputs are not meaningful")

    @classmethod
    def from_exported(
        cls,
        outdir: str | Path,
        device: str | torch.device = "cpu",
        guided_update: str = "auto",
        options: RuntimeOptions | None = None,
    ) -> OnnxEngine:
        from dglm.engine.encode.encoder import SentenceEncoder
        from transformers import AutoTokenizer

        root = Path(outdir)
        manifest = read_manifest(root)
        config = BundleConfig.from_dict(manifest["bundle"]["config"])
        models = OrtModels(root, device, options, manifest)
        probes_file = manifest.get("probes_file")
        probes = load_probes(_inside(root, probes_file, "probes_file")) if probes_file else []
        tokenizer = AutoTokenizer.from_pretrained(
            str(_inside(root, manifest["tokenizer"], "tokenizer"))
        )
        encoder = SentenceEncoder(manifest["encoder"]["reference"], device=models.device)
        logger.info("loaded ONNX export %s (%s, %d probes)", root, manifest["dtype"], len(probes))
        return cls(config, encoder, models, probes, tokenizer, guided_update)

    def save_pretrained(self, path: str | Path) -> None:
        raise NotImplementedError("an ONNX engine has no bundle to save; export from the bundle")

    def validate(self, prompts: list[str], params: list[GenerationParams]) -> list[list[int]]:
        prefix_ids = super().validate(prompts, params)
        for p in params:
            if p.controls and p.sampler_config(self.config.sampler).guidance_mode == "exact":
                raise ValueError(
                    "guidance_mode='exact' differentiates through the score network, which the "
                    "ONNX backend cannot; use guidance_mode='fast' or backend='torch'"
                )
        return prefix_ids

    def _decode(self, prefix_ids: list[list[int]], params: list, soft_prompt: torch.Tensor):
        """Engine.generate runs unchanged; only its decoding stage runs on ONNX Runtime."""
        return self.decoder.generate(self.tokenizer, prefix_ids, params, soft_prompt)

    def info(self) -> dict:
        m = self.models.manifest
        return {
            "backend": "onnx",
            "export": str(self.models.root),
            "encoder": self.config.encoder,
            "decoder": self.config.decoder,
            "latent_dim": self.encoder.dim,
            "decoder_width": self.decoder.hidden_size,
            "decoder_context": self.decoder.max_context,
            "score_network": dict(self.config.score_network.__dict__),
            "prompt_generator": dict(self.config.prompt_generator.__dict__),
            "sampler": self.config.sampler.__dict__,
            "cfg_scale": self.config.cfg_scale,
            "trained": self.config.trained,
            "probes": {
                name: {"labels": list(p.labels), "metrics": p.metrics}
                for name, p in self.probes.probes.items()
            },
            "guided_update": getattr(self.update_fn, "__name__", str(self.update_fn)),
            "device": str(self.device),
            "dtype": m["dtype"],
            "opset": m["opset"],
            "batch_buckets": m["batch_buckets"],
        }
