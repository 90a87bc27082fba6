"""The OpenAI-compatible HTTP server: `POST /v1/completions` (JSON or SSE streaming),
`GET /v1/models`, `/health`, `/metrics` (Prometheus text).

app = create_app(Engine.from_pretrained("default"), ServerConfig())  # then uvicorn.run(app)

Requests go through one `Batcher` (dynamic batching; one worker thread owns the Engine). Status
codes: 400 a bad field (named in error.param) or malformed JSON, 404 an unknown model, 413 a body
past max_body_bytes, 429 a full queue (Retry-After), 503 shutting down, 504 past the request
timeout, 499 (logged only) a client that left.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from dglm.engine.api import RequestOutput
from dglm.engine.engine import Engine
from dglm.engine.probes import CONTROL_METHODS
from dglm.engine.serve.batching import BatchConfig, Batcher, Job
from dglm.engine.serve.metrics import ServerMetrics
from dglm.engine.serve.schema import CompletionRequest, RequestError, parse_request
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

CLIENT_GONE = 499  # nginx's code for a client that closed the connection first


@dataclass(frozen=True)
class ServerConfig:
    model_name: str = "default"  # the `model` clients name (GET /v1/models)
    batch: BatchConfig = field(default_factory=BatchConfig)  # batching, queue, timeouts
    max_body_bytes: int = 1 << 20  # a larger request body is refused (413)

    def __post_init__(self) -> None:
        if not isinstance(self.model_name, str) or not self.model_name:
            raise ValueError(f"model_name must be a non-empty string, got {self.model_name!r}")
        if not isinstance(self.max_body_bytes, int) or self.max_body_bytes < 1:
            raise ValueError(
                f"max_body_bytes must be a positive integer, got {self.max_body_bytes!r}"
            )


def create_app(engine: Engine, config: ServerConfig | None = None) -> FastAPI:
    """The app around `engine`; its lifespan starts the worker and, at shutdown, finishes the
    accepted requests before returning."""
    config = config or ServerConfig()
    metrics = ServerMetrics()
    batcher = Batcher(engine, config.batch, metrics)
    models = models_body(engine, config.model_name)  # read here, before the worker owns it

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        yield
        await asyncio.to_thread(batcher.close)

    app = FastAPI(title="dglm", lifespan=lifespan)
    app.state.batcher, app.state.metrics = batcher, metrics

    @app.get("/health")
    async def health() -> Response:
        alive = batcher.thread is None or batcher.thread.is_alive()
        body = {"status": "ok" if alive and not batcher.closing else "unavailable",
                "queue_depth": len(batcher.queue)}  # fmt: skip
        return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/v1/models")
    async def list_models() -> dict:
        return models

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        try:
            body = await read_body(request, config.max_body_bytes)
            req = parse_request(body)
            if req.model is not None and req.model != config.model_name:
                raise RequestError(
                    404, f"model {req.model!r} is not served here; this server serves "
                    f"{config.model_name!r} (GET /v1/models)", "model", "model_not_found",
                )  # fmt: skip
            params = req.params()
            events: asyncio.Queue = asyncio.Queue()
            job = Job(req.prompts, params, deliver_to(events), stream=req.stream)
            batcher.start()  # started by the lifespan; a host without lifespan events too
            batcher.submit(job)
        except RequestError as e:
            return refuse(e, metrics)
        call = Call(job, events, request, job.arrived + config.batch.timeout_s, metrics)
        return await (stream_completion if req.stream else complete)(call, req, config.model_name)

    return app


def models_body(engine: Engine, name: str) -> dict:
    """OpenAI's model list: the bundle, its probes (labels, RE-Control value networks) and the
    control methods, and engine.info() under "info"."""
    info = engine.info()
    probes = {
        probe: {
            **p,
            "methods": [
                m for m in CONTROL_METHODS if m == "dglm" or probe in info["value_networks"]
            ],
        }  # fmt: skip
        for probe, p in info["probes"].items()
    }
    card = {"id": name, "object": "model", "created": int(time.time()), "owned_by": "dglm",
            "probes": probes, "control_methods": list(CONTROL_METHODS), "info": info}  # fmt: skip
    return json.loads(json.dumps({"object": "list", "data": [card]}, default=str))


async def read_body(request: Request, limit: int) -> bytes:
    """The body, RequestError 413 past `limit` bytes (by Content-Length or as it arrives)."""
    too_big = RequestError(413, f"the request body is larger than {limit} bytes", kind="too_large")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


def deliver_to(events: asyncio.Queue):
    """A Job's `deliver`: from the worker thread onto this event loop's queue."""
    loop = asyncio.get_running_loop()

    def deliver(event: tuple) -> None:
        try:
            loop.call_soon_threadsafe(events.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    return deliver


def refuse(e: RequestError, metrics: ServerMetrics) -> Response:
    metrics.requests.labels(str(e.status)).inc()
    metrics.errors.labels(e.kind).inc()
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


@dataclass
class Call:
    """One completion call in flight: its job, event queue, request and deadline."""

    job: Job
    events: asyncio.Queue
    request: Request
    deadline: float
    metrics: ServerMetrics

    async def next(self) -> tuple:
        """The job's next event; ("timeout",) past the deadline, ("gone",) when the client
        disconnects."""
        get = asyncio.ensure_future(self.events.get())
        gone = asyncio.ensure_future(wait_disconnect(self.request))
        left = max(0.0, self.deadline - time.monotonic())
        done, _ = await asyncio.wait({get, gone}, timeout=left,
                                     return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
        gone.cancel()
        if get in done:
            return get.result()
        get.cancel()
        return ("gone",) if gone in done else ("timeout",)

    def failed(self, event: tuple) -> Response:
        """The response to an "error", "timeout" or "gone" event; the job is cancelled."""
        self.job.cancel()
        if event[0] == "error":
            return refuse(event[1], self.metrics)
        if event[0] == "timeout":
            timeout = self.deadline - self.job.arrived
            return refuse(RequestError(504, f"the request did not finish within {timeout:g} s; "
                                       "ask for fewer tokens or retry later", kind="timeout"),
                          self.metrics)  # fmt: skip
        self.metrics.requests.labels(str(CLIENT_GONE)).inc()
        self.metrics.errors.labels("disconnected").inc()
        return Response(status_code=CLIENT_GONE)


async def wait_disconnect(request: Request) -> None:
    """Returns when the client disconnects (the body has been read: receive() waits for it)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


