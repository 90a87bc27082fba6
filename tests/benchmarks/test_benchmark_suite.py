"""The benchmark suite (benchmarks/run.py, benchmarks/suite/): percentiles, peak memory, the
target checks on synthetic rows that meet and miss, the markdown and plots, the reference-style
decoding against our decoder, the judge, and a tiny end-to-end run on the tiny bundle."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # `benchmarks` is a folder of the repository, not a package install

from decoder_fixtures import one_thread  # noqa: E402, F401 (autouse fixture)

from benchmarks.suite.config import METHODS, PROMPTS, SuiteConfig, preset  # noqa: E402
from benchmarks.suite.measure import PeakMemory, summarize, timed  # noqa: E402
from benchmarks.suite.report import render_markdown, target_checks, write_plots  # noqa: E402
from benchmarks.suite.runner import schedule  # noqa: E402


# ------------------------------------------------------------------ pure pieces
def test_summarize_percentiles_interpolate_linearly():
    s = summarize([40.0, 10.0, 100.0, 20.0, 30.0])  # sorted: 10 20 30 40 100
    assert s["p50"] == pytest.approx(30.0)
    assert s["p90"] == pytest.approx(40.0 + 0.6 * 60.0)  # rank 0.9·4 = 3.6
    assert s["p99"] == pytest.approx(40.0 + 0.96 * 60.0)  # rank 3.96
    assert (s["mean"], s["min"], s["max"], s["n"]) == (40.0, 10.0, 100.0, 5)
    one = summarize([7.0])
    assert one["p50"] == one["p99"] == 7.0
    with pytest.raises(ValueError, match="at least one"):
        summarize([])


def test_peak_memory_sees_an_allocation_inside_the_call():
    meter = PeakMemory(torch.device("cpu"))
    if meter.method == "none":
        pytest.skip("no way to read peak RSS here")

    def allocate():
        x = torch.ones(32 * 1024 * 1024 // 4 * 3)  # 96 MiB, touched
        return float(x[-1])

    _, seconds, peak, growth = timed(allocate, torch.device("cpu"), meter)
    assert seconds > 0
    assert growth >= 80, (meter.method, growth)
    assert peak >= growth
    _, _, _, small = timed(lambda: torch.ones(16).sum(), torch.device("cpu"), meter)
    assert small < 40, (meter.method, small)  # the peak was reset between calls


def test_schedule_same_prompts_and_seeds_per_call_different_per_repeat():
    cfg = SuiteConfig(seed=5)
    p0, s0 = schedule(cfg, 8, 0)
    p1, s1 = schedule(cfg, 8, 1)
    assert (p0, s0) == schedule(cfg, 8, 0)
    assert p0 == list(PROMPTS[:8]) and p1 == list(PROMPTS[8:16])
    assert s0 == list(range(5, 13)) and s1 == list(range(1005, 1013))
    assert len(set(schedule(cfg, 32, 0)[0])) == 32


def test_same_tokens_share_compares_rows_of_matching_repeats():
    from benchmarks.suite.methods import Run
    from benchmarks.suite.runner import same_tokens_share

    def runs(*rows):
        return [(r, [], Run([], list(toks), [], {})) for r, toks in enumerate(rows)]

    base = runs([[1, 2], [3]], [[4], [5, 6]])
    assert same_tokens_share(runs([[1, 2], [3]], [[4], [5, 6]]), base) == 1.0
    assert same_tokens_share(runs([[1, 2], [3, 0]], [[4], [6, 5]]), base) == 0.5
    with pytest.raises(ValueError):
        same_tokens_share(runs([[1, 2], [3]]), base)  # a repeat missing


def test_config_limits_and_validation():
    full, quick = preset("cpu", False), preset("cpu", True)
    assert full.lengths == (16, 32, 64, 128) and full.batches == (1, 8, 32)
    assert (
        quick.lengths == (16, 32) and quick.batches == (1, 8) and quick.output_name == "suite_quick"
    )
    assert full.skip_reason("engine", 32, 128) is None
    assert "batch 32 > 8" in full.skip_reason("fudge", 32, 16)
    assert "= 256 > 128" in full.skip_reason("fudge", 8, 32)
    assert full.skip_reason("fudge", 8, 16) is None and full.skip_reason("fudge", 1, 128) is None
    assert "batch 8 > 1" in quick.skip_reason("reference_dglm", 8, 16)
    assert full.repeats_for(1) == 3 and full.repeats_for(8) == 2
    assert preset("cpu", True, lengths=(4,), control_scale=None).lengths == (4,)
    with pytest.raises(ValueError, match="methods"):
        SuiteConfig(methods=("engine", "nope"))
    with pytest.raises(ValueError, match="lengths"):
        SuiteConfig(lengths=(0,))
    with pytest.raises(ValueError, match="suite"):
        SuiteConfig(suite="tpu")


# ------------------------------------------------------------------ targets, markdown, plots
def _row(method, batch, length, p50, success=None, n=10):
    q = {
        "n": n,
        "success_k": None if success is None else round(success * n),
        "success_n": 0 if success is None else n,
        "success_rate": success,
        "probe_success_rate": 0.5,
        "perplexity": 12.0,
    }
    return {
        "method": method,
        "family": METHODS[method],
        "controls": "—",
        "batch": batch,
        "length": length,
        "latency_ms": {"p50": p50, "p90": p50 * 1.1, "p99": p50 * 1.2},
        "tokens_per_s": batch * length / p50 * 1e3,
        "tokens_per_row": float(length),
        "stages_ms": {"encode": 1.0, "diffusion": 20.0, "decode": p50 - 21.0},
        "peak_mem_delta_mib": 3.0,
        "quality": q,
        "info": {},
    }


def _rows(controlled=1100.0, hf=1500.0, reference=20000.0, fudge=5000.0, ours=0.6, theirs=0.4):
    rows = []
    for L in (16, 32):
        scale = L / 32
        rows += [
            _row("hf_generate", 1, L, hf * scale, 0.3),
            _row("engine", 1, L, 1000.0 * scale, 0.3),
            _row("engine_1probe", 1, L, controlled * scale, ours),
            _row("engine_2probes", 1, L, 1120.0 * scale, 0.5),
            _row("reference_dglm", 1, L, reference * scale, theirs),
            _row("fudge", 1, L, fudge * scale, theirs),
        ]
    return rows


def _by_target(checks):
    out = {}
    for c in checks:
        out.setdefault(c["target"], []).append(c)
    return out


def test_target_checks_all_met():
    checks = _by_target(target_checks(_rows()))
    ratio = checks["engine_1probe ≤ 1.15× engine uncontrolled"][0]
    assert ratio["met"] is True and ratio["value"] == pytest.approx(1.1)
    assert checks["engine_1probe faster than hf_generate (no control)"][0]["met"] is True
    ref = checks["engine_1probe ≥ 10× faster than reference_dglm"]
    assert [c["where"] for c in ref] == ["L=16, B=1", "L=32, B=1"]
    assert all(c["met"] for c in ref) and ref[1]["value"] == pytest.approx(20000 / 1100)
    assert all(c["met"] for c in checks["engine_1probe faster than fudge"])
    success = checks["engine_1probe control success ≥ fudge"][0]
    assert success["met"] is True and success["value"] == pytest.approx(0.2)
    assert "12/20" in success["note"] and "8/20" in success["note"]


def test_target_checks_each_missed():
    rows = _rows(controlled=1200.0, hf=1100.0, reference=9000.0, fudge=1000.0, ours=0.2)
    checks = _by_target(target_checks(rows))
    assert checks["engine_1probe ≤ 1.15× engine uncontrolled"][0]["met"] is False
    assert checks["engine_1probe faster than hf_generate (no control)"][0]["met"] is False
    assert not any(c["met"] for c in checks["engine_1probe ≥ 10× faster than reference_dglm"])
    assert not any(c["met"] for c in checks["engine_1probe faster than fudge"])
    assert checks["engine_1probe control success ≥ reference_dglm"][0]["met"] is False
    # two probes at 1.12× still meet the (extra) ratio
    assert checks["engine_2probes ≤ 1.15× engine uncontrolled (extra)"][0]["met"]


def test_target_checks_not_measured_without_the_cells():
    rows = [r for r in _rows() if r["length"] == 16 and r["method"] != "fudge"]
    checks = _by_target(target_checks(rows))
    assert checks["engine_1probe ≤ 1.15× engine uncontrolled"][0]["met"] is None
    assert checks["engine_1probe faster than fudge"][0]["met"] is None
    assert checks["engine_1probe control success ≥ fudge"][0]["met"] is None
    assert checks["engine_1probe ≥ 10× faster than reference_dglm"][0]["met"] is True  # L=16


def _report(rows):
    return {
        "device": "cpu",
        "config": {"quick": True, "temperature": 1.0, "top_p": 0.95, "control_scale": 20.0},
        "environment": {  # as benchmarks.common.environment captures it
            "device": "cpu",
            "device_name": "m",
            "cpu_count": 2,
            "torch_threads": 1,
            "python": "3.x",
            "versions": {"torch": "x"},
            "commit": "abc1234def",
            "dirty": False,
            "load_avg": {"start": 1.0, "end": 2.0},
            "decoder": "smollm2",
        },
        "wall_s": 12.0,
        "memory_method": "rss_hwm",
        "notes": ["a note"],
        "methods": {"engine": "the engine"},
        "rows": rows,
        "targets": target_checks(rows),
    }


def test_markdown_table_targets_and_skipped_rows():
    rows = _rows()
    rows.append({"method": "fudge", "family": "fudge", "controls": "—", "batch": 32,
                 "length": 16, "skipped": "batch 32 > 8 (time)"})  # fmt: skip
    md = render_markdown(_report(rows), ["out/suite_quick_relative_runtime.png"])
    table = [line for line in md.splitlines() if line.startswith("| ")]
    header = table[0].count("|")
    assert all(line.count("|") == header for line in table[:14]), "ragged table"
    assert "| engine_1probe | — | 1 | 32 | 1100.0 | 1210.0 | 1320.0 |" in md
    assert "skipped: batch 32 > 8 (time)" in md
    assert "| **met** |" in md and "**missed**" not in md
    missed = render_markdown(_report(_rows(controlled=1300.0)), [])
    assert "**missed**" in missed
    assert "commit `abc1234`, torch x, Python 3.x; m, 2 cores, 1 torch threads" in md
    assert "![suite_quick_relative_runtime](suite_quick_relative_runtime.png)" in md


def test_plots_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    rows = _rows()
    rows += [_row(m, 8, 32, p) for m, p in (("engine", 3000.0), ("hf_generate", 4000.0))]
    paths = write_plots(rows, tmp_path, "suite_test")
    assert [p.name for p in paths] == [
        "suite_test_relative_runtime.png",
        "suite_test_latency_vs_batch.png",
    ]
    for p in paths:
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


# ------------------------------------------------------------------ pieces on the tiny bundle
def test_hf_soft_prompt_decoding_matches_our_decoder(tiny_engine, tiny_llama_dir, gen):
    """The reference-style decoding (HF generate from [pads ; prefix ; soft prompt]) follows our
    decoder's greedy tokens: same layout, masks and positions (T → 0 makes HF sampling greedy)."""
    from dglm.engine.decoding.loop import DecodeParams, generate

    from benchmarks.suite.methods import HFSoftPromptCore, load_hf

    hf = load_hf(tiny_llama_dir, torch.device("cpu"), torch.float32)
    tok = tiny_engine.tokenizer
    prefix = [tok.encode(p) for p in ("The movie was great", "Prices")]  # padded rows
    assert len(prefix[0]) != len(prefix[1])
    soft = torch.randn(2, 3, tiny_engine.decoder.hidden_size, generator=gen)
    decode = HFSoftPromptCore(hf, tok, temperature=1e-4, top_p=1.0).decode
    theirs, t = decode(prefix, [DecodeParams(max_new_tokens=12, seed=0)] * 2, soft)
    ours, _ = generate(tiny_engine.decoder, tok, prefix, [DecodeParams(12, 0.0)], soft)
    assert t["prefill_s"] > 0 and t["decode_s"] > 0
    assert all(len(r.token_ids) == 12 for r in theirs)  # min_new_tokens: exactly L
    compared = 0
    for o, h in zip(ours, theirs, strict=True):
        assert o.token_ids == h.token_ids[: len(o.token_ids)]  # ours stops at EOS
        compared += len(o.token_ids)
    assert compared >= 6
    plain, _ = decode(prefix, [DecodeParams(max_new_tokens=12, seed=0)] * 2, soft * 0 + 1)
    assert [r.token_ids for r in plain] != [r.token_ids for r in theirs]  # the soft prompt counts


