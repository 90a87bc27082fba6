"""Controls a bundle implies (config.json implied_controls, e.g. toxicity=low through RE-Control
with sentiment=negative): added to the requests they name, never over the request's own control
of that probe, off per request, refused at load when the bundle cannot run them, and measured by
`dglm eval` with a twin row without them."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
import torch
from dglm.engine import bundle as bundle_io
from dglm.engine.api import GenerationParams
from dglm.engine.cli.generate import add_parser
from dglm.engine.engine import Engine
from dglm.engine.evaluation.settings import EvalConfig, build_settings
from dglm.engine.methods.re_control import ValueNetConfig, ValueNetwork
from dglm.engine.probes import Control, Probe, load_probes, save_probes, with_implied

IMPLIED = {"sentiment=negative": ("toxicity=low@re-control",)}
PROMPTS = ["The movie was", "Prices are rising while"]


def test_with_implied_adds_once_and_never_over_the_requests_own_control():
    neg, pos = Control("sentiment", "negative"), Control("sentiment", "positive")
    low = Control("toxicity", "low", method="re-control")
    assert with_implied((neg,), IMPLIED) == (neg, low)
    assert with_implied((pos,), IMPLIED) == (pos,)
    assert with_implied((), IMPLIED) == ()
    own = Control("toxicity", "high", 5.0)  # the request's own toxicity control wins
    assert with_implied((neg, own), IMPLIED) == (neg, own)
    assert with_implied((own, neg), IMPLIED) == (own, neg)
    # the method of the naming control does not matter; two keys implying one probe add it once
    both = Control("sentiment", "negative", method="both")
    assert with_implied((both,), IMPLIED) == (both, low)
    table = {**IMPLIED, "topic=sports": ("toxicity=high",)}
    assert with_implied((neg, Control("topic", "sports")), table)[2:] == (low,)


@pytest.fixture(scope="module")
def implied_bundle(tiny_bundle, tmp_path_factory):
    """The tiny bundle with a toxicity probe (random, labels low/high), a value network for it
    with a large step (its edit changes tokens) and sentiment=negative implying toxicity=low."""
    out = tmp_path_factory.mktemp("implied") / "b"
    shutil.copytree(tiny_bundle, out)
    config = bundle_io.read_config(out)
    torch.manual_seed(0)
    probes = load_probes(out / bundle_io.PROBES_FILE)
    toxicity = Probe("toxicity", ("low", "high"), torch.randn(1, 384), torch.zeros(1))
    save_probes(out / bundle_io.PROBES_FILE, [*probes, toxicity])
    hidden = config.prompt_generator.decoder_dim
    vc = ValueNetConfig("toxicity", hidden, 1, hidden_dim=16, depth=2, steps=10, step_size=200.0)
    bundle_io.save_value_networks({"toxicity": ValueNetwork(vc)}, out / bundle_io.VALUE_NETS_FILE)
    bundle_io.write_config(replace(config, value_networks=(vc,), implied_controls=IMPLIED), out)
    return out


@pytest.fixture(scope="module")
def engine(implied_bundle):
    return Engine.from_pretrained(implied_bundle)


def tokens(engine, controls, **kw):
    params = [
        GenerationParams(controls=controls, seed=5 + i, max_new_tokens=12, ignore_eos=True, **kw)
        for i in range(len(PROMPTS))
    ]
    return [o.samples[0].token_ids for o in engine.generate(PROMPTS, params)]


def test_the_engine_adds_the_implied_control_and_a_request_can_turn_it_off(engine):
    neg = Control("sentiment", "negative")
    low = Control("toxicity", "low", method="re-control")
    implied = tokens(engine, (neg,))
    explicit = tokens(engine, (neg, low), implied_controls=False)
    alone = tokens(engine, (neg,), implied_controls=False)
    assert implied == explicit  # exactly the composition, written out
    assert implied != alone  # and the edit changes the text (else the test could not fail)
    # controls the table does not name are untouched
    pos = Control("sentiment", "positive")
    assert tokens(engine, (pos,)) == tokens(engine, (pos,), implied_controls=False)
    # validate() sees the same requests generate() runs
    assert engine.validate(PROMPTS, [GenerationParams(controls=(neg,))] * 2)


def test_implied_controls_must_be_a_boolean():
    with pytest.raises(ValueError, match="implied_controls must be True or False"):
        GenerationParams(implied_controls="no")


@pytest.mark.parametrize(
    "table, message",
    [
        ({"sentiment=negative": ["topic=sports"]}, "no probe|unknown probe|topic"),
        ({"sentiment=negative": ["toxicity=medium@re-control"]}, "medium"),
        ({"sentiment=negative": ["sentiment2=low"]}, "sentiment2"),
    ],
)
def test_a_bundle_implying_what_it_cannot_run_is_refused_at_load(
    implied_bundle, tmp_path, table, message
):
    out = tmp_path / "b"
    shutil.copytree(implied_bundle, out)
    data = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**data, "implied_controls": table}))
    with pytest.raises(ValueError, match="implied_controls") as e:
        Engine.from_pretrained(out)
    assert any(word in str(e.value) for word in message.split("|")), str(e.value)


def test_a_re_control_implied_control_needs_a_value_network(implied_bundle, tmp_path):
    out = tmp_path / "b"
    shutil.copytree(implied_bundle, out)
    data = json.loads((out / "config.json").read_text())
    data["implied_controls"] = {"toxicity=high": ["sentiment=positive@re-control"]}
    (out / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="no value network for 'sentiment'"):
        Engine.from_pretrained(out)


def test_the_cli_turns_them_off():
    import argparse

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    assert parser.parse_args(["generate", "x"]).implied_controls is True
    assert parser.parse_args(["generate", "x", "--no-implied-controls"]).implied_controls is False


def test_eval_rows_carry_them_and_a_twin_row_goes_without(engine):
    probes = engine.probes.probes
    config = EvalConfig(guidance_scales=(300.0, 1000.0), fudge_strengths=(1.0,))
    settings, _ = build_settings(config, probes, 0.95, ("toxicity",), 1000.0, 0.0, IMPLIED)
    by_name = {s.name: s for s in settings}
    twin = by_name["dglm sentiment=negative:1000 without implied"]
    assert (
        not twin.implied_controls
        and twin.controls == by_name["dglm sentiment=negative:1000"].controls
    )
    # one twin per row the table changes at the default scale: not positive, not FUDGE, not 300
    twins = sorted(n for n in by_name if n.endswith(" without implied"))
    assert twins == ["dglm sentiment=negative:1000 without implied"], twins
    low = Control("toxicity", "low", method="re-control")
    assert by_name["dglm sentiment=negative:1000"].effective_controls(IMPLIED)[-1] == low
    assert twin.effective_controls(IMPLIED) == twin.controls
    # without a table, no twins
    plain, _ = build_settings(config, probes, 0.95, ("toxicity",), 1000.0)
    assert not any(s.name.endswith(" without implied") for s in plain)
