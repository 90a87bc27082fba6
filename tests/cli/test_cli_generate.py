"""`dglm generate` and `dglm info` on the tiny bundle: text, JSON, timings, exit codes."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from dglm.engine import bundle as bundle_io
from dglm.engine.cli.main import main
from dglm.engine.engine import Engine


def test_generate_prints_text_and_timings(tiny_bundle, capsys):
    rc = main(
        [
            "generate",
            "The movie was",
            "--bundle",
            str(tiny_bundle),
            "--control",
            "sentiment=positive:20",
            "--max-new-tokens",
            "4",
            "--seed",
            "3",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert out.startswith("The movie was")
    assert "timings:" in out and "diffusion=" in out and "decode=" in out


def test_generate_json(tiny_bundle, capsys):
    rc = main(
        [
            "generate",
            "A",
            "B",
            "--bundle",
            str(tiny_bundle),
            "--json",
            "--max-new-tokens",
            "3",
            "-n",
            "2",
        ]
    )
    rows = json.loads(capsys.readouterr().out)
    assert rc == 0 and [r["prompt"] for r in rows] == ["A", "B"]
    assert all(len(r["samples"]) == 2 for r in rows)
    assert rows[0]["timings_s"]["total"] > 0


def test_bad_control_exit_code(tiny_bundle, capsys):
    rc = main(["generate", "x", "--bundle", str(tiny_bundle), "--control", "nope=positive"])
    assert rc == 2
    assert "unknown probe 'nope'" in capsys.readouterr().err


def test_info(tiny_bundle, capsys):
    assert main(["info", "--bundle", str(tiny_bundle)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["latent_dim"] == 384 and "sentiment" in info["probes"]
    assert info["probes"]["sentiment"]["metrics"]["train_accuracy"] > 0.8


@pytest.mark.parametrize(
    "args, match",
    [
        (["x", "--stop", ""], "stop[0] must be a non-empty string"),
        (["x", "--temperature", "1e-40"], "temperature must be 0 or"),
        (["x", "--control", "sentiment=positive:1e30"], "controls: the scale of probe 'sentiment'"),
        (["x", "--control", "sentiment=positive:big"], "control scale must be a number"),
        (["ok", "\udcff\udcfe"], "prompts[1] is not valid UTF-8"),  # invalid bytes in argv
    ],
)
def test_bad_input_is_a_one_line_error(tiny_bundle, capsys, args, match):
    rc = main(["generate", *args, "--bundle", str(tiny_bundle), "--max-new-tokens", "2"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert err.splitlines()[-1].startswith("dglm: error: ") and match in err.splitlines()[-1]


def test_a_damaged_bundle_is_a_one_line_error(tiny_bundle, tmp_path, capsys):
    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    (bundle / bundle_io.SCORE_NET_FILE).write_bytes(b"not safetensors")
    assert main(["generate", "x", "--bundle", str(bundle)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dglm: error: ") and "score_network.safetensors" in err
    assert err.count("\n") == 1


@pytest.mark.parametrize("command", ["generate", "info"])
def test_an_unavailable_device_is_a_usage_error(tiny_bundle, capsys, command):
    missing = torch.cuda.device_count() if torch.cuda.is_available() else 0
    args = [command, *(["x"] if command == "generate" else [])]
    with pytest.raises(SystemExit) as e:
        main([*args, "--bundle", str(tiny_bundle), "--device", f"cuda:{missing}"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --device: device 'cuda:{missing}' is not available" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "args, match",
    [
        ([""], r"prompts\[0\] is empty"),  # the shipped default bundle
        (["ok", "  "], r"prompts\[1\] is empty"),
        (["ok", "\udcff"], r"prompts\[1\] is not valid UTF-8"),
        (["x", "--temperature", "1e-40"], "temperature must be 0 or"),
        (["x", "--stop", ""], r"stop\[0\] must be a non-empty string"),
        (["x", "--control", "sentiment=positive:big"], "control scale must be a number"),
        (["x", "--steps", "0"], r"num_inference_steps must be an integer in \[1, 10000\]"),
        # the default bundle's sampler is its distilled student: 1-4 steps
        (["x", "--steps", "100"], r"outside \[1, 4\].*sampler='consistency': the bundle's default"),
        (["x", "--sampler", "consistency", "--steps", "5"], r"outside \[1, 4\]"),
    ],
)
def test_request_checks_run_before_any_model_loads(monkeypatch, capsys, args, match):
    """`dglm generate ""` used to load the encoder and decoder (~17 s) before refusing the
    prompt: every check that needs no model runs first."""
    loads = []

    def from_pretrained(*a, **kw):
        loads.append(a)
        raise RuntimeError("a model was loaded")

    monkeypatch.setattr(Engine, "from_pretrained", from_pretrained)
    rc = main(["generate", *args, "--bundle", "default"])
    err = capsys.readouterr().err
    assert loads == []
    assert rc == 2 and err.startswith("dglm: error: ") and err.count("\n") == 1
    assert re.search(match, err), err


def test_a_good_request_still_loads_the_bundle(monkeypatch, capsys):
    """The early checks pass a valid request on to the engine (guards the test above)."""
    loads = []

    def from_pretrained(*a, **kw):
        loads.append(a)
        raise RuntimeError("stop here")

    monkeypatch.setattr(Engine, "from_pretrained", from_pretrained)
    assert main(["generate", "x", "--steps", "2"]) == 1
    assert loads == [("default",)]
    assert "stop here" in capsys.readouterr().err


def test_a_student_sampler_on_a_bundle_without_one_is_refused_before_loading(
    tiny_bundle, monkeypatch, capsys
):
    monkeypatch.setattr(Engine, "from_pretrained", lambda *a, **kw: pytest.fail("loaded"))
    rc = main(["generate", "x", "--bundle", str(tiny_bundle), "--sampler", "consistency"])
    assert rc == 2 and "needs a distilled student" in capsys.readouterr().err