def test_judge_success_by_vader_and_toxicity(tiny_engine):
    pytest.importorskip("vaderSentiment")
    pytest.importorskip("profanity_check")
    from dglm.engine.probes import Control, Probe

    from benchmarks.suite.quality import Judge, aggregate

    probes = dict(tiny_engine.probes.probes)
    probes["toxicity"] = Probe("toxicity", ("low", "high"), torch.randn(1, 384), torch.zeros(1))
    judge = Judge(tiny_engine.decoder, tiny_engine.encoder, probes, "low")
    texts = [
        "What a wonderful, lovely day.",  # positive, clean
        "This is great, you fucking idiot",  # positive, toxic
        "Everything about it was terrible.",  # negative
    ]
    ids = [tiny_engine.tokenizer.encode(t) for t in texts]
    prefix = [tiny_engine.tokenizer.encode("Today")] * 3
    one = judge.judge(prefix, ids, texts, (Control("sentiment", "positive"),))
    assert one.success == [True, True, False]
    both = judge.judge(
        prefix, ids, texts, (Control("sentiment", "positive"), Control("toxicity", "low"))
    )
    assert both.success == [True, False, False]
    neg = judge.judge(prefix, ids, texts, (Control("sentiment", "negative"),))
    assert neg.success == [False, False, True]
    agg = aggregate(both)
    assert (agg["n"], agg["success_k"], agg["success_n"]) == (3, 1, 3)
    assert agg["success_rate"] == pytest.approx(1 / 3)
    assert agg["mean_tokens"] == pytest.approx(sum(len(i) for i in ids) / 3)
    assert agg["perplexity"] > 1


