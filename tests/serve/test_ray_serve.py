"""The Ray Serve deployment: replicas are checked before Ray is touched; with Ray Serve
installed, one replica of the tiny bundle answers a completion over HTTP (skipped without ray)."""

from __future__ import annotations

import importlib.util
import socket

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")

from dglm.engine.serve.app import ServerConfig  # noqa: E402
from dglm.engine.serve.ray_serve import deployment  # noqa: E402

HAS_RAY = importlib.util.find_spec("ray") is not None


@pytest.mark.parametrize("replicas", [0, -1, 1.5, True])
def test_bad_replicas_are_refused(replicas):
    with pytest.raises(ValueError, match="replicas"):
        deployment("default", {}, ServerConfig(), replicas)


@pytest.mark.skipif(HAS_RAY, reason="ray is installed")
def test_without_ray_the_error_names_the_package():
    with pytest.raises(RuntimeError, match=r"ray\[serve\]"):
        deployment("default", {}, ServerConfig(), 1)


@pytest.mark.skipif(not HAS_RAY, reason="needs ray[serve]")
def test_one_replica_serves_a_completion(tiny_bundle):
    httpx = pytest.importorskip("httpx")
    ray = pytest.importorskip("ray")
    from ray import serve

    with socket.socket() as s:  # a free loopback port for Ray's HTTP proxy
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=1, include_dashboard=False, ignore_reinit_error=True)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = deployment(str(tiny_bundle), {}, ServerConfig(model_name="tiny"), 1,
                         ray_actor_options={"num_cpus": 1})  # fmt: skip
        serve.run(app, name="dglm", route_prefix="/")
        body = {"model": "tiny", "prompt": "The movie was", "max_tokens": 4, "seed": 0}
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        assert len(r.json()["choices"]) == 1
    finally:
        serve.shutdown()
        ray.shutdown()
