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


def test_probe_train_adds_probe(tiny_bundle, tmp_path, capsys):
    import shutil

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


def test_train_steering_procs_are_checked_before_any_work(tmp_path, capsys):
    base = ["train", "steering", str(tmp_path / "no-data"), "--out", str(tmp_path / "run")]
    assert main([*base, "--procs", "3"]) == 2  # the default batches (16, 64) do not split in 3
    assert "--batch-size 16 must be a multiple of --procs 3" in capsys.readouterr().err
    assert main([*base, "--procs", "2", "--device", "cuda"]) == 2
    assert "use --device cpu" in capsys.readouterr().err
    assert main([*base, "--procs", "0"]) == 2
    assert "--procs must be a positive integer" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
