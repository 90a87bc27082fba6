"""The HTTP app in-process (FastAPI TestClient, no network): completions match Engine.generate for
the same seed, streaming adds up to the same text, every bad value is a 400 naming its field,
malformed JSON 400, oversized bodies 413, unknown models 404, /v1/models, /health, /metrics."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")
pytest.importorskip("httpx")  # TestClient's transport

from dglm.engine.api import GenerationParams  # noqa: E402
from dglm.engine.probes import Control  # noqa: E402
from dglm.engine.serve.app import ServerConfig, create_app  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

POSITIVE = {"probe": "sentiment", "target": "positive", "scale": 10, "method": "dglm"}


@pytest.fixture(scope="module")
def client(tiny_engine):
    app = create_app(tiny_engine, ServerConfig(max_body_bytes=4096))
    with TestClient(app) as c:  # runs the lifespan: the worker starts and stops
        yield c


def expected(engine, prompts, params: GenerationParams) -> list[list[str]]:
    return [[s.text for s in o.samples] for o in engine.generate(prompts, params)]


def sse_events(text: str) -> list[str]:
    return [line[len("data: ") :] for line in text.splitlines() if line.startswith("data: ")]


def test_completion_matches_engine_generate(client, tiny_engine):
    body = {"model": "default", "prompt": ["The movie was", "A quick brown fox"], "n": 2,
            "max_tokens": 9, "temperature": 0.8, "top_p": 0.9, "seed": 7,
            "controls": [POSITIVE], "num_inference_steps": 4}  # fmt: skip
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "text_completion" and out["model"] == "default"
    params = GenerationParams(controls=(Control("sentiment", "positive", 10.0),), num_samples=2,
                              max_new_tokens=9, temperature=0.8, top_p=0.9, seed=7,
                              num_inference_steps=4)  # fmt: skip
    want = [t for texts in expected(tiny_engine, body["prompt"], params) for t in texts]
    assert [c["text"] for c in out["choices"]] == want
    assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
    assert all(c["finish_reason"] in ("stop", "length") for c in out["choices"])
    usage = out["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0


def test_stream_adds_up_to_the_completion(client, tiny_engine):
    body = {"prompt": "I loved the story", "max_tokens": 12, "seed": 3, "n": 2,
            "stop": ["e"], "controls": [POSITIVE], "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    texts, reasons = ["", ""], [None, None]
    for c in chunks:
        for choice in c["choices"]:
            texts[choice["index"]] += choice["text"]
            reasons[choice["index"]] = choice["finish_reason"] or reasons[choice["index"]]
    assert "usage" in chunks[-1]
    params = GenerationParams(controls=(Control("sentiment", "positive", 10.0),), num_samples=2,
                              max_new_tokens=12, seed=3, stop=("e",), top_p=1.0)  # fmt: skip
    (want,) = expected(tiny_engine, [body["prompt"]], params)
    assert texts == want
    assert all(r in ("stop", "length") for r in reasons)


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_tokens", 0), ("max_tokens", "12"), ("max_tokens", 10**9), ("temperature", -1),
        ("temperature", 1e-9), ("top_p", 0), ("top_p", 1.5), ("n", 0), ("seed", -1),
        ("seed", True), ("stop", [""]), ("stop", 3), ("cfg_scale", 1e9), ("sampler", "euler"),
        ("guidance_mode", "slow"), ("num_inference_steps", 0), ("renoise_alpha2", 2.0),
        ("prompt_guidance", 25.0), ("re_control_steps", -1), ("re_control_plausibility", 1.0),
        ("caa_multiplier", 1e9), ("top_k", -1), ("prompt", ""),
        ("prompt", []), ("prompt", [1, 2]), ("controls", [{"probe": "nope", "target": "x"}]),
        ("controls", [{"probe": "sentiment", "target": "happy"}]),
        ("controls", [{"probe": "sentiment", "target": "positive", "scale": 1e12}]),
        ("controls", [{"probe": "sentiment", "target": "positive", "method": "magic"}]),
        ("bogus", 1),
    ],
)  # fmt: skip
def test_a_bad_value_is_a_400_naming_its_field(client, field, value):
    body = {"prompt": "The movie was", "max_tokens": 4, field: value}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 400, (field, value, r.text)
    err = r.json()["error"]
    assert err["param"] is not None and err["param"].split(".")[0] == field, err
    assert err["message"]


def test_malformed_oversized_and_unknown_model(client):
    r = client.post("/v1/completions", content=b'{"prompt": "x",',
                    headers={"content-type": "application/json"})  # fmt: skip
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = client.post("/v1/completions", content=b"[1, 2]")
    assert r.status_code == 400
    r = client.post("/v1/completions", json={"prompt": "x" * 5000})
    assert r.status_code == 413
    r = client.post("/v1/completions", json={"model": "gpt-4", "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"


def test_models_health_and_metrics(client):
    r = client.get("/v1/models")
    assert r.status_code == 200
    (card,) = r.json()["data"]
    assert card["id"] == "default" and "sentiment" in card["probes"]
    assert card["probes"]["sentiment"]["labels"] == ["negative", "positive"]
    assert "dglm" in card["probes"]["sentiment"]["methods"]
    assert client.get("/health").json()["status"] == "ok"
    client.post("/v1/completions", json={"prompt": "The movie was", "max_tokens": 3, "seed": 1})
    r = client.get("/metrics")
    assert r.status_code == 200
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    for name in ("dglm_queue_depth", "dglm_batch_rows", "dglm_stage_seconds",
                 "dglm_generated_tokens", "dglm_decode_tokens_per_second", "dglm_errors",
                 "dglm_requests"):  # fmt: skip
        assert name in families, name
    stages = {s.labels.get("stage") for s in families["dglm_stage_seconds"].samples}
    assert {"encode", "diffusion", "decode"} <= stages
    kinds = {s.labels.get("kind") for s in families["dglm_errors"].samples}
    assert "invalid_request_error" in kinds  # the 400s above
