"""benchmarks/bench_int8_linear.py on one layer's shapes: a row per implementation and batch,
written where --out says."""

from __future__ import annotations

import json

import pytest
from dglm.kernels import int8_linear

from benchmarks import bench_int8_linear


@pytest.mark.skipif(not int8_linear.available(), reason="dglm.kernels.cpu_ops is not built")
def test_bench_int8_linear_writes_a_row_per_impl_and_batch(tmp_path):
    argv = ["--layers", "1", "--batches", "1", "3", "--repeats", "1", "--out", str(tmp_path)]
    assert bench_int8_linear.main(argv) == 0
    report = json.loads((tmp_path / "int8_linear.json").read_text())
    got = {(r["impl"], r["batch"]) for r in report["rows"]}
    assert {("cpp", 1), ("fp32", 1), ("cpp", 3), ("fp32", 3)} <= got
    assert all(r["ms_per_pass"] > 0 and r["commit"] for r in report["rows"])
    assert report["isa"] == int8_linear.isa()
    assert "| 3 | cpp |" in (tmp_path / "int8_linear.md").read_text()
