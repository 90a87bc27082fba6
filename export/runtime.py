"""ONNX Runtime backend: the graphs written by `dglm.export.onnx` driving the Engine.

    engine = Engine.from_pretrained(OUTDIR, backend="onnx")                 # CPU execution provider
    engine = Engine.from_pretrained(OUTDIR, backend="onnx", device="cuda")  # CUDA EP: I/O binding,
                                                                            # CUDA graphs per bucket
What runs where: the score network, the prompt generator and the decoder (prefill + decode) run in
ONNX Runtime; the sentence encoder (sentence-transformers), the tokenizer, the sampler loop with the
fused guided update, and the decode loop with its token sampling stay in PyTorch/Python: the
Engine is the same object on both backends (`load_export` hands it these graphs in place of its
networks, `OrtDecoder` is a step backend of the one decode loop), so a seed gives the same tokens
on both. `exact` probe guidance differentiates through the score network and is refused here (use
`fast`, or backend="torch").

Batches run in the manifest's batch buckets: a batch is split at the largest bucket and, on CUDA
(or with `pad_batches=True`), rounded up to a bucket with `bisect` (padding rows copy row 0 and are
sliced off). On CUDA every captured graph reads and writes static torch buffers, one set per bucket,
bound once through I/O binding on torch's current stream; each bucket is its own ORT CUDA graph
(`gpu_graph_id`). The KV buffer (L, B, n_kv, S, Dh) belongs to the runtime: the decode graph
returns the new key/value and the runtime stores it at the step's slot.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from dglm.engine.bundle import BundleConfig
from dglm.engine.decoding.buckets import bucket_index, pad_rows, round_up, row_chunks
from dglm.engine.decoding.loop import generate as decode_loop
from dglm.engine.decoding.padding import PaddedBatch
from dglm.engine.decoding.sampling import DecodeParams, DecodeResult
from dglm.engine.encode.encoder import SentenceEncoder
from dglm.engine.models.base import HiddenHook
from dglm.engine.models.loading import load_tokenizer
from dglm.engine.probes import Probe, load_probes

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
    # onnxruntime is an optional extra: imported when an ONNX graph is loaded
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
    import onnx  # optional extra, like onnxruntime: imported when a graph is checked

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


class Buckets:
    """The export's batch buckets: a batch is split at the largest and, with `pad`, rounded up to
    a bucket (`decoding.buckets`); each bucket is its own captured graph."""

    def __init__(self, sizes: list[int], pad: bool) -> None:
        self.sizes, self.pad = sorted(sizes), pad

    @property
    def largest(self) -> int:
        return self.sizes[-1]

    def size(self, n: int) -> int:
        """Rows to run for n ≤ largest real rows."""
        return round_up(self.sizes, n, "the export's --batch-buckets") if self.pad else n

    def graph_id(self, rows: int) -> int:
        """1 + the bucket's index when `rows` is a bucket size (a CUDA graph), else −1."""
        i = bucket_index(self.sizes, rows)
        return i + 1 if self.pad and i >= 0 else -1


class OrtScoreNetwork:
    """Drop-in for `ScoreNetwork.__call__`: (z, context | None, alpha² (B,), drop_context) → v̂;
    for the student graph (z, context, alpha², None, cfg_scale) → v̂."""

    def __init__(self, graph: OrtGraph, buckets: Buckets, latent_dim: int) -> None:
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
        for rows in row_chunks(n, self.buckets.largest):
            b = self.buckets.size(rows.stop - rows.start)
            feeds = {
                "z": pad_rows(z[rows], b),
                "context": pad_rows(context[rows], b),
                "alpha2": pad_rows(alpha2[rows], b),
                last_name: pad_rows(last[rows], b),
            }
            v = self.graph.run(feeds, {"batch": b}, self.buckets.graph_id(b))["v"]
            out.append(v[: rows.stop - rows.start].clone())
        return torch.cat(out).to(z.device)


class OrtPromptGenerator:
    """Drop-in for `PromptGenerator.__call__`: (z (B, d), alpha² (B,)) → soft prompt (B, P, H)."""

    def __init__(self, graph: OrtGraph, buckets: Buckets) -> None:
        self.graph, self.buckets = graph, buckets

    def __call__(self, z: torch.Tensor, alpha2: torch.Tensor) -> torch.Tensor:
        out = []
        for rows in row_chunks(z.shape[0], self.buckets.largest):
            b = self.buckets.size(rows.stop - rows.start)
            feeds = {"z": pad_rows(z[rows], b), "alpha2": pad_rows(alpha2[rows], b)}
            out.append(self.graph.run(feeds, {"batch": b})["soft_prompt"][: rows.stop - rows.start])
        return torch.cat(out).to(z.device)


