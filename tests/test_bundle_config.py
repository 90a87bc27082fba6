"""config.json is checked field by field at load: a bad value of any field is refused by
`read_config` with a ValueError naming the file and the field (its key path), not later."""

from __future__ import annotations

import copy
import json
import re
from dataclasses import fields

import pytest
from dglm.engine import bundle as bundle_io
from dglm.engine.bundle import NESTED, BundleConfig
from dglm.engine.methods.re_control import ValueNetConfig

# the shipped default bundle's config holds every field (a student, adapters, value networks)
BASE = json.loads((bundle_io.resolve_bundle_dir("default") / "config.json").read_text())

# (key path, a bad value): at least one per field of the config and of every config it nests;
# `test_every_field_has_a_bad_value` keeps the table complete as fields are added
BAD = [
    (("format",), "dglm-bundel"),
    (("version",), "1"),
    (("version",), True),
    (("encoder",), 3),
    (("encoder",), ""),
    (("decoder",), None),
    (("decoder",), ["smollm2"]),
    (("score_network",), "compact"),
    (("prompt_generator",), []),
    (("sampler",), 4),
    (("cfg_scale",), "abc"),  # loaded before, then a TypeError inside methods/dglm.py
    (("cfg_scale",), True),
    (("cfg_scale",), 1e9),
    (("cfg_scale",), 2.0),  # outside the default student's distilled range [1, 1]
    (("trained",), "no"),
    (("trained",), 1),
    (("notes",), 7),
    (("student",), 3),
    (("student_cfg_range",), [1.0]),
    (("student_cfg_range",), ["1", "2"]),
    (("student_cfg_range",), [2.0, 1.0]),
    (("student_cfg_range",), "1,1"),
    (("decoder_lora",), "rank-8"),
    (("control_scale",), "big"),
    (("control_scale",), 0),
    (("prompt_guidance",), "2"),
    (("prompt_guidance",), -1.0),
    (("prompt_plausibility",), 1.5),
    (("prompt_plausibility",), False),
    (("no_repeat_ngram_size",), 2.0),
    (("no_repeat_ngram_size",), -1),
    (("no_repeat_ngram_size",), True),
    (("implied_controls",), ["toxicity=low@re-control"]),  # a list, not a mapping
    (("implied_controls",), {"sentiment": ["toxicity=low"]}),  # key without a target
    (("implied_controls",), {"sentiment=negative:1000": ["toxicity=low"]}),  # key with a scale
    (("implied_controls",), {"sentiment=negative": "toxicity=low"}),  # not a list
    (("implied_controls",), {"sentiment=negative": []}),
    (("implied_controls",), {"sentiment=negative": ["toxicity"]}),  # not a control
    (("implied_controls",), {"sentiment=negative": ["toxicity=low@caa-x"]}),  # no such method
    (("implied_controls",), {"sentiment=negative": ["sentiment=positive"]}),  # the same probe
    (("implied_controls",), {"sentiment=negative": [3]}),
    (("steering_vectors",), {}),
    (("steering_vectors",), "sentiment"),
    (("value_networks",), {}),
    (("value_networks",), "sentiment"),
    (("score_network", "latent_dim"), 384.0),
    (("score_network", "dim"), True),
    (("score_network", "depth"), 3),  # odd: dense skips pair the blocks
    (("score_network", "head_dim"), "64"),
    (("score_network", "num_tokens"), 0),
    (("score_network", "output_dim_mult"), -8),
    (("score_network", "guidance_embedding"), "false"),
    (("score_network", "bogus"), 1),
    (("prompt_generator", "latent_dim"), "384"),
    (("prompt_generator", "decoder_dim"), 0),
    (("prompt_generator", "dim"), 256.5),
    (("prompt_generator", "depth"), True),
    (("prompt_generator", "head_dim"), -64),
    (("prompt_generator", "prompt_len"), None),
    (("sampler", "sampler"), "euler"),
    (("sampler", "sampler"), ["ddpm"]),
    (("sampler", "num_inference_steps"), 100),  # the default student runs 1-4 steps
    (("sampler", "num_inference_steps"), 4.0),
    (("sampler", "num_inference_steps"), True),
    (("sampler", "var_lambda"), "abc"),
    (("sampler", "var_lambda"), 2.0),
    (("sampler", "schedule_scale"), 0),
    (("sampler", "schedule_scale"), "1"),
    (("sampler", "guidance_mode"), "slow"),
    (("sampler", "mc_samples"), 1.5),
    (("sampler", "mc_samples"), False),
    (("sampler", "rescale"), "yes"),
    (("sampler", "renoise_alpha2"), 2),
    (("sampler", "renoise_alpha2"), "0.9"),
    (("student", "latent_dim"), 128),  # differs from the score network's
    (("student", "dim"), "256"),
    (("student", "depth"), 0),
    (("student", "head_dim"), 48),  # does not divide dim
    (("student", "num_tokens"), 7),  # does not divide latent_dim·8
    (("student", "output_dim_mult"), 1.5),
    (("student", "guidance_embedding"), False),  # a student takes w as an input
    (("decoder_lora", "rank"), 0),
    (("decoder_lora", "rank"), True),
    (("decoder_lora", "alpha"), "16"),
    (("decoder_lora", "alpha"), -1.0),
    (("decoder_lora", "targets"), "wqkv"),  # a string, not a list of names
    (("decoder_lora", "targets"), []),
    (("decoder_lora", "targets"), ["wqkv", 3]),
    (("value_networks", 0), "sentiment"),
    (("value_networks", 0, "probe"), ""),
    (("value_networks", 0, "input_dim"), 0),
    (("value_networks", 0, "outputs"), True),
    (("value_networks", 0, "hidden_dim"), 1.5),
    (("value_networks", 0, "depth"), "2"),
    (("value_networks", 0, "steps"), -1),
    (("value_networks", 0, "step_size"), "big"),
    (("value_networks", 0, "step_size_with_dglm"), -1.0),
    (("value_networks", 0, "plausibility"), 1.0),
    (("value_networks", 0, "plausibility_with_dglm"), "x"),
    (("value_networks", 1, "probe"), "sentiment"),  # two networks for one probe
]


