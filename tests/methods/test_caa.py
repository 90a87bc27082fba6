"""CAA in the engine (methods.caa): steering vectors live in the bundle (config validated field by
field, the file checked against it), controls choose "@caa", a request's multiplier overrides the
vector's, CAA composes with DGLM in one request (multiplier 0 = DGLM alone, bit for bit), CAA alone
with multiplier 0 is plain decoding, and the CLI trains a vector, adds it and generates with it."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
import torch
from dglm.engine import bundle as bundle_io
from dglm.engine.api import GenerationParams
from dglm.engine.bundle import BundleConfig
from dglm.engine.cli.main import main
from dglm.engine.engine import Engine
from dglm.engine.methods.caa import (
    SteeringVector,
    SteeringVectorConfig,
    load_steering_vectors,
    save_steering_vectors,
)
from dglm.engine.probes import Control

PROMPTS = ["The movie was", "Prices are rising while"]


def random_vector(num_layers: int, hidden: int, layers=(0,), multiplier: float = 8.0):
    g = torch.Generator().manual_seed(11)
    v = torch.randn(num_layers, hidden, generator=g)
    config = SteeringVectorConfig(
        "sentiment", ("negative", "positive"), num_layers, hidden, layers, multiplier
    )
    return SteeringVector(config, torch.stack([-v, v]))


@pytest.fixture(scope="module")
def caa_bundle(tiny_bundle, tmp_path_factory):
    """The tiny bundle with a random steering vector for its sentiment probe."""
    out = tmp_path_factory.mktemp("caa") / "b"
    shutil.copytree(tiny_bundle, out)
    config = bundle_io.read_config(out)
    vec = random_vector(2, config.prompt_generator.decoder_dim)
    save_steering_vectors({"sentiment": vec}, out / bundle_io.STEERING_VECTORS_FILE)
    bundle_io.write_config(replace(config, steering_vectors=(vec.config,)), out)
    return out


@pytest.fixture(scope="module")
def engine(caa_bundle):
    return Engine.from_pretrained(caa_bundle)


def tokens(engine, controls, method=None, **kw) -> list[list[int]]:
    params = [
        GenerationParams(controls=controls, seed=3 + i, max_new_tokens=10, ignore_eos=True, **kw)
        for i in range(len(PROMPTS))
    ]
    return [o.samples[0].token_ids for o in engine.generate(PROMPTS, params, method=method)]


def test_control_syntax():
    c = Control.parse("sentiment=negative@caa")
    assert (c.probe, c.target, c.method) == ("sentiment", "negative", "caa")
    assert c.residual and not c.latent and not c.hidden
    assert not Control("s", "p").residual and not Control("s", "p", method="both").residual
    with pytest.raises(ValueError, match="caa_multiplier"):
        GenerationParams(caa_multiplier=float("nan"))
    with pytest.raises(ValueError, match="caa_multiplier"):
        GenerationParams(caa_multiplier=1e9)


def test_config_validation():
    ok = SteeringVectorConfig("sentiment", ["negative", "positive"], 30, 576, [12, 10, 12], 4)
    assert ok.layers == (10, 12) and ok.labels == ("negative", "positive") and ok.multiplier == 4.0
    bad = [
        (dict(layers=[30]), "layer 30"),
        (dict(layers=[]), "layers must be"),
        (dict(layers=[True]), "layer True"),
        (dict(multiplier=float("inf")), "multiplier"),
        (dict(labels=["negative"]), "labels"),
        (dict(labels=["a", "a"]), "distinct"),
        (dict(position="first"), "position"),
        (dict(hidden_size=0), "hidden_size"),
        (dict(probe=""), "probe"),
    ]
    base = ok.to_dict()
    for change, match in bad:
        with pytest.raises(ValueError, match=match):
            SteeringVectorConfig(**{**base, **change})


def test_bundle_config_field(tiny_bundle):
    config = bundle_io.read_config(tiny_bundle)
    entry = random_vector(2, 64).config.to_dict()
    d = {**config.to_dict(), "steering_vectors": [entry]}
    parsed = BundleConfig.from_dict(d)
    assert parsed.steering_vectors == (SteeringVectorConfig(**entry),)
    assert BundleConfig.from_dict(json.loads(json.dumps(parsed.to_dict()))) == parsed
    cases = [
        ([{**entry, "layers": [7]}], r"steering_vectors\[0\]: steering vector layer 7"),
        ([{**entry, "colour": 1}], r"steering_vectors\[0\]: unknown keys \['colour'\]"),
        ([entry, {**entry, "multiplier": 2}], r"steering_vectors\[1\]: probe 'sentiment' already"),
        ({"sentiment": entry}, "steering_vectors must be a list"),
        ([{k: v for k, v in entry.items() if k != "layers"}], "missing keys"),
    ]
    for value, match in cases:
        with pytest.raises(ValueError, match=match):
            BundleConfig.from_dict({**config.to_dict(), "steering_vectors": value})


def test_bundle_files_are_checked(caa_bundle, tmp_path):
    broken = tmp_path / "b"
    shutil.copytree(caa_bundle, broken)
    (broken / bundle_io.STEERING_VECTORS_FILE).unlink()
    with pytest.raises(ValueError, match="steering_vectors.safetensors is missing"):
        Engine.from_pretrained(broken)
    config = bundle_io.read_config(caa_bundle)
    wide = random_vector(2, 65)  # not the decoder's width
    save_steering_vectors({"sentiment": wide}, broken / bundle_io.STEERING_VECTORS_FILE)
    with pytest.raises(ValueError, match="shape"):
        Engine.from_pretrained(broken)
    bundle_io.write_config(replace(config, steering_vectors=(wide.config,)), broken)
    with pytest.raises(ValueError, match="2 blocks × 65 wide"):
        Engine.from_pretrained(broken)


def test_zero_multiplier_is_the_method_without_it(engine):
    caa = (Control("sentiment", "negative", method="caa"),)
    dglm = tokens(engine, ())
    assert tokens(engine, caa, caa_multiplier=0.0) == dglm  # unguided DGLM + a zero vector
    steered = tokens(engine, caa)  # the vector's default m = 8
    assert steered != dglm
    assert tokens(engine, caa, caa_multiplier=8.0) == steered  # the default, given explicitly
    assert tokens(engine, caa, caa_multiplier=-8.0) != steered
    plain = tokens(engine, (), method=engine.re_control)  # plain decoding of the prefix
    assert tokens(engine, caa, method=engine.caa, caa_multiplier=0.0) == plain
    assert tokens(engine, caa, method=engine.caa) != plain
    # CAA alone treats a default-method control as its own
    assert tokens(engine, (Control("sentiment", "negative"),), method=engine.caa) == tokens(
        engine, caa, method=engine.caa
    )


def test_composes_with_dglm(engine):
    dglm = (Control("sentiment", "negative", 30.0),)
    both = (*dglm, Control("sentiment", "negative", method="caa"))
    alone = tokens(engine, dglm)
    assert tokens(engine, both, caa_multiplier=0.0) == alone
    composed = tokens(engine, both)
    assert composed != alone
    # rows of one batch stay independent: a composed row decodes as it does alone
    params = [
        GenerationParams(controls=both, seed=3, max_new_tokens=10, ignore_eos=True),
        GenerationParams(controls=dglm, seed=4, max_new_tokens=10, ignore_eos=True),
    ]
    mixed = [o.samples[0].token_ids for o in engine.generate(PROMPTS, params)]
    assert mixed == [composed[0], alone[1]]


def test_requests_are_refused_by_name(engine, tiny_engine):
    with pytest.raises(ValueError, match="no steering vector"):
        tiny_engine.generate(
            PROMPTS[:1],
            GenerationParams(controls=(Control("sentiment", "negative", method="caa"),)),
        )
    with pytest.raises(ValueError, match="control target 7 is not a label"):
        engine.generate(PROMPTS[:1], GenerationParams(controls=(Control("sentiment", 7, method="caa"),)), method=engine.caa)  # fmt: skip
    assert "sentiment" in engine.info()["steering_vectors"]


def test_cli_trains_adds_and_generates(caa_bundle, tmp_path, monkeypatch, capsys):
    from dglm.engine.training import recipes

    texts = ["good fun", "a great day", "lovely", "bad", "awful, dull", "a waste"]
    labels = ["positive"] * 3 + ["negative"] * 3
    monkeypatch.setitem(
        recipes.LABELLED_SETS,
        "sentiment",
        (lambda: (texts, labels), ("negative", "positive")),
    )
    monkeypatch.setattr(recipes.data_mod, "split_of", lambda t: "train")
    vec_file = tmp_path / "v.safetensors"
    assert main(["train", "steering-vector", "sentiment", "--bundle", str(caa_bundle),
                 "--layers", "1", "--per-label", "2", "--out", str(vec_file)]) == 0  # fmt: skip
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["layers"] == [1] and printed["examples"] == 2 and len(printed["norms"]) == 2
    (vec,) = load_steering_vectors(vec_file).values()
    out = tmp_path / "bundle"
    assert main(["bundle", "add-steering-vector", str(caa_bundle), "--vector", str(vec_file),
                 "--layers", "0,1", "--multiplier", "3", "--out", str(out)]) == 0  # fmt: skip
    config = bundle_io.read_config(out)
    assert config.steering_vectors[0].layers == (0, 1)
    assert config.steering_vectors[0].multiplier == 3.0
    stored = bundle_io.load_bundle_steering_vectors(config, out)["sentiment"]
    assert torch.equal(stored.vectors, vec.vectors)
    capsys.readouterr()
    for method in ("dglm", "caa"):
        assert main(["generate", "The movie was", "--bundle", str(out), "--control",
                     "sentiment=negative@caa", "--method", method, "--caa-multiplier", "2",
                     "--max-new-tokens", "4", "--seed", "0"]) == 0  # fmt: skip
    assert capsys.readouterr().out.strip()