class OrtProbes:
    """Every probe row of the bundle: normalize(emb)·Wᵀ + b → logits (B, K) fp32."""

    def __init__(self, graph: OrtGraph, buckets: Buckets) -> None:
        self.graph, self.buckets = graph, buckets

    def logits(self, embedding: torch.Tensor) -> torch.Tensor:
        out = []
        for rows in row_chunks(embedding.shape[0], self.buckets.largest):
            b = self.buckets.size(rows.stop - rows.start)
            feeds = {"embedding": pad_rows(embedding[rows].float(), b)}
            out.append(self.graph.run(feeds, {"batch": b})["logits"][: rows.stop - rows.start])
        return torch.cat(out)


class OrtValueEdit:
    """RE-Control's edit by one value network (value_<probe>.onnx): (hidden (R, H), coef (R, K),
    steps (R,), step_size (R,)) → edited hidden (R, H) fp32, as `methods.re_control.value_ascent`;
    a request's steps may not exceed the graph's unrolled `max_steps`."""

    def __init__(self, graph: OrtGraph, buckets: Buckets, max_steps: int) -> None:
        self.graph, self.buckets, self.max_steps = graph, buckets, max_steps

    def __call__(
        self, hidden: torch.Tensor, coef: torch.Tensor, steps: torch.Tensor, step_size: torch.Tensor
    ) -> torch.Tensor:
        if steps.numel() and int(steps.max()) > self.max_steps:
            raise ValueError(
                f"re_control_steps {int(steps.max())} exceeds the {self.max_steps} steps the "
                f"exported graph {self.graph.name!r} unrolls (re-export with a larger "
                "re_control_max_steps)"
            )
        out = []
        for rows in row_chunks(hidden.shape[0], self.buckets.largest):
            n = rows.stop - rows.start
            b = self.buckets.size(n)
            feeds = {
                "hidden": pad_rows(hidden[rows].float(), b),
                "coef": pad_rows(coef[rows].float(), b),
                "steps": pad_rows(steps[rows].long(), b),
                "step_size": pad_rows(step_size[rows].float(), b),
            }
            out.append(self.graph.run(feeds, {"batch": b})["hidden_out"][:n])
        return torch.cat(out)


