"""`dglm export onnx BUNDLE OUTDIR`: a bundle as ONNX graphs plus a manifest, validated against
PyTorch on real inputs before the manifest is written.

    OUTDIR/manifest.json          graphs with their inputs/outputs (names, shapes, dtypes), opset,
                                  dtype, batch buckets, decoder geometry, the source bundle (path,
                                  config sha256, config), the validation results
    OUTDIR/score_network.onnx     (z, context, alpha2, drop_context) → v; the CFG pair is batched
                                  by the caller (drop_context marks the null-context rows)
    OUTDIR/student.onnx           (z, context, alpha2, cfg_scale) → v: the distilled student
                                  (bundles with one; w is an input, one row per request)
    OUTDIR/prompt_generator.onnx  (z, alpha2) → soft_prompt
    OUTDIR/probes.onnx            (embedding) → logits over every probe row (bundles with probes)
    OUTDIR/value_<probe>.onnx     (hidden, coef, steps, step_size) → hidden: RE-Control's edit by
                                  that probe's value network, unrolled for re_control_max_steps
                                  (bundles with value networks; fp32 whatever the dtype)
    OUTDIR/prefill.onnx           (input_ids, soft_prompt, positions, key_mask) → (logits, k, v)
    OUTDIR/decode.onnx            (input_ids, positions, slot, key_mask, k_cache, v_cache)
                                  → (logits, k_new, v_new), every dimension static but the batch
    OUTDIR/decoder.weights        the decoder graphs' weights, each tensor stored once (external data)
    OUTDIR/probes.safetensors, OUTDIR/tokenizer/

The sentence encoder is not exported: it runs in PyTorch (sentence-transformers) in both backends,
named by the manifest. Graphs are traced with torch.onnx's TorchScript exporter at a pinned opset
(the dynamo exporter takes ~15 s per graph on the CPU machines here against < 1 s). Graph
modules: `dglm.export.modules`; the runtime: `dglm.export.runtime`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from dglm.engine import bundle as bundle_io
from dglm.engine.api import MAX_RE_CONTROL_STEPS
from dglm.engine.decoding.loop import ReferenceStep
from dglm.engine.decoding.loop import generate as torch_generate
from dglm.engine.decoding.padding import left_pad
from dglm.engine.decoding.sampling import DecodeParams, eos_ids, pad_id
from dglm.engine.diffusion.score_network import ScoreNetwork
from dglm.engine.encode.encoder import SentenceEncoder
from dglm.engine.methods.re_control import value_ascent
from dglm.engine.models.llama import LlamaDecoder
from dglm.engine.probes import ProbeSet
from dglm.engine.prompt.generator import PromptGenerator
from dglm.export.modules import (
    DecodeGraph,
    PrefillGraph,
    ProbesGraph,
    PromptGenGraph,
    ScoreNetGraph,
    ValueEditGraph,
)
from dglm.export.runtime import FORMAT, MANIFEST, VERSION, OrtModels, RuntimeOptions

logger = logging.getLogger(__name__)

OPSET = 18
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
RTOL = {"fp32": 1e-4, "fp16": 1e-2}  # max |ORT − PyTorch fp32| / max |PyTorch fp32|, per output
DEFAULT_BUCKETS = (1, 2, 4, 8)
DEFAULT_MAX_LEN = 256
DECODER_WEIGHTS = "decoder.weights"
# a graph with more weight bytes than this keeps them in external data (protobuf caps at 2 GB)
INLINE_LIMIT = 1 << 30
EXTERNAL_MIN_BYTES = 1024  # smaller tensors stay inline even in externalised graphs
VALIDATION_PROMPTS = (
    "The movie was",
    "I think that the food at this place",
    "Prices are rising while the weather",
)


@dataclass(frozen=True)
class ExportConfig:
    dtype: str = "fp32"  # "fp32" | "fp16": weights and activations (probes and logits stay fp32)
    batch_buckets: tuple[int, ...] = DEFAULT_BUCKETS  # batch sizes the runtime pads up to
    max_len: int = DEFAULT_MAX_LEN  # S: static KV slots (prefix + soft prompt + new tokens)
    opset: int = OPSET  # ONNX opset of every graph
    inline_limit: int = INLINE_LIMIT  # weight bytes above which a small graph goes external too
    validate: bool = True  # compare against PyTorch on real inputs; raise on mismatch
    validation_prompts: tuple[str, ...] = VALIDATION_PROMPTS  # prefixes for the decoder checks
    validation_tokens: int = 8  # greedy tokens compared per prompt
    rtol: float | None = None  # normwise relative tolerance; None: 1e-4 fp32, 1e-2 fp16
    seed: int = 0  # validation inputs
    re_control_max_steps: int = 64  # the value-edit graphs' unrolled steps (a request's n ≤ this)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        buckets = tuple(self.batch_buckets)
        if not buckets or any(not isinstance(b, int) or b < 1 for b in buckets):
            raise ValueError(f"batch_buckets must be positive integers, got {self.batch_buckets!r}")
        object.__setattr__(self, "batch_buckets", tuple(sorted(set(buckets))))
        if not isinstance(self.max_len, int) or self.max_len < 2:
            raise ValueError(f"max_len must be an integer ≥ 2, got {self.max_len!r}")
        if not isinstance(self.opset, int) or not 17 <= self.opset <= 21:
            raise ValueError(f"opset must be an integer in [17, 21], got {self.opset!r}")
        if not self.validation_prompts or not all(
            isinstance(p, str) and p.strip() for p in self.validation_prompts
        ):
            raise ValueError("validation_prompts must be non-empty strings")
        if not isinstance(self.validation_tokens, int) or self.validation_tokens < 2:
            raise ValueError(f"validation_tokens must be ≥ 2, got {self.validation_tokens!r}")
        n = self.re_control_max_steps
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_RE_CONTROL_STEPS:
            raise ValueError(
                f"re_control_max_steps must be an integer in [1, {MAX_RE_CONTROL_STEPS}], got {n!r}"
            )
        if self.rtol is not None and not (math.isfinite(self.rtol) and self.rtol > 0):
            raise ValueError(f"rtol must be a positive number or None, got {self.rtol!r}")

    @property
    def tolerance(self) -> float:
        return self.rtol if self.rtol is not None else RTOL[self.dtype]


class ExportValidationError(RuntimeError):
    """ONNX Runtime disagrees with PyTorch beyond the tolerance; the export is not usable."""


# ------------------------------------------------------------------------------ graph specs
def _io(name: str, shape: list, dtype: str) -> dict:
    return {"name": name, "shape": shape, "dtype": dtype}


def value_edit_spec(hidden: int, outputs: int) -> dict:
    """Inputs/outputs of a value-edit graph (fp32 whatever the export dtype)."""
    return {
        "inputs": [
            _io("hidden", ["batch", hidden], "float32"),
            _io("coef", ["batch", outputs], "float32"),
            _io("steps", ["batch"], "int64"),
            _io("step_size", ["batch"], "float32"),
        ],
        "outputs": [_io("hidden_out", ["batch", hidden], "float32")],
    }


def graph_specs(dims: dict, dt: str) -> dict[str, dict]:
    """Inputs/outputs of every graph; strings are symbolic dimensions."""
    d, p, h, k = dims["latent_dim"], dims["prompt_len"], dims["hidden_size"], dims["probe_rows"]
    L, nkv, S, dh, V = (
        dims[n] for n in ("num_layers", "num_kv_heads", "max_len", "head_dim", "vocab")
    )
    kv = lambda n, t: _io(n, [L, "batch", nkv, t, dh], dt)  # noqa: E731
    return {
        "score_network": {
            "inputs": [
                _io("z", ["batch", d], dt),
                _io("context", ["batch", d], dt),
                _io("alpha2", ["batch"], dt),
                _io("drop_context", ["batch"], "bool"),
            ],
            "outputs": [_io("v", ["batch", d], dt)],
        },
        "student": {
            "inputs": [
                _io("z", ["batch", d], dt),
                _io("context", ["batch", d], dt),
                _io("alpha2", ["batch"], dt),
                _io("cfg_scale", ["batch"], dt),
            ],
            "outputs": [_io("v", ["batch", d], dt)],
        },
        "prompt_generator": {
            "inputs": [_io("z", ["batch", d], dt), _io("alpha2", ["batch"], dt)],
            "outputs": [_io("soft_prompt", ["batch", p, h], dt)],
        },
        "probes": {
            "inputs": [_io("embedding", ["batch", d], "float32")],
            "outputs": [_io("logits", ["batch", k], "float32")],
        },
        "prefill": {
            "inputs": [
                _io("input_ids", ["batch", "prefix_len"], "int64"),
                _io("soft_prompt", ["batch", p, h], dt),
                _io("positions", ["batch", "prefill_len"], "int64"),
                _io("key_mask", ["batch", "prefill_len"], "bool"),
            ],
            "outputs": [
                _io("logits", ["batch", V], "float32"),
                kv("k", "prefill_len"),
                kv("v", "prefill_len"),
            ],
        },
        "decode": {
            "inputs": [
                _io("input_ids", ["batch", 1], "int64"),
                _io("positions", ["batch", 1], "int64"),
                _io("slot", [1], "int64"),
                _io("key_mask", ["batch", S], "bool"),
                kv("k_cache", S),
                kv("v_cache", S),
            ],
            "outputs": [
                _io("logits", ["batch", V], "float32"),
                kv("k_new", 1),
                kv("v_new", 1),
            ],
        },
    }


def example_inputs(spec: dict, sizes: dict[str, int], gen: torch.Generator, vocab: int) -> tuple:
    """Tracing inputs: symbolic dimensions at `sizes` (distinct from every static size)."""
    dtypes = {"float32": torch.float32, "float16": torch.float16}
    out = []
    for io in spec["inputs"]:
        shape = [sizes[s] if isinstance(s, str) else s for s in io["shape"]]
        if io["dtype"] == "int64":
            t = torch.randint(0, max(1, min(vocab, sizes["prefix_len"])), shape, generator=gen)
        elif io["dtype"] == "bool":
            t = torch.ones(shape, dtype=torch.bool)
        else:
            t = torch.rand(shape, generator=gen).to(dtypes[io["dtype"]])
        out.append(t)
    return tuple(out)


# ------------------------------------------------------------------------------ writing
def export_graph(module: torch.nn.Module, args: tuple, spec: dict, opset: int, tmp: Path):
    """Trace `module` into a ModelProto (weights loaded in memory) whose I/O match `spec`."""
    import onnx  # optional extra (dglm-engine[onnx]): imported when exporting

    names_in = [i["name"] for i in spec["inputs"]]
    names_out = [o["name"] for o in spec["outputs"]]
    dynamic = {}
    for io in spec["inputs"] + spec["outputs"]:
        axes = {i: s for i, s in enumerate(io["shape"]) if isinstance(s, str)}
        if axes:
            dynamic[io["name"]] = axes
    path = tmp / "graph.onnx"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(),
            args,
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=names_in,
            output_names=names_out,
            dynamic_axes=dynamic,
            do_constant_folding=True,
        )
    model = onnx.load(str(path))  # loads external data too (graphs over 2 GB)
    for f in tmp.iterdir():
        f.unlink()
    # the manifest's shapes, written onto the graph's inputs and outputs
    for value, io in zip(
        list(model.graph.input) + list(model.graph.output),
        spec["inputs"] + spec["outputs"],
        strict=True,
    ):
        assert value.name == io["name"], (value.name, io["name"])
        dims = value.type.tensor_type.shape.dim
        assert len(dims) == len(io["shape"]), (io, dims)
        for dim, s in zip(dims, io["shape"], strict=True):
            if isinstance(s, str):
                dim.dim_param = s
            else:
                dim.dim_value = s
    return model


def _externalize(models: list, location: str, path: Path, min_bytes: int) -> int:
    """Move initializers of ≥ min_bytes into one file, each distinct tensor stored once (graphs
    exported from the same weights share them). Returns the file's size."""
    import onnx  # optional extra (dglm-engine[onnx]): imported when exporting
    from onnx import numpy_helper  # optional extra (dglm-engine[onnx]): imported when exporting

    stored: dict[bytes, tuple[int, int]] = {}
    with open(path, "wb") as f:
        for model in models:
            for t in model.graph.initializer:
                raw = numpy_helper.to_array(t).tobytes()
                if len(raw) < min_bytes:
                    continue
                key = hashlib.sha256(raw).digest() + bytes(str((t.data_type, list(t.dims))), "utf8")
                if key not in stored:
                    f.write(b"\0" * (-f.tell() % 64))  # 64-byte aligned offsets
                    stored[key] = (f.tell(), len(raw))
                    f.write(raw)
                offset, length = stored[key]
                for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data"):
                    t.ClearField(field)
                t.data_location = onnx.TensorProto.EXTERNAL
                del t.external_data[:]
                for k, v in (("location", location), ("offset", offset), ("length", length)):
                    entry = t.external_data.add()
                    entry.key, entry.value = k, str(v)
        return f.tell()


