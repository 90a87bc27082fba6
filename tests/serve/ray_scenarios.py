"""The Ray Serve scenarios of test_ray_serve.py, run in a child process: Ray's native workers can
crash the interpreter that imported it at exit (seen here: the pytest process ending with
SIGSEGV after every test passed), so pytest itself never imports ray. Prints one JSON object and
leaves with os._exit, past Ray's exit handlers.

    python ray_scenarios.py one-replica BUNDLE
    python ray_scenarios.py kill-one BUNDLE
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time

# On a busy machine Ray Serve's HTTP proxy can take longer to start than its 3 × 5 s readiness
# checks allow (seen here with two other CPU jobs running: the proxy was killed and the scenario
# failed); the local cluster's processes inherit this
os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")

import httpx  # noqa: E402
import ray  # noqa: E402
from dglm.engine.serve.app import ServerConfig  # noqa: E402
from dglm.engine.serve.ray_serve import deployment  # noqa: E402
from ray import serve


def free_port() -> int:
    with socket.socket() as s:  # a free loopback port for Ray's HTTP proxy
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_replica(bundle: str) -> dict:
    port = free_port()
    ray.init(num_cpus=1, include_dashboard=False, ignore_reinit_error=True)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = deployment(bundle, {}, ServerConfig(model_name="tiny"), 1,
                     ray_actor_options={"num_cpus": 1})  # fmt: skip
    serve.run(app, name="dglm", route_prefix="/")
    body = {"model": "tiny", "prompt": "The movie was", "max_tokens": 4, "seed": 0}
    r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=120)
    return {"status": r.status_code, "choices": len(r.json().get("choices", []))}


def kill_one(bundle: str) -> dict:
    """Two replicas, 24 concurrent clients (each retries a 5xx or a dropped connection up to 4
    times), one replica killed 0.3 s in; then one more request."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1/completions"
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = deployment(bundle, {}, ServerConfig(model_name="tiny"), 2,
                     ray_actor_options={"num_cpus": 0.5})  # fmt: skip
    serve.run(app, name="dglm", route_prefix="/")
    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True)
                if "SERVE_REPLICA" in a["name"]]  # fmt: skip

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
                got.append(["refused", r.status_code, r.text])
                return

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(24)]
    for t in threads[:12]:
        t.start()
    time.sleep(0.3)
    in_flight = sum(t.is_alive() for t in threads[:12])
    victim = replicas[0]
    ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=False)
    for t in threads[12:]:
        t.start()
    deadline = time.monotonic() + 240
    for t in threads:
        t.join(timeout=max(1.0, deadline - time.monotonic()))
    after = httpx.post(url, json=body(0), timeout=90)
    return {
        "replicas": len(replicas),
        "in_flight": in_flight,
        "hung": sum(t.is_alive() for t in threads),
        "results": {str(i): v for i, v in results.items()},
        "retried": sum(a > 1 for a in attempts.values()),
        "after": [
            after.status_code,
            after.json()["choices"][0]["text"] if after.is_success else "",
        ],
    }


if __name__ == "__main__":
    scenario, bundle = sys.argv[1], sys.argv[2]
    try:
        out = {"one-replica": one_replica, "kill-one": kill_one}[scenario](bundle)
    except Exception as e:  # reported, not raised: the exit below skips Ray's handlers
        out = {"error": f"{type(e).__name__}: {e}"}
    finally:
        try:
            serve.shutdown()
            ray.shutdown()
        except Exception:
            pass
    print("RESULT " + json.dumps(out), flush=True)
    os._exit(0)
