"""The server under load on loopback: time to first token, p50/p99 request latency, requests/s
and tokens/s through `dglm serve`'s app (uvicorn, SSE) with dynamic batching and without it
(max batch 1), optionally on Ray Serve with N replicas, against the same requests through
Engine.generate one at a time, in one process.

    python -m benchmarks.bench_serve [--bundle default] [--concurrency 1,4,8,16,32,64]
        [--requests 16] [--max-tokens 32] [--max-batch 8] [--max-seconds 600] [--threads 1]
        [--modes batching,no-batching] [--ray-replicas 2]
    → benchmarks/results/<device>/serve.{json,md} and serve_throughput.png

Each level fires max(--requests, concurrency) streaming requests (controlled: sentiment
positive, seed = request number, ignore_eos so each must stream exactly --max-tokens tokens), at
most `concurrency` in flight; the servers listen on 127.0.0.1 only. Each mode has its own
--max-seconds budget: once spent, its remaining levels are not started (the run is bounded).
Every response is accounted for: complete (the usage chunk counts max_tokens), refused with 429
(the queue was full: allowed, counted), or lost (anything else: an error, a short or duplicated
stream); the targets need zero lost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import socket
import statistics
import threading
import time
from pathlib import Path

import torch
from dglm.engine.api import GenerationParams
from dglm.engine.engine import Engine
from dglm.engine.evaluation.provenance import load_average
from dglm.engine.probes import Control

from benchmarks import common
from benchmarks.common import ROOT

PROMPTS = ["The movie was", "My neighbour's dog", "The food at this place", "Yesterday the team"]
CONTROLS = [{"probe": "sentiment", "target": "positive"}]
MODES = ("batching", "no-batching", "ray")


def start_server(engine: Engine, max_batch: int, max_queue: int = 64):
    """uvicorn on a loopback socket in a thread → (server, thread, base url)."""
    import uvicorn
    from dglm.engine.serve.app import ServerConfig, create_app
    from dglm.engine.serve.batching import BatchConfig

    batch = BatchConfig(max_batch=max_batch, max_queue=max_queue)
    app = create_app(engine, ServerConfig(batch=batch))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    return server, thread, f"http://127.0.0.1:{sock.getsockname()[1]}"


async def one_request(client, body: dict) -> dict:
    """One streaming request → {status, ttft_s, latency_s, tokens (from the usage chunk), chunks
    with a finish_reason (exactly one when complete)}."""
    t0 = time.perf_counter()
    first, tokens, finished = None, None, 0
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return {"status": r.status_code, "latency_s": time.perf_counter() - t0}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                msg = json.loads(line[6:])
                if msg.get("usage"):
                    tokens = msg["usage"]["completion_tokens"]
                for choice in msg.get("choices", []):
                    if choice["text"] and first is None:
                        first = time.perf_counter() - t0
                    finished += choice.get("finish_reason") is not None
    except Exception as e:  # noqa: BLE001 - every failure is a lost response, counted
        return {"status": type(e).__name__, "latency_s": time.perf_counter() - t0}
    return {"status": 200, "ttft_s": first, "latency_s": time.perf_counter() - t0,
            "tokens": tokens, "finished": finished}  # fmt: skip


def percentile(values: list[float], q: float) -> float | None:
    """The q-quantile (nearest rank) of `values`, None when empty."""
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v), max(1, math.ceil(q * len(v)))) - 1]


async def level(url: str, concurrency: int, n: int, max_tokens: int) -> dict:
    import httpx

    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=None, limits=limits) as client:

        async def limited(i: int) -> dict:
            body = {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens, "seed": i,
                    "ignore_eos": True, "controls": CONTROLS, "stream": True,
                    "stream_options": {"include_usage": True}}  # fmt: skip
            async with gate:
                return await one_request(client, body)

        t0 = time.perf_counter()
        results = await asyncio.gather(*(limited(i) for i in range(n)))
        wall = time.perf_counter() - t0
    done = [r for r in results if r["status"] == 200 and r["tokens"] == max_tokens
            and r["finished"] == 1]  # fmt: skip
    rejected = sum(r["status"] == 429 for r in results)
    lat = [r["latency_s"] for r in done]
    ttft = [r["ttft_s"] for r in done if r["ttft_s"] is not None]
    return {
        "concurrency": concurrency,
        "requests": n,
        "completed": len(done),
        "rejected_429": rejected,
        "lost": n - len(done) - rejected,
        "ttft_median_s": statistics.median(ttft) if ttft else None,
        "latency_median_s": percentile(lat, 0.5),
        "latency_p99_s": percentile(lat, 0.99),
        "requests_per_s": len(done) / wall,
        "tokens_per_s": len(done) * max_tokens / wall,
        "wall_s": wall,
    }


def mean_batch(url: str) -> float | None:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics").text
    for fam in text_string_to_metric_families(text):
        if fam.name == "dglm_batch_rows":
            s = {x.name: x.value for x in fam.samples if not x.labels.get("le")}
            count = s.get("dglm_batch_rows_count", 0)
            return s["dglm_batch_rows_sum"] / count if count else None
    return None


def baseline(engine: Engine, n: int, max_tokens: int) -> dict:
    """The same requests through Engine.generate, one after another (no server)."""
    control = (Control("sentiment", "positive"),)
    t0 = time.perf_counter()
    latencies = []
    for i in range(n):
        t = time.perf_counter()
        params = GenerationParams(controls=control, seed=i, max_new_tokens=max_tokens,
                                  ignore_eos=True)  # fmt: skip
        engine.generate([PROMPTS[i % len(PROMPTS)]], params)
        latencies.append(time.perf_counter() - t)
    wall = time.perf_counter() - t0
    return {"mode": "engine.generate", "concurrency": 1, "requests": n, "completed": n,
            "rejected_429": 0, "lost": 0, "ttft_median_s": None,
            "latency_median_s": percentile(latencies, 0.5),
            "latency_p99_s": percentile(latencies, 0.99), "requests_per_s": n / wall,
            "tokens_per_s": n * max_tokens / wall, "wall_s": wall}  # fmt: skip


def start_ray(bundle: str, replicas: int, max_batch: int, threads: int, quantize: str = "auto"):
    """Ray Serve on this machine with `replicas` engine replicas → (stop, url) or (None, why)."""
    try:
        import ray
        from ray import serve
    except ImportError:
        return None, "ray[serve] is not installed (pip install 'ray[serve]')"
    from dglm.engine.serve.app import ServerConfig
    from dglm.engine.serve.batching import BatchConfig
    from dglm.engine.serve.ray_serve import deployment

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    ray.init(num_cpus=max(2, replicas), include_dashboard=False, ignore_reinit_error=True)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    server = ServerConfig(batch=BatchConfig(max_batch=max_batch))
    app = deployment(bundle, {"device": "cpu", "quantize": quantize}, server, replicas,
                     {"num_cpus": 1, "runtime_env": {"env_vars": {
                         "OMP_NUM_THREADS": str(threads)}}})  # fmt: skip
    serve.run(app, name="dglm", route_prefix="/")

    def stop():
        serve.shutdown()
        ray.shutdown()

    return stop, f"http://127.0.0.1:{port}"


def run_mode(mode: str, url: str, levels: list[int], args) -> list[dict]:
    rows, t_start = [], time.perf_counter()
    for c in levels:
        if time.perf_counter() - t_start > args.max_seconds:
            rows.append({"mode": mode, "concurrency": c, "skipped": "time budget spent"})
            continue
        n = max(args.requests, c)
        row = asyncio.run(level(url, c, n, args.max_tokens))
        rows.append({"mode": mode, **row, "load": load_average()})
        print(f"{mode} c={c}: {row['tokens_per_s']:.1f} tok/s, p99 {row['latency_p99_s']}",
              flush=True)  # fmt: skip
    return rows


def targets(rows: list[dict]) -> list[str]:
    """The issue's targets, checked on the batching rows."""
    by = {(r["mode"], r["concurrency"]): r for r in rows if "skipped" not in r}
    one, eight = by.get(("batching", 1)), by.get(("batching", 8))
    out = []
    if one and eight:
        gain = eight["tokens_per_s"] / one["tokens_per_s"]
        tail = eight["latency_p99_s"] / one["latency_median_s"]
        out.append(f"concurrency 8 vs 1 (batching): {gain:.2f}x tokens/s (target ≥ 2: "
                   f"{'met' if gain >= 2 else 'missed'}); p99 latency {tail:.2f}x the single "
                   f"request's (target ≤ 2.5: {'met' if tail <= 2.5 else 'missed'})")  # fmt: skip
        alone = by.get(("engine.generate", 1))
        if alone:  # the same tail against the engine's own lone request (no HTTP, no streaming)
            base = alone["latency_median_s"]
            out.append(f"for reference: p99 at concurrency 8 is {eight['latency_p99_s'] / base:.2f}x "
                       f"Engine.generate's lone request ({base:.3f} s, in process); the served lone "
                       f"request takes {one['latency_median_s'] / base:.2f}x that")  # fmt: skip
    lost = sum(r.get("lost", 0) for r in rows)
    rejected = sum(r.get("rejected_429", 0) for r in rows)
    out.append(f"lost or duplicated responses: {lost} (target 0: {'met' if lost == 0 else 'missed'})"
               f"; refused with 429: {rejected}")  # fmt: skip
    return out


