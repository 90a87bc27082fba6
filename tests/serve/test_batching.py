"""Dynamic batching (`Batcher`, one worker thread owning the Engine): requests queued together run
as one Engine.generate batch with results identical to each run alone; a full queue refuses
(429 + Retry-After, over HTTP too); cancelled requests are dropped, or stop decoding mid-batch
without changing their neighbours; streaming hands out text while decoding; shutdown finishes
what was accepted and refuses the rest (503); a request past its timeout is a 504."""

from __future__ import annotations

import threading

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")
pytest.importorskip("httpx")

from dglm.engine.api import GenerationParams  # noqa: E402
from dglm.engine.probes import Control  # noqa: E402
from dglm.engine.serve.app import ServerConfig, create_app  # noqa: E402
from dglm.engine.serve.batching import BatchConfig, Batcher, Job  # noqa: E402
from dglm.engine.serve.metrics import ServerMetrics  # noqa: E402
from dglm.engine.serve.schema import RequestError  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

WAIT_S = 120  # an upper bound for a tiny batch on a loaded machine, never a pause
POSITIVE = (Control("sentiment", "positive", 10.0),)


class Events:
    """A Job's event sink (called from the worker thread)."""

    def __init__(self, on_delta=None) -> None:
        self.events: list[tuple] = []
        self.finished = threading.Event()
        self.on_delta = on_delta

    def __call__(self, event: tuple) -> None:
        self.events.append(event)
        if event[0] == "delta" and self.on_delta is not None:
            self.on_delta()
        if event[0] in ("done", "error"):
            self.finished.set()

    def wait(self) -> tuple:
        assert self.finished.wait(WAIT_S)
        return self.events[-1]


def job(prompts, params, stream=False, on_delta=None) -> tuple[Job, Events]:
    sink = Events(on_delta)
    return Job(list(prompts), params, sink, stream=stream), sink


def texts(outputs) -> list[list[list[int]]]:
    return [[s.token_ids for s in o.samples] for o in outputs]


def test_queued_requests_run_as_one_batch_with_their_own_results(tiny_engine):
    metrics = ServerMetrics()
    batcher = Batcher(tiny_engine, BatchConfig(max_batch=8, max_wait_s=0.0), metrics)
    requests = [
        (["The movie was", "Prices"], GenerationParams(controls=POSITIVE, seed=1, max_new_tokens=8)),
        (["A quick brown fox"], GenerationParams(seed=2, num_samples=2, max_new_tokens=6, top_p=0.8)),
        (["I loved the story"], GenerationParams(seed=3, max_new_tokens=10, temperature=0,
                                                 num_inference_steps=4)),
    ]  # fmt: skip
    jobs = [job(p, g) for p, g in requests]
    for j, _ in jobs:  # all queued before the worker starts: one batch of 5 rows
        batcher.submit(j)
    batcher.start()
    try:
        for (prompts, params), (_, sink) in zip(requests, jobs, strict=True):
            kind, outputs = sink.wait()
            assert kind == "done"
            assert sink.events[0][0] == "accepted"
            assert texts(outputs) == texts(tiny_engine.generate(prompts, params))
    finally:
        batcher.close()
    (batches,) = [m for m in metrics.batch_requests.collect()]
    count = next(s.value for s in batches.samples if s.name.endswith("_count"))
    total = next(s.value for s in batches.samples if s.name.endswith("_sum"))
    assert (count, total) == (1, 3)


def test_a_bad_request_fails_alone(tiny_engine):
    batcher = Batcher(tiny_engine, BatchConfig(max_wait_s=0.0), ServerMetrics())
    bad, bad_sink = job(["x"], GenerationParams(controls=(Control("nope", "y"),), seed=1))
    good, good_sink = job(["The movie was"], GenerationParams(seed=1, max_new_tokens=4))
    batcher.submit(bad)
    batcher.submit(good)
    batcher.start()
    try:
        kind, err = bad_sink.wait()
        assert kind == "error" and err.status == 400 and err.param == "controls"
        assert good_sink.wait()[0] == "done"
    finally:
        batcher.close()


def test_a_full_queue_refuses_with_retry_after(tiny_engine):
    batcher = Batcher(tiny_engine, BatchConfig(max_queue=2), ServerMetrics())
    for _ in range(2):  # the worker is not started: nothing leaves the queue
        batcher.submit(job(["a"], GenerationParams())[0])
    with pytest.raises(RequestError) as e:
        batcher.submit(job(["a"], GenerationParams())[0])
    assert e.value.status == 429 and e.value.headers["Retry-After"] == "1"


def stalled_client(engine, **batch) -> TestClient:
    """A client of an app whose worker never starts (no lifespan, start stubbed): requests queue."""
    app = create_app(engine, ServerConfig(batch=BatchConfig(**batch)))
    app.state.batcher.start = lambda: None
    return TestClient(app)


