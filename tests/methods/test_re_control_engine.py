"""RE-Control in the engine: controls choose their method, value networks live in the bundle, the
CLI trains one (rollouts + TD) and puts it in a bundle, and bad values are refused by name."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from dglm.engine import bundle as bundle_io
from dglm.engine.api import GenerationParams
from dglm.engine.cli.main import main
from dglm.engine.engine import Engine
from dglm.engine.methods.re_control import ValueNetConfig, ValueNetwork
from dglm.engine.probes import Control

PROMPTS = ["The movie was", "Prices are rising while"]


@pytest.fixture(scope="module")
def value_bundle(tiny_bundle, tmp_path_factory):
    """The tiny bundle with a random value network for its sentiment probe."""
    out = tmp_path_factory.mktemp("vb") / "b"
    shutil.copytree(tiny_bundle, out)
    config = bundle_io.read_config(out)
    torch.manual_seed(0)
    hidden = json.loads((out / "config.json").read_text())["prompt_generator"]["decoder_dim"]
    vc = ValueNetConfig("sentiment", hidden, 1, hidden_dim=16, depth=2, steps=10, step_size=50.0)
    bundle_io.save_value_networks({"sentiment": ValueNetwork(vc)}, out / bundle_io.VALUE_NETS_FILE)
    from dataclasses import replace

    bundle_io.write_config(replace(config, value_networks=(vc,)), out)
    return out


@pytest.fixture(scope="module")
def engine(value_bundle):
    return Engine.from_pretrained(value_bundle)


def tokens(engine, controls_per_prompt, method=None, **kw):
    params = [
        GenerationParams(controls=c, seed=3 + i, max_new_tokens=10, ignore_eos=True, **kw)
        for i, c in enumerate(controls_per_prompt)
    ]
    outs = engine.generate(PROMPTS, params, method=method)
    return [o.samples[0].token_ids for o in outs]


def test_control_methods_and_parse():
    c = Control.parse("sentiment=negative:300@both")
    assert (c.probe, c.target, c.scale, c.method) == ("sentiment", "negative", 300.0, "both")
    assert Control.parse("sentiment=positive@re-control").method == "re-control"
    assert Control.parse("sentiment=positive").method == "dglm"
    assert Control("s", "p").latent and not Control("s", "p").hidden
    assert Control("s", "p", method="both").latent and Control("s", "p", method="both").hidden
    with pytest.raises(ValueError, match="method of probe 's'"):
        Control("s", "p", method="pplm")
    for field, bad in (("re_control_steps", -1), ("re_control_steps", 1.5),
                       ("re_control_step_size", float("nan")), ("re_control_step_size", -2.0)):  # fmt: skip
        with pytest.raises(ValueError, match=field):
            GenerationParams(**{field: bad})


def test_value_network_loads_and_is_listed(engine, value_bundle, tmp_path):
    assert list(engine.value_nets) == ["sentiment"]
    info = engine.info()["value_networks"]["sentiment"]
    assert info["steps"] == 10 and info["parameters"] > 0
    engine.save_pretrained(tmp_path / "copy")
    again = Engine.from_pretrained(tmp_path / "copy")
    for a, b in zip(engine.value_nets["sentiment"].parameters(),
                    again.value_nets["sentiment"].parameters(), strict=True):  # fmt: skip
        assert torch.equal(a, b)
    # a config naming a value network whose file is missing names the file
    broken = tmp_path / "broken"
    shutil.copytree(value_bundle, broken)
    (broken / bundle_io.VALUE_NETS_FILE).unlink()
    with pytest.raises(ValueError, match="value_networks.safetensors"):
        Engine.from_pretrained(broken)


def test_re_control_acts_per_row_and_per_method(engine):
    plain = tokens(engine, [(), ()])
    dglm = [(Control("sentiment", "positive"),), ()]
    re = [(Control("sentiment", "positive", method="re-control"),), ()]
    both = [(Control("sentiment", "positive", method="both"),), ()]
    t_dglm, t_re, t_both = tokens(engine, dglm), tokens(engine, re), tokens(engine, both)
    # row 1 has no control: the same tokens whatever row 0 does
    assert t_dglm[1] == t_re[1] == t_both[1] == plain[1]
    assert t_re[0] != plain[0]  # the edit changes the text
    assert t_both[0] != t_dglm[0]  # "both" adds the edit on top of the latent guidance
    # zero steps (or size 0) is exactly no edit
    assert tokens(engine, re, re_control_steps=0)[0] == plain[0]
    assert tokens(engine, re, re_control_step_size=0.0)[0] == plain[0]
    # the plausibility mask: β = 0 is the edit alone; β > 0 changes only the controlled row,
    # alone, with DGLM (after prompt guidance's companion rows) and through engine.re_control
    assert tokens(engine, re, re_control_plausibility=0.0) == t_re
    assert tokens(engine, both, re_control_plausibility=0.0) == t_both
    for controls, unmasked in ((re, t_re), (both, t_both)):
        masked = tokens(engine, controls, re_control_plausibility=0.5)
        assert masked[1] == plain[1] and masked[0] != unmasked[0]
    alone = tokens(engine, re, method=engine.re_control, re_control_plausibility=0.5)
    assert alone[1] == tokens(engine, [(), ()], method=engine.re_control)[1]


def test_re_control_alone_decodes_without_a_soft_prompt(engine):
    from dglm.engine.decoding.loop import generate as decode

    re = [(Control("sentiment", "positive"),), ()]
    got = tokens(engine, re, method=engine.re_control)
    params = [engine.re_control.decode_params(GenerationParams(seed=3 + i, max_new_tokens=10,
                                              ignore_eos=True), 3 + i) for i in range(2)]  # fmt: skip
    ids = [engine.tokenizer.encode(p) for p in PROMPTS]
    plain, _ = decode(engine.decoder, engine.tokenizer, ids, params)
    assert got[1] == plain[1].token_ids  # no control, no soft prompt: plain decoding
    assert got[0] != plain[0].token_ids
    outs = engine.generate(PROMPTS[:1], GenerationParams(), method=engine.re_control)
    assert outs[0].samples[0].latent is None


def test_refusals_name_the_field(engine, tiny_engine):
    re = GenerationParams(controls=(Control("sentiment", "positive", method="re-control"),))
    with pytest.raises(
        ValueError, match=r"params\[0\].controls: probe 'sentiment' has no RE-Control"
    ):
        tiny_engine.generate(["x"], re)  # fmt: skip
    with pytest.raises(ValueError, match="no value network"):
        tiny_engine.generate(["x"], GenerationParams(controls=(Control("sentiment", "positive"),)),
                             method=tiny_engine.re_control)  # fmt: skip
    with pytest.raises(ValueError, match="not a label"):
        engine.generate(["x"], GenerationParams(controls=(Control("sentiment", "meh", method="both"),)))  # fmt: skip


def test_cli_trains_a_value_network_and_adds_it(tiny_bundle, tmp_path, capsys):
    """`dglm train value` (rollouts + TD) → `dglm bundle add-value-network` → `dglm generate
    --control ...@re-control` and `--method re-control`."""
    data = tmp_path / "data"
    data.mkdir()
    rows = [
        {"prefix": f"Review {i}: the film was", "continuation": " fine.", "source": "t"}
        for i in range(40)
    ]
    (data / "pairs_train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"
    rc = main(["train", "value", str(data), "--bundle", str(tiny_bundle), "--probe", "sentiment",
               "--out", str(run), "--rollouts", "16", "--rollout-batch-size", "8",
               "--max-new-tokens", "4", "--steps", "20", "--batch-size", "8", "--eval-every",
               "10", "--save-every", "10", "--warmup", "2"])  # fmt: skip
    assert rc == 0
    assert sorted(p.name for p in (run / "rollouts").iterdir()) == ["rollouts_00000.safetensors"]
    logs = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert {"eval_terminal_mse", "eval_corr_first", "eval_corr_last"} <= set(logs[-1])
    out = tmp_path / "bundle"
    rc = main(["bundle", "add-value-network", str(tiny_bundle), "--run", str(run), "--out",
               str(out), "--steps", "5", "--step-size", "2.5"])  # fmt: skip
    assert rc == 0
    config = bundle_io.read_config(out)
    assert [(v.probe, v.steps, v.step_size) for v in config.value_networks] == [
        ("sentiment", 5, 2.5)
    ]
    for extra in (["--control", "sentiment=positive@re-control"],
                  ["--method", "re-control", "--control", "sentiment=negative"]):  # fmt: skip
        rc = main(["generate", "The film", "--bundle", str(out), "--max-new-tokens", "3",
                   "--seed", "1", "--json", *extra])  # fmt: skip
        assert rc == 0
    # a run for a probe the bundle lacks is refused by name
    capsys.readouterr()
    rc = main(["train", "value", str(data), "--bundle", str(tiny_bundle), "--probe", "topic",
               "--out", str(tmp_path / "r2")])  # fmt: skip
    assert rc == 2 and "--probe 'topic' is not a probe" in capsys.readouterr().err


def test_eval_runs_re_control_beside_dglm(engine, tiny_reference_lm):
    """`dglm eval` adds RE-Control alone and DGLM + RE-Control rows for a probe with a value
    network, with their targets checked."""
    from dataclasses import replace

    from dglm.engine.evaluation.report import render_markdown
    from dglm.engine.evaluation.run import run_eval
    from dglm.engine.evaluation.settings import EvalConfig

    lm = tiny_reference_lm
    config = EvalConfig(prefixes=("The movie was", "I think the food"), num_samples=1,
                        max_new_tokens=6, guidance_scales=(10.0,), renoise_alpha2s=(),
                        fudge_strengths=(), batch_size=2)  # fmt: skip
    config = replace(config, re_control_step_sizes=(2.0,), re_control_plausibilities=(0.9,))
    report, samples = run_eval(engine, config, reference_lm=lm)
    rows = {r["setting"]: r for r in report["rows"]}
    assert {"re-control sentiment=positive", "dglm+re-control sentiment=negative:10",
            "re-control sentiment=positive β=0.9", "dglm+re-control sentiment=positive:10 β=0.9",
            "dglm+re-control sentiment=positive:10 α=2 β=0.9",
            "re-control sentiment=negative α=2 β=0.9"} <= set(rows)  # fmt: skip
    assert rows["re-control sentiment=positive β=0.9"]["re_control_plausibility"] == 0.9
    text = {s["setting"]: [] for s in samples}
    for s in samples:
        text[s["setting"]].append(s["continuation"])
    assert text["re-control sentiment=positive"] != text["decoder"]
    targets = {c["target"] for c in report["targets"]}
    assert "sentiment positive: RE-Control VADER positive ≥ plain decoding + 25%" in targets
    assert any("DGLM + RE-Control above DGLM alone" in t for t in targets)
    above = [c for c in report["targets"] if "DGLM + RE-Control above" in c["target"]]
    assert above and all("paired over 2:" in c["note"] for c in above)  # run_eval's per-sample
    md = render_markdown(report)
    assert "RE-Control (value network's n, α)" in md and "s=10 + RE-Control" in md
    assert "RE-Control (value network's n, α) β=0.9" in md and "s=10 + RE-Control α=2 β=0.9" in md
    assert "| RE-Control α=2 β=0.9 |" in md
    masked = [s["continuation"] for s in samples if s["setting"].endswith("positive β=0.9")]
    assert masked != text["re-control sentiment=positive"]


def test_benchmark_suite_runs_re_control(engine):
    """The suite's RE-Control rows: alone (no diffusion stages) and with DGLM."""
    from benchmarks.suite.config import SuiteConfig
    from benchmarks.suite.methods import build_methods, control_label

    cfg = SuiteConfig(quick=True, methods=("engine_1probe", "re_control", "engine_re_control"))
    methods, notes = build_methods(cfg, engine, engine, None, None)
    assert [m.name for m in methods] == [
        "engine_1probe",
        "re_control",
        "engine_re_control",
    ] and not notes
    runs = {m.name: m.run(PROMPTS, 5, [1, 2]) for m in methods}
    assert runs["re_control"].stages["diffusion"] == 0 < runs["re_control"].stages["decode"]
    assert runs["engine_re_control"].token_ids != runs["engine_1probe"].token_ids
    assert control_label(methods[1].controls) == "sentiment=positive@re-control"