def with_value(path: tuple, value: object) -> dict:
    data = copy.deepcopy(BASE)
    node = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return data


def named(path: tuple) -> list[str]:
    """The words a message must hold to name `path`: every key, a list index with its list
    ("value_networks[0]")."""
    words = []
    for key in path:
        if isinstance(key, int):
            words[-1] += f"[{key}]"
        else:
            words.append(key)
    return words


def test_the_base_config_loads(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(BASE))
    assert bundle_io.read_config(tmp_path) == BundleConfig.from_dict(BASE)


@pytest.mark.parametrize("path, value", BAD, ids=[f"{'.'.join(map(str, p))}={v!r}" for p, v in BAD])
def test_a_bad_value_is_refused_at_load_naming_the_file_and_field(tmp_path, path, value):
    (tmp_path / "config.json").write_text(json.dumps(with_value(path, value)))
    with pytest.raises(ValueError) as e:
        bundle_io.read_config(tmp_path)
    message = str(e.value)
    assert message.startswith(f"{tmp_path / 'config.json'}: "), message
    for word in named(path):
        assert re.search(rf"(?<![\w]){re.escape(word)}(?![\w])", message), (word, message)


def test_a_missing_key_of_a_nested_config_is_named(tmp_path):
    data = copy.deepcopy(BASE)
    del data["value_networks"][1]["input_dim"]
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"value_networks\[1\]: missing keys \['input_dim'\]"):
        bundle_io.read_config(tmp_path)


def test_every_field_has_a_bad_value():
    """The table covers every field of BundleConfig and of each config it holds."""
    covered = {tuple(k for k in p if not isinstance(k, int)) for p, _ in BAD}
    expected = {("format",), ("version",)} | {(f.name,) for f in fields(BundleConfig)}
    for name, cls in NESTED.items():
        expected |= {(name, f.name) for f in fields(cls)}
    expected |= {("value_networks", f.name) for f in fields(ValueNetConfig)}
    assert expected <= covered, sorted(expected - covered)
