"""The few-step comparison's target checks and table (synthetic rows; the run itself is measured)."""

from __future__ import annotations

from benchmarks.bench_few_step import REFERENCE, markdown, targets


def _row(name, evals, cos, fid, success, latent):
    return {
        "sampler": name,
        "network_evals": evals,
        "proposal": {"latent_cos_to_teacher": cos, "latent_mse_to_teacher": 1.0,
                     "text_cos_to_teacher_text": 0.5, "fidelity": fid, "perplexity": 40.0},
        "control": {"sentiment=positive": {"success": success, "probe_success": 0.6,
                                           "latent_probe_success": latent,
                                           "latent_probe_success_unguided": 0.5,
                                           "perplexity": 41.0}},
        "time_per_proposal_ms": {"batch1": 100.0, "batch16_per_row": 10.0},
    }  # fmt: skip


def _report(student):
    rows = [
        _row(REFERENCE, 250, 1.0, 0.30, 0.80, 0.90),
        student,
        _row(REFERENCE + " (other seeds)", 250, 0.40, 0.30, 0.0, 0.0),
    ]
    return rows


def test_targets_met_and_missed():
    good = targets(_report(_row("student 4", 4, 0.39, 0.29, 0.78, 0.88)))
    assert all(t["met"] for t in good), good
    bad = targets(_report(_row("student 4", 8, 0.30, 0.20, 0.70, 0.50)))
    assert not any(t["met"] for t in bad), bad  # 250 / 8 < 50, and every quality check misses
    assert targets([_row(REFERENCE, 250, 1.0, 0.3, 0.8, 0.9)])[0]["met"] is None  # no student


def test_markdown_lists_every_sampler_and_target():
    rows = _report(_row("student 4", 4, 0.39, 0.29, 0.78, 0.88))
    report = {
        "bundle": "default",
        "settings": {"prefixes": 8, "samples_per_prefix": 1, "guidance_scale": 50.0,
                     "max_new_tokens": 20, "top_p": 0.95, "repeats": 2},
        "unguided_rates_teacher250": {"sentiment=positive": 0.25},
        "rows": rows,
        "skipped": [],
        "targets": targets(rows),
        "environment": {"device_name": "cpu", "device": "cpu", "torch_threads": 1,
                        "versions": {"torch": "x"}, "commit": "abc1234", "dirty": False},
    }  # fmt: skip
    md = markdown(report)
    for r in rows:
        assert f"| {r['sampler']} |" in md
    assert md.count("**met**") == len(report["targets"])
    assert "0.500 → 0.880" in md  # the latent probe view, unguided → guided