def test_suite_end_to_end_on_the_tiny_bundle(tiny_engine, tiny_llama_dir, tmp_path):
    """Every method runs on the same prompts and seeds; rows, skipped rows, targets and files."""
    from benchmarks.suite.methods import load_hf
    from benchmarks.suite.report import write_report
    from benchmarks.suite.runner import run

    cfg = SuiteConfig(
        quick=True,
        lengths=(6, 32),
        batches=(1, 2),
        repeats=(2, 1),
        reference_steps=3,
        fudge_top_k=4,
        limits=(("fudge", 1, 1024), ("reference_dglm", 2, 32)),
    )
    hf = load_hf(tiny_llama_dir, torch.device("cpu"), torch.float32)
    lines = []
    report, samples = run(
        cfg, tiny_engine, tiny_engine, hf, hf, torch.device("cpu"), "tiny", lines.append
    )
    rows = report["rows"]
    measured = {(r["method"], r["batch"], r["length"]): r for r in rows if "latency_ms" in r}
    skipped = {(r["method"], r["batch"], r["length"]): r for r in rows if "skipped" in r}
    names = ["hf_generate", "engine", "engine_1probe", "reference_dglm", "fudge"]
    assert "engine_2probes left out: the bundle has no 'toxicity' probe" in report["notes"]
    assert "llama_cpp left out: the bundle's decoder is not the SmolLM2 GGUF" in report["notes"]
    for name in ("re_control", "engine_re_control"):
        assert f"{name} left out: the bundle has no 'sentiment' value network" in report["notes"]
    assert set(skipped) == {("fudge", 2, 6), ("fudge", 2, 32), ("reference_dglm", 2, 32)}
    assert "batch 2 > 1" in skipped[("fudge", 2, 6)]["skipped"]
    assert len(measured) == 4 * len(names) - len(skipped)
    for (m, b, L), r in measured.items():
        assert r["repeats"] == (2 if b == 1 else 1)
        assert r["latency_ms"]["p50"] > 0 and r["tokens_per_s"] > 0
        assert r["quality"]["n"] == b * r["repeats"]
        if m in ("hf_generate", "reference_dglm"):  # HF paths emit exactly L tokens
            assert r["tokens_per_row"] == L and r["full_length_frac"] == 1.0
        else:
            assert 0 <= r["tokens_per_row"] <= L
        assert r["device"] == "cpu" and r["commit"] and "torch" in r["versions"]
    stages = {m: set(measured[(m, 1, 6)]["stages_ms"]) for m in names}
    assert stages["hf_generate"] == {"prefill", "decode"}
    assert stages["fudge"] == {"decode", "rerank"}
    full = {"encode", "diffusion", "prompt_generator", "prefill", "decode"}
    assert full <= stages["engine"] and full <= stages["reference_dglm"]
    ref_sampler = measured[("reference_dglm", 1, 6)]["info"]["sampler"]
    assert (ref_sampler["sampler"], ref_sampler["num_inference_steps"]) == ("ddpm", 3)
    assert ref_sampler["guidance_mode"] == "exact"
    engine_sampler = measured[("engine", 1, 6)]["info"]["sampler"]
    assert engine_sampler["num_inference_steps"] == tiny_engine.config.sampler.num_inference_steps
    same = measured[("engine_1probe", 1, 6)]["same_tokens_as_uncontrolled"]
    assert 0.0 <= same <= 1.0 and "same_tokens_as_uncontrolled" not in measured[("engine", 1, 6)]
    targets = {c["target"]: c for c in report["targets"]}
    assert targets["engine_1probe ≤ 1.15× engine uncontrolled"]["value"] > 0
    assert (
        "identical to uncontrolled" in targets["engine_1probe ≤ 1.15× engine uncontrolled"]["note"]
    )
    assert targets["engine_2probes ≤ 1.15× engine uncontrolled (extra)"]["met"] is None
    assert sum("B=1   L=6" in line for line in lines) == len(names)

    paths = write_report(report, samples, tmp_path, cfg.output_name)
    assert json.loads(paths["json"].read_text())["rows"][0]["method"] in METHODS
    md = paths["markdown"].read_text()
    assert md.count("| engine_1probe |") == 4 and "## Targets" in md
    assert paths["samples"].read_text().count("\n") == len(samples) > 0


