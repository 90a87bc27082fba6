"""Evaluation metrics on hand-made inputs, target checks, and `dglm eval` end to end on the tiny
bundle."""

from __future__ import annotations

import json
import math

import pytest
import torch
from dglm.engine.evaluation import (
    RENOISE_SWEEP,
    EvalConfig,
    build_settings,
    continuation_nll,
    distinct_n,
    fidelity,
    heldout_prefixes,
    low_toxicity_target,
    mean_and_se,
    perplexity,
    render_markdown,
    run_eval,
    sentiment_rates,
    target_checks,
    toxicity,
    write_report,
)
from dglm.engine.probes import Probe


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------ metrics


def test_distinct_n_counts_over_all_texts():
    texts = ["a b a b", "a b c", ""]
    # unigrams a b a b a b c: 3 distinct / 7; bigrams ab ba ab ab bc: 3 / 5; trigrams aba bab abc
    assert distinct_n(texts, 1) == pytest.approx(3 / 7)
    assert distinct_n(texts, 2) == pytest.approx(3 / 5)
    assert distinct_n(texts, 3) == 1.0
    assert distinct_n(["a", ""], 2) == 0.0
    with pytest.raises(ValueError, match="n must be"):
        distinct_n(texts, 0)


def test_sentiment_rates_vader_thresholds():
    r = sentiment_rates(
        ["I love this wonderful movie", "This is terrible and awful", "The table is in the room"]
    )
    assert r["positive"] == pytest.approx(1 / 3) and r["negative"] == pytest.approx(1 / 3)
    # VADER compounds: 0.8616, −0.7269, 0.0
    assert r["compound"] == pytest.approx((0.8616 - 0.7269) / 3, abs=1e-4)
    assert math.isnan(sentiment_rates([])["positive"])


def test_toxicity_mean_and_fraction():
    from profanity_check import predict_prob

    texts = ["you are a stupid idiot and a piece of shit", "have a nice day"]
    p = predict_prob(texts)
    r = toxicity(texts)
    assert r["mean"] == pytest.approx(float(p.mean()))
    assert r["frac"] == 0.5


class UniformDecoder:
    """Stub decoder whose logits are all zero: every token has probability 1/V."""

    vocab_size, hidden_size, device = 7, 3, torch.device("cpu")

    def embed(self, ids):
        return torch.zeros(*ids.shape, self.hidden_size)

    def hidden_states(self, x, positions):
        return x

    def logits(self, h):
        return torch.zeros(*h.shape[:-1], self.vocab_size)


def test_perplexity_of_uniform_decoder_is_vocab_size():
    nll, counts = continuation_nll(UniformDecoder(), [[1, 2], [3]], [[4, 5, 6], []])
    assert counts.tolist() == [3, 0]
    assert nll.tolist() == pytest.approx([3 * math.log(7), 0.0])
    assert perplexity(nll, counts) == pytest.approx(7.0)
    assert math.isnan(perplexity(torch.zeros(1), torch.zeros(1, dtype=torch.long)))


def test_continuation_nll_matches_per_row_forward(tiny_engine, gen):
    dec = tiny_engine.decoder
    V = dec.vocab_size
    prefixes = [torch.randint(0, V, (n,), generator=gen).tolist() for n in (3, 9, 1, 5)]
    conts = [torch.randint(0, V, (n,), generator=gen).tolist() for n in (4, 2, 7, 0)]
    nll, counts = continuation_nll(dec, prefixes, conts, batch_size=3)
    for p, c, got in zip(prefixes, conts, nll.tolist(), strict=True):
        if not c:
            assert got == 0.0
            continue
        seq = torch.tensor([p + c])
        with torch.inference_mode():
            logits = dec(dec.embed(seq), torch.arange(seq.shape[1])[None])[0]  # (T, V)
        lp = torch.log_softmax(logits.double(), -1)
        want = -sum(lp[len(p) - 1 + i, t].item() for i, t in enumerate(c))
        assert got == pytest.approx(want, rel=1e-5)
    assert counts.tolist() == [4, 2, 7, 0]
    with pytest.raises(ValueError, match="prefix_ids\\[0\\] is empty"):
        continuation_nll(dec, [[]], [[1]])


