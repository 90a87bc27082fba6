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


@pytest.mark.slow
@pytest.mark.skipif(not HAS_RAY, reason="needs ray[serve]")
def test_killing_a_replica_under_load_loses_nothing_and_hangs_nothing(tiny_bundle):
    """Two replicas under 24 concurrent requests; one replica is killed mid-load. Every client
    gets exactly one completion (a request that died with its replica is answered with a 5xx and
    retried by the client, as Ray Serve documents), no client hangs, and the app serves afterwards
    (the surviving replica, then the one Ray Serve starts in place of the dead one). Same seed,
    same text whichever replica served it."""
    import threading
    import time

    httpx = pytest.importorskip("httpx")
    ray = pytest.importorskip("ray")
    from ray import serve

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1/completions"
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = deployment(str(tiny_bundle), {}, ServerConfig(model_name="tiny"), 2,
                         ray_actor_options={"num_cpus": 0.5})  # fmt: skip
        serve.run(app, name="dglm", route_prefix="/")
        actors = ray.util.list_named_actors(all_namespaces=True)
        replicas = [a for a in actors if "SERVE_REPLICA" in a["name"]]
        assert len(replicas) == 2

        def body(i):
            return {"model": "tiny", "prompt": f"Story {i % 3}:", "max_tokens": 64,
                    "ignore_eos": True, "seed": i % 3}  # fmt: skip

        results: dict[int, list] = {}
        attempts: dict[int, int] = {}

        def client(i: int) -> None:
            got = results.setdefault(i, [])
            for attempt in range(4):
                attempts[i] = attempt + 1
                try:
                    r = httpx.post(url, json=body(i), timeout=90)
                except httpx.TransportError:
                    continue
                if r.status_code == 200:
                    got.append(r.json()["choices"][0]["text"])
                    return
                if r.status_code < 500:
                    got.append(("refused", r.status_code, r.text))
                    return

        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(24)]
        for t in threads[:12]:
            t.start()
        time.sleep(0.3)  # requests in flight on both replicas
        in_flight = sum(t.is_alive() for t in threads[:12])
        assert in_flight > 0  # the kill lands under load
        victim = replicas[0]
        ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=False)
        for t in threads[12:]:
            t.start()
        deadline = time.monotonic() + 240
        for t in threads:
            t.join(timeout=max(1.0, deadline - time.monotonic()))
        assert not any(t.is_alive() for t in threads), "a client hung"
        print(
            f"in flight at the kill: {in_flight}; retried: {sum(a > 1 for a in attempts.values())}"
        )
        assert sorted(results) == list(range(24))
        assert all(len(v) == 1 and isinstance(v[0], str) for v in results.values()), results
        for i in range(3):  # same seed and prompt, same text, whichever replica answered
            assert len({results[j][0] for j in range(i, 24, 3)}) == 1
        after = httpx.post(url, json=body(0), timeout=90)
        assert after.status_code == 200 and after.json()["choices"][0]["text"] == results[0][0]
    finally:
        serve.shutdown()
        ray.shutdown()