def _weight_bytes(model) -> int:
    from onnx import numpy_helper  # optional extra (dglm-engine[onnx]): imported when exporting

    return sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer)


def _save(model, path: Path, name: str, provenance: dict) -> None:
    import onnx  # optional extra (dglm-engine[onnx]): imported when exporting

    model.producer_name = "dglm-engine"
    model.doc_string = f"dglm {name} graph"
    for k, v in {"dglm_graph": name, **provenance}.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, str(v)
    onnx.save(model, str(path))
    onnx.checker.check_model(str(path))


def _absolute(reference: str) -> str:
    """A reference that is a path, made absolute (the export directory lives elsewhere)."""
    return str(Path(reference).resolve()) if Path(reference).exists() else reference


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# ------------------------------------------------------------------------------ export
def export_onnx(
    bundle: str | Path,
    outdir: str | Path,
    config: ExportConfig | None = None,
    encoder=None,
) -> dict:
    """Export `bundle` into `outdir` and validate it; returns the manifest (also written).

    encoder: a loaded `SentenceEncoder` to reuse for the validation inputs (else loaded).
    Raises ExportValidationError (and writes no manifest) when ONNX Runtime disagrees.
    """
    import onnx  # optional extra: the export needs it, the torch engine does not

    config = config or ExportConfig()
    t_start = time.perf_counter()
    bundle_dir = bundle_io.resolve_bundle_dir(bundle)
    bcfg = bundle_io.read_config(bundle_dir)
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # a failed export must not look loadable

    # PyTorch modules: fp32 references, and copies in the export dtype to trace
    dt = DTYPES[config.dtype]
    score_net = ScoreNetwork(bcfg.score_network)
    bundle_io.load_state(score_net, bundle_dir / bundle_io.SCORE_NET_FILE)
    prompt_gen = PromptGenerator(bcfg.prompt_generator)
    bundle_io.load_state(prompt_gen, bundle_dir / bundle_io.PROMPT_GEN_FILE)
    score_net.eval()
    prompt_gen.eval()
    student = None
    if bcfg.student is not None:
        student = ScoreNetwork(bcfg.student)
        bundle_io.load_state(student, bundle_dir / bundle_io.STUDENT_FILE)
        student.eval()
    probes = bundle_io.load_bundle_probes(bundle_dir)
    probe_set = ProbeSet(probes, bcfg.score_network.latent_dim)
    value_nets = bundle_io.load_value_networks(bcfg, bundle_dir)
    decoder_ref = bundle_io.resolve_reference(bcfg.decoder, bundle_dir)
    decoder, tokenizer = bundle_io.load_bundle_decoder(bcfg, bundle_dir)
    if tokenizer is None:
        raise ValueError(f"decoder {bcfg.decoder!r} has no tokenizer; the export needs one")
    if decoder.hidden_size != bcfg.prompt_generator.decoder_dim:
        raise ValueError(
            f"decoder {bcfg.decoder!r} has width {decoder.hidden_size} but the prompt generator "
            f"emits {bcfg.prompt_generator.decoder_dim}-d vectors"
        )
    max_len = min(config.max_len, decoder.max_context)
    if max_len <= bcfg.prompt_generator.prompt_len + 1:
        raise ValueError(
            f"max_len={max_len} leaves no room after the {bcfg.prompt_generator.prompt_len} "
            "soft-prompt vectors; raise --max-len"
        )
    if dt == torch.float32:
        sn_x, pg_x, dec_x, st_x = score_net, prompt_gen, decoder, student
    else:
        sn_x, pg_x = copy.deepcopy(score_net).to(dt), copy.deepcopy(prompt_gen).to(dt)
        st_x = None if student is None else copy.deepcopy(student).to(dt)
        dec_x = copy.deepcopy(decoder).to(dt)
        dec_x.reset_buffers()  # RoPE tables from fp32, as load_decoder(dtype=fp16) makes them

    dims = {
        "latent_dim": bcfg.score_network.latent_dim,
        "prompt_len": bcfg.prompt_generator.prompt_len,
        "hidden_size": decoder.hidden_size,
        "probe_rows": probe_set.num_rows,
        "num_layers": decoder.num_layers,
        "num_kv_heads": decoder.num_kv_heads,
        "head_dim": decoder.head_dim,
        "max_len": max_len,
        "vocab": decoder.vocab_size,
    }
    dt_name = {"fp32": "float32", "fp16": "float16"}[config.dtype]
    specs = graph_specs(dims, dt_name)
    modules = {
        "score_network": ScoreNetGraph(sn_x),
        "prompt_generator": PromptGenGraph(pg_x),
        "prefill": PrefillGraph(dec_x, max_len),
        "decode": DecodeGraph(dec_x, max_len),
    }
    if probe_set.num_rows:
        modules["probes"] = ProbesGraph(probe_set.weight, probe_set.bias)
    if st_x is not None:
        modules["student"] = ScoreNetGraph(st_x)
    for probe, net in value_nets.items():
        name = f"value_{probe}"
        specs[name] = value_edit_spec(decoder.hidden_size, net.config.outputs)
        modules[name] = ValueEditGraph(net, config.re_control_max_steps)
    # tracing sizes: distinct from one another and from every static size
    p = dims["prompt_len"]
    sizes = {"batch": 3, "prefix_len": 5, "prefill_len": 5 + p}
    gen = torch.Generator().manual_seed(config.seed)
    config_sha = _sha256(bundle_dir / "config.json")
    provenance = {"source_bundle": str(bundle_dir.resolve()), "config_sha256": config_sha}

    graphs: dict[str, dict] = {}
    protos = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, module in modules.items():
            t = time.perf_counter()
            args = example_inputs(specs[name], sizes, gen, decoder.vocab_size)
            protos[name] = export_graph(module, args, specs[name], config.opset, Path(tmp))
            logger.info("traced %s in %.1f s", name, time.perf_counter() - t)
    # decoder graphs: one shared weights file; the others inline unless large
    _externalize(
        [protos["prefill"], protos["decode"]],
        DECODER_WEIGHTS,
        out / DECODER_WEIGHTS,
        EXTERNAL_MIN_BYTES,
    )
    for name, model in protos.items():
        external = [DECODER_WEIGHTS] if name in ("prefill", "decode") else []
        if not external and _weight_bytes(model) > config.inline_limit:
            external = [f"{name}.weights"]
            _externalize([model], external[0], out / external[0], EXTERNAL_MIN_BYTES)
        file = f"{name}.onnx"
        _save(model, out / file, name, provenance)
        graphs[name] = {
            "name": name,
            "file": file,
            "external_data": external,
            "opset": config.opset,
            "nodes": len(model.graph.node),
            "op_types": sorted({n.op_type for n in model.graph.node}),
            **specs[name],
        }
    used = {f for g in graphs.values() for f in g["external_data"]}
    for stale in out.glob("*.weights"):  # from an earlier export into the same directory
        if stale.name not in used:
            stale.unlink()

    if probes:
        shutil.copyfile(bundle_dir / bundle_io.PROBES_FILE, out / "probes.safetensors")
    tokenizer.save_pretrained(str(out / "tokenizer"))
    encoder_ref = _absolute(bundle_io.resolve_reference(bcfg.encoder, bundle_dir))
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "dtype": config.dtype,
        "opset": config.opset,
        "batch_buckets": list(config.batch_buckets),
        "latent_dim": dims["latent_dim"],
        "exporter": {
            "tool": "torch.onnx (TorchScript tracer)",
            "torch": torch.__version__,
            "onnx": onnx.__version__,
        },
        "bundle": {
            "path": str(bundle_dir.resolve()),
            "config_sha256": config_sha,
            "weights_sha256": {
                f: _sha256(bundle_dir / f)
                for f in (
                    bundle_io.SCORE_NET_FILE,
                    bundle_io.PROMPT_GEN_FILE,
                    bundle_io.PROBES_FILE,
                    bundle_io.STUDENT_FILE,
                    bundle_io.VALUE_NETS_FILE,
                )
                if (bundle_dir / f).exists()
            },
            "config": bcfg.to_dict(),
        },
        "encoder": {
            "reference": encoder_ref,
            "runtime": "pytorch",
            "note": "not exported: the sentence encoder runs in PyTorch (sentence-transformers)",
        },
        "decoder": {
            "reference": _absolute(decoder_ref),
            "family": "llama" if isinstance(decoder, LlamaDecoder) else "gpt2",
            "hidden_size": decoder.hidden_size,
            "vocab_size": decoder.vocab_size,
            "num_layers": decoder.num_layers,
            "num_kv_heads": decoder.num_kv_heads,
            "head_dim": decoder.head_dim,
            "max_len": max_len,
            "prompt_len": dims["prompt_len"],
            "eos_token_ids": list(decoder.eos_token_ids),
            "pad_token_id": decoder.config.pad_token_id,
            "kv_buffer": "(num_layers, batch, num_kv_heads, max_len, head_dim), owned by the runtime",
        },
        "graphs": graphs,
        "probes_file": "probes.safetensors" if probes else None,
        "value_networks": {
            probe: {
                "graph": f"value_{probe}",
                "max_steps": config.re_control_max_steps,
                "config": net.config.to_dict(),
                "note": "RE-Control's edit of final-norm hidden states; the decode graphs end at "
                "the LM head, so the runtime does not apply it (generate with backend='torch')",
            }
            for probe, net in value_nets.items()
        },
        "tokenizer": "tokenizer",
        "export_config": {**asdict(config), "tolerance": config.tolerance},
        "validation": None,
    }
    if config.validate:
        if encoder is None:
            encoder = SentenceEncoder(encoder_ref)
        manifest["validation"] = validate_export(
            out, manifest, config, score_net, prompt_gen, probe_set, decoder, tokenizer, encoder,
            student, value_nets,
        )  # fmt: skip
    manifest["export_seconds"] = round(time.perf_counter() - t_start, 2)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    logger.info(
        "exported %s → %s (%s) in %.1f s", bundle_dir, out, config.dtype, manifest["export_seconds"]
    )
    return manifest