def test_fidelity_is_cosine_to_the_latent(minilm):
    texts = ["The weather is lovely today.", "Stocks fell sharply."]
    lat = minilm.latents(texts).cpu()
    assert fidelity(minilm, texts, lat).tolist() == pytest.approx([1.0, 1.0], abs=1e-5)
    assert fidelity(minilm, texts, -3 * lat).tolist() == pytest.approx([-1.0, -1.0], abs=1e-5)
    assert fidelity(minilm, texts, lat.flip(0)).tolist()[0] < 0.5


def test_mean_and_se():
    m, se = mean_and_se(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert m == 2.5 and se == pytest.approx(math.sqrt(5 / 3) / 2)


# ------------------------------------------------------------------ targets


def _row(setting, method, group, target=None, scale=None, **m):
    base = {"perplexity": 10.0, "dist_3": 0.8, "vader_positive": 0.3, "vader_negative": 0.2}
    return {
        "setting": setting,
        "method": method,
        "group": group,
        "target": target,
        "scale": scale,
        "metrics": {**base, **m},
    }


def test_target_checks_pick_smallest_passing_scale_and_report_margins():
    rows = [
        _row("dglm unguided", "dglm", "unguided"),
        _row("p10", "dglm", "sentiment", "positive", 10.0, vader_positive=0.6),
        _row("p50", "dglm", "sentiment", "positive", 50.0, vader_positive=0.9, perplexity=12.0),
        _row("p100", "dglm", "sentiment", "positive", 100.0, vader_positive=0.95, perplexity=12.5),
        _row("n10", "dglm", "sentiment", "negative", 10.0, vader_negative=0.5, perplexity=20.0),
        _row("n50", "dglm", "sentiment", "negative", 50.0, vader_negative=0.7, dist_3=0.7),
        _row("fudge", "fudge", "sentiment", "negative", 1.0, vader_negative=0.99),
    ]
    cos95 = torch.tensor([0.5, 0.6, 0.7, 0.6])
    cos0 = torch.tensor([0.2, 0.2, 0.3, 0.3])
    checks = target_checks(rows, {0.95: cos95, 0.0: cos0})
    pos = [c for c in checks if c["target"].startswith("sentiment positive")]
    assert {c["setting"] for c in pos} == {"p50"} and all(c["met"] for c in pos)
    assert pos[0]["margin"] == pytest.approx(0.05)
    assert pos[1]["value"] == pytest.approx(1.2) and pos[1]["margin"] == pytest.approx(0.1)
    neg = [c for c in checks if c["target"].startswith("sentiment negative")]
    # neither passes; n50 meets two of three (perplexity, rate fails; dist-3 off by 0.1)
    assert {c["setting"] for c in neg} == {"n50"}
    assert [c["met"] for c in neg] == [False, True, False]
    assert neg[0]["margin"] == pytest.approx(-0.15) and neg[2]["margin"] == pytest.approx(-0.05)
    (fid,) = [c for c in checks if c["target"].startswith("fidelity")]
    diff, se = mean_and_se(cos95 - cos0)
    assert fid["value"] == pytest.approx(0.35) and fid["met"]
    assert fid["margin"] == pytest.approx(diff - 2 * se)


# ------------------------------------------------------------------ harness


def test_settings_cover_every_probe_and_skip_missing_ones(gen):
    def probe(name, labels):
        rows = 1 if len(labels) == 2 else len(labels)
        return Probe(name, labels, torch.randn(rows, 8, generator=gen), torch.zeros(rows))

    config = EvalConfig(guidance_scales=(10.0, 50.0), fudge_strengths=(1.0,))
    probes = {
        "sentiment": probe("sentiment", ("negative", "positive")),
        "toxicity": probe("toxicity", ("low", "high")),
    }
    settings, skipped = build_settings(config, probes, 0.95)
    names = [s.name for s in settings]
    assert skipped == []
    assert "dglm toxicity=low:10" in names and "dglm toxicity=low:50" in names
    assert "fudge sentiment=negative λ=1" in names
    assert [s.renoise_alpha2 for s in settings if s.group == "fidelity"] == list(RENOISE_SWEEP)
    assert low_toxicity_target(probe("toxicity", ("clean", "toxic"))) == "clean"
    assert low_toxicity_target(probe("toxicity", ("a", "b"))) == "a"  # binary: y = 0
    with pytest.raises(ValueError, match="no non-toxic class"):
        low_toxicity_target(probe("toxicity", ("a", "b", "c")))
    settings, skipped = build_settings(config, {}, 0.95)
    assert [s["setting"] for s in skipped] == ["sentiment", "toxicity=low"]
    assert [s.name for s in settings][:2] == ["decoder", "dglm unguided"]


def test_heldout_prefixes_are_deterministic_and_held_out(tiny_engine):
    from dglm.engine.data import split_of

    tok = tiny_engine.tokenizer
    a = heldout_prefixes(tok, 4, ("rotten_tomatoes",), min_tokens=8, max_tokens=12)
    assert a == heldout_prefixes(tok, 4, ("rotten_tomatoes",), min_tokens=8, max_tokens=12)
    assert len(a) == 4 and all(src == "rotten_tomatoes" for src, _ in a)
    from dglm.engine.data import rotten_tomatoes

    evals = [d.text for d in rotten_tomatoes() if split_of(d.text) == "eval"]
    for _, p in a:
        assert 8 <= len(tok.encode(p, add_special_tokens=False)) <= 13
        assert any(t.startswith(p) for t in evals)
    with pytest.raises(ValueError, match="unknown data source"):
        heldout_prefixes(tok, 1, ("nope",))


def test_eval_end_to_end_quick_on_tiny_bundle(tiny_engine, tmp_path):
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
    report, samples = run_eval(tiny_engine, config, lambda *a: calls.append(a), bundle="tiny")
    names = [r["setting"] for r in report["rows"]]
    assert names == [
        "decoder",
        "dglm unguided",
        "dglm sentiment=positive:10",
        "fudge sentiment=positive λ=1",
        "dglm sentiment=negative:10",
        "fudge sentiment=negative λ=1",
        "dglm unguided α²=0.95",
        "dglm unguided α²=0",
    ]
    # α² = 0.95 is the bundle's default: the unguided run is reused, not repeated
    assert report["rows"][6]["same_run_as"] == "dglm unguided"
    assert calls[-1][1] == calls[-1][2] == 7 * 2  # 7 distinct runs × 2 batches
    assert report["skipped"] == [
        {"setting": "toxicity=low", "reason": "the bundle has no 'toxicity' probe"}
    ]
    for r in report["rows"]:
        assert r["n"] == 4 and r["timings"]["per_sample_s"] > 0
        m = r["metrics"]
        assert m["perplexity"] > 1 or m["tokens"] == 0
        assert 0 <= m["dist_3"] <= 1 and 0 <= m["vader_positive"] <= 1
        assert ("fidelity" in m) == (r["method"] == "dglm")
    assert {c["target"].split(":")[0] for c in report["targets"]} == {
        "sentiment positive",
        "sentiment negative",
        "fidelity",
    }
    assert len(samples) == 7 * 4
    paths = write_report(report, samples, tmp_path / "out")
    loaded = json.loads(paths["json"].read_text())
    assert loaded["rows"][0]["setting"] == "decoder"
    assert loaded["environment"]["device"] == "cpu" and loaded["environment"]["versions"]["torch"]
    md = paths["markdown"].read_text()
    assert "| dglm sentiment=negative:10 |" in md and "## Targets" in md
    assert "untrained" in md
    assert md == render_markdown(report)
    lines = paths["samples"].read_text().splitlines()
    assert json.loads(lines[0])["setting"] == "decoder"


def test_eval_cli(tiny_bundle, tmp_path, capsys):
    from dglm.engine.cli import main

    out = tmp_path / "cli"
    rc = main(
        [
            "eval", "--bundle", str(tiny_bundle), "--quick", "--out", str(out), "--prefixes", "2",
            "--sources", "rotten_tomatoes", "--max-new-tokens", "3", "--scales", "10",
            "--renoise", "0.95,0", "--fudge-top-k", "3",
        ]
    )  # fmt: skip
    assert rc == 0
    report = json.loads((out / "results.json").read_text())
    assert len(report["prefixes"]) == 2 and report["config"]["guidance_scales"] == [10.0]
    assert "## Targets" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["eval", "--bundle", str(tiny_bundle), "--scales", "a,b"])
    assert "comma-separated numbers, got 'a,b'" in capsys.readouterr().err
    assert main(["eval", "--bundle", str(tiny_bundle), "--samples", "0"]) == 2
    assert "num_samples must be an integer ≥ 1" in capsys.readouterr().err
