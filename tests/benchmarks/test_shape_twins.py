"""Shape twins (benchmarks/shape_twins.py) and the one switch that swaps them in
(`dglm.engine.models.loading.shape_twin_dir`, $DGLM_SHAPE_TWINS): the committed configs are the
real models' shapes, a twin built from shrunk assets loads wherever the default models are named,
and the switch fails loudly on a folder without twins."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from dglm.engine.encode.encoder import SentenceEncoder, resolve_encoder_path
from dglm.engine.models import load_decoder
from dglm.engine.models.loading import SHAPE_TWINS_ENV, shape_twin_dir, smollm2_dir

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # `benchmarks` is a folder of the repository, not a package install

from benchmarks import shape_twins  # noqa: E402


def test_assets_hold_the_real_models_shapes():
    dec = json.loads((shape_twins.ASSETS / "smollm2" / "config.json").read_text())
    assert {k: dec[k] for k in ("model_type", "vocab_size", "hidden_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "intermediate_size",
            "tie_word_embeddings", "max_position_embeddings")} == {
        "model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "num_hidden_layers": 30,
        "num_attention_heads": 9, "num_key_value_heads": 3, "intermediate_size": 1536,
        "tie_word_embeddings": True, "max_position_embeddings": 8192,
    }  # fmt: skip
    enc = json.loads((shape_twins.ASSETS / "minilm" / "config.json").read_text())
    assert (enc["model_type"], enc["num_hidden_layers"], enc["hidden_size"]) == ("bert", 6, 384)
    assert (enc["num_attention_heads"], enc["intermediate_size"], enc["vocab_size"]) == (
        12,
        1536,
        30522,
    )
    for name in (*shape_twins.DECODER_FILES, "config.json"):
        assert (shape_twins.ASSETS / "smollm2" / name).is_file(), name
    for name in (*shape_twins.ENCODER_FILES, "config.json"):
        assert (shape_twins.ASSETS / "minilm" / name).is_file(), name


@pytest.fixture
def small_assets(tmp_path, monkeypatch) -> Path:
    """The committed assets with fewer, narrower layers (same vocabularies and tokenizers)."""
    assets = tmp_path / "assets"
    shutil.copytree(shape_twins.ASSETS, assets)
    for name, shrink in (
        ("smollm2", {"num_hidden_layers": 1, "hidden_size": 64, "intermediate_size": 96,
                     "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}),
        ("minilm", {"num_hidden_layers": 1, "intermediate_size": 96}),
    ):  # fmt: skip
        path = assets / name / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **shrink}))
    monkeypatch.setattr(shape_twins, "ASSETS", assets)
    return assets


def test_twins_load_wherever_the_default_models_are_named(tmp_path, small_assets, monkeypatch):
    twins = tmp_path / "twins"
    assert shape_twins.main([str(twins)]) == 0
    monkeypatch.setenv(SHAPE_TWINS_ENV, str(twins))
    assert smollm2_dir() == shape_twin_dir("decoder") == twins / "decoder"
    assert resolve_encoder_path("all-MiniLM-L6-v2") == str(twins / "encoder")
    decoder, tokenizer = load_decoder("smollm2")
    assert (decoder.config.vocab_size, decoder.hidden_size) == (49152, 64)
    assert tokenizer.decode(tokenizer.encode("The movie was")) == "The movie was"
    encoder = SentenceEncoder("all-MiniLM-L6-v2")
    emb = encoder.embed(["The movie was", "great"])
    assert encoder.dim == 384 and emb.shape == (2, 384)
    assert encoder.model.tokenizer.vocab_size == 30522
    assert next(encoder.model.parameters()).dtype.is_floating_point
    monkeypatch.delenv(SHAPE_TWINS_ENV)
    assert shape_twin_dir("decoder") is None and shape_twin_dir("encoder") is None


def test_the_switch_names_the_variable_when_the_twins_are_missing(tmp_path, monkeypatch):
    monkeypatch.setenv(SHAPE_TWINS_ENV, str(tmp_path))
    with pytest.raises(RuntimeError, match=f"{SHAPE_TWINS_ENV}=.*benchmarks.shape_twins"):
        smollm2_dir()
    with pytest.raises(RuntimeError, match="encoder/config.json"):
        resolve_encoder_path("all-MiniLM-L6-v2")
    with pytest.raises(ValueError, match="kind"):
        shape_twin_dir("tokenizer")
