"""The server's Prometheus metrics, in a registry of its own (one per app: several apps in one
process, e.g. tests, do not collide): queue depth, batch sizes, per-stage latency from
RequestOutput.timings, generated tokens and decode tokens/s, request latency, time to first
token, errors by kind."""

from __future__ import annotations

from dglm.engine.api import RequestOutput
from dglm.engine.engine import STAGES
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.queue_depth = Gauge("dglm_queue_depth", "requests waiting for the engine", registry=r)
        self.batch_rows = Histogram(
            "dglm_batch_rows", "rows (prompts x n) per engine batch", buckets=BATCH_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.batch_requests = Histogram(
            "dglm_batch_requests", "HTTP requests per engine batch", buckets=BATCH_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.stage_seconds = Histogram(
            "dglm_stage_seconds", "seconds per engine batch in each stage", ["stage"],
            buckets=SECONDS_BUCKETS, registry=r,
        )  # fmt: skip
        self.tokens = Counter("dglm_generated_tokens", "tokens generated", registry=r)
        self.tokens_per_s = Gauge(
            "dglm_decode_tokens_per_second", "generated tokens / decode seconds, last batch",
            registry=r,
        )  # fmt: skip
        self.requests = Counter(
            "dglm_requests", "HTTP completion requests by status code", ["code"], registry=r
        )
        self.request_seconds = Histogram(
            "dglm_request_seconds", "seconds from arrival to the last token",
            buckets=SECONDS_BUCKETS, registry=r,
        )  # fmt: skip
        self.first_token_seconds = Histogram(
            "dglm_time_to_first_token_seconds", "seconds from arrival to the first streamed text",
            buckets=SECONDS_BUCKETS, registry=r,
        )  # fmt: skip
        self.errors = Counter("dglm_errors", "refused or failed requests by kind", ["kind"],
                              registry=r)  # fmt: skip

    def observe_batch(self, outputs: list[RequestOutput]) -> None:
        """One engine batch's stage timings (shared by its outputs) and generated tokens."""
        timings = outputs[0].timings
        for stage in (*STAGES, "total"):
            if stage in timings:
                self.stage_seconds.labels(stage).observe(timings[stage])
        n = sum(len(s.token_ids) for o in outputs for s in o.samples)
        self.tokens.inc(n)
        if timings.get("decode", 0) > 0:
            self.tokens_per_s.set(n / timings["decode"])

    def render(self) -> bytes:
        return generate_latest(self.registry)