def plot(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for mode in MODES:
        pts = [r for r in rows if r["mode"] == mode and "skipped" not in r]
        if pts:
            xs = [r["concurrency"] for r in pts]
            a.plot(xs, [r["tokens_per_s"] for r in pts], marker="o", label=mode)
            b.plot(xs, [r["latency_p99_s"] for r in pts], marker="o", label=mode)
    for ax, label in ((a, "tokens/s"), (b, "p99 latency, s")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", default="default")
    p.add_argument("--concurrency", default="1,4,8,16,32,64")
    p.add_argument("--requests", type=int, default=16, help="per level (at least concurrency)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-queue", type=int, default=64)
    p.add_argument("--max-seconds", type=float, default=600.0, help="per mode")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--modes", default="batching,no-batching", help=f"some of {MODES}")
    p.add_argument("--ray-replicas", type=int, default=2)
    p.add_argument("--quantize", default="auto", help="decoder weights (Engine.from_pretrained)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad:
        p.error(f"--modes: {bad} unknown; choose from {MODES}")
    device = torch.device("cpu")
    env = common.environment(device, packages=(*common.PACKAGES, "fastapi", "uvicorn"))
    engine = Engine.from_pretrained(args.bundle, quantize=args.quantize)
    rows = [{**baseline(engine, args.requests, args.max_tokens), "load": load_average()}]
    notes, batch = [f"decoder weights: {engine.info()['decoder_quantized']}"], None
    for mode in modes:
        if mode == "ray":
            stop, url = start_ray(
                args.bundle, args.ray_replicas, args.max_batch, args.threads, args.quantize
            )
            if stop is None:
                notes.append(f"ray rows skipped: {url}")
                continue
            try:
                rows += run_mode(f"ray ({args.ray_replicas} replicas)", url, levels, args)
            finally:
                stop()
            continue
        max_batch = args.max_batch if mode == "batching" else 1
        server, thread, url = start_server(engine, max_batch, args.max_queue)
        try:
            rows += run_mode(mode, url, levels, args)
            if mode == "batching":
                batch = mean_batch(url)
        finally:
            server.should_exit = True
            thread.join(60)
    rows = common.stamp(rows, env, device)
    checks = targets(rows)
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / "cpu"
    out.mkdir(parents=True, exist_ok=True)
    plotted = plot(rows, out / "serve_throughput.png")
    md = common.header("dglm serve on loopback", env, f"bundle {args.bundle}",
                       f"{args.max_tokens} tokens per request",
                       f"max batch {args.max_batch} (no-batching: 1), max queue {args.max_queue}",
                       f"mean engine batch with batching {batch}", *notes)  # fmt: skip
    md += ["", *[f"- {c}" for c in checks], ""]
    md += ["| mode | concurrency | requests | completed | 429 | lost | TTFT p50 s | latency p50 s "
           "| latency p99 s | requests/s | tokens/s | load |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip

    def f(v):
        return "-" if v is None else f"{v:.3f}"

    for r in rows:
        if "skipped" in r:
            md.append(f"| {r['mode']} | {r['concurrency']} | skipped: {r['skipped']} |"
                      + " |" * 9)  # fmt: skip
            continue
        md.append(f"| {r['mode']} | {r['concurrency']} | {r['requests']} | {r['completed']} | "
                  f"{r['rejected_429']} | {r['lost']} | {f(r['ttft_median_s'])} | "
                  f"{f(r['latency_median_s'])} | {f(r['latency_p99_s'])} | "
                  f"{r['requests_per_s']:.2f} | {r['tokens_per_s']:.1f} | {r['load']} |")  # fmt: skip
    if plotted:
        md += ["", "![tokens/s and p99 latency vs concurrency](serve_throughput.png)"]
    report = {"rows": rows, "mean_batch_rows": batch, "targets": checks, "notes": notes,
              "environment": env}  # fmt: skip
    paths = common.write_results(out, "serve", report, "\n".join(md) + "\n")
    print("\n".join(md))
    print(f"wrote {paths['json']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
