"""The Ray Serve deployment: replicas are checked before Ray is touched; with Ray Serve
installed (skipped without ray), in a child process (ray_scenarios.py): one replica of the tiny
bundle answers a completion over HTTP, and two replicas survive one being killed under load."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")

from dglm.engine.serve.app import ServerConfig  # noqa: E402
from dglm.engine.serve.ray_serve import deployment  # noqa: E402

# a real package: the editable install puts the checkout's parent directory on sys.path, where a
# `ray` folder (Ray's own session directory when the checkout sits in /tmp) is a namespace package
_RAY = importlib.util.find_spec("ray")
HAS_RAY = _RAY is not None and _RAY.origin is not None


@pytest.mark.parametrize("replicas", [0, -1, 1.5, True])
def test_bad_replicas_are_refused(replicas):
    with pytest.raises(ValueError, match="replicas"):
        deployment("default", {}, ServerConfig(), replicas)


@pytest.mark.skipif(HAS_RAY, reason="ray is installed")
def test_without_ray_the_error_names_the_package():
    with pytest.raises(RuntimeError, match=r"ray\[serve\]"):
        deployment("default", {}, ServerConfig(), 1)


def run_scenario(name: str, bundle) -> dict:
    """One scenario of ray_scenarios.py in a child process (pytest never imports ray: see there)."""
    script = Path(__file__).with_name("ray_scenarios.py")
    done = subprocess.run([sys.executable, str(script), name, str(bundle)], capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    assert lines, done.stdout[-2000:] + done.stderr[-2000:]
    out = json.loads(lines[-1][len("RESULT ") :])
    assert "error" not in out, out["error"]
    return out


@pytest.mark.skipif(not HAS_RAY, reason="needs ray[serve]")
def test_one_replica_serves_a_completion(tiny_bundle):
    out = run_scenario("one-replica", tiny_bundle)
    assert out == {"status": 200, "choices": 1}


@pytest.mark.slow
@pytest.mark.skipif(not HAS_RAY, reason="needs ray[serve]")
def test_killing_a_replica_under_load_loses_nothing_and_hangs_nothing(tiny_bundle):
    """Two replicas under 24 concurrent requests; one replica is killed mid-load. Every client
    gets exactly one completion (a request that died with its replica is answered with a 5xx and
    retried by the client, as Ray Serve documents), no client hangs, and the app serves afterwards
    (the surviving replica, then the one Ray Serve starts in place of the dead one). Same seed,
    same text whichever replica served it."""
    out = run_scenario("kill-one", tiny_bundle)
    assert out["replicas"] == 2
    assert out["in_flight"] > 0  # the kill lands under load
    assert out["hung"] == 0, "a client hung"
    results = {int(i): v for i, v in out["results"].items()}
    assert sorted(results) == list(range(24))
    assert all(len(v) == 1 and isinstance(v[0], str) for v in results.values()), results
    for i in range(3):  # same seed and prompt, same text, whichever replica answered
        assert len({results[j][0] for j in range(i, 24, 3)}) == 1
    assert out["after"] == [200, results[0][0]]
