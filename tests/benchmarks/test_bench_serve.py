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


def test_bench_serve_writes_a_row_per_mode_and_level(tiny_bundle, tmp_path):
    argv = ["--bundle", str(tiny_bundle), "--concurrency", "1,3", "--requests", "2",
            "--max-tokens", "4", "--out", str(tmp_path)]  # fmt: skip
    assert bench_serve.main(argv) == 0
    report = json.loads((tmp_path / "serve.json").read_text())
    rows = report["rows"]
    assert [(r["mode"], r["concurrency"]) for r in rows] == [
        ("engine.generate", 1), ("batching", 1), ("batching", 3), ("no-batching", 1),
        ("no-batching", 3)]  # fmt: skip
    assert [r["requests"] for r in rows] == [2, 2, 3, 2, 3]  # at least the concurrency
    assert all(r["tokens_per_s"] > 0 and r["commit"] for r in rows)
    assert all(r["completed"] == r["requests"] and r["lost"] == 0 for r in rows)
    assert all(r["ttft_median_s"] is not None for r in rows[1:])
    assert all(r["latency_p99_s"] >= r["latency_median_s"] for r in rows)
    assert report["mean_batch_rows"] >= 1
    assert any("lost or duplicated responses: 0" in t for t in report["targets"])
    assert (tmp_path / "serve.md").read_text().startswith("# dglm serve on loopback")


def test_percentile_is_the_nearest_rank():
    v = [float(x) for x in range(1, 101)]
    assert bench_serve.percentile(v, 0.5) == 50 and bench_serve.percentile(v, 0.99) == 99
    assert bench_serve.percentile([3.0, 1.0, 2.0], 0.5) == 2
    assert bench_serve.percentile([7.0], 0.99) == 7 and bench_serve.percentile([], 0.5) is None


def test_unknown_modes_are_refused(tiny_bundle, tmp_path):
    with pytest.raises(SystemExit):
        bench_serve.main(["--bundle", str(tiny_bundle), "--modes", "gpu", "--out", str(tmp_path)])
