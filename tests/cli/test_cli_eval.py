"""`dglm eval` from the command line on the tiny bundle: flags, output files, usage errors."""

from __future__ import annotations

import json

import pytest
from decoder_fixtures import one_thread  # noqa: F401 (autouse fixture)
from dglm.engine.cli.main import main


def test_eval_cli(tiny_bundle, tmp_path, capsys):

    out = tmp_path / "cli"
    rc = main(
        [
            "eval", "--bundle", str(tiny_bundle), "--quick", "--out", str(out), "--prefixes", "2",
            "--sources", "rotten_tomatoes", "--max-new-tokens", "3", "--scales", "10",
            "--renoise", "0.95,0", "--fudge-top-k", "3", "--no-gemma",
        ]
    )  # fmt: skip
    assert rc == 0
    report = json.loads((out / "results.json").read_text())
    assert len(report["prefixes"]) == 2 and report["config"]["guidance_scales"] == [10.0]
    assert report["config"]["gemma"] is False and report["reference_lm"]["status"] == "disabled"
    printed = capsys.readouterr().out
    assert "## Targets" in printed and "Gemma-3-270M perplexity not computed" in printed
    with pytest.raises(SystemExit):
        main(["eval", "--bundle", str(tiny_bundle), "--scales", "a,b"])
    assert "comma-separated numbers, got 'a,b'" in capsys.readouterr().err
    assert main(["eval", "--bundle", str(tiny_bundle), "--samples", "0"]) == 2
    assert "num_samples must be an integer ≥ 1" in capsys.readouterr().err


def test_eval_cli_test_split_refuses_sweep_flags(tiny_bundle, capsys, monkeypatch):
    import dglm.engine.engine as engine_mod

    def no_load(*a, **k):
        raise AssertionError("a refused request must not load a model")

    monkeypatch.setattr(engine_mod.Engine, "from_pretrained", no_load)
    for flags in (["--scales", "10"], ["--quick"], ["--seed", "3"], ["--prompt-guidance", "3"],
                  ["--re-control-step-sizes", "8"], ["--fudge-strengths", "1"],
                  ["--no-repeat-ngram-size", "0"]):  # fmt: skip
        rc = main(["eval", "--bundle", str(tiny_bundle), "--split", "test", *flags])
        assert rc == 2, flags
        err = capsys.readouterr().err
        assert "--split test runs the bundle's defaults only" in err and flags[0] in err


def test_eval_cli_rescore_adds_the_neural_judge_to_a_finished_run(
    tiny_bundle, tmp_path, capsys, monkeypatch
):
    import dglm.engine.cli.eval as eval_cli
    import dglm.engine.evaluation.perplexity as perplexity

    out = tmp_path / "run"
    args = ["eval", "--bundle", str(tiny_bundle), "--quick", "--out", str(out), "--prefixes", "2",
            "--sources", "rotten_tomatoes", "--max-new-tokens", "3", "--scales", "10",
            "--renoise", "0.95", "--fudge-strengths", "", "--no-gemma"]  # fmt: skip
    assert main(args) == 0
    before = json.loads((out / "results.json").read_text())
    assert before["sentiment_judge"] is None
    assert "neural_positive" not in before["rows"][0]["metrics"]

    class Judge:
        name = "stub judge"

        def p_positive(self, texts):
            return [0.9] * len(texts)

    monkeypatch.setattr(perplexity, "load_gemma", lambda device: "lm")
    monkeypatch.setattr(eval_cli, "neural_judge", lambda a, lm: (Judge(), 0.8))
    capsys.readouterr()
    assert main(["eval", "--rescore", str(out)]) == 0
    after = json.loads((out / "results.json").read_text())
    assert after["sentiment_judge"] == "stub judge" and after["sentiment_judge_accuracy"] == 0.8
    assert all(r["metrics"]["neural_positive"] == 1.0 for r in after["rows"])
    assert [r["setting"] for r in after["rows"]] == [r["setting"] for r in before["rows"]]
    assert "accuracy 0.800" in (out / "results.md").read_text()
