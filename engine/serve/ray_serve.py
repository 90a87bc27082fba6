"""Scale-out on Ray Serve: N replicas, each loading its own Engine behind the same app
(`create_app`: its own batcher, worker thread and metrics); Ray's proxy spreads requests over
them.

    dglm serve --ray --replicas 2                      # from the CLI, or
    serve run dglm.engine.serve.ray_serve:app_builder bundle=default replicas=2

ray is imported only here, inside the functions: `pip install "ray[serve]"` to use it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from dglm.engine.serve.app import ServerConfig

logger = logging.getLogger(__name__)


def import_serve():
    try:
        from ray import serve
    except ImportError:
        raise RuntimeError("dglm serve --ray needs Ray Serve: pip install 'ray[serve]'") from None
    return serve


def deployment(
    bundle: str, engine_kwargs: dict, server: ServerConfig, replicas: int = 1,
    ray_actor_options: dict | None = None,
):  # fmt: skip
    """A Ray Serve application (bound deployment) of `replicas` engine replicas."""
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        raise ValueError(f"replicas must be an integer ≥ 1, got {replicas!r}")
    serve = import_serve()

    def build_app():  # runs on each replica: the engine loads there
        from dglm.engine.engine import Engine
        from dglm.engine.serve.app import create_app

        return create_app(Engine.from_pretrained(bundle, **engine_kwargs), server)

    replica = serve.deployment(
        serve.ingress(build_app)(),
        name="dglm",
        num_replicas=replicas,
        ray_actor_options=ray_actor_options or {},
        # each replica batches its own requests: let enough of them in to fill a batch
        max_ongoing_requests=server.batch.max_queue + server.batch.max_batch,
    )
    return replica.bind()


def app_builder(args: dict):
    """`serve run dglm.engine.serve.ray_serve:app_builder bundle=... replicas=N device=cpu`."""
    bundle = args.get("bundle", "default")
    server = ServerConfig(model_name=args.get("model_name", Path(bundle).name))
    engine_kwargs = {"device": args.get("device", "cpu")}
    return deployment(bundle, engine_kwargs, server, int(args.get("replicas", 1)))


def run(
    bundle: str, engine_kwargs: dict, server: ServerConfig, replicas: int, host: str, port: int
) -> int:
    """Start Ray (locally), deploy, and serve until interrupted."""
    serve = import_serve()
    import ray

    app = deployment(bundle, engine_kwargs, server, replicas)
    ray.init(ignore_reinit_error=True)
    serve.start(http_options={"host": host, "port": port})
    serve.run(app, name="dglm", route_prefix="/")
    print(f"dglm: serving {server.model_name!r} on http://{host}:{port} ({replicas} replicas)",
          flush=True)  # fmt: skip
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
    return 0