# ------------------------------------------------------------------------------ validation
def value_edit_inputs(net, batch: int, max_steps: int, gen: torch.Generator) -> tuple:
    """Validation inputs of a value-edit graph: hidden states at a decoder's scale, each row one
    target (±1) on a random output, steps cycling through 0, max_steps and between, α in
    [0.1, 1]."""
    H, K = net.config.input_dim, net.config.outputs
    h = torch.randn(batch, H, generator=gen) * 2
    coef = torch.zeros(batch, K)
    pick = torch.randint(0, K, (batch,), generator=gen)
    coef[torch.arange(batch), pick] = torch.where(torch.arange(batch) % 2 == 0, 1.0, -1.0)
    steps = torch.tensor([(0, max_steps, max(1, max_steps // 3))[i % 3] for i in range(batch)])
    size = 0.1 + 0.9 * torch.rand(batch, generator=gen)
    return h, coef, steps, size


def _compare(ort: torch.Tensor, ref: torch.Tensor, rtol: float) -> dict:
    diff = (ort.float() - ref.float()).abs().max().item()
    scale = ref.float().abs().max().item()
    rel = diff / max(scale, 1e-30)
    return {"max_abs_diff": diff, "max_abs_ref": scale, "rel": rel, "rtol": rtol, "ok": rel <= rtol}


@torch.no_grad()
def torch_greedy(
    decoder, prefix_ids: list[list[int]], soft: torch.Tensor, pad: int, steps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference greedy loop (the decode loop's `ReferenceStep`, `Decoder.forward`) →
    (tokens (B, steps), logits (steps, B, V))."""
    slots = max(map(len, prefix_ids)) + soft.shape[1] + steps
    batch = left_pad(prefix_ids, pad, slots, soft, decoder.device)
    step = ReferenceStep(decoder, decoder.new_cache(len(prefix_ids), slots))
    logits = [step.start(batch)]
    tokens = [logits[-1].argmax(-1)]
    for _ in range(1, steps):
        logits.append(step.step(tokens[-1]))
        tokens.append(logits[-1].argmax(-1))
    return torch.stack(tokens, 1), torch.stack(logits)


def validate_export(
    outdir: Path,
    manifest: dict,
    config: ExportConfig,
    score_net: ScoreNetwork,
    prompt_gen: PromptGenerator,
    probe_set: ProbeSet,
    decoder,
    tokenizer,
    encoder,
    student: ScoreNetwork | None = None,
    value_nets: dict | None = None,
) -> dict:
    """ONNX Runtime (CPU EP, batches padded to buckets) against the fp32 PyTorch modules on real
    inputs: encoder latents of the validation prompts, their tokens, soft prompts from the prompt
    generator. Every output must satisfy max|Δ| ≤ rtol·max|ref|; greedy tokens must be identical
    (fp16: a step where the fp32 reference's top-2 logits are within the tolerance may differ).
    Raises ExportValidationError listing every failure."""

    rtol, t0 = config.tolerance, time.perf_counter()
    dt = DTYPES[config.dtype]
    ort = OrtModels(outdir, "cpu", RuntimeOptions(pad_batches=True), manifest)
    gen = torch.Generator().manual_seed(config.seed)
    prompts = list(config.validation_prompts)
    ctx = encoder.latents(prompts).float().cpu()  # (n, d) real prefix latents
    emb = encoder.embed(prompts).float().cpu()
    d = ctx.shape[1]
    report: dict = {"prompts": prompts, "rtol": rtol, "graphs": {}}
    failures = []

    def record(graph: str, output: str, batch: int, res: dict) -> None:
        entry = report["graphs"].setdefault(graph, {}).setdefault(output, {"batches": []})
        entry["batches"].append(batch)
        for key in ("max_abs_diff", "max_abs_ref", "rel"):
            entry[key] = max(entry.get(key, 0.0), res[key])
        entry["rtol"], entry["ok"] = rtol, entry.get("ok", True) and res["ok"]
        if not res["ok"]:
            failures.append(f"{graph}.{output} at batch {batch}: rel {res['rel']:.3g} > {rtol:g}")

    with torch.no_grad():
        for b in config.batch_buckets:
            rows = torch.arange(b) % len(prompts)
            z = torch.randn(b, d, generator=gen)
            a2 = torch.rand(b, generator=gen) * 0.9 + 0.05
            drop = torch.arange(b) % 2 == 1  # CFG pairs: every other row uses the null context
            ref = score_net(z, ctx[rows], a2, drop)
            got = ort.score_net(z.to(dt), ctx[rows].to(dt), a2.to(dt), drop)
            record("score_network", "v", b, _compare(got, ref, rtol))
            if student is not None:
                w = 1 + 2 * torch.rand(b, generator=gen)
                ref = student(z, ctx[rows], a2, None, w)
                got = ort.student(z.to(dt), ctx[rows].to(dt), a2.to(dt), None, w.to(dt))
                record("student", "v", b, _compare(got, ref, rtol))
            ref = prompt_gen(z, a2)
            record(
                "prompt_generator",
                "soft_prompt",
                b,
                _compare(ort.prompt_gen(z.to(dt), a2.to(dt)), ref, rtol),
            )
            if ort.probes is not None:
                e = emb[rows]
                ref = torch.nn.functional.normalize(e, dim=-1) @ probe_set.weight.T + probe_set.bias
                record("probes", "logits", b, _compare(ort.probes.logits(e), ref, rtol))
            for probe, net in (value_nets or {}).items():
                name, n = f"value_{probe}", config.re_control_max_steps
                h, coef, steps, size = value_edit_inputs(net, b, n, gen)
                ref = value_ascent(h, net, coef, steps, size[:, None], n, native=False)
                got = ort.value_edits[probe](h, coef, steps, size)
                res = _compare(got, ref, rtol)
                still = steps == 0  # rows without the edit: bit-identical
                res["ok"] = res["ok"] and torch.equal(got[still], h[still])
                record(name, "hidden_out", b, res)

        # decoder: left-padded real prefixes + soft prompts, teacher-forced on the reference,
        # in chunks of the largest bucket
        pad = pad_id(decoder, tokenizer, eos_ids(decoder, tokenizer))
        steps = config.validation_tokens
        z = torch.randn(len(prompts), d, generator=gen)
        soft_all = prompt_gen(z, torch.full((len(prompts),), 0.95))  # (n, P, H) fp32
        room = manifest["decoder"]["max_len"] - soft_all.shape[1] - steps  # prefix tokens that fit
        if room < 1:
            raise ValueError(
                f"max_len={manifest['decoder']['max_len']} leaves no room for a prefix with "
                f"{soft_all.shape[1]} soft-prompt vectors and {steps} validation tokens"
            )
        mismatches, same_all = [], []
        for start in range(0, len(prompts), ort.buckets.largest):
            chunk = slice(start, start + ort.buckets.largest)
            prefix_ids = [tokenizer.encode(p)[-room:] for p in prompts[chunk]]
            soft = soft_all[chunk]
            ref_tok, ref_logits = torch_greedy(decoder, prefix_ids, soft, pad, steps)
            slots = max(map(len, prefix_ids)) + soft.shape[1] + steps
            got = [ort.decoder.start(left_pad(prefix_ids, pad, slots, soft.to(dt)))]
            for i in range(1, steps):
                got.append(ort.decoder.step(ref_tok[:, i - 1]))
            got = torch.stack(got)  # (steps, n, V)
            record("prefill", "logits", ort.decoder.batch, _compare(got[0], ref_logits[0], rtol))
            record("decode", "logits", ort.decoder.batch, _compare(got[1:], ref_logits[1:], rtol))
            # greedy tokens: ORT's argmax against the reference's at every step
            top2 = ref_logits.float().topk(2, dim=-1).values  # (steps, n, 2)
            gap = top2[..., 0] - top2[..., 1]
            differ = got.argmax(-1) != ref_tok.T  # (steps, n)
            tie = gap <= rtol * ref_logits.float().abs().amax(-1)
            hard = differ & ~tie if dt != torch.float32 else differ
            mismatches += [(s, r + start) for s, r in differ.nonzero().tolist()]
            # the runtime's own loop, free running, against decoding.generate in fp32
            params = [DecodeParams(max_new_tokens=steps, temperature=0.0)]
            ort_res, _ = ort.decoder.generate(tokenizer, prefix_ids, params, soft.to(dt))
            ref_res, _ = torch_generate(decoder, tokenizer, prefix_ids, params, soft_prompt=soft)
            same = [a.token_ids == b.token_ids for a, b in zip(ort_res, ref_res, strict=True)]
            same_all += same
            if hard.any() or (dt == torch.float32 and not all(same)):
                failures.append(
                    f"greedy tokens differ from PyTorch at (step, prompt) {mismatches}; "
                    f"free-running identical per prompt: {same_all}"
                )
        report["greedy"] = {
            "tokens_per_prompt": steps,
            "teacher_forced_mismatches": mismatches,
            "identical": not mismatches and all(same_all),
            "free_running_identical": same_all,
        }
    report["seconds"] = round(time.perf_counter() - t0, 2)
    if failures:
        raise ExportValidationError(
            f"ONNX export in {str(outdir)!r} does not match PyTorch ({config.dtype}, rtol "
            f"{rtol:g}): " + "; ".join(failures)
        )
    return report
