"""ONNX export of the tiny bundle and the ONNX Runtime backend: graphs, manifest, parity with
PyTorch (fp32 within 1e-4 relative with identical greedy tokens, fp16 within 1e-2), the Engine end
to end on both backends, and the loader's refusal of external data outside the model directory."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from decoder_fixtures import FAMILIES, make_tiny_hf_dir  # noqa: E402
from dglm.engine import bundle as bundle_io  # noqa: E402
from dglm.engine.api import GenerationParams  # noqa: E402
from dglm.engine.decoding.loop import generate as torch_generate  # noqa: E402
from dglm.engine.decoding.padding import left_pad  # noqa: E402
from dglm.engine.decoding.sampling import DecodeParams, eos_ids, pad_id  # noqa: E402
from dglm.engine.diffusion.score_network import ScoreNetwork  # noqa: E402
from dglm.engine.engine import Engine  # noqa: E402
from dglm.engine.probes import Control, ProbeSet, load_probes  # noqa: E402
from dglm.engine.prompt.generator import PromptGenerator  # noqa: E402
from dglm.export.onnx import (  # noqa: E402
    OPSET,
    ExportConfig,
    ExportValidationError,
    example_inputs,
    export_graph,
    export_onnx,
    graph_specs,
    torch_greedy,
)
from dglm.export.runtime import (  # noqa: E402
    MANIFEST,
    OrtGraph,
    OrtModels,
    RuntimeOptions,
    check_external_data,
    read_manifest,
)

BUCKETS = (1, 2, 4)
TOL = {"fp32": 1e-4, "fp16": 1e-2}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def exports(tiny_bundle, minilm, tmp_path_factory):
    """The tiny bundle exported once per dtype (validated at export time)."""
    out = {}
    for dtype in ("fp32", "fp16"):
        d = tmp_path_factory.mktemp(f"onnx_{dtype}")
        cfg = ExportConfig(dtype=dtype, batch_buckets=BUCKETS, max_len=64)
        export_onnx(tiny_bundle, d, cfg, encoder=minilm)
        out[dtype] = d
    return out


@pytest.fixture(scope="module")
def torch_parts(tiny_bundle):
    from dglm.engine.models import load_decoder

    config = bundle_io.read_config(tiny_bundle)
    sn = ScoreNetwork(config.score_network)
    bundle_io.load_state(sn, tiny_bundle / bundle_io.SCORE_NET_FILE)
    pg = PromptGenerator(config.prompt_generator)
    bundle_io.load_state(pg, tiny_bundle / bundle_io.PROMPT_GEN_FILE)
    decoder, tokenizer = load_decoder(config.decoder)
    return sn.eval(), pg.eval(), decoder, tokenizer


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.float() - ref.float()).abs().max() / ref.float().abs().max())


# ------------------------------------------------------------------------------ the export
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_manifest_names_graphs_io_opset_and_source(exports, tiny_bundle, dtype):
    out = exports[dtype]
    m = read_manifest(out)
    assert m["dtype"] == dtype and m["opset"] == OPSET and m["batch_buckets"] == list(BUCKETS)
    sha = hashlib.sha256((tiny_bundle / "config.json").read_bytes()).hexdigest()
    assert m["bundle"]["config_sha256"] == sha
    assert m["bundle"]["path"] == str(tiny_bundle.resolve())
    assert m["encoder"]["runtime"] == "pytorch"
    assert set(m["graphs"]) == {"score_network", "prompt_generator", "probes", "prefill", "decode"}
    want = {"fp32": "tensor(float)", "fp16": "tensor(float16)"}[dtype]
    onnx_types = {"float32": "tensor(float)", "float16": "tensor(float16)",
                  "int64": "tensor(int64)", "bool": "tensor(bool)"}  # fmt: skip
    for name, g in m["graphs"].items():
        model = onnx.load(str(out / g["file"]), load_external_data=False)
        assert [(o.domain, o.version) for o in model.opset_import] == [("", OPSET)]
        meta = {p.key: p.value for p in model.metadata_props}
        assert meta["dglm_graph"] == name and meta["config_sha256"] == sha
        sess = ort.InferenceSession(str(out / g["file"]), providers=["CPUExecutionProvider"])
        for got, spec in ((sess.get_inputs(), g["inputs"]), (sess.get_outputs(), g["outputs"])):
            assert [i.name for i in got] == [s["name"] for s in spec]
            assert [i.type for i in got] == [onnx_types[s["dtype"]] for s in spec]
            assert [i.shape for i in got] == [s["shape"] for s in spec]
    assert (
        m["graphs"]["decode"]["inputs"][4]["dtype"] == {"fp32": "float32", "fp16": "float16"}[dtype]
    )
    assert sess.get_outputs()[0].type == "tensor(float)"  # logits stay fp32
    assert (
        ort.InferenceSession(str(out / "score_network.onnx"), providers=["CPUExecutionProvider"])
        .get_inputs()[0]
        .type
        == want
    )
    v = m["validation"]
    assert v["rtol"] == TOL[dtype] and v["greedy"]["identical"]
    assert all(o["ok"] for g in v["graphs"].values() for o in g.values())


def test_decode_graph_is_capturable(exports):
    """No control flow and no Shape ops, every dimension static except the batch."""
    m = read_manifest(exports["fp32"])
    model = onnx.load(str(exports["fp32"] / "decode.onnx"), load_external_data=False)
    ops = {n.op_type for n in model.graph.node}
    assert not ops & {"If", "Loop", "Scan", "Shape", "NonZero"}, ops
    for value in list(model.graph.input) + list(model.graph.output):
        params = [d.dim_param for d in value.type.tensor_type.shape.dim if d.dim_param]
        assert params in ([], ["batch"]), (value.name, params)
    prefill = onnx.load(str(exports["fp32"] / "prefill.onnx"), load_external_data=False)
    assert not {n.op_type for n in prefill.graph.node} & {"If", "Loop", "Scan"}
    assert m["decoder"]["max_len"] == 64


def test_decoder_weights_shared_once_in_external_data(exports):
    out = exports["fp32"]
    files = {g: check_external_data(out / f"{g}.onnx") for g in ("prefill", "decode")}
    assert files == {"prefill": ["decoder.weights"], "decode": ["decoder.weights"]}
    full = onnx.load(str(out / "decode.onnx"))  # weights read back through the offsets
    weights = sum(onnx.numpy_helper.to_array(t).nbytes for t in full.graph.initializer)
    size = (out / "decoder.weights").stat().st_size
    assert weights * 0.9 < size < weights * 1.2  # prefill's copy of the same tensors is not stored
    assert check_external_data(out / "score_network.onnx") == []  # small graphs stay inline


def test_large_graph_weights_go_external(tiny_bundle, minilm, tmp_path):
    cfg = ExportConfig(batch_buckets=(2,), max_len=32, inline_limit=0, validate=False)
    m = export_onnx(tiny_bundle, tmp_path, cfg, encoder=minilm)
    assert m["graphs"]["score_network"]["external_data"] == ["score_network.weights"]
    assert check_external_data(tmp_path / "score_network.onnx") == ["score_network.weights"]
    models = OrtModels(tmp_path)  # loads from the external file
    z = torch.randn(2, 384, generator=torch.Generator().manual_seed(0))
    assert models.score_net(z, z, torch.rand(2)).shape == (2, 384)


def test_validation_failure_raises_and_writes_no_manifest(tiny_bundle, minilm, tmp_path):
    cfg = ExportConfig(batch_buckets=(1,), max_len=32, rtol=1e-12)
    with pytest.raises(ExportValidationError, match="does not match PyTorch"):
        export_onnx(tiny_bundle, tmp_path, cfg, encoder=minilm)
    assert not (tmp_path / MANIFEST).exists()
    with pytest.raises(ValueError, match="no manifest.json"):
        Engine.from_pretrained(tmp_path, backend="onnx")


def test_export_config_rejects_bad_values():
    with pytest.raises(ValueError, match="dtype"):
        ExportConfig(dtype="bf16")
    with pytest.raises(ValueError, match="batch_buckets"):
        ExportConfig(batch_buckets=(0, 2))
    with pytest.raises(ValueError, match="opset"):
        ExportConfig(opset=9)
    for bad in (0, 1001, 2.5, True):
        with pytest.raises(ValueError, match="re_control_max_steps"):
            ExportConfig(re_control_max_steps=bad)
    assert ExportConfig(batch_buckets=(4, 1, 4)).batch_buckets == (1, 4)


# ------------------------------------------------------------------------------ loading safety
def _model_with_external(tmp_path, location: str):
    """A one-Add model whose initializer lives at `location` (relative to its directory)."""
    from onnx import TensorProto, helper

    d = tmp_path / "model"
    d.mkdir(exist_ok=True)
    w = helper.make_tensor("w", TensorProto.FLOAT, [2], [1.0, 2.0])
    w.ClearField("float_data")
    w.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", "0"), ("length", "8")):
        e = w.external_data.add()
        e.key, e.value = k, v
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        [w],
    )
    path = d / "m.onnx"
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=9)
    path.write_bytes(model.SerializeToString())
    return path


@pytest.mark.parametrize("kind", ["parent", "absolute", "symlink"])
def test_loader_refuses_external_data_outside_model_dir(tmp_path, kind):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"\0" * 8)
    if kind == "parent":
        location = "../secret.bin"
    elif kind == "absolute":
        location = str(secret)
    else:
        (tmp_path / "model").mkdir()
        os.symlink(secret, tmp_path / "model" / "link.bin")
        location = "link.bin"
    path = _model_with_external(tmp_path, location)
    with pytest.raises(ValueError, match="outside the model directory"):
        check_external_data(path)
    spec = {"name": "m", "file": "m.onnx", "inputs": [], "outputs": []}
    with pytest.raises(ValueError, match="outside the model directory"):
        OrtGraph(path.parent, spec, torch.device("cpu"), RuntimeOptions())


def test_loader_accepts_external_data_inside_and_refuses_graph_paths_outside(tmp_path):
    path = _model_with_external(tmp_path, "w.bin")
    (path.parent / "w.bin").write_bytes(torch.tensor([1.0, 2.0]).numpy().tobytes())
    assert check_external_data(path) == ["w.bin"]
    spec = {"name": "m", "file": "m.onnx", "inputs": [], "outputs": []}
    OrtGraph(path.parent, spec, torch.device("cpu"), RuntimeOptions())
    with pytest.raises(ValueError, match="outside the model directory"):
        OrtGraph(path.parent, {**spec, "file": "../m.onnx"}, torch.device("cpu"),
                 RuntimeOptions())  # fmt: skip


# ------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("pad", [False, True])
def test_networks_match_pytorch(exports, torch_parts, minilm, tiny_bundle, dtype, pad):
    """Fresh inputs at odd batch sizes (5 > the largest bucket: split, and padded with `pad`)."""
    sn, pg, _, _ = torch_parts
    probes = ProbeSet(load_probes(tiny_bundle / bundle_io.PROBES_FILE), 384)
    models = OrtModels(exports[dtype], options=RuntimeOptions(pad_batches=pad))
    dt, tol = {"fp32": torch.float32, "fp16": torch.float16}[dtype], TOL[dtype]
    g = torch.Generator().manual_seed(11)
    texts = ["A quick brown fox.", "Rain again today", "The soup was cold", "Great!", "Meh"]
    for b in (3, 5):
        ctx = minilm.latents(texts[:b]).float()
        z, a2 = torch.randn(b, 384, generator=g), torch.rand(b, generator=g)
        drop = torch.rand(b, generator=g) < 0.5
        with torch.no_grad():
            assert (
                _rel(models.score_net(z.to(dt), ctx.to(dt), a2.to(dt), drop), sn(z, ctx, a2, drop))
                <= tol
            )
            assert _rel(models.score_net(z.to(dt), None, a2.to(dt)), sn(z, None, a2)) <= tol
            assert _rel(models.prompt_gen(z.to(dt), a2.to(dt)), pg(z, a2)) <= tol
        emb = minilm.embed(texts[:b]).float()
        ref = torch.nn.functional.normalize(emb, dim=-1) @ probes.weight.T + probes.bias
        assert _rel(models.probes.logits(emb), ref) <= 1e-4  # the probes graph is fp32


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("batch", [1, 3])
def test_decoder_logits_and_greedy_tokens_match_pytorch(exports, torch_parts, dtype, batch):
    """Prefill + decode steps teacher-forced on PyTorch's greedy tokens: logits within the
    tolerance at every step; fp32: the runtime's own greedy loop yields identical tokens."""
    _, pg, decoder, tok = torch_parts
    models = OrtModels(exports[dtype], options=RuntimeOptions(pad_batches=True))
    dt, tol = {"fp32": torch.float32, "fp16": torch.float16}[dtype], TOL[dtype]
    prompts = ["Prices are", "The movie was great and the food", "I loved"][:batch]
    prefix = [tok.encode(p) for p in prompts]
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        soft = pg(torch.randn(batch, 384, generator=g), torch.full((batch,), 0.95))
    pad = pad_id(decoder, tok, eos_ids(decoder, tok))
    steps = 10
    ref_tok, ref_logits = torch_greedy(decoder, prefix, soft, pad, steps)
    slots = max(map(len, prefix)) + soft.shape[1] + steps
    got = [models.decoder.start(left_pad(prefix, pad, slots, soft.to(dt)))]
    for i in range(1, steps):
        got.append(models.decoder.step(ref_tok[:, i - 1]))
    got = torch.stack(got)
    assert models.decoder.batch == {1: 1, 3: 4}[batch]  # padded to the bucket
    for i in range(steps):
        assert _rel(got[i], ref_logits[i]) <= tol, i
    if dtype == "fp32":
        assert torch.equal(got.argmax(-1), ref_tok.T)
        params = [DecodeParams(max_new_tokens=steps, temperature=0.0)]
        ours, _ = models.decoder.generate(tok, prefix, params, soft)
        theirs, _ = torch_generate(decoder, tok, prefix, params, soft_prompt=soft)
        assert [r.token_ids for r in ours] == [r.token_ids for r in theirs]


