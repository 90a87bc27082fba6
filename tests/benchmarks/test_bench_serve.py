"""benchmarks/bench_serve.py end to end on the tiny bundle (loopback, two requests per level):
a row per level plus the engine baseline, written where --out says."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("httpx")
pytest.importorskip("prometheus_client")

from benchmarks import bench_serve  # noqa: E402


def test_bench_serve_writes_a_row_per_level(tiny_bundle, tmp_path):
    argv = ["--bundle", str(tiny_bundle), "--concurrency", "1,2", "--requests", "2",
            "--max-tokens", "4", "--out", str(tmp_path)]  # fmt: skip
    assert bench_serve.main(argv) == 0
    report = json.loads((tmp_path / "serve.json").read_text())
    rows = report["rows"]
    assert [r["concurrency"] for r in rows] == ["engine.generate, sequential", 1, 2]
    assert all(r["tokens_per_s"] > 0 and r["commit"] for r in rows)
    assert all(r["ttft_median_s"] is not None for r in rows[1:])
    assert report["mean_batch_rows"] >= 1
    assert (tmp_path / "serve.md").read_text().startswith("# dglm serve on loopback")