def test_http_429_and_504(tiny_engine):
    client = stalled_client(tiny_engine, max_queue=1, timeout_s=0.05)
    r = client.post("/v1/completions", json={"prompt": "The movie was"})
    assert r.status_code == 504 and r.json()["error"]["type"] == "timeout"
    queue = client.app.state.batcher.queue
    assert len(queue) == 1 and queue[0].cancelled.is_set()  # dropped when the worker gets to it
    r = client.post("/v1/completions", json={"prompt": "The movie was"})
    assert r.status_code == 429 and r.headers["Retry-After"] == "1"
    metrics = client.get("/metrics").text
    assert 'dglm_errors_total{kind="queue_full"} 1.0' in metrics
    assert 'dglm_errors_total{kind="timeout"} 1.0' in metrics


def test_cancelled_jobs_are_dropped_or_stop_decoding(tiny_engine):
    batcher = Batcher(tiny_engine, BatchConfig(max_wait_s=0.0), ServerMetrics())
    long = GenerationParams(seed=5, max_new_tokens=40, ignore_eos=True)
    dropped, dropped_sink = job(["The movie was"], long)
    dropped.cancel()  # gone before its batch: never run
    # gone after its first streamed text: its row finishes, the loop ends early
    streaming, stream_sink = job(["A quick brown fox"], long, stream=True)
    stream_sink.on_delta = streaming.cancel
    neighbour, neighbour_sink = job(["Prices"], GenerationParams(seed=6, max_new_tokens=12))
    for j in (dropped, streaming, neighbour):
        batcher.submit(j)
    batcher.start()
    try:
        kind, outputs = stream_sink.wait()
        assert kind == "done"
        assert len(outputs[0].samples[0].token_ids) < 12  # stopped early (pad after the cancel)
        kind, outputs = neighbour_sink.wait()
        assert texts(outputs) == texts(
            tiny_engine.generate(["Prices"], GenerationParams(seed=6, max_new_tokens=12))
        )
        assert dropped_sink.events == []
    finally:
        batcher.close()


def test_streaming_hands_out_text_while_decoding(tiny_engine):
    batcher = Batcher(tiny_engine, BatchConfig(max_wait_s=0.0), ServerMetrics())
    params = GenerationParams(controls=POSITIVE, seed=9, max_new_tokens=24, ignore_eos=True)
    streaming, sink = job(["The movie was"], params, stream=True)
    batcher.submit(streaming)
    batcher.start()
    try:
        kind, outputs = sink.wait()
    finally:
        batcher.close()
    assert kind == "done"
    kinds = [e[0] for e in sink.events]
    assert kinds[0] == "accepted" and kinds[-1] == "done"
    deltas = [e[2] for e in sink.events if e[0] == "delta"]
    assert len(deltas) > 1  # text left during decoding, not all at the end
    assert "".join(deltas) == outputs[0].text


def test_shutdown_finishes_accepted_requests_then_refuses(tiny_engine):
    batcher = Batcher(tiny_engine, BatchConfig(max_batch=1, max_wait_s=0.0), ServerMetrics())
    jobs = [job([p], GenerationParams(seed=i, max_new_tokens=5))
            for i, p in enumerate(["The movie was", "Prices", "A quick brown fox"])]  # fmt: skip
    for j, _ in jobs:
        batcher.submit(j)
    batcher.start()
    batcher.close()  # returns once the queue is drained: three batches of one
    assert [sink.events[-1][0] for _, sink in jobs] == ["done"] * 3
    with pytest.raises(RequestError) as e:
        batcher.submit(job(["a"], GenerationParams())[0])
    assert e.value.status == 503


def test_only_the_worker_thread_calls_the_engine(tiny_engine, monkeypatch):
    """The thread-safety the server relies on: every Engine call (validation included) is made by
    the one worker thread, whatever thread the HTTP requests arrive on."""
    callers = set()
    for name in ("validate", "generate"):
        method = getattr(tiny_engine, name)

        def recording(*args, _method=method, **kwargs):
            callers.add(threading.current_thread().name)
            return _method(*args, **kwargs)

        monkeypatch.setattr(tiny_engine, name, recording)
    app = create_app(tiny_engine, ServerConfig())
    with TestClient(app) as client:
        for stream in (False, True):
            body = {"prompt": "The movie was", "max_tokens": 4, "seed": 1, "stream": stream}
            assert client.post("/v1/completions", json=body).status_code == 200
        assert client.post("/v1/completions", json={"prompt": "x", "controls": [
            {"probe": "nope", "target": "y"}]}).status_code == 400  # fmt: skip
    assert callers == {"dglm-engine"}
