"""`dglm probe train`: a probe from labelled JSONL added to a bundle; a bad file is a usage error."""

from __future__ import annotations

import json
import shutil

from dglm.engine.cli.main import main


def test_probe_train_adds_probe(tiny_bundle, tmp_path, capsys):

    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    data = tmp_path / "topic.jsonl"
    rows = [
        {"text": f"The {w} match ended with a late goal.", "label": "sport"}
        for w in ("football", "hockey", "rugby", "cup", "league", "derby")
    ]
    rows += [
        {"text": f"The {w} rate rose as markets fell.", "label": "finance"}
        for w in ("interest", "inflation", "exchange", "tax", "mortgage", "bond")
    ]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    assert main(["probe", "train", "topic", str(data), "--bundle", str(bundle)]) == 0
    assert json.loads(capsys.readouterr().out.strip())["train_accuracy"] == 1.0
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x"}\n')
    assert main(["probe", "train", "t2", str(bad), "--bundle", str(bundle)]) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err
