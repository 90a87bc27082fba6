"""CAA rows in `dglm eval`: one per sentiment target at the steering vector's defaults, a dev sweep
over block sets × multipliers (refused on the test split, in the config and on the command line),
a vector file in place of the bundle's (dev), and rows run on the released decoder: multiplier 0
gives plain decoding's continuations exactly."""

from __future__ import annotations

import shutil
from dataclasses import replace

import pytest
import torch
from decoder_fixtures import one_thread  # noqa: F401 (autouse fixture)
from dglm.engine import bundle as bundle_io
from dglm.engine.cli.main import main
from dglm.engine.engine import Engine
from dglm.engine.evaluation.report import render_markdown
from dglm.engine.evaluation.run import run_eval
from dglm.engine.evaluation.settings import PRESETS, EvalConfig, build_settings, check_test_config
from dglm.engine.methods.caa import SteeringVector, SteeringVectorConfig, save_steering_vectors


def vector(hidden: int, layers=(1,), multiplier: float = 6.0) -> SteeringVector:
    g = torch.Generator().manual_seed(5)
    v = torch.randn(2, hidden, generator=g)
    c = SteeringVectorConfig("sentiment", ("negative", "positive"), 2, hidden, layers, multiplier)
    return SteeringVector(c, torch.stack([-v, v]))


@pytest.fixture(scope="module")
def caa_engine(tiny_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_caa") / "b"
    shutil.copytree(tiny_bundle, out)
    config = bundle_io.read_config(out)
    vec = vector(config.prompt_generator.decoder_dim)
    save_steering_vectors({"sentiment": vec}, out / bundle_io.STEERING_VECTORS_FILE)
    bundle_io.write_config(replace(config, steering_vectors=(vec.config,)), out)
    return Engine.from_pretrained(out)


def test_caa_settings(sentiment_probe):
    probes = {"sentiment": sentiment_probe}
    settings, _ = build_settings(EvalConfig(), probes, 0.95, steering_vectors=("sentiment",))
    caa = [s for s in settings if s.method == "caa"]
    assert [s.name for s in caa] == ["caa sentiment=positive", "caa sentiment=negative"]
    assert all(s.caa_layers is None and s.caa_multiplier is None for s in caa)
    assert not [s for s in build_settings(EvalConfig(), probes, 0.95)[0] if s.method == "caa"]
    sweep = EvalConfig(caa_layer_sets=((0,), (0, 1)), caa_multipliers=(2.0, 4.0))
    caa = [s for s in build_settings(sweep, probes, 0.95, steering_vectors=("sentiment",))[0]
           if s.method == "caa"]  # fmt: skip
    assert len(caa) == 2 * 2 * 2 and caa[1].name == "caa sentiment=positive L=0 m=4"
    assert caa[2].caa_layers == (0, 1) and caa[2].caa_multiplier == 2.0
    # a bundle's implied controls: a twin without them for CAA at its defaults, not for the sweep
    implied = {"sentiment=negative": ("sentiment2=x@re-control",)}
    names = [s.name for s in build_settings(EvalConfig(), probes, 0.95, (), 10.0, 0.0, implied,
                                            ("sentiment",))[0]]  # fmt: skip
    assert "caa sentiment=negative without implied" in names
    assert "caa sentiment=positive without implied" not in names  # nothing implied for it
    names = [s.name for s in build_settings(sweep, probes, 0.95, (), 10.0, 0.0, implied,
                                            ("sentiment",))[0]]  # fmt: skip
    assert not [n for n in names if n.startswith("caa") and "without implied" in n]
    with pytest.raises(ValueError, match="caa_layer_sets"):
        EvalConfig(caa_layer_sets=((),))
    for field, value in (("caa_layer_sets", ((3,),)), ("caa_multipliers", (2.0,)),
                         ("caa_vector", "v.safetensors")):  # fmt: skip
        with pytest.raises(ValueError, match=field):
            check_test_config(replace(PRESETS["test"], **{field: value}))


def test_eval_cli_test_split_refuses_caa_flags(tiny_bundle, capsys, monkeypatch):
    import dglm.engine.engine as engine_mod

    def no_load(*a, **k):
        raise AssertionError("a refused request must not load a model")

    monkeypatch.setattr(engine_mod.Engine, "from_pretrained", no_load)
    for flags in (["--caa-layers", "1;0+1"], ["--caa-multipliers", "2,4"],
                  ["--caa-vector", "v.safetensors"]):  # fmt: skip
        assert main(["eval", "--bundle", str(tiny_bundle), "--split", "test", *flags]) == 2
        err = capsys.readouterr().err
        assert "--split test runs the bundle's defaults only" in err and flags[0] in err


def test_caa_rows_end_to_end(caa_engine, tiny_reference_lm, tmp_path):
    config = EvalConfig(
        prefixes=("The movie was", "I think the food"),
        num_samples=2,
        max_new_tokens=5,
        guidance_scales=(),
        renoise_alpha2s=(),
        fudge_strengths=(),
        batch_size=1,
        caa_layer_sets=((1,), (0, 1)),
        caa_multipliers=(0.0, 6.0),
        only=("decoder", "caa sentiment=negative"),
    )
    report, samples = run_eval(caa_engine, config, reference_lm=tiny_reference_lm)
    rows = {r["setting"]: r for r in report["rows"]}
    assert set(rows) == {
        "decoder",
        *(f"caa sentiment=negative L={L} m={m}" for L in ("1", "0+1") for m in (0, 6)),
    }
    r = rows["caa sentiment=negative L=0+1 m=6"]
    assert (r["method"], r["caa_layers"], r["caa_multiplier"], r["n"]) == ("caa", [0, 1], 6.0, 4)
    texts = {}
    for s in samples:
        texts.setdefault(s["setting"], []).append(s["continuation"])
    assert texts["caa sentiment=negative L=1 m=0"] == texts["decoder"]  # m = 0: plain decoding
    assert texts["caa sentiment=negative L=0+1 m=6"] != texts["decoder"]
    assert "CAA L=0+1 m=6" in render_markdown(report)
    # a vector file in place of the bundle's (dev): its own defaults
    path = tmp_path / "v.safetensors"
    save_steering_vectors({"sentiment": vector(64, (0,), 3.0)}, path)
    config = replace(config, caa_layer_sets=(), caa_multipliers=(), caa_vector=str(path),
                     only=("caa sentiment=positive",))  # fmt: skip
    report, _ = run_eval(caa_engine, config, reference_lm=tiny_reference_lm)
    (row,) = report["rows"]
    assert (row["caa_layers"], row["caa_multiplier"]) == ([0], 3.0)