@pytest.mark.parametrize("pad", [False, True])
def test_one_loop_samples_the_same_tokens_on_torch_and_onnx(exports, torch_parts, pad):
    """The one decode loop over the torch decoder and over ONNX Runtime (5 rows: chunked at the
    largest bucket, padded or not): same seeds, same sampled tokens, stop strings and EOS."""
    _, pg, decoder, tok = torch_parts
    models = OrtModels(exports["fp32"], options=RuntimeOptions(pad_batches=pad))
    prompts = ["Prices are", "The movie was great", "I loved", "A quick brown fox", "Hi"]
    prefix = [tok.encode(p) for p in prompts]
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        soft = pg(torch.randn(5, 384, generator=g), torch.full((5,), 0.95))
    params = [
        DecodeParams(max_new_tokens=9, top_p=0.9, seed=1),
        DecodeParams(max_new_tokens=9, top_k=20, temperature=0.8, seed=2),
        DecodeParams(max_new_tokens=7, temperature=0.0),
        DecodeParams(max_new_tokens=9, top_p=0.8, top_k=50, seed=3, stop=("e",)),
        DecodeParams(max_new_tokens=9, temperature=1.3, seed=4, ignore_eos=True),
    ]
    ours, _ = models.decoder.generate(tok, prefix, params, soft)
    theirs, _ = torch_generate(decoder, tok, prefix, params, soft_prompt=soft)
    assert [(r.token_ids, r.text, r.finish_reason) for r in ours] == [
        (r.token_ids, r.text, r.finish_reason) for r in theirs
    ]