def test_overhead_benchmark_measures_both_arms(value_bundle, tmp_path, monkeypatch):
    """benchmarks/bench_re_control: the edit and plain arms on the same decode path, per batch,
    their ratio against the target; a bundle without the probe's value network is refused."""
    import json
    import sys

    from benchmarks import bench_re_control

    argv = ["bench_re_control", "--bundle", str(value_bundle), "--batches", "1,2", "--tokens",
            "4", "--repeats", "1", "--out", str(tmp_path)]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    bench_re_control.main()
    report = json.loads((tmp_path / "re_control.json").read_text())
    assert [r["batch"] for r in report["rows"]] == [1, 2]
    for r in report["rows"]:
        assert r["plain_ms_per_token"] > 0 and r["edit_ms_per_token"] > 0
        # (the ms are rounded to 3 decimals, the ratio from the unrounded values)
        assert r["ratio"] == pytest.approx(r["edit_ms_per_token"] / r["plain_ms_per_token"], 0.02)
        assert r["plausibility"] == 0.1 and r["masked_ms_per_token"] > 0  # the third arm
        ratio = r["masked_ratio"]  # (rounded: at exactly 1.3 either verdict is honest)
        assert r["masked_met"] is (ratio <= 1.3) or abs(ratio - 1.3) < 2e-3
        want = r["masked_ms_per_token"] / r["plain_ms_per_token"]
        assert r["masked_ratio"] == pytest.approx(want, 0.02)
    assert "| 2 |" in (tmp_path / "re_control.md").read_text()
    monkeypatch.setattr(sys, "argv", [*argv, "--probe", "topic"])
    with pytest.raises(SystemExit, match="no 'topic' value network"):
        bench_re_control.main()


