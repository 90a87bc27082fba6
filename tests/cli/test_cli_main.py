"""The top-level parser: every command group registered in `dglm --help` order, help exits 0."""

from __future__ import annotations

import pytest
from dglm.engine.cli import generate
from dglm.engine.cli.main import build_parser, main

COMMANDS = ["generate", "info", "data", "train", "bundle", "export", "probe", "eval", "serve"]


def test_every_command_is_registered_in_order(capsys):
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert list(sub.choices) == COMMANDS
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert all(c in out for c in COMMANDS)
    with pytest.raises(SystemExit) as e:
        main(["train"])  # a group without its command: argparse's usage error
    assert e.value.code == 2


def test_a_missing_file_is_a_one_line_usage_error(monkeypatch, capsys):
    def cmd_info(args):
        raise FileNotFoundError("no such file: nowhere.json")

    monkeypatch.setattr(generate, "cmd_info", cmd_info)  # registered when main builds the parser
    assert main(["info"]) == 2
    assert capsys.readouterr().err == "dglm: error: no such file: nowhere.json\n"