# ------------------------------------------------------------------------------ the engine
@pytest.fixture(scope="module")
def onnx_engine(exports):
    return Engine.from_pretrained(exports["fp32"], backend="onnx")


def _outputs(outs):
    return [[(s.token_ids, s.text, s.finish_reason) for s in o.samples] for o in outs]


@pytest.mark.parametrize("pad", [False, True])
def test_generate_same_seed_same_tokens_on_both_backends(tiny_engine, exports, pad):
    engine = Engine.from_pretrained(
        exports["fp32"], backend="onnx", onnx_options=RuntimeOptions(pad_batches=pad)
    )
    prompts = ["The movie was", "I think that the food", "Prices are"]
    params = [
        GenerationParams(seed=1, max_new_tokens=6, top_k=20),
        GenerationParams(
            seed=2,
            max_new_tokens=7,
            num_samples=3,
            controls=(Control("sentiment", "positive", 20.0),),
        ),
        GenerationParams(seed=3, max_new_tokens=5, temperature=0.0, cfg_scale=2.0, stop=("e",)),
    ]  # 5 rows: above the largest bucket (4)
    ref, got = tiny_engine.generate(prompts, params), engine.generate(prompts, params)
    assert _outputs(got) == _outputs(ref)
    for o_ref, o_got in zip(ref, got, strict=True):
        for s_ref, s_got in zip(o_ref.samples, o_got.samples, strict=True):
            torch.testing.assert_close(s_got.latent, s_ref.latent, rtol=1e-4, atol=1e-4)
        assert set(o_got.timings) == set(o_ref.timings)


