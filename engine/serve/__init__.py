"""The OpenAI-compatible server (`dglm serve`): HTTP app, dynamic batching, request schema,
metrics, and the Ray Serve deployment. Needs the `serve` extra (fastapi, uvicorn,
prometheus-client; ray for `--ray`)."""
