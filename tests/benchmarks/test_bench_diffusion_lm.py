"""benchmarks/bench_diffusion_lm.py end to end on a tiny Diffusion-LM bundle with a sentiment
classifier (no Gemma judge): every section written, the targets stated, samples saved."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from dglm.engine.methods.diffusion_lm import (
    DIFFUSION_LM_PRESETS,
    DiffusionLMNetwork,
    LatentClassifier,
    LatentClassifierConfig,
)
from dglm.engine.methods.diffusion_lm.bundle import save_bundle
from dglm.engine.training.diffusion_lm import (
    build_vocab,
    encode_sentences,
    labelled_sentences,
    train_diffusion_lm,
    train_latent_classifier,
)
from dglm.engine.training.loop import TrainConfig

from benchmarks import bench_diffusion_lm

pytest.importorskip("vaderSentiment")

POSITIVE = ["the movie was great and fun .", "i loved the story and the food .",
            "a great film with good music ."]  # fmt: skip
NEGATIVE = ["the movie was bad and dull .", "i hated the story and the food .",
            "a sad film with awful music ."]  # fmt: skip


def test_bench_diffusion_lm_writes_every_section(tmp_path, tiny_llama_dir):
    torch.manual_seed(0)
    texts = (POSITIVE + NEGATIVE) * 8
    vocab = build_vocab(texts, 64, 12)
    config = replace(DIFFUSION_LM_PRESETS["tiny"], vocab_size=len(vocab))
    ids, _ = encode_sentences(texts, vocab, config.seq_len)
    cfg = TrainConfig(steps=40, batch_size=16, lr=3e-3, warmup=5, eval_every=20, save_every=20)
    path = train_diffusion_lm(DiffusionLMNetwork(config), vocab, ids, ids[:8], tmp_path / "r", cfg)
    from dglm.engine.methods.diffusion_lm.bundle import load_bundle

    net, vocab, _, _ = load_bundle(path)
    labels = ["positive"] * 24 + ["negative"] * 24
    sets = labelled_sentences(POSITIVE * 8 + NEGATIVE * 8, labels, ("negative", "positive"),
                              vocab, 12)  # fmt: skip
    ccfg = LatentClassifierConfig("sentiment", ("negative", "positive"), 8, 12, dim=32, depth=1,
                                  head_dim=16)  # fmt: skip
    clf = train_latent_classifier(LatentClassifier(ccfg), net, sets["train"], sets["eval"],
                                  tmp_path / "c", replace(cfg, steps=20))  # fmt: skip
    bundle = save_bundle(tmp_path / "b", net, vocab, [clf], {"num_inference_steps": 10})
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"{t} number {i} ." for i, t in enumerate(texts * 4)))
    out = tmp_path / "out"
    argv = ["--bundle", str(bundle), "--n", "4", "--quick", "--no-gemma", "--corpus",
            str(corpus), "--out", str(out), "--scorer", str(tiny_llama_dir)]  # fmt: skip
    assert bench_diffusion_lm.main(argv) == 0
    report = json.loads((out / "diffusion_lm.json").read_text())
    got = [(r["sampler"], r["steps"], r["candidates"], r["select"]) for r in report["speed"]]
    assert got == list(bench_diffusion_lm.SPEED)
    assert [q["setting"] for q in report["quality"]] == [
        "ddim-20", "ddpm-200", f"ddim-20 best of {bench_diffusion_lm.BEST_OF} (lm)",
        f"ddim-20 lattice of {bench_diffusion_lm.LATTICE_OF}",
    ]  # fmt: skip
    assert all(r["seconds_median"] > 0 for r in report["speed"])
    assert report["speed"][0]["controls"] == ["sentiment=positive"]
    for q in report["quality"]:
        assert q["length"]["n"] == 4 and 0 <= q["length"]["rate"] <= 1
        assert q["infill"]["context_kept"]["n"] >= 1
        if q["select"] == "lattice":  # needs a known length: no unconditional or attribute task
            assert q["unconditional"] is None and "attribute" not in q
            assert q["infill"]["context_kept"]["rate"] == 1 and q["length"]["rate"] == 1
        else:
            assert set(q["attribute"]) == {"unconditional", "positive", "negative"}
    assert "n/a (a lattice needs a known length)" in (out / "diffusion_lm.md").read_text()
    assert any("length exact" in t for t in report["targets"])
    assert report["bundle"] == "b"  # outside the working directory: the folder name only
    assert (out / "diffusion_lm.md").read_text().startswith("# Diffusion-LM on CPU")
    tasks = {json.loads(x)["task"] for x in (out / "diffusion_lm_samples.jsonl").open()}
    assert {"unconditional", "length", "infill", "sentiment=positive"} <= tasks
    assert any("best of" in t for t in report["targets"])


def test_ppl_ratio_resamples_both_sets_and_results_drop_working_values():
    """The infill/human perplexity ratio: the point value is the ratio of the two token-weighted
    perplexities; its interval resamples both sets (so it is wider than one that resamples only
    the first against a fixed second); the written report keeps no per-sentence "_" values."""
    import math

    from benchmarks.bench_diffusion_lm import ppl_ratio, public

    a = {"_nll": [2.0, 4.0, 3.0, 5.0] * 8, "_tokens": [1, 2, 1, 2] * 8}
    b = {"_nll": [1.0, 2.0, 1.5, 3.0] * 8, "_tokens": [1, 1, 1, 2] * 8}
    r = ppl_ratio(a, b)
    want = math.exp(sum(a["_nll"]) / sum(a["_tokens"])) / math.exp(
        sum(b["_nll"]) / sum(b["_tokens"])
    )
    assert r["ratio"] == pytest.approx(want)
    assert r["ci"][0] < r["ratio"] < r["ci"][1]
    fixed_b = {
        "_nll": [sum(b["_nll"])],
        "_tokens": [sum(b["_tokens"])],
    }  # one "sentence": no spread
    one_sided = ppl_ratio(a, fixed_b)
    assert one_sided["ratio"] == pytest.approx(want)
    assert r["ci"][1] - r["ci"][0] > one_sided["ci"][1] - one_sided["ci"][0]
    same = ppl_ratio(a, a)
    assert same["ratio"] == pytest.approx(1.0) and same["ci"][0] < 1 < same["ci"][1]
    report = {
        "human": {"ppl": 3.0, "_nll": [1.0]},
        "quality": [{"infill": {"gemma": {"_tokens": [1], "n": 1}}}],
    }
    assert public(report) == {"human": {"ppl": 3.0}, "quality": [{"infill": {"gemma": {"n": 1}}}]}
