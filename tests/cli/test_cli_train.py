"""`dglm train`: flags checked before any work."""

from __future__ import annotations

from dglm.engine.cli.main import main


def test_train_steering_procs_are_checked_before_any_work(tmp_path, capsys):
    base = ["train", "steering", str(tmp_path / "no-data"), "--out", str(tmp_path / "run")]
    assert main([*base, "--procs", "3"]) == 2  # the default batches (16, 64) do not split in 3
    assert "--batch-size 16 must be a multiple of --procs 3" in capsys.readouterr().err
    assert main([*base, "--procs", "2", "--device", "cuda"]) == 2
    assert "use --device cpu" in capsys.readouterr().err
    assert main([*base, "--procs", "0"]) == 2
    assert "--procs must be a positive integer" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
