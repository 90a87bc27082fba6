"""The app under uvicorn on a loopback socket (127.0.0.1, port chosen by the OS): SSE streaming
over a real connection adds up to the non-streamed completion; a client that leaves mid-stream
cancels its request and its row stops decoding; shutdown finishes a request already accepted."""

from __future__ import annotations

import json
import socket
import threading

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from dglm.engine.serve.app import ServerConfig, create_app  # noqa: E402

WAIT_S = 120  # an upper bound on a loaded machine, never a pause
POSITIVE = {"probe": "sentiment", "target": "positive", "scale": 10}


class Live:
    """uvicorn serving the app in a thread; `accepted` is set when a request reaches the queue
    (`jobs` holds them)."""

    def __init__(self, engine) -> None:
        self.app = create_app(engine, ServerConfig())
        self.batcher = self.app.state.batcher
        self.jobs, self.accepted = [], threading.Event()
        submit = self.batcher.submit

        def recording_submit(job) -> None:
            submit(job)
            self.jobs.append(job)
            self.accepted.set()

        self.batcher.submit = recording_submit
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen()  # connections wait in the backlog until uvicorn serves
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]})
        self.thread.start()

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(WAIT_S)
        assert not self.thread.is_alive()


@pytest.fixture
def live(tiny_engine):
    server = Live(tiny_engine)
    yield server
    if server.thread.is_alive():
        server.stop()


def test_stream_over_a_socket_adds_up_to_the_completion(live):
    body = {"prompt": "The movie was", "max_tokens": 16, "seed": 11, "controls": [POSITIVE]}
    with httpx.Client(base_url=live.url, timeout=WAIT_S) as client:
        whole = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
        with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            assert r.status_code == 200
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_a_client_that_leaves_mid_stream_stops_its_row(live):
    released, done = threading.Event(), threading.Event()
    decode = live.batcher._decode

    def held_decode(ids: list[int]) -> str:  # after the first text, wait for the cancel
        if live.jobs and released.is_set():
            live.jobs[0].cancelled.wait(WAIT_S)
        return decode(ids)

    live.batcher._decode = held_decode
    body = {"prompt": "The movie was", "max_tokens": 200, "seed": 1, "ignore_eos": True,
            "stream": True}  # fmt: skip
    with httpx.Client(base_url=live.url, timeout=WAIT_S) as client:
        with client.stream("POST", "/v1/completions", json=body) as r:
            job = None
            for line in r.iter_lines():
                if line.startswith("data: "):
                    job = live.jobs[0]
                    deliver = job.deliver

                    def recording(event: tuple, deliver=deliver) -> None:
                        deliver(event)
                        if event[0] == "done":
                            done.set()

                    job.deliver = recording
                    released.set()
                    break  # leave: the connection closes with the stream
    assert job is not None
    assert job.cancelled.wait(WAIT_S)  # the server saw the client go
    assert done.wait(WAIT_S)
    metrics = httpx.get(f"{live.url}/metrics", timeout=WAIT_S).text
    (tokens,) = [ln for ln in metrics.splitlines() if ln.startswith("dglm_generated_tokens_total")]
    assert float(tokens.split()[-1]) < 200  # the row stopped long before max_tokens
    assert 'dglm_errors_total{kind="disconnected"} 1.0' in metrics


def test_shutdown_finishes_an_accepted_request(live):
    result = {}

    def post() -> None:
        body = {"prompt": "Prices", "max_tokens": 24, "seed": 2, "ignore_eos": True}
        result["r"] = httpx.post(f"{live.url}/v1/completions", json=body, timeout=WAIT_S)

    client = threading.Thread(target=post)
    client.start()
    assert live.accepted.wait(WAIT_S)
    live.stop()  # while the request is queued or decoding
    client.join(WAIT_S)
    r = result["r"]
    assert r.status_code == 200
    assert r.json()["choices"][0]["finish_reason"] == "length"
    assert r.json()["usage"]["completion_tokens"] == 24