# ------------------------------------------------------------------------------ decoder
class OrtDecoder:
    """The prefill and decode graphs over a runtime-owned static KV buffer: a step backend of the
    one decode loop (`dglm.engine.decoding.loop.StepBackend`: can_run, start, step).

    Quacks like the torch decoders where the loop and the engine look (hidden_size, vocab_size,
    max_context = the buffer's S slots, eos_token_ids, config.pad_token_id, device, dtype). The
    graphs end at the LM head: no hidden-state hook (can_run says no).
    """

    def __init__(
        self,
        prefill: OrtGraph,
        decode: OrtGraph,
        spec: dict,
        buckets: Buckets,
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
        self.max_batch = buckets.largest
        self.split_batches = True  # the loop runs larger batches in chunks of the largest bucket
        self._buffers: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        # the batch in flight, set by start()
        self.rows = self.batch = self.slot = 0  # real rows, rows run (the bucket), next slot
        self.k = self.v = self.key_mask = self.next_pos = self.slot_t = None

    def _kv(self, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Zeroed static buffers per batch size (stale slots stay finite: masked, never NaN)."""
        if batch not in self._buffers:
            shape = (self.num_layers, batch, self.num_kv_heads, self.max_context, self.head_dim)
            k = torch.zeros(shape, dtype=self.dtype, device=self.device)
            v = torch.zeros_like(k)
            slot = torch.zeros(1, dtype=torch.long, device=self.device)
            self._buffers[batch] = (k, v, slot)
        return self._buffers[batch]

    def can_run(self, batch_size: int, slots: int, hooked: object = False) -> bool:
        return not hooked and batch_size <= self.max_batch and slots <= self.max_context

    def start(self, batch: PaddedBatch, hidden_hook: HiddenHook | None = None) -> torch.Tensor:
        """Prefill: left-padded prefixes then the soft prompt → last logits (B, V) fp32; the batch
        is padded up to its bucket (rows copy row 0) and stays in flight for `step`."""
        if hidden_hook is not None:
            raise ValueError(
                "the ONNX decode graphs end at the LM head, so RE-Control's edit of the hidden "
                "states (a hidden-state hook) is not applied on backend='onnx' (the value networks "
                "are exported as value_<probe>.onnx for runtimes that wire it in): use "
                "backend='torch'"
            )
        if batch.soft_prompt is None:
            raise ValueError(f"the exported prefill graph needs a soft prompt ({self.prompt_len} "
                             "vectors per row)")  # fmt: skip
        n, t0 = batch.batch_size, batch.prefill_len
        if n > self.max_batch:
            raise ValueError(f"{n} rows exceed the largest batch bucket {self.max_batch}")
        if t0 > self.max_context:
            raise ValueError(
                f"{t0} prefix tokens and soft-prompt vectors exceed the exported KV buffer of "
                f"{self.max_context} slots (export with a larger --max-len)"
            )
        rows = self.buckets.size(n)
        key_mask = torch.zeros(n, self.max_context, dtype=torch.bool, device=batch.ids.device)
        key_mask[:, :t0] = batch.key_mask[:, :t0]  # (B, S): filled slots only
        ids, key_mask, positions, next_pos = (
            pad_rows(t, rows).to(self.device)
            for t in (batch.ids, key_mask, batch.positions, batch.next_positions())
        )
        soft = pad_rows(batch.soft_prompt.to(self.device, self.dtype), rows)
        out = self.prefill_graph.run(
            {
                "input_ids": ids,
                "soft_prompt": soft,
                "positions": positions,
                "key_mask": key_mask[:, :t0].contiguous(),
            },
            {"batch": rows, "prefix_len": ids.shape[1], "prefill_len": t0},
        )
        self.k, self.v, self.slot_t = self._kv(rows)
        self.k[:, :, :, :t0].copy_(out["k"])
        self.v[:, :, :, :t0].copy_(out["v"])
        self.rows, self.batch, self.slot = n, rows, t0
        self.key_mask, self.next_pos = key_mask, next_pos
        return out["logits"][:n].float()

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """One token per row (tokens (B,) long) → logits (B, V) fp32; stores its keys/values."""
        if self.slot >= self.max_context:
            raise ValueError(f"the KV buffer of {self.max_context} slots is full")
        s = self.slot
        self.key_mask[:, s] = True
        self.slot_t.fill_(s)
        ids = pad_rows(tokens.to(self.device)[:, None], self.batch)
        out = self.decode_graph.run(
            {
                "input_ids": ids,
                "positions": self.next_pos,
                "slot": self.slot_t,
                "key_mask": self.key_mask,
                "k_cache": self.k,
                "v_cache": self.v,
            },
            {"batch": self.batch},
            self.buckets.graph_id(self.batch),
            in_place=("k_cache", "v_cache", "slot"),
        )
        self.k[:, :, :, s].copy_(out["k_new"][:, :, :, 0])
        self.v[:, :, :, s].copy_(out["v_new"][:, :, :, 0])
        self.next_pos += 1
        self.slot += 1
        logits = out["logits"][: self.rows].float()
        return logits.clone() if self.decode_graph.capture else logits  # static buffer: copy

    def generate(
        self,
        tokenizer,
        prefix_ids: list[list[int]],
        params: list[DecodeParams],
        soft_prompt: torch.Tensor,
    ) -> tuple[list[DecodeResult], dict[str, float]]:
        """The one decode loop (`dglm.engine.decoding.loop.generate`) on these graphs."""
        return decode_loop(self, tokenizer, prefix_ids, params, soft_prompt, runner=self)


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
        self.buckets = Buckets(self.manifest["batch_buckets"], pad)
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
        self.value_edits = {
            probe: OrtValueEdit(graph(v["graph"]), self.buckets, int(v["max_steps"]))
            for probe, v in self.manifest.get("value_networks", {}).items()
        }
        self.decoder = OrtDecoder(
            graph("prefill"),
            graph("decode", True),
            self.manifest["decoder"],
            self.buckets,
            self.device,
        )

    def info(self) -> dict:
        """What the engine's info() adds for an ONNX export."""
        m = self.manifest
        return {
            "export": str(self.root),
            "dtype": m["dtype"],
            "opset": m["opset"],
            "batch_buckets": m["batch_buckets"],
            "value_edit_graphs": sorted(self.value_edits),
        }


@dataclass
class OnnxExport:
    """An export directory loaded for `Engine.from_pretrained(..., backend="onnx")`."""

    config: BundleConfig  # the source bundle's config
    models: OrtModels  # every graph, as sessions
    probes: list[Probe]
    tokenizer: object
    encoder: SentenceEncoder  # not exported: runs in PyTorch


def load_export(
    outdir: str | Path,
    device: str | torch.device = "cpu",
    options: RuntimeOptions | None = None,
) -> OnnxExport:
    """Everything an Engine needs from a `dglm export onnx` directory."""
    root = Path(outdir)
    manifest = read_manifest(root)
    config = BundleConfig.from_dict(manifest["bundle"]["config"])
    models = OrtModels(root, device, options, manifest)
    if (config.student is None) != (models.student is None):
        raise ValueError(
            "the export's config and graphs disagree about the distilled student: re-export "
            "the bundle"
        )
    probes_file = manifest.get("probes_file")
    probes = load_probes(_inside(root, probes_file, "probes_file")) if probes_file else []
    tokenizer = load_tokenizer(_inside(root, manifest["tokenizer"], "tokenizer"))
    if tokenizer is None:
        raise ValueError(f"the export in {str(root)!r} has no tokenizer: re-export the bundle")
    encoder = SentenceEncoder(manifest["encoder"]["reference"], device=models.device)
    logger.info("loaded ONNX export %s (%s, %d probes)", root, manifest["dtype"], len(probes))
    return OnnxExport(config, models, probes, tokenizer, encoder)
