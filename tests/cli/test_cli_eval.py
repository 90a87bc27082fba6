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