def test_reference_dglm_decodes_without_prompt_guidance(tiny_engine, tiny_bundle, tiny_llama_dir):
    """On a bundle whose default prompt guidance is on, the engine's rows use it and the
    reference-style rows (HF generate from the soft prompt, as the reference) do not."""
    from dataclasses import replace

    from dglm.engine.engine import Engine

    from benchmarks.suite.methods import describe, engine_method, load_hf, reference_method

    engine = Engine.from_pretrained(tiny_bundle)
    engine.dglm.config = replace(engine.dglm.config, prompt_guidance=2.0)
    hf = load_hf(tiny_llama_dir, torch.device("cpu"), torch.float32)
    ref = reference_method(engine, hf, (), steps=2, temperature=1.0, top_p=0.9)
    ours = engine_method("engine", engine, (), temperature=1.0, top_p=0.9)
    run = ref.run(["The movie was", "Prices"], 4, [1, 2])
    assert [len(t) for t in run.token_ids] == [4, 4]
    assert "prompt guidance 1" in describe(ref) and "prompt guidance 2" in describe(ours)
    guided = ours.run(["The movie was", "Prices"], 4, [1, 2])
    plain = engine_method("engine", tiny_engine, (), temperature=1.0, top_p=0.9)
    assert guided.token_ids != plain.run(["The movie was", "Prices"], 4, [1, 2]).token_ids