async def complete(call: Call, req: CompletionRequest, model: str) -> Response:
    prompt_tokens: list[int] = []
    while True:
        event = await call.next()
        if event[0] == "accepted":
            prompt_tokens = event[1]
        elif event[0] == "done":
            break
        elif event[0] != "delta":
            return call.failed(event)
    outputs: list[RequestOutput] = event[1]
    choices = [
        {"index": i, "text": s.text, "logprobs": None, "finish_reason": s.finish_reason}
        for i, s in enumerate(s for o in outputs for s in o.samples)
    ]
    completion = sum(len(s.token_ids) for o in outputs for s in o.samples)
    body = {
        "id": completion_id(), "object": "text_completion", "created": int(time.time()),
        "model": model, "choices": choices,
        "usage": {"prompt_tokens": sum(prompt_tokens), "completion_tokens": completion,
                  "total_tokens": sum(prompt_tokens) + completion},
        "timings": outputs[0].timings,  # extension: seconds per stage of the engine batch
    }  # fmt: skip
    call.metrics.requests.labels("200").inc()
    call.metrics.request_seconds.observe(time.monotonic() - call.job.arrived)
    return JSONResponse(body)


async def stream_completion(call: Call, req: CompletionRequest, model: str) -> Response:
    """SSE in OpenAI's chunk format: text deltas as they are decoded, each choice's last chunk
    with its finish_reason, then `data: [DONE]`. A refusal before the first token is a plain
    HTTP error; one after it (timeout) is an `error` event before [DONE]."""
    event = await call.next()
    if event[0] != "accepted":
        return call.failed(event)
    prompt_tokens = sum(event[1])
    cid, created = completion_id(), int(time.time())

    def chunk(index: int, text: str, finish_reason: str | None = None) -> str:
        body = {"id": cid, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": index, "text": text, "logprobs": None,
                             "finish_reason": finish_reason}]}  # fmt: skip
        return f"data: {json.dumps(body)}\n\n"

    async def events() -> AsyncIterator[str]:
        first, event = True, ("accepted",)
        try:
            while True:
                event = await call.next()
                if event[0] == "gone":
                    return
                if event[0] == "delta":
                    if first:
                        call.metrics.first_token_seconds.observe(
                            time.monotonic() - call.job.arrived
                        )
                        first = False
                    yield chunk(event[1], event[2])
                    continue
                if event[0] == "done":
                    samples = [s for o in event[1] for s in o.samples]
                    for i, s in enumerate(samples):
                        yield chunk(i, "", s.finish_reason)
                    if req.stream_options and req.stream_options.get("include_usage"):
                        completion = sum(len(s.token_ids) for s in samples)
                        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                                 "total_tokens": prompt_tokens + completion}  # fmt: skip
                        last = {"id": cid, "object": "text_completion", "created": created,
                                "model": model, "choices": [], "usage": usage}  # fmt: skip
                        yield f"data: {json.dumps(last)}\n\n"
                    call.metrics.requests.labels("200").inc()
                    call.metrics.request_seconds.observe(time.monotonic() - call.job.arrived)
                else:  # error / timeout after the 200 went out
                    kind, message = "timeout", "the request did not finish in time"
                    if event[0] == "error":
                        kind, message = event[1].kind, event[1].message
                    call.metrics.errors.labels(kind).inc()
                    call.job.cancel()
                    err = {"error": {"message": message, "type": kind, "param": None,
                                     "code": None}}  # fmt: skip
                    yield f"data: {json.dumps(err)}\n\n"
                yield "data: [DONE]\n\n"
                return
        finally:  # also when the client disconnects: its rows stop decoding
            if not call.job.cancelled.is_set() and event[0] != "done":
                call.job.cancel()
                call.metrics.errors.labels("disconnected").inc()

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)