def test_onnx_engine_info_and_refusals(onnx_engine):
    info = onnx_engine.info()
    assert info["backend"] == "onnx" and info["opset"] == OPSET and info["decoder_context"] == 64
    with pytest.raises(ValueError, match="guidance_mode='exact'"):
        onnx_engine.generate(
            ["Hi"], GenerationParams(guidance_mode="exact", controls=(Control("sentiment", 1),))
        )
    with pytest.raises(ValueError, match="exceeds the decoder's context of 64"):
        onnx_engine.generate(["Hi"], GenerationParams(max_new_tokens=80))
    with pytest.raises(ValueError, match="backend must be"):
        Engine.from_pretrained("x", backend="tensorrt")


def test_cli_generate_backend_onnx_matches_torch(tiny_bundle, exports, capsys):
    from dglm.engine.cli.main import main

    args = ["generate", "The movie was", "--seed", "4", "--max-new-tokens", "5", "--json"]
    assert main([*args, "--bundle", str(tiny_bundle)]) == 0
    ref = json.loads(capsys.readouterr().out)
    assert main([*args, "--bundle", str(exports["fp32"]), "--backend", "onnx"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got[0]["samples"][0]["token_ids"] == ref[0]["samples"][0]["token_ids"]


def test_cli_export_onnx(tiny_bundle, tmp_path, capsys):
    from dglm.engine.cli.main import main

    rc = main(["export", "onnx", str(tiny_bundle), str(tmp_path), "--batch-buckets", "2,1",
               "--max-len", "32", "--no-validate"])  # fmt: skip
    assert rc == 0 and "decode.onnx" in capsys.readouterr().out
    assert read_manifest(tmp_path)["batch_buckets"] == [1, 2]
    assert main(["export", "onnx", str(tiny_bundle), str(tmp_path), "--batch-buckets", "x"]) == 2


# ------------------------------------------------------------------------------ CUDA EP
def _cuda_ep() -> bool:
    return torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_cuda_graphs_decoder_matches_cpu(exports, torch_parts, dtype):
    """CUDA EP with I/O binding and one captured graph per bucket: the same logits as PyTorch
    (teacher-forced) across replays and buckets."""
    if not _cuda_ep():
        pytest.skip("onnxruntime has no CUDA execution provider")
    _, pg, decoder, tok = torch_parts
    models = OrtModels(exports[dtype], "cuda", RuntimeOptions(cuda_graphs=True))
    dt, tol = {"fp32": torch.float32, "fp16": torch.float16}[dtype], TOL[dtype]
    pad = pad_id(decoder, tok, eos_ids(decoder, tok))
    for prompts in (["Prices are"], ["The movie was", "I loved", "A quick brown fox"]):
        prefix = [tok.encode(p) for p in prompts]
        with torch.no_grad():
            soft = pg(torch.randn(len(prompts), 384), torch.full((len(prompts),), 0.95))
        ref_tok, ref_logits = torch_greedy(decoder, prefix, soft, pad, 8)
        for _ in range(2):  # the second pass replays the captured graphs
            batch = left_pad(prefix, pad, max(map(len, prefix)) + soft.shape[1] + 8, soft)
            batch.soft_prompt = soft.to("cuda", dt)
            got = [models.decoder.start(batch)]
            for i in range(1, 8):
                got.append(models.decoder.step(ref_tok[:, i - 1].cuda()))
            got = torch.stack(got).cpu()
            for i in range(8):
                assert _rel(got[i], ref_logits[i]) <= tol, i


@pytest.mark.gpu
def test_cuda_engine_generate_matches_cpu(exports):
    if not _cuda_ep():
        pytest.skip("onnxruntime has no CUDA execution provider")
    cpu = Engine.from_pretrained(exports["fp32"], backend="onnx")
    gpu = Engine.from_pretrained(exports["fp32"], backend="onnx", device="cuda")
    p = GenerationParams(seed=9, max_new_tokens=8, temperature=0.0, num_samples=3)
    assert _outputs(gpu.generate(["The movie was"], p)) == _outputs(
        cpu.generate(["The movie was"], p)
    )


# ------------------------------------------------------------------------------ every family
@pytest.mark.parametrize("family", FAMILIES)
def test_decoder_graphs_match_forward_for_every_family(family, tmp_path):
    """Prefill + decode graphs of each tiny decoder family (GQA, biases, head_dim ≠ H/nh, llama3
    RoPE, GPT-2 tied/untied) on ORT against `Decoder.forward` with a KV cache, left padded."""
    from dglm.engine.models import load_decoder
    from dglm.export.modules import DecodeGraph, PrefillGraph

    make_tiny_hf_dir(family, tmp_path / "hf")
    dec, _ = load_decoder(str(tmp_path / "hf"))
    S, P, steps = 24, 3, 4
    dims = {"latent_dim": 8, "prompt_len": P, "hidden_size": dec.hidden_size, "probe_rows": 1,
            "num_layers": dec.num_layers, "num_kv_heads": dec.num_kv_heads,
            "head_dim": dec.head_dim, "max_len": S, "vocab": dec.vocab_size}  # fmt: skip
    specs = graph_specs(dims, "float32")
    g = torch.Generator().manual_seed(3)
    sizes = {"batch": 3, "prefix_len": 5, "prefill_len": 5 + P}  # tracing sizes
    (tmp_path / "trace").mkdir()
    run = {}
    for name, module in (("prefill", PrefillGraph(dec, S)), ("decode", DecodeGraph(dec, S))):
        args = example_inputs(specs[name], sizes, g, dec.vocab_size)
        model = export_graph(module, args, specs[name], OPSET, tmp_path / "trace")
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        run[name] = lambda sess=sess, **feeds: [
            torch.from_numpy(o) for o in sess.run(None, {k: v.numpy() for k, v in feeds.items()})
        ]
    # two left-padded rows: prefix of 4 and 6 tokens, then P soft-prompt vectors
    ids = torch.randint(4, dec.vocab_size, (2, 6), generator=g)
    soft = torch.randn(2, P, dec.hidden_size, generator=g)
    km = torch.ones(2, S, dtype=torch.bool)
    km[0, :2] = False
    t0 = 6 + P
    pos = (km[:, :t0].long().cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        cache = dec.new_cache(2, S)
        x = torch.cat((dec.embed(ids), soft), 1)
        ref = [dec(x, pos, cache, km[:, :t0], last_only=True)[:, -1]]
        lg, k, v = run["prefill"](
            input_ids=ids, soft_prompt=soft, positions=pos, key_mask=km[:, :t0]
        )
        got = [lg]
        kb = torch.zeros(dec.num_layers, 2, dec.num_kv_heads, S, dec.head_dim)
        vb = torch.zeros_like(kb)
        kb[..., :t0, :], vb[..., :t0, :] = k, v
        next_pos = pos[:, -1:] + 1
        for i in range(steps):
            tok = ref[-1].argmax(-1)[:, None]
            slot = t0 + i
            ref.append(dec(dec.embed(tok), next_pos, cache, km[:, : slot + 1])[:, -1])
            lg, kn, vn = run["decode"](
                input_ids=tok,
                positions=next_pos,
                slot=torch.tensor([slot]),
                key_mask=km & (torch.arange(S) <= slot),  # slots written so far
                k_cache=kb,
                v_cache=vb,
            )
            got.append(lg)
            kb[..., slot, :], vb[..., slot, :] = kn[..., 0, :], vn[..., 0, :]
            next_pos = next_pos + 1
    for i, (a, b) in enumerate(zip(got, ref, strict=True)):
        assert _rel(a, b) <= 1e-4, (family, i)


# ------------------------------------------------------------------------- RE-Control's edit
@pytest.fixture(scope="module")
def value_export(tiny_bundle, minilm, tmp_path_factory):
    """The tiny bundle with a random value network for its probe, exported (fp32, validated)."""
    import shutil
    from dataclasses import replace

    from dglm.engine.methods.re_control import ValueNetConfig, ValueNetwork

    src = tmp_path_factory.mktemp("value_bundle") / "bundle"
    shutil.copytree(tiny_bundle, src)
    config = bundle_io.read_config(src)
    rows = ProbeSet(bundle_io.load_bundle_probes(src), 384).num_rows
    torch.manual_seed(3)
    net = ValueNetwork(ValueNetConfig("sentiment", 64, rows, hidden_dim=16, depth=2)).eval()
    bundle_io.write_config(replace(config, value_networks=(net.config,)), src)
    bundle_io.save_value_networks({"sentiment": net}, src / bundle_io.VALUE_NETS_FILE)
    out = tmp_path_factory.mktemp("onnx_value")
    cfg = ExportConfig(batch_buckets=BUCKETS, max_len=64, re_control_max_steps=6)
    manifest = export_onnx(src, out, cfg, encoder=minilm)
    return out, manifest, net


def test_value_network_exported_as_its_edit_and_validated(value_export):
    """Each value network becomes value_<probe>.onnx, RE-Control's edit unrolled for
    re_control_max_steps: ONNX Runtime equals the PyTorch reference (value_ascent) per row's n and
    α, rows with 0 steps come back bit-identical, more steps than the graph holds are refused; the
    engine on the export still refuses the edit in decoding, naming why."""
    from dglm.engine.methods.re_control import value_ascent

    out, manifest, net = value_export
    entry = manifest["value_networks"]["sentiment"]
    assert entry["graph"] == "value_sentiment" and entry["max_steps"] == 6
    assert entry["config"]["hidden_dim"] == 16 and (out / "value_sentiment.onnx").is_file()
    checked = manifest["validation"]["graphs"]["value_sentiment"]["hidden_out"]
    assert checked["ok"] and checked["batches"] == list(BUCKETS)
    models = OrtModels(out)
    edit = models.value_edits["sentiment"]
    assert models.info()["value_edit_graphs"] == ["sentiment"]
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(5, 64, generator=gen) * 2
    coef = torch.zeros(5, net.config.outputs)
    coef[:, 0] = torch.tensor([1.0, -1.0, 1.0, 0.0, -1.0])
    steps = torch.tensor([6, 3, 0, 6, 1])
    size = torch.tensor([0.5, 1.0, 0.7, 0.3, 0.9])
    got = edit(h, coef, steps, size)  # 5 rows: chunks of the largest bucket, the last padded
    ref = value_ascent(h, net, coef, steps, size[:, None], 6, native=False)
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert not torch.allclose(got[0], h[0])  # it moved
    assert torch.equal(got[2], h[2]) and torch.equal(got[3], h[3])  # 0 steps; no target
    with pytest.raises(ValueError, match="exceeds the 6 steps"):
        edit(h, coef, torch.tensor([7, 0, 0, 0, 0]), size)
    engine = Engine.from_pretrained(out, backend="onnx")
    with pytest.raises(ValueError, match="ONNX decode graph does not include"):
        engine.generate(
            ["Hi"], GenerationParams(controls=(Control("sentiment", 1, method="re-control"),))
        )
