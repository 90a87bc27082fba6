"""ONNX export of the default bundle (or, until one ships, a bundle with the same real encoder and
decoder, all-MiniLM-L6-v2 and SmolLM2-135M, and untrained "small" networks): validated at export,
and `dglm generate --backend onnx` gives the torch backend's tokens."""

import json

import pytest
import torch

pytest.importorskip("onnxruntime")

from dglm.engine.api import GenerationParams  # noqa: E402
from dglm.engine.engine import Engine
from dglm.engine.probes import Control  # noqa: E402
from dglm.export.onnx import ExportConfig, export_onnx  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real_bundle(tmp_path_factory, sentiment_probe):
    from dglm.engine.bundle import resolve_bundle_dir

    try:
        return resolve_bundle_dir("default")
    except ValueError:
        from dglm.engine.training.builder import create_bundle

        out = tmp_path_factory.mktemp("real_bundle")
        create_bundle(out, "all-MiniLM-L6-v2", "smollm2", "small", "small", [sentiment_probe])
        return out


def test_real_bundle_exports_validated_and_generates_the_same_tokens(
    real_bundle, minilm, tmp_path, capsys
):
    from dglm.engine.cli.main import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = ExportConfig(batch_buckets=(1, 2, 4), max_len=96)
        m = export_onnx(real_bundle, tmp_path, cfg, encoder=minilm)
        v = m["validation"]
        assert v["greedy"]["identical"]
        assert v["graphs"]["decode"]["logits"]["rel"] <= 1e-4
        assert m["decoder"]["num_layers"] == 30 and m["decoder"]["hidden_size"] == 576

        prompt, control = "The movie was", "sentiment=positive:10"
        args = ["generate", prompt, "--seed", "3", "--max-new-tokens", "12", "--json"]
        assert (
            main([*args, "--bundle", str(tmp_path), "--backend", "onnx", "--control", control]) == 0
        )
        got = json.loads(capsys.readouterr().out)[0]["samples"][0]["token_ids"]
        # the ONNX backend decodes without the bundle's prompt guidance (not exported yet)
        ref = Engine.from_pretrained(real_bundle, quantize="none").generate(  # the export: fp32
            [prompt],
            GenerationParams(
                seed=3, max_new_tokens=12, controls=(Control.parse(control),), prompt_guidance=1.0
            ),
        )
        assert got == ref[0].samples[0].token_ids
        onnx = Engine.from_pretrained(tmp_path, backend="onnx")
        assert onnx.config.prompt_guidance == 1.0
        with pytest.raises(ValueError, match="prompt_guidance=2"):
            onnx.generate([prompt], GenerationParams(max_new_tokens=2, prompt_guidance=2.0))
    finally:
        torch.set_num_threads(threads)
