"""`dglm generate` and `dglm info` on the tiny bundle: text, JSON, timings, exit codes."""

from __future__ import annotations

import json

from dglm.engine.cli.main import main


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
