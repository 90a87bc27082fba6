"""`dglm eval`'s harness end to end on the tiny bundle: settings, shared runs, metrics with
intervals, targets, and the three output files."""

from __future__ import annotations

import json
from dataclasses import replace

from decoder_fixtures import one_thread  # noqa: F401 (autouse fixture)
from dglm.engine.evaluation.judges import PROFANITY_NOTE
from dglm.engine.evaluation.report import render_markdown, write_report
from dglm.engine.evaluation.run import add_sentiment_judge, run_eval
from dglm.engine.evaluation.settings import EvalConfig


def test_eval_end_to_end_quick_on_tiny_bundle(
    tiny_engine, tiny_reference_lm, tmp_path, monkeypatch
):
    lm = tiny_reference_lm
    # the bundle as if it shipped prompt guidance (g = 2, mask 0.1): plain decoding then gets a
    # row with the same truncation
    monkeypatch.setattr(
        tiny_engine.dglm, "config", replace(tiny_engine.config, prompt_guidance=2.0)
    )
    config = EvalConfig(
        prefixes=("The movie was", "I think the food"),
        num_samples=2,
        max_new_tokens=4,
        guidance_scales=(10.0,),
        renoise_alpha2s=(0.95, 0.0),
        fudge_top_k=4,
        fudge_strengths=(1.0,),
        batch_size=1,
    )
    calls = []
    report, samples = run_eval(
        tiny_engine, config, lambda *a: calls.append(a), bundle="tiny", reference_lm=lm
    )
    names = [r["setting"] for r in report["rows"]]
    assert names == [
        "decoder",
        "decoder min-p 0.1",  # plain decoding with the truncation of the bundle's prompt guidance
        "dglm unguided",
        "dglm sentiment=positive:10",
        "fudge sentiment=positive λ=1",
        "dglm sentiment=negative:10",
        "fudge sentiment=negative λ=1",
        "dglm unguided α²=0.95",
        "dglm unguided α²=0",
    ]
    # α² = 0.95 is the bundle's default: the unguided run is reused, not repeated
    assert report["rows"][7]["same_run_as"] == "dglm unguided"
    assert calls[-1][1] == calls[-1][2] == 8 * 2  # 8 distinct runs × 2 batches
    assert report["skipped"] == [
        {"setting": "toxicity=low", "reason": "the bundle has no 'toxicity' probe"}
    ]
    assert report["reference_lm"] == {"name": "tiny-llama", "status": "used", "note": ""}
    for r in report["rows"]:
        assert r["n"] == 4 and r["timings"]["per_sample_s"] > 0
        m = r["metrics"]
        assert m["perplexity"] > 1 or m["tokens"] == 0
        assert m["ref_perplexity"] > 1 or m["ref_tokens"] == 0
        assert 0 <= m["dist_3"] <= 1 and 0 <= m["vader_positive"] <= 1
        for key in ("vader_negative", "textblob_positive", "hatesonar_frac", "toxicity_frac"):
            lo, hi = m[key + "_ci"]
            assert 0 <= lo <= m[key] <= hi <= 1 and hi - lo > 0.2  # n = 4: a wide interval
        lo, hi = m["hatesonar_mean_ci"]
        assert lo <= m["hatesonar_mean"] <= hi
        assert ("fidelity" in m) == (r["method"] == "dglm")
        for key in ("repeat_trigram", "fused", "harm_patterns"):
            lo, hi = m[key + "_ci"]
            assert 0 <= lo <= m[key] <= hi <= 1
        assert m["relevance_ci"][0] <= m["relevance"] <= m["relevance_ci"][1]
        assert ("overrepresented" in r) == (r["setting"] != "decoder")
    assert "same_run_as" not in report["rows"][1]  # a run of its own (8 runs counted above)
    steered = {c["setting"] for c in report["bounds"]}
    assert steered == {"dglm unguided", "dglm sentiment=positive:10", "dglm sentiment=negative:10"}
    assert report["split"] == "dev" and "## Bounds to ship (split: dev)" in render_markdown(report)
    assert {c["target"].split(":")[0] for c in report["targets"]} == {
        "unguided DGLM",
        "sentiment positive",
        "sentiment negative",
        "fidelity",
    }
    assert all(c["met"] is not None for c in report["targets"])  # scale 10 is the default
    assert len(samples) == 8 * 4
    paths = write_report(report, samples, tmp_path / "out")
    loaded = json.loads(paths["json"].read_text())
    assert loaded["rows"][0]["setting"] == "decoder"
    assert loaded["environment"]["device"] == "cpu" and loaded["environment"]["versions"]["torch"]
    md = paths["markdown"].read_text()
    assert "| dglm sentiment=negative:10 | s=10 (default) | 4 |" in md and "## Targets" in md
    assert "untrained" in md
    assert md == render_markdown(report)
    _check_markdown_columns(md, report)
    lines = paths["samples"].read_text().splitlines()
    assert json.loads(lines[0])["setting"] == "decoder"


