"""Dynamic batching: the requests that arrive within a short window run as one `Engine.generate`
batch, each with its own settings and seed.

Threads: the Engine runs one call at a time under its own lock (calls from other threads wait;
see `Engine`), but the server does not lean on that: one worker thread is the only caller of
every Engine method (validation included), which is where requests meet to be batched. The
asyncio side only queues `Job`s (`Batcher.submit`, thread-safe) and receives their events
(`Job.deliver` hops back onto the event loop). The streaming hook the worker passes to
`Engine.generate` never calls the engine (a call from inside a call is refused).

A request's result does not depend on its batch: its rows draw from generators seeded by its
own seed (sample j: seed + j) in every stage. The floats are not bit-identical to a request run
alone (the encoder pads a batch to its longest prompt; a one-row matmul takes another kernel), a
~1e-6 move of the latent that changes a token only at a near-tie (tests/serve).

Every batch runs with the decode loop's streaming hook (streamed text, and the rows of cancelled
jobs finished mid-batch): a host read of each step's tokens — free on CPU, one device sync per
token on CUDA.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from dglm.engine.api import GenerationParams, RequestOutput
from dglm.engine.decoding.sampling import decode_text, eos_ids
from dglm.engine.engine import Engine
from dglm.engine.serve.metrics import ServerMetrics
from dglm.engine.serve.schema import RequestError, field_of, rename
from dglm.engine.serve.streaming import TextStream

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchConfig:
    max_batch: int = 8  # rows (prompts × n) per Engine.generate call; a larger request runs alone
    max_wait_s: float = 0.01  # how long the first request of a batch waits for company
    max_queue: int = 64  # requests waiting for the worker; one more is refused (429)
    timeout_s: float = 300.0  # per request, from arrival to its last token (504 past it)

    def __post_init__(self) -> None:
        for name, lo in (("max_batch", 1), ("max_queue", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise ValueError(f"{name} must be an integer ≥ {lo}, got {value!r}")
        if not 0 <= self.max_wait_s <= 60:
            raise ValueError(f"max_wait_s must be in [0, 60] seconds, got {self.max_wait_s!r}")
        if not 0 < self.timeout_s <= 86400:
            raise ValueError(f"timeout_s must be in (0, 86400] seconds, got {self.timeout_s!r}")


@dataclass(eq=False)
class Job:
    """One HTTP request: its prompts share `params`; events go to `deliver` (from the worker
    thread): ("accepted", prompt token counts), ("delta", choice, text) when streaming,
    ("done", outputs in prompt order) or ("error", RequestError)."""

    prompts: list[str]
    params: GenerationParams
    deliver: Callable[[tuple], None]
    stream: bool = False
    arrived: float = field(default_factory=time.monotonic)
    cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def rows(self) -> int:
        return len(self.prompts) * self.params.num_samples

    def cancel(self) -> None:
        """The client is gone (or timed out): drop it from batches to come, finish its rows in the
        running one."""
        self.cancelled.set()


class Batcher:
    """The queue of jobs and the worker thread that owns the Engine."""

    def __init__(self, engine: Engine, config: BatchConfig, metrics: ServerMetrics) -> None:
        self.engine, self.config, self.metrics = engine, config, metrics
        self.queue: deque[Job] = deque()
        self.cond = threading.Condition()
        self.closing = False
        self.thread: threading.Thread | None = None
        self.eos = eos_ids(engine.decoder, engine.tokenizer)

    def start(self) -> None:
        with self.cond:
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="dglm-engine", daemon=True)
                self.thread.start()

    def submit(self, job: Job) -> None:
        """Queue `job`; RequestError 429 (with Retry-After) when the queue is full, 503 when the
        server is shutting down."""
        with self.cond:
            if self.closing:
                raise RequestError(503, "the server is shutting down; retry on another replica",
                                   kind="server_shutting_down")  # fmt: skip
            if len(self.queue) >= self.config.max_queue:
                raise RequestError(
                    429,
                    f"the queue is full ({self.config.max_queue} requests waiting); retry later",
                    kind="queue_full",
                    headers={"Retry-After": "1"},
                )
            self.queue.append(job)
            self.metrics.queue_depth.set(len(self.queue))
            self.cond.notify()

    def close(self, timeout: float | None = None) -> None:
        """Refuse new jobs, finish the accepted ones, stop the worker."""
        with self.cond:
            self.closing = True
            self.cond.notify_all()
        if self.thread is not None:
            self.thread.join(timeout)

    # ---------------------------------------------------------------- the worker thread
    def _run(self) -> None:
        while (jobs := self._next_batch()) is not None:
            try:
                self._execute(jobs)
            except Exception as e:  # the worker must survive anything a batch raises
                logger.exception("batch of %d requests failed", len(jobs))
                self.metrics.errors.labels("internal").inc()
                for job in jobs:
                    job.deliver(("error", RequestError(500, f"internal error: {e}",
                                                       kind="server_error")))  # fmt: skip

    def _next_batch(self) -> list[Job] | None:
        """The next batch: the oldest job, then those that arrive within max_wait_s of it while
        their rows fit in max_batch. None when closing and nothing is left."""
        with self.cond:
            while True:
                while not self.queue and not self.closing:
                    self.cond.wait()
                if not self.queue:
                    return None
                first = self.queue.popleft()
                if not first.cancelled.is_set():
                    break
                self.metrics.queue_depth.set(len(self.queue))
            jobs, rows = [first], first.rows
            deadline = first.arrived + self.config.max_wait_s
            while rows < self.config.max_batch:
                if self.queue:
                    nxt = self.queue[0]
                    if nxt.cancelled.is_set():
                        self.queue.popleft()
                        continue
                    if rows + nxt.rows > self.config.max_batch:
                        break
                    jobs.append(self.queue.popleft())
                    rows += nxt.rows
                    continue
                left = deadline - time.monotonic()
                if left <= 0 or self.closing:
                    break
                self.cond.wait(left)
            self.metrics.queue_depth.set(len(self.queue))
            return jobs

    def _execute(self, jobs: list[Job]) -> None:
        engine = self.engine
        accepted = []
        for job in jobs:  # each job's own checks: one bad request fails alone
            if job.cancelled.is_set():
                continue
            try:
                ids = engine.validate(job.prompts, [job.params] * len(job.prompts))
            except ValueError as e:
                msg = rename(str(e))
                self.metrics.errors.labels("bad_request").inc()
                job.deliver(("error", RequestError(400, msg, field_of(msg))))
                continue
            job.deliver(("accepted", [len(x) for x in ids]))
            accepted.append(job)
        if not accepted:
            return
        prompts = [p for job in accepted for p in job.prompts]
        params = [job.params for job in accepted for _ in job.prompts]
        owners = [(job, k) for job in accepted for k in range(job.rows)]  # Engine's row order
        streams = {
            r: TextStream(self._decode, self.eos, job.params.max_new_tokens, job.params.stop)
            for r, (job, _) in enumerate(owners)
            if job.stream
        }

        def on_tokens(first_row: int, tokens: list[int]) -> list[int]:
            finish = []
            for i, token in enumerate(tokens):
                job, k = owners[first_row + i]
                if job.cancelled.is_set():
                    finish.append(i)
                elif (stream := streams.get(first_row + i)) and (delta := stream.push(token)):
                    job.deliver(("delta", k, delta))
            return finish

        self.metrics.batch_rows.observe(len(owners))
        self.metrics.batch_requests.observe(len(accepted))
        outputs = engine.generate(prompts, params, on_tokens=on_tokens)
        self.metrics.observe_batch(outputs)
        start = row = 0
        for job in accepted:
            outs: list[RequestOutput] = outputs[start : start + len(job.prompts)]
            if job.stream:
                samples = [s for o in outs for s in o.samples]
                for k, sample in enumerate(samples):
                    if delta := streams[row + k].finish(sample.text):
                        job.deliver(("delta", k, delta))
            job.deliver(("done", outs))
            start, row = start + len(job.prompts), row + job.rows

    def _decode(self, ids: list[int]) -> str:
        return decode_text(self.engine.tokenizer, ids)
