"""`dglm serve`: the OpenAI-compatible HTTP server (uvicorn), or its Ray Serve deployment."""

from __future__ import annotations

import argparse
from pathlib import Path

from dglm.engine.cli.common import device


def add_parser(sub) -> None:
    s = sub.add_parser(
        "serve",
        help="OpenAI-compatible server: /v1/completions, /v1/models, /health, /metrics",
    )
    s.add_argument("--bundle", default="default", help="bundle directory or shipped name")
    s.add_argument(
        "--model-name", default=None, help="the `model` clients name (default: the bundle's name)"
    )
    s.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0: all)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--device", type=device, default="cpu", help="cpu, cuda or cuda:N")
    s.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    s.add_argument("--backend", default="torch", choices=("torch", "onnx"))
    s.add_argument(
        "--quantize", default="auto", choices=("auto", "none", "int8", "int8-bf16"),
        help="decoder weights as `dglm generate --quantize` (int8-bf16: bf16 activations on "
        "AVX512-BF16 CPUs, faster batches)",
    )  # fmt: skip
    s.add_argument(
        "--fast-decode", action="store_true",
        help="decode with the engine's persistent runner (default: on when the fused CPU step "
        "serves the decoder, e.g. the default bundle's int8 SmolLM2)",
    )  # fmt: skip
    s.add_argument("--max-batch", type=int, default=8, help="rows (prompts × n) per engine batch")
    s.add_argument(
        "--max-wait-ms",
        type=float,
        default=10.0,
        help="how long a request waits for others to share its batch",
    )
    s.add_argument(
        "--max-queue", type=int, default=64, help="waiting requests before 429 (Retry-After)"
    )
    s.add_argument("--timeout", type=float, default=300.0, help="per-request timeout, seconds")
    s.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger bodies get 413")
    s.add_argument("--ray", action="store_true", help="run on Ray Serve (needs ray[serve])")
    s.add_argument("--replicas", type=int, default=1, help="Ray Serve replicas (with --ray)")
    s.set_defaults(func=cmd_serve)


def configs(args: argparse.Namespace):
    """(engine kwargs, ServerConfig) from the flags; ValueError naming a bad one."""
    from dglm.engine.serve.app import ServerConfig
    from dglm.engine.serve.batching import BatchConfig

    batch = BatchConfig(
        max_batch=args.max_batch,
        max_wait_s=args.max_wait_ms / 1000,
        max_queue=args.max_queue,
        timeout_s=args.timeout,
    )
    name = args.model_name or Path(args.bundle).name
    server = ServerConfig(model_name=name, batch=batch, max_body_bytes=args.max_body_bytes)
    engine = {"device": args.device, "dtype": args.dtype, "backend": args.backend,
              "fast_decode": True if args.fast_decode else None}  # fmt: skip
    if args.quantize != "auto":
        engine["quantize"] = args.quantize
    return engine, server


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn
    except ImportError:
        raise RuntimeError(
            "dglm serve needs the `serve` extra: pip install 'dglm-engine[serve]'"
        ) from None
    engine_kwargs, server = configs(args)
    if args.ray:
        from dglm.engine.serve.ray_serve import run

        return run(args.bundle, engine_kwargs, server, args.replicas, args.host, args.port)
    if args.replicas != 1:
        raise ValueError("--replicas needs --ray (one process serves one engine)")
    from dglm.engine.engine import Engine
    from dglm.engine.serve.app import create_app

    engine = Engine.from_pretrained(args.bundle, **engine_kwargs)
    print(f"dglm: serving {server.model_name!r} on http://{args.host}:{args.port}", flush=True)
    uvicorn.run(create_app(engine, server), host=args.host, port=args.port, log_level="info")
    return 0