@pytest.mark.gpu
def test_re_control_rides_the_cuda_graphs_on_gpu(value_bundle):
    """On CUDA the engine's persistent runner records the edit in its graphs (no eager fallback):
    RE-Control alone, both ways with DGLM (prompt guidance's companion rows too) and with the
    plausibility mask give the greedy tokens of the engine without the runner."""
    graphs = Engine.from_pretrained(value_bundle, device="cuda", fast_decode=True)
    eager = Engine.from_pretrained(value_bundle, device="cuda", fast_decode=False)
    assert graphs.decode_runner is not None and graphs.decode_runner.graphs
    cases = [
        ([(Control("sentiment", "positive"),)] * 2, graphs.re_control, {}),
        ([(Control("sentiment", "negative", method="both"),), ()], None, {}),
        ([(Control("sentiment", "negative", method="both"),), ()], None,
         {"prompt_guidance": 2.0}),  # with prompt guidance's companion rows
        ([(Control("sentiment", "positive", method="re-control"),)] * 2, None,
         {"re_control_plausibility": 0.2}),
    ]  # fmt: skip
    for controls, method, kw in cases:
        want = tokens(eager, controls, eager.re_control if method else None, temperature=0.0, **kw)
        got = tokens(graphs, controls, method, temperature=0.0, **kw)
        assert got == want
    recorded = graphs.decode_runner._hooked_graphs.values()  # recorded, not bypassed
    assert recorded and all(isinstance(g, torch.cuda.CUDAGraph) for g in recorded)
