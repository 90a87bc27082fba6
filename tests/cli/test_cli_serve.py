"""`dglm serve`: flags build the server's configs (bad values are one-line usage errors before
any model loads), the app it hands to uvicorn serves the bundle, --replicas needs --ray, and
--ray without Ray Serve names the package to install."""

from __future__ import annotations

import importlib.util

import pytest

uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")
pytest.importorskip("httpx")

from dglm.engine.cli.main import main  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--max-batch", "0"], "max_batch"),
        (["--max-queue", "0"], "max_queue"),
        (["--timeout", "-1"], "timeout_s"),
        (["--max-body-bytes", "0"], "max_body_bytes"),
        (["--replicas", "2"], "--replicas needs --ray"),
    ],
)
def test_bad_flags_are_usage_errors(flags, message, capsys):
    assert main(["serve", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dglm: error:") and message in err


def test_serve_hands_uvicorn_an_app_of_the_bundle(tiny_bundle, monkeypatch, capsys):
    seen = {}

    def run(app, host, port, **kwargs):
        seen.update(app=app, host=host, port=port)

    monkeypatch.setattr(uvicorn, "run", run)
    assert main(["serve", "--bundle", str(tiny_bundle), "--port", "8123", "--max-batch", "4"]) == 0
    assert (seen["host"], seen["port"]) == ("127.0.0.1", 8123)
    assert seen["app"].state.batcher.config.max_batch == 4
    with TestClient(seen["app"]) as client:
        (card,) = client.get("/v1/models").json()["data"]
        assert card["id"] == tiny_bundle.name
        r = client.post("/v1/completions", json={"model": tiny_bundle.name, "prompt": "Hi",
                                                 "max_tokens": 3, "seed": 0})  # fmt: skip
        assert r.status_code == 200


@pytest.mark.skipif(importlib.util.find_spec("ray") is not None, reason="ray is installed")
def test_ray_without_ray_names_the_package(capsys):
    assert main(["serve", "--ray", "--replicas", "2"]) == 1
    assert "ray[serve]" in capsys.readouterr().err
