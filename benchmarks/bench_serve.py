"""The server under load on loopback: time to first token, request latency and tokens/s through
`dglm serve`'s app (uvicorn, dynamic batching, SSE) vs the same requests through Engine.generate
one at a time, in one process.

    python -m benchmarks.bench_serve [--bundle default] [--concurrency 1,4,8] [--requests 8]
                                     [--max-tokens 32] [--max-seconds 120] [--threads 1]
    → benchmarks/results/<device>/serve.{json,md}

Each level fires `--requests` streaming requests (controlled: sentiment positive, seeds 0..n-1)
with at most `concurrency` in flight; the server listens on 127.0.0.1 only. A level stops being
started once --max-seconds have passed (the run is bounded). Rows: the level, median time to
first text and to the last chunk (perf_counter), generated tokens/s over the level's wall time,
the mean engine batch (rows) from /metrics, the load average.
"""

from __future__ import annotations

import argparse
import asyncio
import json
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


def start_server(engine: Engine, max_batch: int):
    """uvicorn on a loopback socket in a thread → (server, thread, base url)."""
    import uvicorn
    from dglm.engine.serve.app import ServerConfig, create_app
    from dglm.engine.serve.batching import BatchConfig

    app = create_app(engine, ServerConfig(batch=BatchConfig(max_batch=max_batch)))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    return server, thread, f"http://127.0.0.1:{sock.getsockname()[1]}"


async def one_request(client, body: dict) -> dict:
    t0 = time.perf_counter()
    first = None
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]" and first is None:
                if json.loads(line[6:])["choices"][0]["text"]:
                    first = time.perf_counter() - t0
    return {"ttft_s": first, "latency_s": time.perf_counter() - t0}


async def level(url: str, concurrency: int, n: int, max_tokens: int) -> dict:
    import httpx

    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=None) as client:

        async def limited(i: int) -> dict:
            body = {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens, "seed": i,
                    "ignore_eos": True, "controls": CONTROLS, "stream": True}  # fmt: skip
            async with gate:
                return await one_request(client, body)

        t0 = time.perf_counter()
        results = await asyncio.gather(*(limited(i) for i in range(n)))
        wall = time.perf_counter() - t0
    ttft = [r["ttft_s"] for r in results if r["ttft_s"] is not None]
    return {
        "concurrency": concurrency,
        "requests": n,
        "ttft_median_s": statistics.median(ttft) if ttft else None,
        "latency_median_s": statistics.median(r["latency_s"] for r in results),
        "tokens_per_s": n * max_tokens / wall,
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
                                  ignore_eos=True, top_p=1.0)  # fmt: skip
        engine.generate([PROMPTS[i % len(PROMPTS)]], params)
        latencies.append(time.perf_counter() - t)
    wall = time.perf_counter() - t0
    return {"concurrency": "engine.generate, sequential", "requests": n, "ttft_median_s": None,
            "latency_median_s": statistics.median(latencies), "tokens_per_s": n * max_tokens / wall,
            "wall_s": wall}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", default="default")
    p.add_argument("--concurrency", default="1,4,8")
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-seconds", type=float, default=120.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    device = torch.device("cpu")
    env = common.environment(device, packages=(*common.PACKAGES, "fastapi", "uvicorn"))
    engine = Engine.from_pretrained(args.bundle)
    rows = [{**baseline(engine, args.requests, args.max_tokens), "load": load_average()}]
    server, thread, url = start_server(engine, args.max_batch)
    t_start = time.perf_counter()
    try:
        for c in levels:
            if time.perf_counter() - t_start > args.max_seconds:
                break
            row = asyncio.run(level(url, c, args.requests, args.max_tokens))
            rows.append({**row, "load": load_average()})
        batch = mean_batch(url)
    finally:
        server.should_exit = True
        thread.join(60)
    rows = common.stamp(rows, env, device)
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / "cpu"
    md = common.header("dglm serve on loopback", env, f"bundle {args.bundle}",
                       f"{args.max_tokens} tokens per request", f"mean batch {batch}")  # fmt: skip
    md += ["| concurrency | requests | TTFT median s | latency median s | tokens/s | load |",
           "|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        ttft = "-" if r["ttft_median_s"] is None else f"{r['ttft_median_s']:.3f}"
        md.append(f"| {r['concurrency']} | {r['requests']} | {ttft} | "
                  f"{r['latency_median_s']:.3f} | {r['tokens_per_s']:.1f} | {r['load']} |")  # fmt: skip
    paths = common.write_results(out, "serve", {"rows": rows, "mean_batch_rows": batch,
                                                "environment": env}, "\n".join(md) + "\n")  # fmt: skip
    print("\n".join(md))
    print(f"wrote {paths['json']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
