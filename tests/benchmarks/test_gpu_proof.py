"""benchmarks/gpu_proof.sh and its bookkeeping (benchmarks/gpu_proof.py): the CPU dry run end to end
with two deliberately failing steps (an error and a timeout) that must not stop the steps after
them, the GPU mode on a machine without CUDA (every GPU step skipped with its reason), and the
target checks on synthetic results that meet, miss and are not measured."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # `benchmarks` is a folder of the repository, not a package install

from benchmarks import gpu_proof  # noqa: E402

SCRIPT = ROOT / "benchmarks" / "gpu_proof.sh"
STEPS = ["install", "twins", "pytest_gpu", "kernels", "decode", "suite", "onnx"]
RETURNED = {"summary.json", "summary.md", "proof.log", "results.tar.gz"}


def run_script(*args: str, timeout: float, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    environ = {k: v for k, v in os.environ.items() if k != "DGLM_SHAPE_TWINS"}
    t0 = time.perf_counter()
    proc = subprocess.run(
        ["bash", str(SCRIPT), *args],
        cwd=ROOT,
        env={**environ, "PYTHON": sys.executable, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return proc, time.perf_counter() - t0


def test_dry_run_runs_every_step_and_a_failed_step_stops_nothing(tmp_path):
    out = tmp_path / "out"
    proc, wall = run_script("--dry-run", str(out), timeout=300, GPU_PROOF_INJECT_FAILURE="1")
    log = proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.returncode == 1, log  # the injected failures make the run fail, after every step
    assert wall < 300
    assert {p.name for p in out.iterdir()} == RETURNED  # the device machine returns ≤ 8 files
    summary = json.loads((out / "summary.json").read_text())
    steps = {s["name"]: s for s in summary["steps"]}
    order = [s["name"] for s in summary["steps"]]
    assert order == [*STEPS[:2], "injected_error", "injected_timeout", *STEPS[2:]], log
    assert steps["injected_error"]["status"] == "failed" and steps["injected_error"]["rc"] == 1
    assert steps["injected_timeout"]["status"] == "timeout"
    assert steps["injected_timeout"]["rc"] in (124, 137)
    assert summary["failed_steps"] == ["injected_error", "injected_timeout"]
    for name in ("install", "twins", "pytest_gpu", "kernels", "decode", "suite"):
        assert steps[name]["status"] == "ok", (name, steps[name], log)
        assert steps[name]["wall_s"] > 0 and steps[name]["timeout_s"] >= 10
    assert steps["onnx"]["status"] == "skipped" and steps["onnx"]["reason"]
    assert summary["pytest_gpu"]["failures"] == summary["pytest_gpu"]["errors"] == 0
    assert summary["mode"] == "dry-run" and "random shape twins" in summary["shape_twins"]
    targets = {t["target"]: t for t in summary["targets"]}
    assert any("reference_dglm" in t and v["value"] for t, v in targets.items())  # suite ran
    md = (out / "summary.md").read_text()
    assert "random shape twins" in md and "injected_timeout | timeout" in md
    with tarfile.open(out / "results.tar.gz") as tar:
        names = set(tar.getnames())
    for want in ("steps/decode/decode.json", "steps/kernels/cpu/kernels.json",
                 "steps/suite/suite_quick.json", "steps/pytest_gpu/junit.xml", "steps.jsonl"):  # fmt: skip
        assert want in names, sorted(names)
    assert "----- suite: ok" in (out / "proof.log").read_text()


def test_gpu_mode_without_cuda_skips_each_step_with_its_reason(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the GPU mode would run for minutes")
    proc, _ = run_script("--budget", "0", str(tmp_path), timeout=120)
    assert proc.returncode == 1, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [s["name"] for s in summary["steps"]] == STEPS
    for s in summary["steps"]:
        assert s["status"] == "skipped" and s["reason"], s
    reasons = {s["name"]: s["reason"] for s in summary["steps"]}
    assert "budget" in reasons["install"] and "budget" in reasons["twins"]
    for name in ("pytest_gpu", "kernels", "decode", "suite", "onnx"):
        assert "torch.cuda.is_available() is False" in reasons[name]


def test_bad_arguments_exit_2(tmp_path):
    assert run_script(timeout=30)[0].returncode == 2
    assert run_script("--budget", "soon", str(tmp_path), timeout=30)[0].returncode == 2


# ------------------------------------------------------------------ the summary on synthetic results
def _write(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def _decode_row(x_floor: float, n: int) -> dict:
    return {"model": "SmolLM2-135M (shape twin, random)", "impl": "ours_graphs", "batch": 1,
            "new_tokens": n, "sampling": "top_p0.9", "ms_per_token": 0.1 * x_floor,
            "floor_ms": 0.1, "x_floor": x_floor}  # fmt: skip


def _kernel_rows() -> list[dict]:
    rows = []
    for b, (triton, eager) in {1: (10.0, 70.0), 8: (10.0, 40.0)}.items():
        rows += [
            {"bench": "guided_update", "impl": "triton", "batch": b, "us": triton},
            {"bench": "guided_update", "impl": "eager_reference", "batch": b, "us": eager},
        ]
    for t, (triton, sdpa) in {32: (8.0, 12.0), 64: (9.0, 8.0)}.items():
        for impl, us in (("triton", triton), ("sdpa_alone", sdpa),
                         ("layer_pytorch(norms+sdpa)", 30.0)):  # fmt: skip
            rows.append({"bench": "attention", "impl": impl, "batch": 1, "tokens": t,
                         "dtype": "bfloat16", "us": us})  # fmt: skip
    return rows


def test_summary_checks_the_anchor_targets(tmp_path):
    steps = tmp_path / "work" / "steps"
    _write(
        steps / "decode" / "decode.json", {"rows": [_decode_row(1.5, 32), _decode_row(2.5, 128)]}
    )
    _write(steps / "kernels" / "h200" / "kernels.json", {"rows": _kernel_rows()})
    suite_targets = [
        {"target": "engine_1probe ≥ 10× faster than reference_dglm", "where": "L=32, B=1",
         "value": 12.0, "threshold": "≥ 10", "met": True, "note": ""},
        {"target": "engine_1probe control success ≥ fudge", "where": "4 shared cell(s)",
         "value": 0.1, "threshold": "≥ 0 (difference)", "met": True, "note": "3/4 vs 2/4"},
    ]  # fmt: skip
    _write(steps / "suite" / "suite_quick.json", {"targets": suite_targets})
    records = tmp_path / "work" / "steps.jsonl"
    for args in (
        ["decode", "ok", "0", "12.5", "130", ""],
        ["onnx", "skipped", "", "0", "0", "no EP"],
    ):
        assert gpu_proof.main(["record", str(records), *args, "python", "-m", "x"]) == 0
    out = tmp_path / "out"
    assert gpu_proof.main(["summary", str(records), str(steps), str(out), "--mode", "gpu"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["status"] == "ok" and [st["status"] for st in s["steps"]] == ["ok", "skipped"]
    got = [(t["target"].split(" ")[0], t["where"], t["value"], t["met"]) for t in s["targets"]]
    assert got[:2] == [
        ("decode", "SmolLM2-135M (shape twin, random), 32 new tokens, top_p0.9", 1.5, True),
        ("decode", "SmolLM2-135M (shape twin, random), 128 new tokens, top_p0.9", 2.5, False),
    ]
    assert got[2] == ("fused", "", 4.0, False)  # worst batch: 40 / 10
    assert got[3:5] == [
        ("qk-norm", "dtype=bfloat16, tokens=32", 1.5, True),
        ("qk-norm", "dtype=bfloat16, tokens=64", 0.89, False),
    ]
    assert got[5] == ("engine_1probe", "L=32, B=1", 12.0, True)
    assert got[6][3] is None  # a quality target: not meaningful on shape twins
    assert "not meaningful" in s["targets"][6]["note"]
    assert "| onnx | skipped | — |" in (out / "summary.md").read_text()


def test_summary_without_results_reports_not_measured(tmp_path):
    out = tmp_path / "out"
    code = gpu_proof.main(
        ["summary", str(tmp_path / "none.jsonl"), str(tmp_path / "steps"), str(out),
         "--mode", "dry-run"]
    )  # fmt: skip
    assert code == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["steps"] == [] and s["pytest_gpu"] is None
    assert s["targets"] and all(t["met"] is None for t in s["targets"])


def test_a_skipped_step_needs_a_reason(tmp_path):
    with pytest.raises(SystemExit):
        gpu_proof.main(["record", str(tmp_path / "r.jsonl"), "x", "skipped", "", "0", "0", ""])