def _check_markdown_columns(md: str, report: dict) -> None:
    """Every table has its judges' columns and the plain-decoding and unguided DGLM rows."""
    assert (
        "| setting | guidance | n | PPL SmolLM2 | PPL tiny-llama | Dist-1 | Dist-2 | Dist-3 |" in md
    )
    assert (
        "| setting | guidance | n | VADER + | VADER − | TextBlob + | TextBlob − | probe p(+) |"
        in md
    )
    assert (
        "| setting | guidance | n | profanity-check† mean | profanity-check† > 0.5 | "
        "HateSonar mean | HateSonar > 0.5 |" in md
    )
    tox_header = md.index("| setting | guidance | n | profanity-check†")
    note = md.index(f"† {PROFANITY_NOTE}")
    assert 0 < note - tox_header < 2000  # right under the toxicity table
    # fluency, naturalness, sentiment, toxicity
    assert md.count("| decoder | none (plain decoding) | 4 |") == 4
    assert md.count("| dglm unguided | s=0 (unguided) | 4 |") == 4
    assert (
        "| decoder | " in md.split("by stage")[1]
        and "| dglm unguided | " in md.split("by stage")[1]
    )
    m = report["rows"][0]["metrics"]
    lo, hi = m["vader_positive_ci"]
    assert f"| {m['vader_positive']:.0%} [{lo:.0%}, {hi:.0%}] |" in md  # Wilson interval
    assert "| fudge sentiment=positive λ=1 | FUDGE λ=1 | 4 |" in md
    assert "| target | setting | value | threshold | met | margin | note |" in md


class _WordJudge:
    """A stub neural judge: positive iff the text says "good"."""

    name = "word judge"

    def p_positive(self, texts):
        return [0.9 if "good" in t else 0.1 for t in texts]


def test_a_neural_judge_added_to_a_finished_run_rescores_every_row():
    def row(name, **extra):
        return {"setting": name, "method": "dglm", "group": "sentiment", "target": "positive",
                "scale": 10.0, "n": 4, "metrics": {"vader_positive": 1.0}, **extra}  # fmt: skip

    report = {
        "rows": [row("a"), row("b", same_run_as="a"), row("c")],
        "default_scale": 10.0,
    }
    samples = [{"setting": "a", "continuation": t} for t in ("good", "good", "bad", "good")]
    samples += [{"setting": "c", "continuation": t} for t in ("bad", "bad", "bad", "good")]
    out = add_sentiment_judge(report, samples, _WordJudge(), 0.9)
    m = {r["setting"]: r["metrics"] for r in out["rows"]}
    assert m["a"]["neural_positive"] == m["b"]["neural_positive"] == 0.75
    assert m["c"]["neural_positive"] == 0.25 and m["c"]["neural_negative"] == 0.75
    assert out["sentiment_judge"] == "word judge" and out["sentiment_judge_accuracy"] == 0.9
    neural = [c for c in out["bounds"] if c["bound"].startswith("neural")]
    assert [(c["setting"], c["met"]) for c in neural] == [("a", False), ("b", False), ("c", False)]
