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


def test_targets_judge_the_batching_rows_and_cite_the_engine_alone():
    from benchmarks.bench_serve import targets

    def row(mode, c, tok_s, p50, p99, lost=0):
        return {"mode": mode, "concurrency": c, "tokens_per_s": tok_s, "latency_median_s": p50,
                "latency_p99_s": p99, "lost": lost, "rejected_429": 0}  # fmt: skip

    rows = [row("engine.generate", 1, 200.0, 0.2, 0.21), row("batching", 1, 90.0, 0.4, 0.42),
            row("batching", 8, 300.0, 0.9, 0.96)]  # fmt: skip
    got = targets(rows)
    assert got[0] == ("concurrency 8 vs 1 (batching): 3.33x tokens/s (target ≥ 2: met); p99 "
                      "latency 2.40x the single request's (target ≤ 2.5: met)")  # fmt: skip
    assert got[1] == (
        "for reference: p99 at concurrency 8 is 4.80x Engine.generate's lone "
        "request (0.200 s, in process); the served lone request takes 2.00x that"
    )
    rows[2] = row("batching", 8, 170.0, 1.3, 1.35, lost=1)
    got = targets(rows)
    assert "1.89x tokens/s (target ≥ 2: missed)" in got[0] and "3.38x" in got[0]
    assert got[-1].startswith("lost or duplicated responses: 1 (target 0: missed)")
