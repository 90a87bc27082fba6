"""The settings `dglm eval` runs for a bundle's probes, and the presets."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from dglm.engine.evaluation.settings import (
    DEFAULT_SCALE,
    PRESETS,
    RENOISE_SWEEP,
    EvalConfig,
    build_settings,
    low_toxicity_target,
    target_rate,
)
from dglm.engine.probes import Probe


def test_settings_cover_every_probe_and_skip_missing_ones(gen):
    def probe(name, labels):
        rows = 1 if len(labels) == 2 else len(labels)
        return Probe(name, labels, torch.randn(rows, 8, generator=gen), torch.zeros(rows))

    config = EvalConfig(guidance_scales=(10.0, 50.0), fudge_strengths=(1.0,))
    probes = {
        "sentiment": probe("sentiment", ("negative", "positive")),
        "toxicity": probe("toxicity", ("low", "high")),
    }
    settings, skipped = build_settings(config, probes, 0.95)
    names = [s.name for s in settings]
    assert skipped == []
    assert "dglm toxicity=low:10" in names and "dglm toxicity=low:50" in names
    assert "fudge sentiment=negative λ=1" in names
    assert [s.renoise_alpha2 for s in settings if s.group == "fidelity"] == list(RENOISE_SWEEP)
    assert low_toxicity_target(probe("toxicity", ("clean", "toxic"))) == "clean"
    assert low_toxicity_target(probe("toxicity", ("a", "b"))) == "a"  # binary: y = 0
    with pytest.raises(ValueError, match="no non-toxic class"):
        low_toxicity_target(probe("toxicity", ("a", "b", "c")))
    settings, skipped = build_settings(config, {}, 0.95)
    assert [s["setting"] for s in skipped] == ["sentiment", "toxicity=low"]
    assert [s.name for s in settings][:2] == ["decoder", "dglm unguided"]


def test_presets_judge_with_gemma_and_hold_the_default_scale():
    # the presets judge with Gemma; full (dev) and test hold ≥ 400 continuations per cell; the
    # quick preset is dev; the dev sweeps hold the default scale, test runs only the bundle's own
    assert all(p.gemma for p in PRESETS.values())
    for name in ("full", "test"):
        assert PRESETS[name].num_prefixes * PRESETS[name].num_samples >= 400
    assert PRESETS["quick"].split == PRESETS["full"].split == "dev"
    assert PRESETS["test"].split == "test" and PRESETS["test"].guidance_scales == ()
    for preset in (PRESETS["full"], PRESETS["quick"]):
        assert DEFAULT_SCALE in preset.guidance_scales and len(preset.guidance_scales) >= 3


def test_re_control_step_size_sweep_and_the_only_filter(gen):
    """--re-control-step-sizes adds DGLM + RE-Control rows at each α (the same control, α
    carried to GenerationParams), --only keeps the settings whose names contain a string, and bad
    values name the field."""
    probes = {
        "sentiment": Probe(
            "sentiment", ("negative", "positive"), torch.randn(1, 8, generator=gen), torch.zeros(1)
        )
    }
    config = EvalConfig(re_control_step_sizes=(2.0, 8.0), only=("re-control", "decoder"))
    settings, _ = build_settings(config, probes, 0.95, ("sentiment",), 1000.0)
    names = [s.name for s in settings]
    assert names == [
        "decoder",
        "re-control sentiment=positive",
        "dglm+re-control sentiment=positive:1000",
        "dglm+re-control sentiment=positive:1000 α=2",
        "dglm+re-control sentiment=positive:1000 α=8",
        "re-control sentiment=negative",
        "dglm+re-control sentiment=negative:1000",
        "dglm+re-control sentiment=negative:1000 α=2",
        "dglm+re-control sentiment=negative:1000 α=8",
    ]
    alphas = [s.re_control_step_size for s in settings if s.method == "dglm+re-control"]
    assert alphas == [None, 2.0, 8.0] * 2
    assert len({s.controls for s in settings if s.method == "dglm+re-control"}) == 2
    for bad in ((0.0,), (float("nan"),), (1e9,)):
        with pytest.raises(ValueError, match="re_control_step_sizes"):
            EvalConfig(re_control_step_sizes=bad)
    # --re-control-scales: combined rows with DGLM at other scales (the default's not repeated)
    config = EvalConfig(re_control_scales=(300.0, 1000.0, 300.0), only=("+re-control",))
    settings, _ = build_settings(config, probes, 0.95, ("sentiment",), 1000.0)
    assert [(s.name, s.scale, s.controls[0].scale) for s in settings] == [
        ("dglm+re-control sentiment=positive:1000", 1000.0, 1000.0),
        ("dglm+re-control sentiment=positive:300", 300.0, 300.0),
        ("dglm+re-control sentiment=negative:1000", 1000.0, 1000.0),
        ("dglm+re-control sentiment=negative:300", 300.0, 300.0),
    ]
    assert {s.controls[0].method for s in settings} == {"both"}
    assert all(s.re_control_step_size is None for s in settings)
    for bad in ((0.0,), (float("inf"),)):
        with pytest.raises(ValueError, match="re_control_scales"):
            EvalConfig(re_control_scales=bad)
    with pytest.raises(ValueError, match="only"):
        EvalConfig(only=("",))


def test_composition_two_controls_two_methods(gen):
    """With a toxicity value network, `dglm eval` adds one request of two controls: DGLM steers
    sentiment negative at the default scale, RE-Control holds toxicity at the probe's non-toxic
    label; its target is VADER negative. Without the value network, or without a negative label,
    there is none."""

    def probe(name, labels):
        return Probe(name, labels, torch.randn(1, 8, generator=gen), torch.zeros(1))

    probes = {
        "sentiment": probe("sentiment", ("negative", "positive")),
        "toxicity": probe("toxicity", ("non_toxic", "toxic")),
    }
    config = EvalConfig(only=(" + ",))
    settings, _ = build_settings(config, probes, 0.9, ("sentiment", "toxicity"), 1000.0)
    assert [s.name for s in settings] == [
        "dglm sentiment=negative:1000 + re-control toxicity=non_toxic"
    ]
    (s,) = settings
    assert s.group == "composition" and s.method == "dglm+re-control"
    assert [(c.probe, c.target, c.method, c.scale) for c in s.controls] == [
        ("sentiment", "negative", "dglm", 1000.0),
        ("toxicity", "non_toxic", "re-control", None),
    ]
    assert s.renoise_alpha2 == 0.9
    assert target_rate(s, {"vader_negative": 0.7, "toxicity_frac": 0.1}) == 0.7
    for nets, labels in ((("sentiment",), ("negative", "positive")), (("toxicity",), ("a", "b"))):
        ps = {**probes, "sentiment": probe("sentiment", labels)}
        assert build_settings(config, ps, 0.9, nets, 1000.0)[0] == []
    assert build_settings(EvalConfig(re_control=False, only=(" + ",)), probes, 0.9,
                          ("toxicity",), 1000.0)[0] == []  # fmt: skip


def test_test_split_refuses_every_sweep():
    from dglm.engine.evaluation.settings import PRESETS, SWEEP_FIELDS, check_test_config

    test = PRESETS["test"]
    check_test_config(test)  # the preset itself is fine
    check_test_config(replace(test, num_prefixes=10, split="test"))  # n is not a setting
    changed = {
        "guidance_scales": (10.0,), "renoise_alpha2s": (0.95,), "fudge_strengths": (1.0,),
        "re_control_step_sizes": (8.0,), "re_control_plausibilities": (0.1,),
        "re_control_scales": (100.0,), "seed": 1, "prefixes": ("a prefix",),
        "no_repeat_ngram_size": 0, "caa_layer_sets": ((10,),), "caa_multipliers": (4.0,),
        "caa_vector": "v.safetensors",
    }  # fmt: skip
    assert set(changed) == set(SWEEP_FIELDS)
    for field, value in changed.items():
        with pytest.raises(ValueError, match=field):
            check_test_config(replace(test, **{field: value}))
    check_test_config(replace(PRESETS["full"], guidance_scales=(10.0,)))  # dev: anything goes
    with pytest.raises(ValueError, match="split must be one of"):
        EvalConfig(split="train")


def test_plain_decoding_with_the_same_truncation_is_a_row():
    probes = {}
    settings, _ = build_settings(EvalConfig(), probes, 0.95, plausibility=0.1)
    plain = [s for s in settings if s.method == "decoder"]
    assert [(s.name, s.min_p) for s in plain] == [("decoder", None), ("decoder min-p 0.1", 0.1)]
    settings, _ = build_settings(EvalConfig(), probes, 0.95)  # prompt guidance off: no such row
    assert [s.name for s in settings if s.method == "decoder"] == ["decoder"]
